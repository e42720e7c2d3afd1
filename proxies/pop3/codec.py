"""POP3 on the wire, both directions, without I/O (RFC 1939, RFC 2449, RFC 2595, RFC 5034).

Like h11: `receive_data(bytes)` only buffers (b"" means the peer closed), `next_event()` returns
one event or `NEED_DATA`, and the functions at the bottom turn replies back into bytes. No
socket, no asyncio here; the proxy's driver (`proxies.pop3.session`) does the I/O.

- `ClientReader` parses what a POP3 client sends: command lines, and inside an AUTH exchange
  the SASL response lines (which are credentials, never commands).
- `ServerReader` parses what a POP3 server sends: the greeting, status lines, SASL
  continuations ("+ " lines, RFC 5034 4) and multi-line responses. Whether a `+OK` starts a
  multi-line response depends on the command it answers, so the driver says what it sent
  with `expect(command)`.

Multi-line responses (RFC 1939 3): the lines after the status line end with a line holding
only ".", and every line of the content that starts with "." is sent with one more "."
("byte-stuffing"). The content as the driver sees it is everything between the CRLF that ends
the status line and that final ".\\r\\n", so it ends with CRLF (or is empty). `ServerReader`
hands it out either as the server sent it (`unstuff=False`: relayed unchanged) or with the
stuffing removed (`unstuff=True`: the message itself, for scanning); `DotStuffer` puts the
stuffing back, so unstuff + stuff gives back exactly what a correct server sent.

The session states (RFC 1939 3: AUTHORIZATION, TRANSACTION, UPDATE) and which command is
valid in which live in `proxies.pop3.states`.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Final, Literal

from proxies.pop3.errors import LocalProtocolError, RemoteProtocolError, err

__all__ = [
    "MAX_CLIENT_LINE",
    "MAX_SERVER_LINE",
    "NEED_DATA",
    "BodyData",
    "BodyEnd",
    "ClientReader",
    "Closed",
    "Command",
    "DotStuffer",
    "NeedData",
    "SaslLine",
    "ServerReader",
    "Status",
    "dot_stuff",
    "dot_unstuff",
    "is_multiline",
    "multiline",
]

# RFC 2449 4: "Keywords and arguments ... [commands are] up to 255 octets". SASL initial
# responses (RFC 5034 4) may be longer, so the client side allows more; anything beyond is
# refused rather than buffered without end.
MAX_CLIENT_LINE: Final = 8192
# RFC 2449 4: "Responses may be up to 512 characters long"; generous for real servers.
MAX_SERVER_LINE: Final = 8192

# Commands whose arguments are credentials: logs show only the verb.
SECRET_VERBS: Final = frozenset({"USER", "PASS", "APOP", "AUTH"})

_VERB = re.compile(rb"^[A-Za-z][A-Za-z0-9-]{0,39}$")
# RFC 1939 7: the APOP timestamp is a msg-id in the greeting, "<process-ID.clock@hostname>".
_TIMESTAMP = re.compile(rb"<[^<>\s]*@[^<>\s]*>")


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A command line from the client; `raw` is the line as sent (relayed unchanged)."""

    verb: str  # upper-cased keyword, "" for an empty line
    argument: bytes  # what follows the keyword and one space, without the line ending
    raw: bytes

    @property
    def arguments(self) -> list[bytes]:
        return self.argument.split()

    def loggable(self) -> str:
        """The command for a log line: credentials replaced."""
        if self.verb in SECRET_VERBS:
            if self.verb == "AUTH" and self.arguments:
                return f"AUTH {self.arguments[0].decode('ascii', 'replace')[:20]} [hidden]"
            return f"{self.verb} [hidden]"
        return (self.verb + " " + self.argument.decode("ascii", "replace")[:40]).strip()


@dataclass(frozen=True)
class SaslLine:
    """One client response inside an AUTH exchange (RFC 5034 4): base64, or "*" to cancel."""

    raw: bytes

    @property
    def data(self) -> bytes:
        return self.raw.rstrip(b"\r\n")


