"""What a POP3 session's layer (`proxies.pop3.layer`) and its driver
(`proxies.pop3.session`) say to each other: the events the driver feeds in, the commands the
layer answers with. Plain data; no behaviour."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from proxies.scan.api import ScanResult

Side = Literal["client", "server"]


# --- events: what the driver tells the layer ----------------------------------------------------

@dataclass(frozen=True)
class ClientReadable:
    """New bytes (or the EOF) are in the client reader."""


@dataclass(frozen=True)
class ServerReadable:
    """New bytes (or the EOF, or the loss) are in the server reader."""


@dataclass(frozen=True)
class ClientLost:
    """The client's connection is gone: nothing more can reach it."""


@dataclass(frozen=True)
class ClientPaused:
    """The client's transport is over its high-water mark: the client is not reading."""


@dataclass(frozen=True)
class ClientWritable:
    """The client's transport has room (after a pause, or when the layer waits to flush)."""


@dataclass(frozen=True)
class Connected:
    pass


@dataclass(frozen=True)
class ConnectFailed:
    reason: str


@dataclass(frozen=True)
class TlsDone:
    side: Side
    error: str | None = None


@dataclass(frozen=True)
class ScanDone:
    result: ScanResult
    token: int  # the Scan's


@dataclass(frozen=True)
class QuarantineDone:
    quarantine_id: str | None  # None: the store failed (it has logged why)


@dataclass(frozen=True)
class Tick:
    """`wake_at` has come."""


Event = (ClientReadable | ServerReadable | ClientLost | ClientPaused | ClientWritable | Connected
         | ConnectFailed | TlsDone | ScanDone | QuarantineDone | Tick)


# --- commands: what the layer asks the driver to do ---------------------------------------------

@dataclass(frozen=True)
class SendClient:
    data: bytes


@dataclass(frozen=True)
class SendServer:
    data: bytes


@dataclass(frozen=True)
class Connect:
    """Connect to the destination; answer Connected or ConnectFailed."""


@dataclass(frozen=True)
class StartTls:
    """TLS on one side (ours towards the client, a client's towards the server); TlsDone."""

    side: Side


@dataclass(frozen=True)
class StreamScan:
    """Start the scan `token` while the message arrives (ScanData brings its pieces); the Scan
    with the same token ends it. Only where LayerSetup.streaming says the scanner can."""

    token: int


@dataclass(frozen=True)
class ScanData:
    token: int
    data: bytes  # the next piece of the content (unstuffed)


@dataclass(frozen=True)
class Scan:
    """Scan `content`; answer ScanDone with the same `token` (more than one may run: a scan
    ahead and the scan of a message that was not the one foreseen). After a StreamScan with
    the token: that scan's end, `content` the whole of what its ScanData brought."""

    content: bytes
    token: int


@dataclass(frozen=True)
class CancelScan:
    token: int


@dataclass(frozen=True)
class Quarantine:
    content: bytes
    result: ScanResult
    origin: dict[str, str]


@dataclass(frozen=True)
class Passthrough:
    """From now on relay the bytes both ways as they are (TLS end to end), until both sides
    have ended or neither has sent for client_timeout; the layer is done."""


@dataclass(frozen=True)
class Close:
    """End the session: `reply` (if any) goes to the client first; `error` is for the log."""

    error: str | None = None
    reply: bytes | None = None


Command_ = (SendClient | SendServer | Connect | StartTls | StreamScan | ScanData | Scan
            | CancelScan | Quarantine | Passthrough | Close)
