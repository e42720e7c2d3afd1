"""The two errors of the POP3 protocol core, in the manner of h11's `_util.py`.

`LocalProtocolError`: *we* misused a codec (called it in the wrong state, or asked it to put
something on the wire that POP3 cannot carry). `RemoteProtocolError`: the *peer* broke the
protocol. Each carries the reply the situation implies (a whole `-ERR ...` line, CRLF included),
so the I/O layer answers the client without inventing text; no traceback ever reaches a peer.

Reply texts use the RFC 3206 response codes: `[SYS/TEMP]` tells a client the failure is
temporary (try again later, the message stays on the server), `[SYS/PERM]` that it is not.
"""

from __future__ import annotations

__all__ = ["LocalProtocolError", "Pop3Error", "RemoteProtocolError", "err"]


def err(text: str) -> bytes:
    """A `-ERR` status line (RFC 1939 3); `text` must be one line of ASCII."""
    return b"-ERR " + text.encode("ascii", "replace") + b"\r\n"


class Pop3Error(Exception):
    """Base of the two; `reply` is the status line the situation implies (None: nothing)."""

    def __init__(self, message: str, reply: bytes | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply


class LocalProtocolError(Pop3Error):
    """We misused the protocol object: a bug in the caller."""


class RemoteProtocolError(Pop3Error):
    """The peer (client or server) sent something POP3 does not allow."""
