"""A sans-I/O SMTP probe: does a server accept one recipient? (Postfix's verify(8) probes.)

The conversation is the start of a delivery that never sends a message (RFC 5321 3.3):

    220 greeting, EHLO (HELO if EHLO is refused), STARTTLS when offered and wanted,
    MAIL FROM:<>, RCPT TO:<recipient>, then QUIT (the transaction is abandoned, 4.1.1.10)

The null reverse-path is what Postfix's probes used first and what RFC 5321 4.5.5 says every
server must accept; with PIPELINING (RFC 2920) MAIL and RCPT go in one write. What the replies
mean, as `ProbeDone.status`:

- "ok": RCPT got 2xx. "refused": RCPT got 5xx, the server does not want this recipient.
- "tempfail": a 4xx (or 421) anywhere, or the server broke the protocol or closed the
  connection: nothing is known about the recipient yet.
- "unverifiable": MAIL FROM:<> got 5xx, or the recipient needs SMTPUTF8 the server does not
  offer. The server will not answer the question, which says nothing about the recipient;
  refusing mail for that would block every message to a server whose policy we cannot change.

No sockets, no asyncio (cf. proxies.smtp.client): the driver (proxies.smtp.verify) moves
the bytes and upgrades the transport on `StartTls`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final, Literal

from proxies.smtp.errors import LocalProtocolError, RemoteProtocolError
from proxies.smtp.events import NEED_DATA, NeedData, StartTls
from proxies.smtp.reply import Reply, ReplyReader

__all__ = ["ProbeDone", "ProbeEvent", "ProbeSession", "ProbeStatus"]

ProbeStatus = Literal["ok", "refused", "tempfail", "unverifiable"]

# What each reply answers, for the stage of ProbeDone ("connect" and "timeout" are the driver's).
_GREETING, _EHLO, _HELO, _STARTTLS, _MAIL, _RCPT = (
    "greeting", "ehlo", "helo", "starttls", "mail", "rcpt")
# Postfix's wording, for the text a client may be shown: "(in reply to RCPT TO command)".
COMMAND_NAMES: Final = {
    _GREETING: "the initial greeting", _EHLO: "EHLO command", _HELO: "HELO command",
    _STARTTLS: "STARTTLS command", _MAIL: "MAIL FROM command", _RCPT: "RCPT TO command",
}
# Stages before the transaction: a failure there is the server's state, not the recipient's,
# so the driver tries the next address of the hop (as delivery does, RFC 5321 5.1).
BEFORE_MAIL: Final = frozenset({"connect", _GREETING, _EHLO, _HELO, _STARTTLS, "tls"})


@dataclass(frozen=True)
class ProbeDone:
    """The probe's answer; `reply` is the server's reply that decided it (or the driver's,
    for a connection that failed), `stage` the command it answered."""

    status: ProbeStatus
    reply: Reply
    stage: str
    # The server's address, set by the driver: the reply is that server's own.
    host: str | None = None


ProbeEvent = NeedData | StartTls | ProbeDone


class ProbeSession:
    """One probe for `recipient` (a path without angle brackets, already checked)."""

    def __init__(self, helo_name: str, recipient: str, *, tls: bool) -> None:
        if not helo_name or not helo_name.isprintable() or " " in helo_name:
            raise LocalProtocolError(f"bad HELO name {helo_name!r}")
        if not recipient or any(ord(c) < 32 or ord(c) == 127 or c in "<>" for c in recipient):
            raise LocalProtocolError(f"bad recipient {recipient!r}")
        self.helo_name = helo_name
        self.recipient = recipient
        self.tls_wanted = tls
        self.tls_active = False
        self.extensions: dict[str, str] = {}
        self._replies = ReplyReader()
        self._outgoing: list[bytes] = []
        self._pending: deque[str] = deque([_GREETING])
        self._eof = False
        self._done: ProbeDone | None = None
        self._answering: str | None = None  # the command whose reply is being handled

    # --- the driver's interface -----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; b"" when it closed the connection."""
        if self._done is not None:
            return  # the 221 to QUIT, or replies to pipelined commands we no longer need
        if not data:
            self._eof = True
            return
        self._replies.receive_data(data)

    def data_to_send(self) -> bytes:
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        return data

    def next_event(self) -> ProbeEvent:
        """`NEED_DATA` until the replies decide; `ProbeDone` again on every later call."""
        if self._done is not None:
            return self._done
        try:
            return self._process()
        except RemoteProtocolError as exc:
            assert exc.reply is not None
            return self._finish("tempfail", exc.reply, self._answering or self._stage(),
                                quit=False)

    def tls_established(self) -> None:
        """The transport is now TLS: forget the plain-text EHLO and say it again (RFC 3207
        4.2)."""
        if self._done is not None:
            return
        if self._replies.has_data:
            # Plain text after the 220 to STARTTLS: the injection RFC 3207 5 warns of.
            self._finish("tempfail", Reply(451, "4.4.0", "protocol error from server: plain "
                                           "text after the 220 to STARTTLS"), _STARTTLS,
                         quit=False)
            return
        self.tls_active = True
        self.extensions = {}
        self._command(f"EHLO {self.helo_name}", _EHLO)

    # --- internals ---------------------------------------------------------------------------

    def _command(self, line: str, kind: str) -> None:
        self._outgoing.append(line.encode("utf-8") + b"\r\n")
        self._pending.append(kind)

    def _stage(self) -> str:
        return self._pending[0] if self._pending else _RCPT

    def _finish(self, status: ProbeStatus, reply: Reply, stage: str, *,
                quit: bool = True) -> ProbeDone:
        self._done = ProbeDone(status, reply, stage)
        self._outgoing.clear()
        self._pending.clear()
        if quit:  # not after a 421, EOF or a protocol error: the server is gone or insane
            self._outgoing.append(b"QUIT\r\n")
        return self._done

    def _process(self) -> ProbeEvent:
        self._answering = None
        while True:
            if not self._pending:
                if self._replies.has_data:
                    raise RemoteProtocolError("unsolicited data", Reply(
                        451, "4.4.0", "protocol error from server: unsolicited data"))
                return NEED_DATA
            reply = self._replies.next_reply()
            if reply is None:
                if self._eof:
                    stage = self._stage()
                    return self._finish("tempfail", Reply(
                        451, "4.4.2", f"connection closed by server while waiting for the "
                                      f"{stage} reply"), stage, quit=False)
                return NEED_DATA
            kind = self._answering = self._pending.popleft()
            if reply.code == 421:  # RFC 5321 3.8: shutting down, at any point
                return self._finish("tempfail", reply, kind, quit=False)
            event = self._handle(kind, reply)
            if event is not None:
                if isinstance(event, StartTls) and self._replies.has_data:
                    raise RemoteProtocolError("data after 220 to STARTTLS", Reply(
                        451, "4.4.0", "protocol error from server: plain text after the "
                                      "220 to STARTTLS"))
                return event

    def _handle(self, kind: str, reply: Reply) -> ProbeEvent | None:
        if kind == _GREETING:
            if reply.code == 220:
                self._command(f"EHLO {self.helo_name}", _EHLO)
                return None
            # A 5xx greeting is retried later by delivery (smtp_skip_5xx_greeting): transient.
            return self._finish("tempfail", reply, kind)
        if kind == _EHLO:
            if reply.code // 100 == 2:
                for line in reply.lines[1:]:  # RFC 1869 4.3: "keyword params"
                    keyword, _, params = line.strip().partition(" ")
                    if keyword:
                        self.extensions[keyword.upper()] = params.strip()
                return self._after_hello()
            if reply.is_permanent and not self.tls_active:
                self._command(f"HELO {self.helo_name}", _HELO)  # RFC 5321 3.2
                return None
            return self._finish("tempfail", reply, kind)
        if kind == _HELO:
            if reply.code // 100 == 2:
                return self._after_hello()
            return self._finish("tempfail", reply, kind)
        if kind == _STARTTLS:
            if reply.code == 220:
                return StartTls()
            return self._start_transaction()  # opportunistic: refused, carry on in plain text
        if kind == _MAIL:
            if reply.code // 100 == 2:
                if "PIPELINING" not in self.extensions:
                    self._command(f"RCPT TO:<{self.recipient}>", _RCPT)
                return None
            # 4xx: ask again later. 5xx to the null sender: the server will not tell us.
            return self._finish("tempfail" if reply.is_transient else "unverifiable", reply,
                                kind)
        if kind == _RCPT:
            if reply.code // 100 == 2:
                return self._finish("ok", reply, kind)
            if reply.is_permanent:
                return self._finish("refused", reply, kind)
            return self._finish("tempfail", reply, kind)
        raise AssertionError(f"reply kind {kind!r}")  # pragma: no cover

    def _after_hello(self) -> ProbeEvent | None:
        if self.tls_wanted and not self.tls_active and "STARTTLS" in self.extensions:
            self._command("STARTTLS", _STARTTLS)
            return None
        return self._start_transaction()

    def _start_transaction(self) -> ProbeEvent | None:
        params = ""
        if not self.recipient.isascii():
            if "SMTPUTF8" not in self.extensions:  # RFC 6531 3.2: cannot even ask
                return self._finish("unverifiable", Reply(
                    550, "5.6.7", "SMTPUTF8 is required, but was not offered by the server"),
                    "policy")
            params = " SMTPUTF8"
        self._command(f"MAIL FROM:<>{params}", _MAIL)
        if "PIPELINING" in self.extensions:  # RFC 2920 3.1: MAIL and RCPT in one group
            self._command(f"RCPT TO:<{self.recipient}>", _RCPT)
        return None
