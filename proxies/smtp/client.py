"""A sans-I/O SMTP client for onward delivery: one message per transaction, and with
keep_open several transactions over one connection.

RFC 5321 (SMTP), 1869 (EHLO), 1870 (SIZE), 2920 (PIPELINING), 3207 (STARTTLS), 6152
(8BITMIME), 6531 (SMTPUTF8), 2034 (enhanced status codes). No sockets, no asyncio: the driver
moves bytes and reacts to events.

    session = ClientSession(helo, sender, recipients, len(content), eight_bit=..., smtputf8=...,
                            tls="opportunistic")
    while True:
        writer.write(session.data_to_send())        # commands (and content) to send
        event = session.next_event()
        if event is NEED_DATA:         read, then session.receive_data(data) (b"" on EOF)
        elif StartTls:                 upgrade the transport, then session.tls_established()
        elif ReadyForContent:          session.send_content(content) (or in chunks, final=False)
        elif Finished / Failed:        write session.data_to_send() (QUIT) once more, close

`next_event()` does not raise for anything the server sends: a broken server ends the session
with `Failed(451 4.4.0 protocol error from server: ...)`. `LocalProtocolError` means the driver
misused the session.

Choices, after Postfix:
- A 5xx greeting is retried later (Postfix's smtp_skip_5xx_greeting): Failed with a 4xx reply.
- EHLO refused with 5xx: fall back to HELO (RFC 5321 3.2), unless after STARTTLS.
- tls="opportunistic": STARTTLS when offered; refused STARTTLS -> carry on in plain text.
  tls="required": no STARTTLS offered or it is refused -> Failed 451 4.7.4 (deferred).
  A TLS handshake failure is the driver's to handle (Postfix retries opportunistic TLS
  in plain text on a new connection).
- SMTPUTF8 needed but not offered: Failed 550 5.6.7 (RFC 6531 3.2; Postfix's text).
- 8-bit content and no 8BITMIME: Postfix converts MIME to quoted-printable; we never rewrite
  content (it would break DKIM signatures), so we send it as it is without BODY=, as Postfix
  does with disable_mime_output_conversion=yes (a knowing departure from RFC 6152 3, which
  most servers tolerate). With strict_8bitmime=True: Failed 554 5.6.3 instead.
- SIZE over the server's advertised limit: Failed 552 5.3.4 (Postfix bounces too).
- Data the server sends that answers nothing we sent (before EHLO, after 354, after the 220
  to STARTTLS: the plain-text response injection RFC 3207 5 warns of, the client-side twin of
  CVE-2011-0411) is a protocol error; an unsolicited 421 (server shutting down) ends the
  session with that 421.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Final, Literal

from proxies.smtp.dataframe import DotStuffer
from proxies.smtp.errors import LocalProtocolError, RemoteProtocolError
from proxies.smtp.events import (
    NEED_DATA,
    ClientEvent,
    Failed,
    Finished,
    NeedData,
    ReadyForContent,
    StartTls,
)
from proxies.smtp.reply import Reply, ReplyReader

__all__ = [
    "NEED_DATA",
    "ClientEvent",
    "ClientSession",
    "Failed",
    "Finished",
    "LocalProtocolError",
    "NeedData",
    "ReadyForContent",
    "RemoteProtocolError",
    "Reply",
    "StartTls",
    "TlsMode",
]

TlsMode = Literal["never", "opportunistic", "required"]

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
MAX_COMMAND_LINE: Final = 512


class _State(enum.Enum):
    GREETING = "greeting"            # waiting for the 220
    EHLO = "ehlo"                    # EHLO sent (again after STARTTLS)
    HELO = "helo"                    # EHLO refused, HELO sent
    STARTTLS = "starttls"            # STARTTLS sent
    TLS_HANDSHAKE = "tls-handshake"  # 220 to STARTTLS; the driver upgrades the transport
    ENVELOPE = "envelope"            # MAIL, RCPT and DATA replies due
    CONTENT = "content"              # 354 received; the driver sends the content
    END_OF_DATA = "end-of-data"      # content sent; the final reply (or a drained one) due
    DONE = "done"                    # Finished or Failed returned; QUIT queued if sensible
    RSET = "rset"                    # kept open, RSET sent before the next transaction


# Every legal move of the session, in one place (cf. h11/_state.py). `_move` turns anything
# else into a LocalProtocolError: a bug here, never the server's doing.
_TRANSITIONS: Final[Mapping[_State, frozenset[_State]]] = {
    _State.GREETING: frozenset({_State.EHLO, _State.DONE}),
    _State.EHLO: frozenset({_State.HELO, _State.STARTTLS, _State.ENVELOPE, _State.DONE}),
    _State.HELO: frozenset({_State.ENVELOPE, _State.DONE}),
    _State.STARTTLS: frozenset({_State.TLS_HANDSHAKE, _State.ENVELOPE, _State.DONE}),
    _State.TLS_HANDSHAKE: frozenset({_State.EHLO, _State.DONE}),
    _State.ENVELOPE: frozenset({_State.CONTENT, _State.END_OF_DATA, _State.DONE}),
    _State.CONTENT: frozenset({_State.END_OF_DATA, _State.DONE}),
    _State.END_OF_DATA: frozenset({_State.DONE}),
    # keep_open: a connection left in a clean state carries another transaction (RSET first).
    _State.DONE: frozenset({_State.RSET}),
    _State.RSET: frozenset({_State.ENVELOPE, _State.DONE}),
}

# What a reply answers; the replies come back in the order the commands went (RFC 2920 3.1).
_GREETING, _EHLO, _HELO, _STARTTLS = "greeting", "ehlo", "helo", "starttls"
_MAIL, _RCPT, _DATA, _END_OF_DATA, _DRAIN = "mail", "rcpt", "data", "content", "drain"
_RSET = "rset"


def _check_path(path: str, what: str, smtputf8: bool) -> str:
    if path.startswith("<") and path.endswith(">"):
        path = path[1:-1]
    # CR or LF in a path would let it inject commands; no control character belongs there.
    if any(ord(c) < 32 or ord(c) == 127 for c in path) or "<" in path or ">" in path:
        raise LocalProtocolError(f"{what} {path!r} contains characters not allowed in a path",
                                 Reply(501, "5.1.3", f"Bad {what} address syntax"))
    if not smtputf8 and not path.isascii():
        # RFC 6531 3.2: a non-ASCII address needs SMTPUTF8; the caller must say so.
        raise LocalProtocolError(f"{what} {path!r} is not ASCII but smtputf8 is False",
                                 Reply(553, "5.6.7", f"Non-ASCII {what} address needs SMTPUTF8"))
    return path


class ClientSession:
    """One SMTP client session delivering one message to `recipients`.

    `size` is the content's length in octets (CRLF line ends, before dot-stuffing), sent as
    SIZE= when the server offers SIZE (RFC 1870). `eight_bit`: the content is 8BITMIME
    (RFC 6152); `smtputf8`: the envelope or headers need SMTPUTF8 (RFC 6531).
    Raises `LocalProtocolError` for arguments that cannot be put on the wire.

    `keep_open=True` (a connection cache, like Postfix's): when a transaction ends with the
    connection in a clean state (`reusable`), no QUIT is queued; the driver then either calls
    `next_transaction()` for another message over the same connection (RSET first, RFC 5321
    4.1.1.5) or `quit()`.

    `canonical=True` (or set before a transaction's content): the caller vouches that the
    content has CRLF line ends only (normalised or refused when it was accepted), so it is not
    checked again chunk by chunk (a pass over every octet, the delivery process's largest cost
    per byte).
    """

    def __init__(self, helo_name: str, sender: str, recipients: Sequence[str], size: int, *,
                 eight_bit: bool, smtputf8: bool, tls: TlsMode = "opportunistic",
                 strict_8bitmime: bool = False, keep_open: bool = False,
                 canonical: bool = False) -> None:
        if not helo_name or not helo_name.isprintable() or " " in helo_name:
            raise LocalProtocolError(f"bad HELO name {helo_name!r}")
        if tls not in ("never", "opportunistic", "required"):
            raise LocalProtocolError(f"bad tls mode {tls!r}")
        self.helo_name = helo_name
        self.tls: TlsMode = tls
        self.strict_8bitmime = strict_8bitmime
        self.keep_open = keep_open
        self.canonical = canonical
        # True once a transaction ended with nothing outstanding and the server sane: the
        # connection may carry another one (keep_open only).
        self.reusable = False
        self._hello_done = False
        self._set_message(sender, recipients, size, eight_bit=eight_bit, smtputf8=smtputf8)

        # What the server told us.
        self.greeting: Reply | None = None
        self.extensions: dict[str, str] = {}   # EHLO keyword (upper case) -> parameters
        self.tls_active = False

        self._state = _State.GREETING
        self._replies = ReplyReader()
        self._outgoing: list[bytes] = []
        # Commands whose replies are due, oldest first: (kind, recipient or "").
        self._pending: deque[tuple[str, str]] = deque([(_GREETING, "")])
        # How many of the newest entries of _pending are not yet handed out by data_to_send.
        self._unflushed = 0
        self._eof = False
        self._pipelining = False

    def _set_message(self, sender: str, recipients: Sequence[str], size: int, *,
                     eight_bit: bool, smtputf8: bool) -> None:
        """Check and take one transaction's envelope; reset its progress."""
        if size < 0:
            raise LocalProtocolError("size must not be negative")
        if not recipients:
            raise LocalProtocolError("no recipients")
        self.sender = "" if sender == "<>" else _check_path(sender, "sender", smtputf8)
        # A recipient given twice is sent once; results are per distinct recipient.
        self.recipients: tuple[str, ...] = tuple(
            dict.fromkeys(_check_path(r, "recipient", smtputf8) for r in recipients))
        if not all(self.recipients):
            raise LocalProtocolError("empty recipient")
        for line in (f"MAIL FROM:<{self.sender}> SIZE={size} BODY=8BITMIME SMTPUTF8",
                     *(f"RCPT TO:<{r}>" for r in self.recipients)):
            if len(line.encode("utf-8")) + 2 > MAX_COMMAND_LINE:
                raise LocalProtocolError(f"command too long: {line[:60]!r}...")
        self.size = size
        self.eight_bit = eight_bit
        self.smtputf8 = smtputf8
        self._mail_refused: Reply | None = None
        self._results: dict[str, Reply] = {}
        self._accepted: list[str] = []
        self._stuffer: DotStuffer | None = None
        self._drained_outcome: Finished | Failed | None = None
        # The kind of command whose reply is being handled, for Failed.stage.
        self._answering: str | None = None
        self._outcome: Finished | Failed | None = None

    # --- the driver's interface -----------------------------------------------------------

    @property
    def stage(self) -> str:
        """Where the session is, for logs: one of the _State values."""
        return self._state.value

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; b"" when it closed the connection."""
        if self._state is _State.DONE:
            return  # e.g. the 221 to QUIT: nothing depends on it
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data received after the end of the stream")
        self._replies.receive_data(data)

    def data_to_send(self) -> bytes:
        """Everything queued for the server, to be written now (b"" when nothing)."""
        self._unflushed = 0
        if not self._outgoing:
            return b""
        # join() of a single bytes object returns it without a copy.
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        return data

    def next_event(self) -> ClientEvent:
        """The next event; `NEED_DATA` until the server's bytes decide something.

        Once `Finished` or `Failed` has been returned, it is returned again on every call.
        """
        if self._outcome is not None:
            return self._outcome
        if self._state is _State.CONTENT:
            raise LocalProtocolError("the server waits for the content: call send_content()")
        if self._state is _State.TLS_HANDSHAKE:
            raise LocalProtocolError("upgrade the transport, then call tls_established()")
        try:
            return self._process()
        except RemoteProtocolError as exc:
            assert exc.reply is not None
            return self._fail(exc.reply, self._stage_name(), quit=False)

    def next_transaction(self, sender: str, recipients: Sequence[str], size: int, *,
                         eight_bit: bool, smtputf8: bool) -> None:
        """Start another message over this connection (keep_open, after a `reusable` end):
        RSET, then the envelope as for the first one. Events start again from NEED_DATA."""
        if not self.reusable or self._state is not _State.DONE:
            raise LocalProtocolError("next_transaction() needs a reusable, finished session")
        self._set_message(sender, recipients, size, eight_bit=eight_bit, smtputf8=smtputf8)
        self.reusable = False
        self._outcome = None
        self._move(_State.RSET)
        self._command("RSET", _RSET)
        if "PIPELINING" in self.extensions and self._policy_refusal() is None:
            # RFC 2920 3.1: RSET may lead a group (only EHLO, DATA, VRFY, EXPN, TURN, QUIT
            # and NOOP must end one), so the envelope goes with it: one write and one round
            # trip fewer per message on a cached connection. _on_rset only checks the reply.
            self._send_envelope()

    def quit(self) -> None:
        """Queue QUIT for a kept-open session that will carry no more transactions."""
        if self._state is not _State.DONE:
            raise LocalProtocolError(f"quit() in state {self._state.value}")
        if self.reusable:
            self.reusable = False
            self._outgoing.append(b"QUIT\r\n")

    def tls_established(self) -> None:
        """The driver finished the TLS handshake: forget what the server said in plain text
        and say EHLO again (RFC 3207 4.2)."""
        if self._state is not _State.TLS_HANDSHAKE:
            raise LocalProtocolError(f"tls_established() in state {self._state.value}")
        if self._replies.has_data:
            # Plain text that arrived after the 220 would be taken as a reply over TLS: the
            # response injection RFC 3207 5 warns of.
            self._fail(Reply(451, "4.4.0", "protocol error from server: "
                                           "plain text after the 220 to STARTTLS"),
                       _STARTTLS, quit=False)
            return
        self.tls_active = True
        self.extensions = {}
        self._move(_State.EHLO)
        self._command(f"EHLO {self.helo_name}", _EHLO)

    def send_content(self, content: bytes, *, final: bool = True) -> None:
        """Queue message content (unstuffed, CRLF line ends) for `data_to_send()`.

        It is dot-stuffed on the way (RFC 5321 4.5.2). To stream, call with successive chunks
        and final=False, taking data_to_send() after each, then once with final=True (the
        chunk may be b""), which adds the terminator. A bare CR or LF in the content raises
        LocalProtocolError: normalise or reject it first.
        """
        if self._state is not _State.CONTENT or self._stuffer is None:
            raise LocalProtocolError(f"send_content() in state {self._state.value}")
        chunk = self._stuffer.feed(content)
        if chunk:
            self._outgoing.append(chunk)
        if final:
            self._outgoing.append(self._stuffer.finish())
            self._stuffer = None
            self._move(_State.END_OF_DATA)
            self._pending.append((_END_OF_DATA, ""))
            self._unflushed += 1

    # --- internals ---------------------------------------------------------------------------

    def _move(self, state: _State) -> None:
        if state not in _TRANSITIONS[self._state]:
            raise LocalProtocolError(f"illegal move {self._state.value} -> {state.value}")
        self._state = state

    def _command(self, line: str, kind: str, recipient: str = "") -> None:
        self._outgoing.append(line.encode("utf-8") + b"\r\n")
        self._pending.append((kind, recipient))
        self._unflushed += 1

    def _stage_name(self) -> str:
        if self._answering is not None:
            return self._answering
        if self._pending:
            return self._pending[0][0]
        return self._state.value

    def _process(self) -> ClientEvent:
        self._answering = None
        while True:
            if len(self._pending) <= self._unflushed:
                # Nothing we sent awaits a reply (the next command is not yet written).
                if self._replies.has_data:
                    return self._unsolicited()
                return NEED_DATA
            reply = self._replies.next_reply()
            if reply is None:
                if self._eof:
                    stage = self._stage_name()
                    return self._fail(
                        Reply(451, "4.4.2",
                              f"connection closed by server while waiting for the {stage} reply"),
                        stage, quit=False)
                return NEED_DATA
            kind, recipient = self._pending.popleft()
            self._answering = kind
            event = self._handle(kind, recipient, reply)
            if event is None:
                self._answering = None
            else:
                if isinstance(event, StartTls | ReadyForContent) and self._replies.has_data:
                    return self._unsolicited()
                return event

    def _unsolicited(self) -> ClientEvent:
        stage = self._stage_name()
        try:
            reply = self._replies.next_reply()
        except RemoteProtocolError:
            reply = None
        if reply is not None and reply.code == 421:
            # RFC 5321 3.8: a server shutting down may say 421 at any time, then close.
            return self._fail(reply, stage, quit=False)
        raise RemoteProtocolError(
            "unsolicited data", Reply(451, "4.4.0",
                                      f"protocol error from server: unsolicited data ({stage})"))

    def _fail(self, reply: Reply, stage: str, *, quit: bool = True) -> Failed:
        outcome = Failed(reply, stage)
        self._end(outcome, quit=quit)
        return outcome

    def _finish(self, *, quit: bool = True) -> Finished:
        session_reply = None
        if self._accepted:
            session_reply = self._results[self._accepted[0]]
        outcome = Finished({r: self._results[r] for r in self.recipients}, session_reply)
        self._end(outcome, quit=quit)
        return outcome

    def _end(self, outcome: Finished | Failed, *, quit: bool) -> None:
        # Reusable: the server is past its greeting and hello, every command we wrote has
        # been answered and nothing more has arrived, and it did not say 421 or misbehave.
        clean = (quit and self._hello_done and len(self._pending) == self._unflushed
                 and not self._replies.has_data and not self._eof
                 and not (isinstance(outcome, Failed) and outcome.stage == _RSET))
        self._move(_State.DONE)
        self._outcome = outcome
        self._pending.clear()
        self._unflushed = 0
        # Commands queued and not yet written will never be answered: drop them.
        self._outgoing.clear()
        if self.keep_open and clean:
            self.reusable = True
        elif quit:
            # RFC 5321 4.1.1.10. The 221 is not waited for: the message's fate is known.
            self._outgoing.append(b"QUIT\r\n")

    @staticmethod
    def _protocol_error(what: str, reply: Reply) -> RemoteProtocolError:
        text = f"protocol error from server: unexpected reply to {what}: {reply}"[:400]
        return RemoteProtocolError(text, Reply(451, "4.4.0", text))

    def _handle(self, kind: str, recipient: str, reply: Reply) -> ClientEvent | None:
        handler = {
            _GREETING: self._on_greeting,
            _EHLO: self._on_ehlo,
            _HELO: self._on_helo,
            _STARTTLS: self._on_starttls,
            _MAIL: self._on_mail,
            _DATA: self._on_data,
            _END_OF_DATA: self._on_end_of_data,
            _DRAIN: self._on_drain,
            _RSET: self._on_rset,
        }.get(kind)
        if handler is None:
            return self._on_rcpt(recipient, reply)
        return handler(reply)

    # Each handler takes the reply to one command and returns an event for the driver, or
    # None to carry on reading replies.

    def _on_greeting(self, reply: Reply) -> ClientEvent | None:
        # RFC 5321 4.2 / 3.1: 220 to talk, 554 (or 421) not to.
        self.greeting = reply
        if reply.code == 220:
            self._move(_State.EHLO)
            self._command(f"EHLO {self.helo_name}", _EHLO)
            return None
        if reply.code == 421 or reply.is_transient or reply.is_permanent:
            return self._fail(reply.as_transient(), _GREETING, quit=reply.code != 421)
        raise self._protocol_error("the connection", reply)

    def _on_ehlo(self, reply: Reply) -> ClientEvent | None:
        if reply.code // 100 == 2:
            # RFC 1869 4.3: the first line is the greeting, each other "keyword params".
            extensions = {}
            for line in reply.lines[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    extensions[keyword.upper()] = params.strip()
            self.extensions = extensions
            return self._after_hello()
        if reply.is_permanent and not self.tls_active and reply.code != 421:
            self._move(_State.HELO)
            self._command(f"HELO {self.helo_name}", _HELO)
            return None
        if reply.is_transient or reply.is_permanent:
            # After STARTTLS we must not fall back to HELO; like Postfix, retry later.
            return self._fail(reply.as_transient() if self.tls_active else reply, _EHLO,
                              quit=reply.code != 421)
        raise self._protocol_error("EHLO", reply)

    def _on_helo(self, reply: Reply) -> ClientEvent | None:
        if reply.code // 100 == 2:
            self.extensions = {}
            return self._after_hello()
        if reply.is_transient or reply.is_permanent:
            return self._fail(reply, _HELO, quit=reply.code != 421)
        raise self._protocol_error("HELO", reply)

    def _after_hello(self) -> ClientEvent | None:
        if not self.tls_active and self.tls != "never" and "STARTTLS" in self.extensions:
            self._move(_State.STARTTLS)
            self._command("STARTTLS", _STARTTLS)
            return None
        if not self.tls_active and self.tls == "required":
            return self._fail(
                Reply(451, "4.7.4", "TLS is required, but was not offered by the server"),
                _STARTTLS)
        return self._start_transaction()

    def _on_starttls(self, reply: Reply) -> ClientEvent | None:
        if reply.code == 220:
            # RFC 3207 4: the TLS handshake starts right after this reply; anything else the
            # server sent in plain text is an injection attempt (checked by _process).
            self._move(_State.TLS_HANDSHAKE)
            return StartTls()
        if reply.code == 421:
            return self._fail(reply, _STARTTLS, quit=False)
        if reply.is_transient or reply.is_permanent:
            if self.tls == "required":
                return self._fail(
                    Reply(451, "4.7.4", f"TLS is required, but STARTTLS was refused: {reply}"),
                    _STARTTLS)
            return self._start_transaction()
        raise self._protocol_error("STARTTLS", reply)

    def _on_rset(self, reply: Reply) -> ClientEvent | None:
        if reply.code // 100 == 2:
            # Pipelined, the envelope is already on its way (next_transaction).
            return self._start_transaction() if self._state is _State.RSET else None
        if reply.is_transient or reply.is_permanent:
            # A cached connection the server no longer wants: the message is not at fault.
            return self._fail(reply.as_transient(), _RSET, quit=reply.code != 421)
        raise self._protocol_error("RSET", reply)

    def _start_transaction(self) -> ClientEvent | None:
        self._hello_done = True
        refusal = self._policy_refusal()
        if refusal is not None:
            return self._fail(refusal, "policy")
        self._send_envelope()
        return None

    def _policy_refusal(self) -> Reply | None:
        """Why this message cannot go to this server at all, from its EHLO keywords."""
        extensions = self.extensions
        if self.smtputf8 and "SMTPUTF8" not in extensions:
            return Reply(550, "5.6.7", "SMTPUTF8 is required, but was not offered by the server")
        if self.eight_bit and self.strict_8bitmime and "8BITMIME" not in extensions:
            return Reply(554, "5.6.3", "8-bit content, but the server does not offer 8BITMIME")
        # RFC 1870 4: "SIZE" alone or "SIZE 0" means no fixed limit.
        limit = extensions.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < self.size:
            return Reply(552, "5.3.4", f"message size {self.size} exceeds the size limit "
                                       f"{int(limit)} of the server")
        return None

    def _send_envelope(self) -> None:
        extensions = self.extensions
        params = []
        if "SIZE" in extensions:
            params.append(f"SIZE={self.size}")
        if self.eight_bit and "8BITMIME" in extensions:
            params.append("BODY=8BITMIME")
        if self.smtputf8:
            params.append("SMTPUTF8")
        self._move(_State.ENVELOPE)
        self._command(" ".join([f"MAIL FROM:<{self.sender}>", *params]), _MAIL)
        # RFC 2920 3.1: MAIL, RCPT and DATA may go in one group; the replies come in order.
        self._pipelining = "PIPELINING" in extensions
        if self._pipelining:
            for recipient in self.recipients:
                self._command(f"RCPT TO:<{recipient}>", _RCPT, recipient)
            self._command("DATA", _DATA)

    def _on_mail(self, reply: Reply) -> ClientEvent | None:
        if reply.code // 100 == 2:
            if not self._pipelining:
                self._command(f"RCPT TO:<{self.recipients[0]}>", _RCPT, self.recipients[0])
            return None
        if reply.code == 421:
            return self._fail(reply, _MAIL, quit=False)
        if reply.is_transient or reply.is_permanent:
            if self._pipelining:
                # RCPT and DATA replies are still coming; _on_data decides.
                self._mail_refused = reply
                return None
            return self._fail(reply, _MAIL)
        raise self._protocol_error("MAIL", reply)

    def _on_rcpt(self, recipient: str, reply: Reply) -> ClientEvent | None:
        if reply.code == 421:
            return self._fail(reply, _RCPT, quit=False)
        if reply.code // 100 not in (2, 4, 5):
            raise self._protocol_error("RCPT", reply)
        self._results[recipient] = reply
        if reply.code // 100 == 2 and self._mail_refused is None:
            self._accepted.append(recipient)
        if self._pipelining:
            return None
        index = self.recipients.index(recipient) + 1
        if index < len(self.recipients):
            following = self.recipients[index]
            self._command(f"RCPT TO:<{following}>", _RCPT, following)
            return None
        if not self._accepted:
            return self._finish()
        self._command("DATA", _DATA)
        return None

    def _on_data(self, reply: Reply) -> ClientEvent | None:
        if self._mail_refused is not None or not self._accepted:
            # Only pipelining gets here: DATA was sent before we knew it was in vain.
            outcome: Finished | Failed
            if self._mail_refused is not None:
                outcome = Failed(self._mail_refused, _MAIL)
            else:
                outcome = Finished({r: self._results[r] for r in self.recipients}, None)
            if reply.code == 354:
                # RFC 2920 3.1: a server that says 354 anyway gets an empty message, whose
                # end-of-data reply we wait for and ignore.
                self._drained_outcome = outcome
                self._move(_State.END_OF_DATA)
                self._outgoing.append(b".\r\n")
                self._pending.append((_DRAIN, ""))
                self._unflushed += 1
                return None
            self._end(outcome, quit=reply.code != 421)
            return outcome
        if reply.code == 354:
            self._move(_State.CONTENT)
            self._stuffer = DotStuffer(check=not self.canonical)
            return ReadyForContent()
        if reply.is_transient or reply.is_permanent:
            for recipient in self._accepted:
                self._results[recipient] = reply
            return self._finish(quit=reply.code != 421)
        raise self._protocol_error("DATA", reply)

    def _on_end_of_data(self, reply: Reply) -> ClientEvent | None:
        if reply.code // 100 not in (2, 4, 5):
            raise self._protocol_error("the end of data", reply)
        for recipient in self._accepted:
            self._results[recipient] = reply
        return self._finish(quit=reply.code != 421)

    def _on_drain(self, reply: Reply) -> ClientEvent | None:
        outcome = self._drained_outcome
        assert outcome is not None
        self._end(outcome, quit=reply.code != 421)
        return outcome