@dataclass(frozen=True)
class Status:
    """A status line from the server: +OK, -ERR, or a SASL continuation ("+ ...")."""

    kind: Literal["ok", "err", "continue"]
    text: bytes  # after the indicator and its space, without the line ending
    raw: bytes
    greeting: bool = False

    @property
    def ok(self) -> bool:
        return self.kind == "ok"

    @property
    def timestamp(self) -> bytes | None:
        """The APOP timestamp of a greeting (RFC 1939 7), if it has one."""
        match = _TIMESTAMP.search(self.text) if self.greeting else None
        return match.group(0) if match else None


@dataclass(frozen=True)
class BodyData:
    """A piece of multi-line content (stuffed as sent, or unstuffed, as `expect` asked)."""

    data: bytes


@dataclass(frozen=True)
class BodyEnd:
    """The final "." line of a multi-line response has arrived."""


@dataclass(frozen=True)
class Closed:
    """The peer closed its side; nothing more will come."""


ClientEvent = Command | SaslLine | Closed
ServerEvent = Status | BodyData | BodyEnd | Closed


def is_multiline(verb: str, has_argument: bool) -> bool:
    """Does a +OK to this command carry a multi-line response?

    RFC 1939 5-7: LIST and UIDL without an argument list every message, with one they answer
    on the status line; RETR and TOP carry the message. RFC 2449 5: CAPA. AUTH without a
    mechanism lists the mechanisms (a common extension, Dovecot among others); with one it is
    a SASL exchange (RFC 5034). Anything else, including commands we do not know, answers on
    one line.
    """
    if verb in ("RETR", "TOP", "CAPA"):
        return True
    if verb in ("LIST", "UIDL", "AUTH"):
        return not has_argument
    return False


# --- reading lines ----------------------------------------------------------------------------


def _take_line(buffer: bytearray, limit: int) -> bytes | None:
    """Remove and return one LF-terminated line, or None if it has not all arrived.

    Raises ValueError when `limit` octets arrive with no line end.
    """
    end = buffer.find(b"\n", 0, limit)
    if end < 0:
        if len(buffer) >= limit:
            raise ValueError("line too long")
        return None
    line = bytes(buffer[: end + 1])
    del buffer[: end + 1]
    return line


def _strip_eol(line: bytes) -> bytes:
    return line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")


# --- the client side --------------------------------------------------------------------------


