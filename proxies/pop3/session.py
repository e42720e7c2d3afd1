"""One intercepted POP3 connection, from accept to close: the asyncio driver of its layer.

Every decision is the layer's (`proxies.pop3.layer`); this module only carries them out. The
two sockets are `Link` protocols whose bytes go straight into the layer's codec readers, and
each callback steps the layer at once (no task switch per read); what takes time elsewhere
(connecting, a TLS handshake, a scan, a quarantine write) runs as a task whose result is fed
back as an event. One timer serves the layer's `wake_at`. Flow control: while the client's
transport is over its high-water mark the server is not read if its bytes would go on to the
client (a relayed response; a message being fetched for its scan is read on), and each reader
that holds more than its limit stops its own socket until the layer has taken the bytes.

After a passed-through STLS the driver relays the encrypted bytes itself, as
`proxies.tcprelay` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxies import logs
from proxies.pop3.cache import ScanCache
from proxies.pop3.codec import ClientReader
from proxies.pop3.config import Pop3Config
from proxies.pop3.events import (
    CancelScan,
    ClientLost,
    ClientPaused,
    ClientReadable,
    ClientWritable,
    Close,
    Command_,
    Connect,
    Connected,
    ConnectFailed,
    Event,
    Passthrough,
    Quarantine,
    QuarantineDone,
    Scan,
    ScanData,
    ScanDone,
    SendClient,
    SendServer,
    ServerReadable,
    StartTls,
    StreamScan,
    Tick,
    TlsDone,
)
from proxies.pop3.layer import LayerSetup, Pop3Layer
from proxies.pop3.link import Link
from proxies.scan.api import ContentScanner, ScanResult, ScanStream, StreamingScanner
from proxies.transparent import Address, ConnectionInfo, connect_socket

__all__ = ["Pop3Session", "QuarantineStore", "SessionContext", "set_nodelay"]

SERVER_BUFFER = 1 << 20
TLS_HANDSHAKE_TIMEOUT = 30.0
CLOSE_GRACE = 2.0
# The events of every read, made once (they carry nothing).
CLIENT_READABLE, SERVER_READABLE, CLIENT_LOST = ClientReadable(), ServerReadable(), ClientLost()


def set_nodelay(sock: socket.socket | None) -> None:
    """TCP_NODELAY on a proxied socket.

    asyncio sets it only on sockets whose `proto` is IPPROTO_TCP, and the transparent sockets
    are made with proto 0. Without it, a response written in pieces (status line, content,
    final ".") meets the client's delayed ACK: Nagle holds the second piece for about 40 ms,
    which capped small RETRs at about 40 messages/s.
    """
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class QuarantineStore(Protocol):
    """Where replaced originals go; returns the id the notice names."""

    def store(self, content: bytes, result: ScanResult, origin: dict[str, str]) -> str: ...


@dataclass
class SessionContext:
    """What every session of one proxy shares."""

    config: Pop3Config
    scanner: ContentScanner | None
    quarantine: QuarantineStore | None
    cache: ScanCache
    hostname: str
    tls_server: ssl.SSLContext | None  # our certificate, for terminate mode
    tls_client: ssl.SSLContext | None  # towards servers
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    no_peek: set[Address] = field(default_factory=set)  # LayerSetup.no_peek, for all sessions

    @functools.cached_property
    def streaming_scanner(self) -> StreamingScanner | None:
        """The scanner, if it can take messages as they arrive (decided once: a runtime
        protocol check is slow)."""
        scanner = self.scanner
        if isinstance(scanner, StreamingScanner) and scanner.can_stream:
            return scanner
        return None

    def spawn(self, coroutine: object, name: str) -> asyncio.Task[Any]:
        """A named task the proxy keeps a reference to until it ends."""
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(
            coroutine, name=name)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


class Pop3Session:
    def __init__(self, context: SessionContext, ident: int, client: Link, info: ConnectionInfo,
                 destination: Address, source: str | None) -> None:
        self.context = context
        self.config = context.config
        self.ident = ident
        self.info = info
        self.destination = destination
        self.source = source
        self.client_link = client
        assert isinstance(client.reader, ClientReader)
        self.layer = Pop3Layer(LayerSetup(
            config=context.config, ident=ident, client=info.client, destination=destination,
            cache=context.cache, hostname=context.hostname,
            scanning=context.scanner is not None, quarantining=context.quarantine is not None,
            our_certificate=context.tls_server is not None,
            streaming=context.streaming_scanner is not None, no_peek=context.no_peek),
            client.reader)
        self.server_link = Link(self.layer.server, SERVER_BUFFER)
        self._loop = asyncio.get_running_loop()
        self._events: deque[Event] = deque()
        self._stepping = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._scans: dict[int, asyncio.Task[Any]] = {}
        self._streams: dict[int, ScanStream] = {}  # scans being fed, by token
        self._done: asyncio.Future[None] = self._loop.create_future()
        self.error: str | None = None
        self.started = time.monotonic()

    @property
    def messages(self) -> int:
        return self.layer.messages

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        logs.event("pop3_connect", id=self.ident, client=f"[{self.info.client[0]}]:"
                   f"{self.info.client[1]}", server=f"[{self.destination[0]}]:"
                   f"{self.destination[1]}", how=self.info.how, spoof=self.source is not None)
        client, server = self.client_link, self.server_link
        client.listener = self._client_changed
        client.on_paused = functools.partial(self._feed, ClientPaused())
        client.on_writable = self._client_writable
        server.listener = functools.partial(self._feed, SERVER_READABLE)
        try:
            self._execute(self.layer.start(self._loop.time()))
            self._step()
            await self._done
        except asyncio.CancelledError:
            self.error = "proxy stopping"
            raise
        except Exception:  # a bug in the driver: log it, end only this session
            self.error = "internal error"
            logs.error("pop3_session_crashed", id=self.ident, exc_info=True)
        finally:
            await self._close()
            fields: dict[str, Any] = {
                "id": self.ident, "messages": self.messages,
                "seconds": round(time.monotonic() - self.started, 3)}
            if self.error:
                fields["error"] = self.error
            logs.event("pop3_close", **fields)

    def _finish(self, error: str | None) -> None:
        if not self._done.done():
            if error is not None and self.error is None:
                self.error = error
            self._done.set_result(None)

    async def _close(self) -> None:
        self._cancel_timer()
        self.layer.close()
        for task in list(self._tasks):
            task.cancel()
        for stream in self._streams.values():
            stream.cancel()
        self._streams.clear()
        for link in (self.server_link, self.client_link):
            link.listener = None
            link.on_paused = link.on_writable = None
            link.raw = None
            link.raw_eof = None
        for link in (self.server_link, self.client_link):
            if link.transport is None or link.lost:
                continue
            with contextlib.suppress(Exception):
                link.close()  # sends what is still buffered, then closes
            deadline = self._loop.time() + CLOSE_GRACE
            with contextlib.suppress(Exception):
                while not link.lost:
                    await link.wait_data(deadline)
            if not link.lost:
                link.abort()

    # --- stepping the layer ---------------------------------------------------------------------

    def _client_changed(self) -> None:
        self._feed(CLIENT_LOST if self.client_link.lost else CLIENT_READABLE)

    def _client_writable(self) -> None:
        self.server_link.resume_reading()
        self._feed(ClientWritable())

    def _feed(self, event: Event) -> None:
        """Step the layer with `event` and carry out its commands. An event that comes while
        commands are carried out (a write that pauses the transport) waits its turn."""
        self._events.append(event)
        if not self._stepping:
            self._step()

    def _step(self) -> None:
        if self._done.done():
            self._events.clear()
            return
        self._stepping = True
        layer, events, client = self.layer, self._events, self.client_link
        try:
            while True:
                while events:
                    self._execute(layer.handle(events.popleft(), self._loop.time()))
                    if self._done.done():
                        events.clear()
                        return
                if layer.waiting == "flush" and not client.write_paused:
                    events.append(ClientWritable())  # it has taken the writes already
                    continue
                break
            if layer.passthrough:  # the driver relays the bytes itself now
                return
            if client.write_paused and layer.forwarding:
                self.server_link.pause_reading()
            else:
                self.server_link.consumed()
            client.consumed()
            self._set_timer(layer.wake_at)
        except Exception:
            logs.error("pop3_session_crashed", id=self.ident, exc_info=True)
            self._finish("internal error")
        finally:
            self._stepping = False

    def _set_timer(self, wake: float | None) -> None:
        if wake is None:
            self._cancel_timer()
        elif self._timer is None or wake < self._timer_at:
            # Moved only when a deadline comes earlier (not at every step): a timer that fires
            # early finds nothing due and is set again.
            self._cancel_timer()
            self._timer_at = wake
            self._timer = self._loop.call_at(wake, self._ring)

    def _ring(self) -> None:
        self._timer = None
        self._feed(Tick())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _execute(self, commands: list[Command_]) -> None:
        for command in commands:
            if isinstance(command, SendClient):
                self.client_link.write(command.data)
            elif isinstance(command, SendServer):
                self.server_link.write(command.data)
            elif isinstance(command, ScanData):
                stream = self._streams.get(command.token)
                if stream is not None:
                    stream.feed(command.data)
            elif isinstance(command, StreamScan):
                self._start_stream(command.token)
            elif isinstance(command, Scan):
                self._start_scan(command)
            elif isinstance(command, CancelScan):
                task = self._scans.pop(command.token, None)
                if task is not None:
                    task.cancel()
                stream = self._streams.pop(command.token, None)
                if stream is not None:
                    stream.cancel()
            elif isinstance(command, Quarantine):
                self._start(self._quarantine(command), "quarantine")
            elif isinstance(command, Connect):
                self._start(self._connect(), "connect")
            elif isinstance(command, StartTls):
                self._start(self._start_tls(command), "tls")
            elif isinstance(command, Passthrough):
                self._relay_encrypted()
            elif isinstance(command, Close):
                if command.reply is not None:
                    self.client_link.write(command.reply)
                self._finish(command.error)
                return

    def _start(self, coroutine: Any, what: str) -> asyncio.Task[Any]:
        task = self.context.spawn(coroutine, f"pop3-{self.ident}-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- what takes time ------------------------------------------------------------------------

    async def _connect(self) -> None:
        try:
            sock = await connect_socket(self.destination, source=self.source,
                                        timeout=self.config.connect_timeout)
        except OSError as exc:
            self._feed(ConnectFailed(str(exc)))
            return
        set_nodelay(sock)
        try:
            await self._loop.create_connection(lambda: self.server_link, sock=sock)
        except OSError as exc:
            sock.close()
            self._feed(ConnectFailed(str(exc)))
            return
        assert self.server_link.transport is not None
        self.server_link.transport.set_write_buffer_limits(high=SERVER_BUFFER)
        self._feed(Connected())

    async def _start_tls(self, command: StartTls) -> None:
        if command.side == "server":
            link = self.server_link
            context = self.context.tls_client or ssl.create_default_context()
        else:
            link = self.client_link
            assert self.context.tls_server is not None
            context = self.context.tls_server
        try:
            await link.start_tls(context, server_side=command.side == "client",
                                 timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self._feed(TlsDone(command.side, str(exc) or type(exc).__name__))
            return
        self._feed(TlsDone(command.side))

    def _start_stream(self, token: int) -> None:
        scanner = self.context.streaming_scanner
        assert scanner is not None  # the layer streams only then
        stream = scanner.stream()
        if stream is not None:  # else the Scan at the message's end scans it whole
            self._streams[token] = stream

    def _start_scan(self, command: Scan) -> None:
        scanner = self.context.scanner
        assert scanner is not None
        token = command.token
        stream = self._streams.pop(token, None)
        task = self._start(scanner.scan(command.content) if stream is None
                           else stream.finish(command.content), "scan")
        if stream is not None:
            # A task cancelled before its first step never runs `finish`, which ends it.
            task.add_done_callback(lambda _task: stream.cancel())
        self._scans[token] = task

        def scanned(task: asyncio.Task[ScanResult]) -> None:
            if self._scans.pop(token, None) is not task or task.cancelled():
                return  # cancelled: the layer gave up on it
            exc = task.exception()
            if exc is not None:  # a scanner bug or outage is a failed scan, not a dead session
                result = ScanResult("failed", reason=f"scanner error: {type(exc).__name__}")
            else:
                result = task.result()
            self._feed(ScanDone(result, token))

        task.add_done_callback(scanned)

    async def _quarantine(self, command: Quarantine) -> None:
        store = self.context.quarantine
        assert store is not None
        try:
            ident = await asyncio.to_thread(store.store, command.content, command.result,
                                            command.origin)
        except Exception:  # OSError from the disk, or whatever the store raises
            logs.error("pop3_quarantine_failed", id=self.ident, exc_info=True)
            self._feed(QuarantineDone(None))
            return
        self._feed(QuarantineDone(ident))

    # --- after a passed-through STLS ------------------------------------------------------------

    def _relay_encrypted(self) -> None:
        """Bytes both ways, unscanned, until both sides end (each FIN passed on, RFC 9293 3.6)
        or neither sends for client_timeout."""
        client, server = self.client_link, self.server_link
        client.listener = server.listener = None
        client.on_paused = None
        last = [self._loop.time()]

        def ended(side: Link, to: Link) -> None:
            if to.transport is not None and not to.lost and to.transport.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    to.transport.write_eof()
            if (client.eof and server.eof) or client.lost or server.lost:
                self._finish(None)

        def forward(to: Link, source: Link, data: bytes) -> None:
            last[0] = self._loop.time()
            to.write(data)
            if to.write_paused:
                source.pause_reading()

        def idle() -> None:
            due = last[0] + self.config.client_timeout
            if self._loop.time() >= due:
                self._finish("passthrough: idle for too long")
            else:
                self._timer = self._loop.call_at(due, idle)

        # Flow control as in proxies.tcprelay: a side over its high-water mark stops the
        # other's reading until it drains.
        for side, other in ((client, server), (server, client)):
            side.raw = functools.partial(forward, other, side)
            side.raw_eof = functools.partial(ended, side, other)
            side.on_writable = other.resume_reading
        server.write(self.layer.client.discard_buffer())
        client.write(self.layer.server.take_buffer())
        client.resume_reading()
        server.resume_reading()
        if client.eof:
            ended(client, server)
        if server.eof:
            ended(server, client)
        self._cancel_timer()
        self._timer = self._loop.call_at(last[0] + self.config.client_timeout, idle)

