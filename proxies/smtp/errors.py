"""The two errors of the SMTP protocol cores, in the manner of h11's `_util.py`.

`LocalProtocolError`: *we* misused a protocol object (called a method in the wrong state, handed
it something it cannot put on the wire). `RemoteProtocolError`: the *peer* broke the protocol.
Each carries the SMTP reply the situation implies, so the I/O layer can answer a client or
record a delivery outcome without inventing one; no traceback text ever reaches a peer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxies.smtp.reply import Reply

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base of the two; `reply` is what the situation implies (None: nothing sensible)."""

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply


class LocalProtocolError(ProtocolError):
    """We misused the protocol object: a bug in the caller, or input it must not send."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""
