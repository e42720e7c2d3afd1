"""Events the SMTP protocol cores hand to their I/O drivers (cf. h11's `_events.py`).

Every `next_event()` returns exactly one of these; `NEED_DATA` means "read more bytes from the
peer and call `receive_data()`".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from proxies.smtp.reply import Reply

__all__ = [
    "NEED_DATA",
    "ClientEvent",
    "DataComplete",
    "Failed",
    "Finished",
    "NeedData",
    "ReadyForContent",
    "StartTls",
]


@dataclass(frozen=True)
class NeedData:
    """Nothing can happen until more bytes arrive from the peer."""


NEED_DATA = NeedData()


# --- DATA reader (proxies.smtp.dataframe.DataReader) -------------------------------------------

@dataclass(frozen=True)
class DataComplete:
    """The DATA terminator CRLF.CRLF was seen (RFC 5321 4.1.1.4).

    `content` is the unstuffed message (RFC 5321 4.5.2), ending with the CRLF that began the
    terminator; it is empty when `too_big`. `size` counts the octets the client sent before
    the terminator's ".CRLF" (dot-stuffed, as SIZE and aiosmtpd count them). A non-None
    `bare_line_ending` is the offset in `content` of the first CR or LF that is not part of a
    CRLF: the caller rejects or normalises (SMTP smuggling, CVE-2023-51764). `leftover` is what
    the client sent after the terminator: pipelined commands (RFC 2920) for the caller's
    command parser.
    """

    content: bytes
    size: int
    too_big: bool
    bare_line_ending: int | None
    leftover: bytes = field(repr=False)


# --- SMTP client (proxies.smtp.client.ClientSession) -------------------------------------------

@dataclass(frozen=True)
class StartTls:
    """The server agreed to STARTTLS (RFC 3207 4): upgrade the transport, then call
    `session.tls_established()`; the session then sends EHLO again."""


@dataclass(frozen=True)
class ReadyForContent:
    """The server answered DATA with 354: give the content with `session.send_content()`."""


@dataclass(frozen=True)
class Finished:
    """The transaction ended: each recipient's final reply, in the order they were given.

    A recipient the server refused has its RCPT reply; every accepted one has the reply to the
    end of data (or to DATA itself, if that was refused). `session_reply` is that DATA-stage
    reply; None when no recipient was accepted, so DATA never decided anything.
    """

    results: Mapping[str, Reply]
    session_reply: Reply | None


@dataclass(frozen=True)
class Failed:
    """The session failed as a whole; `reply` applies to every recipient.

    4xx: try again later; 5xx: bounce. `stage` says where: "greeting", "ehlo", "helo",
    "starttls", "mail", "rcpt", "data", "content" (the end-of-data reply), "policy" (a
    missing extension we need, or a size over the server's limit).
    """

    reply: Reply
    stage: str


ClientEvent = NeedData | StartTls | ReadyForContent | Finished | Failed