class ClientReader:
    """What a POP3 client sends, as `Command` (or, after `expect_sasl()`, one `SaslLine`).

    A line longer than MAX_CLIENT_LINE raises RemoteProtocolError carrying the reply; the rest
    of that line is then discarded and reading goes on with the next one.
    """

    def __init__(self, max_line: int = MAX_CLIENT_LINE) -> None:
        self._buffer = bytearray()
        self._closed = False
        self._sasl = False
        self._discarding = False
        self.max_line = max_line

    def receive_data(self, data: bytes | memoryview) -> None:
        if data:
            self._buffer += data
        else:
            self._closed = True

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as events (pipelined commands)."""
        return len(self._buffer)

    @property
    def has_line(self) -> bool:
        """A whole line is buffered: the client's next command is here."""
        return b"\n" in self._buffer

    def discard_buffer(self) -> bytes:
        """Drop what is buffered: plaintext that arrived after STLS must not be read as if it
        came over TLS (RFC 2595 4, the STARTTLS command injection of CVE-2011-0411)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def expect_sasl(self) -> None:
        """The next line is a SASL response to a server continuation, not a command."""
        self._sasl = True

    def next_event(self) -> ClientEvent | NeedData:
        while self._discarding:
            end = self._buffer.find(b"\n")
            if end < 0:
                self._buffer.clear()
                return Closed() if self._closed else NEED_DATA
            del self._buffer[: end + 1]
            self._discarding = False
        try:
            line = _take_line(self._buffer, self.max_line)
        except ValueError:
            # Drop only what was read of the overlong line: the loop above drops its rest, up
            # to its LF, and the lines after it (pipelined) may be in the buffer already.
            del self._buffer[: self.max_line]
            self._discarding = True
            raise RemoteProtocolError(
                "client line too long", err(f"line too long (at most {self.max_line} octets)")
            ) from None
        if line is None:
            # A last line without its LF, then EOF: the client is gone; it cannot want an
            # answer to half a command.
            return Closed() if self._closed else NEED_DATA
        if self._sasl:
            self._sasl = False
            return SaslLine(line)
        text = _strip_eol(line)
        keyword, _, argument = text.partition(b" ")
        verb = keyword.upper().decode("ascii") if _VERB.match(keyword) else ""
        if not verb and text.strip():
            verb = "?"  # not a keyword at all: relayed as an unknown command
        return Command(verb, argument, line)


# --- the server side --------------------------------------------------------------------------

_ServerState = Literal["greeting", "idle", "status", "body", "done"]


class ServerReader:
    """What a POP3 server sends.

    First event: the greeting (`Status` with greeting=True). Then, after each `expect()`, the
    status line and, for a multi-line response, `BodyData`... `BodyEnd`. A SASL continuation
    (`Status` kind "continue") leaves the reader waiting for another status line of the same
    AUTH exchange.
    """

    def __init__(self, max_line: int = MAX_SERVER_LINE) -> None:
        self._buffer = bytearray()
        self._closed = False
        self._state: _ServerState = "greeting"
        self._verb = ""
        self._multiline = False
        self._unstuff = False
        self._bol = True  # the next byte of content starts a line
        self._events: deque[ServerEvent] = deque()
        self.max_line = max_line

    def receive_data(self, data: bytes | memoryview) -> None:
        if data:
            self._buffer += data
        else:
            self._closed = True

    @property
    def state(self) -> str:
        return self._state

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as events."""
        return len(self._buffer)

    def take_buffer(self) -> bytes:
        """What is buffered (for a passthrough relay after STLS)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def expect(self, command: Command, *, unstuff: bool = False) -> None:
        """The driver has sent `command`; read its response next.

        `unstuff`: hand out multi-line content without the byte-stuffing (the message as
        stored), instead of as sent.
        """
        if self._state not in ("idle", "status"):
            raise LocalProtocolError(f"cannot send {command.verb} while the server reader is "
                                     f"in state {self._state!r}")
        self._state = "status"
        self._verb = command.verb
        self._multiline = is_multiline(command.verb, bool(command.argument.strip()))
        self._unstuff = unstuff

    def next_event(self) -> ServerEvent | NeedData:
        if self._events:
            return self._events.popleft()
        if self._state == "body":
            return self._body()
        if self._state in ("greeting", "status"):
            return self._status()
        if self._buffer and self._state == "idle":
            # Nothing was asked: a server talking out of turn is broken (or hostile).
            raise RemoteProtocolError("the server sent data nobody asked for",
                                      err("[SYS/TEMP] the mail server sent an invalid reply"))
        return Closed() if self._closed else NEED_DATA

    def _status(self) -> ServerEvent | NeedData:
        try:
            line = _take_line(self._buffer, self.max_line)
        except ValueError:
            raise RemoteProtocolError(
                "the server's status line is too long",
                err("[SYS/TEMP] the mail server sent an invalid reply")) from None
        if line is None:
            if self._closed:
                self._state = "done"
                return Closed()
            return NEED_DATA
        text = _strip_eol(line)
        greeting = self._state == "greeting"
        if text.startswith(b"+OK"):
            status = Status("ok", text[3:].lstrip(b" "), line, greeting)
        elif text.startswith(b"-ERR"):
            status = Status("err", text[4:].lstrip(b" "), line, greeting)
        elif text.startswith(b"+") and self._verb == "AUTH" and not greeting:
            # RFC 5034 4: "+" SP base64 (or a bare "+" for an empty challenge).
            return Status("continue", text[1:].lstrip(b" "), line)
        else:
            self._state = "done"
            raise RemoteProtocolError(
                f"the server sent {text[:60]!r} where a status line belongs",
                err("[SYS/TEMP] the mail server sent an invalid reply"))
        if status.ok and self._multiline and not greeting:
            self._state = "body"
            self._bol = True
        else:
            self._state = "idle"
        return status

    def _body(self) -> ServerEvent | NeedData:
        """Content up to the terminating ".\\r\\n" line, a whole buffer at a time.

        A "." can start a line at the start of the buffer (if the content so far ended a line)
        or after any LF. At each: ".\\r\\n" ends the response; anything else is a stuffed line
        (RFC 1939 3) whose first dot goes when unstuffing. A ".", ".\\r" at the very end of the
        buffer may be the start of the terminator: it waits for more.
        """
        data = bytes(self._buffer)
        self._buffer.clear()
        if not data:
            if self._closed:
                self._state = "done"
                return Closed()
            return NEED_DATA
        pieces: list[bytes] = []
        start = 0
        dot = 0 if self._bol and data[:1] == b"." else _line_dot(data, 0)
        while dot >= 0:
            rest = data[dot:dot + 3]
            if len(rest) < 3 and b".\r\n".startswith(rest):
                if self._closed:
                    break  # never completes: the truncated tail is content, then Closed
                # Maybe the terminator: keep it for the next call.
                self._buffer[:0] = data[dot:]
                data = data[:dot]
                break
            if rest == b".\r\n":
                pieces.append(data[start:dot])
                self._buffer[:0] = data[dot + 3:]
                self._state = "idle"
                content = b"".join(pieces)
                if content:
                    self._events.append(BodyEnd())
                    return BodyData(content)
                return BodyEnd()
            if self._unstuff:
                pieces.append(data[start:dot])
                start = dot + 1
            dot = _line_dot(data, dot + 1)
        pieces.append(data[start:])
        if data:
            self._bol = data.endswith(b"\n")
        content = b"".join(pieces)
        if content:
            return BodyData(content)
        return self._body() if self._buffer and self._closed else NEED_DATA


def _line_dot(data: bytes, start: int) -> int:
    """Index of the next "." that starts a line (follows an LF) at or after `start`, or -1."""
    found = data.find(b"\n.", max(start - 1, 0))
    return found + 1 if found >= 0 else -1


# --- writing ----------------------------------------------------------------------------------


def dot_unstuff(stuffed: bytes) -> bytes:
    """The content of a multi-line response from its stuffed form (no terminator)."""
    if stuffed.startswith(b"."):
        stuffed = stuffed[1:]
    return stuffed.replace(b"\n.", b"\n")


def dot_stuff(content: bytes) -> bytes:
    """Content as a multi-line response carries it: each line starting with "." gets one more."""
    stuffed = content.replace(b"\n.", b"\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


class DotStuffer:
    """`dot_stuff` for content that arrives in pieces, plus the terminator.

    The terminator is ".\\r\\n" after content that ends with a line end, else "\\r\\n.\\r\\n"
    (RFC 1939 3: the response ends with CRLF "." CRLF).
    """

    def __init__(self) -> None:
        self._bol = True
        self._ended = False

    def send(self, content: bytes) -> bytes:
        if self._ended:
            raise LocalProtocolError("content after the end of a multi-line response")
        if not content:
            return b""
        stuffed = content.replace(b"\n.", b"\n..")
        if self._bol and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        self._bol = content.endswith(b"\n")
        return stuffed

    def end(self) -> bytes:
        if self._ended:
            raise LocalProtocolError("a multi-line response ends once")
        self._ended = True
        return b".\r\n" if self._bol else b"\r\n.\r\n"


def multiline(status: bytes, content: bytes) -> bytes:
    """A whole multi-line response: `status` line (with CRLF), stuffed content, terminator."""
    stuffer = DotStuffer()
    return status + stuffer.send(content) + stuffer.end()
