"""One socket of a POP3 session as an asyncio.BufferedProtocol: bytes go straight into the codec.

Why not asyncio streams: a StreamReader copies every chunk into its own buffer, and each
response then costs the session a task switch per read; at 5 KB messages that was half the
proxy's time. Here each read (into `proxies.receivebuffer`'s buffer, not a new one per read)
feeds the codec's reader (`proxies.pop3.codec`) and then calls the session back (`listener`),
so the session's layer (`proxies.pop3.layer`) is stepped in the callback, with no task switch.

Flow control bounds memory both ways: a reader whose codec holds more than `max_buffer`
unread octets stops reading from its socket until the session has taken them (`consumed`),
and a link whose transport is over its high-water mark says so (`write_paused`, `on_paused`,
`on_writable`), which the session answers by not reading the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Protocol, cast

from proxies.receivebuffer import SharedBufferProtocol

__all__ = ["CodecReader", "Link"]


class CodecReader(Protocol):
    def receive_data(self, data: bytes | memoryview) -> None: ...

    @property
    def buffered(self) -> int: ...


class Link(SharedBufferProtocol):
    def __init__(self, reader: CodecReader, max_buffer: int = 1 << 20,
                 on_made: Callable[[Link], None] | None = None) -> None:
        self.reader = reader
        self.max_buffer = max_buffer
        self.transport: asyncio.Transport | None = None
        self.tls = False
        self.lost = False
        self.eof = False
        self.write_paused = False
        self.read_paused = False
        # Called after new bytes, an EOF or the loss of the connection (the relay's fast
        # path), and when the transport can take writes again.
        self.listener: Callable[[], None] | None = None
        self.on_writable: Callable[[], None] | None = None
        self.on_paused: Callable[[], None] | None = None
        # Passthrough (TLS relayed end to end): bytes bypass the codec and go here.
        self.raw: Callable[[bytes], None] | None = None
        self.raw_eof: Callable[[], None] | None = None
        self._on_made = on_made
        self._data_waiter: asyncio.Future[None] | None = None

    # --- asyncio's callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not derive from asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes | memoryview) -> None:
        """`data`: the shared buffer's (SharedBufferProtocol); the reader copies it first."""
        raw = self.raw
        if raw is not None:
            raw(bytes(data))  # the other transport may keep what it cannot send yet
            return
        self.reader.receive_data(data)
        if self.reader.buffered > self.max_buffer and not self.read_paused:
            self.pause_reading()
        self._changed()

    def eof_received(self) -> bool:
        self.eof = True
        if self.raw_eof is not None:
            self.raw_eof()
            return True
        self.reader.receive_data(b"")
        self._changed()
        # A plain socket stays open for writing after the peer's FIN (a client may send QUIT
        # and shut down its side, and still want the +OK); asyncio's TLS transport cannot.
        return not self.tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.eof:
            self.eof = True
            if self.raw_eof is not None:
                self.raw_eof()
            else:
                self.reader.receive_data(b"")
        self._changed()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.on_paused is not None:
            self.on_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.on_writable is not None:
            self.on_writable()

    def _changed(self) -> None:
        waiter, self._data_waiter = self._data_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.listener is not None:
            self.listener()

    # --- for the session --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.read_paused and not self.lost:
            self.read_paused = True
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.read_paused and not self.lost:
            self.read_paused = False
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    def consumed(self) -> None:
        """The session took events from the reader: read again once it has room."""
        if self.read_paused and self.reader.buffered <= self.max_buffer // 2:
            self.resume_reading()

    async def wait_data(self, deadline: float) -> None:
        """Until the next bytes, EOF or loss (TimeoutError at `deadline`, loop time)."""
        if self.lost:
            return
        self.consumed()
        waiter = asyncio.get_running_loop().create_future()
        self._data_waiter = waiter
        async with asyncio.timeout_at(deadline):
            await waiter

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool,
                        timeout: float, server_hostname: str | None = None) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(
            self.transport, self, context, server_side=server_side,
            server_hostname=server_hostname, ssl_handshake_timeout=timeout)
        if transport is None:
            raise ConnectionResetError("the connection closed during the TLS handshake")
        self.transport = transport
        self.tls = True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
