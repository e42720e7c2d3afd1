"""SMTP replies: the value type, and a sans-I/O reader of a server's reply stream.

RFC 5321 4.2: a reply is one or more lines "ddd-text" ending with "ddd text" (or bare "ddd"),
all with the same code, each line at most 512 octets with its CRLF (4.5.3.1.5). RFC 2034/3463:
with ENHANCEDSTATUSCODES the text of every line starts with "class.subject.detail", where the
class repeats the reply code's first digit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from proxies.smtp.errors import RemoteProtocolError

__all__ = ["MAX_REPLY_LINE", "MAX_REPLY_LINES", "Reply", "ReplyReader"]

# RFC 5321 4.5.3.1.5: "The maximum total length of a reply line including the reply code and
# the <CRLF> is 512 octets."
MAX_REPLY_LINE: Final = 512
# RFC 5321 sets no limit on the number of lines; an EHLO reply has a dozen or two. A server
# sending more is broken or hostile, and we would otherwise buffer without bound.
MAX_REPLY_LINES: Final = 100

_REPLY_LINE = re.compile(r"([2-5][0-9][0-9])(?:([ -])(.*))?", re.DOTALL)
# RFC 3463 2: class "." subject "." detail; subject 1-3 digits, detail 1-3 digits.
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: +|$)")
# Control characters a server has no business sending in reply text (RFC 5321 4.2 textstring is
# HT and printable ASCII; RFC 6531 3.7.4 allows UTF-8). We replace rather than reject them, and
# so never hand CR, LF or NUL on to logs, queue files or our own clients.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Reply:
    """One SMTP reply. `text` holds the lines without code and enhanced code, joined by "\\n".

    `str(reply)` is one line, safe for logs and queue records: "250 2.0.0 Ok" (the lines of a
    multi-line reply joined by spaces); `wire()` gives the multi-line form to send to a peer.
    """

    code: int
    enhanced: str | None
    text: str

    @property
    def is_positive(self) -> bool:
        """2yz positive completion or 3yz positive intermediate (RFC 5321 4.2.1)."""
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """4yz: transient negative completion, try again later."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5yz: permanent negative completion, do not repeat."""
        return 500 <= self.code < 600

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n")

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        text = " ".join(line.strip() for line in self.lines if line.strip())
        if text:
            parts.append(text)
        return " ".join(parts)

    def wire(self) -> str:
        """The reply as lines for the wire, joined by CRLF, without the final CRLF."""
        lines = self.lines
        out = []
        for index, line in enumerate(lines):
            separator = " " if index == len(lines) - 1 else "-"
            rest = " ".join(p for p in (self.enhanced, line) if p)
            out.append(f"{self.code}{separator}{rest}" if rest or separator == "-"
                       else str(self.code))
        return "\r\n".join(out)

    def as_transient(self) -> Reply:
        """This reply with a 4yz class (code 554 -> 454, 5.7.1 -> 4.7.1): for a server's
        permanent answer we choose to retry, as Postfix does with a 5xx greeting."""
        if not self.is_permanent:
            return self
        enhanced = "4" + self.enhanced[1:] if self.enhanced else None
        return Reply(self.code - 100, enhanced, self.text)


def _protocol_error(detail: str) -> RemoteProtocolError:
    # RFC 3463 4.4.0: "other or undefined network or routing status"; transient, so the
    # message is retried (perhaps at another MX) rather than bounced for a broken server.
    reply = Reply(451, "4.4.0", f"protocol error from server: {detail}")
    return RemoteProtocolError(f"protocol error from server: {detail}", reply)


def _describe(raw: bytes) -> str:
    shown = repr(bytes(raw[:60]))
    return shown + ("..." if len(raw) > 60 else "")


class ReplyReader:
    """Turns a server's byte stream into `Reply` values.

    `receive_data(bytes)` buffers; `next_reply()` returns one complete reply or None when more
    bytes are needed, and raises `RemoteProtocolError` (carrying a 451 4.4.0 reply) for anything
    that is not a reply. A bare LF is accepted as a line end, as Postfix's client does; replies
    are not message content, so this does not open a smuggling hole.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[tuple[int, str]] = []

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def has_data(self) -> bool:
        """Whether bytes were received that are not yet part of a returned reply."""
        return bool(self._buffer or self._lines)

    def clear(self) -> None:
        """Forget everything buffered (RFC 3207 4.2: nothing from before TLS is kept)."""
        self._buffer.clear()
        self._lines.clear()

    def next_reply(self) -> Reply | None:
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) >= MAX_REPLY_LINE:
                    raise _protocol_error("reply line longer than 512 octets")
                return None
            if end + 1 > MAX_REPLY_LINE:
                raise _protocol_error("reply line longer than 512 octets")
            raw = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            line = raw.decode("utf-8", "replace")
            match = _REPLY_LINE.fullmatch(line)
            if match is None:
                raise _protocol_error(f"not an SMTP reply line: {_describe(raw)}")
            code = int(match.group(1))
            separator = match.group(2)
            text = _CONTROL.sub("?", match.group(3) or "")
            if self._lines and self._lines[0][0] != code:
                raise _protocol_error(
                    f"reply code changed within a multi-line reply: {self._lines[0][0]}, {code}")
            self._lines.append((code, text))
            if separator == "-":
                if len(self._lines) >= MAX_REPLY_LINES:
                    raise _protocol_error(f"reply longer than {MAX_REPLY_LINES} lines")
                continue
            lines, self._lines = self._lines, []
            return _make_reply(code, [text for _code, text in lines])


def _make_reply(code: int, texts: list[str]) -> Reply:
    # RFC 2034 4: the enhanced code is on every line; keep the first line's, strip each.
    enhanced: str | None = None
    stripped = []
    for index, text in enumerate(texts):
        match = _ENHANCED.match(text)
        if match is not None and match.group(1) == str(code)[0]:
            if index == 0:
                enhanced = ".".join(match.group(1, 2, 3))
            text = text[match.end():]
        stripped.append(text)
    return Reply(code, enhanced, "\n".join(stripped))
