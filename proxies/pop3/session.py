"""One intercepted POP3 connection, from accept to close: the asyncio edge around the codec.

The session reads one client command at a time and finishes its response before it takes the
next, so a client that pipelines (RFC 2449 6.6, PIPELINING) is served correctly: its commands
wait in the client reader's buffer and are answered in order. Most commands and responses are
relayed byte for byte; the proxy steps in for:

- RETR and TOP (TOP unless scan_top = false): the message is taken whole from the server
  (`Spool`: memory, then a temporary file), scanned, and the client gets the original, a tagged
  copy, a notice, or -ERR [SYS/TEMP] (`policy.decide`). `Keepalive` keeps a slow one alive.
- CAPA: STLS is shown or hidden by the TLS mode; the rest is the server's list.
- STLS (RFC 2595): "terminate" answers it here and does TLS with the gateway's certificate,
  the server connection having been upgraded with STLS right after its greeting, when it
  offers it; "passthrough" relays it and then relays the encrypted bytes unscanned (logged);
  "strip" hides it from the client (the server connection is still upgraded).
- Commands a state does not allow (`states.check`) are answered here with -ERR.

Whatever goes wrong on one side, the other side gets a -ERR when one can still be sent, or a
closed connection, within the configured timeouts; the proxy never sends QUIT for a client
(RFC 1939 6: only the client's QUIT deletes messages) and never logs credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxies import logs, metrics
from proxies.mail.headers import Header, parse_header
from proxies.pop3 import rewrite, states
from proxies.pop3.cache import CacheKey, ScanCache
from proxies.pop3.codec import (
    BodyData,
    BodyEnd,
    ClientReader,
    Closed,
    Command,
    DotStuffer,
    NeedData,
    SaslLine,
    ServerEvent,
    ServerReader,
    Status,
    multiline,
)
from proxies.pop3.config import Pop3Config
from proxies.pop3.errors import RemoteProtocolError, err
from proxies.pop3.keepalive import Keepalive
from proxies.pop3.link import Link
from proxies.pop3.policy import decide
from proxies.pop3.relay import (
    SERVER_GONE,
    SERVER_INVALID,
    AuthExchange,
    RelayFailed,
    ResponseRelay,
    SessionFacts,
    client_capabilities,
    route,
)
from proxies.pop3.spool import Spool
from proxies.scan.api import ContentScanner, ScanResult
from proxies.transparent import Address, ConnectionInfo, connect_socket

__all__ = ["Pop3Session", "QuarantineStore", "SessionContext", "set_nodelay"]

CHUNK = 1 << 20
MAX_UNKNOWN_COMMANDS = 20
MAX_CAPA_SIZE = 64 * 1024
TLS_HANDSHAKE_TIMEOUT = 30.0

SERVER_SILENT = err("[SYS/TEMP] the mail server did not answer in time")


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
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coroutine: object, name: str) -> asyncio.Task[None]:
        """A named task the proxy keeps a reference to until it ends."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            coroutine, name=name)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


class _Abort(Exception):
    """End the session: `reply` (if any) goes to the client first."""

    def __init__(self, reason: str, reply: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


def _command(line: str) -> Command:
    verb, _, argument = line.partition(" ")
    return Command(verb, argument.encode(), line.encode() + b"\r\n")


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
        self.client = client.reader
        self.server = ServerReader()
        self.server_link = Link(self.server, CHUNK)
        loop = asyncio.get_running_loop()
        self._loop = loop
        # The relay's fast path (see `_pump`): the coroutine waits in `_park` meanwhile.
        self._parked: asyncio.Future[Command | SaslLine | Closed] | None = None
        self._relaying: ResponseRelay | None = None
        self._idle_since = loop.time()
        self._server_active = 0.0
        self._paused_since = 0.0
        self._stalled = False  # the client's transport was full when the pump last looked
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at = 0.0
        client.listener = self._pump
        client.on_writable = self._client_writable
        self.server_link.listener = self._pump
        self.facts = SessionFacts()  # state, user and UIDLs, learnt from what is relayed
        self.client_tls = False
        self.server_tls = False
        self.server_offers_stls = False
        self.passthrough = False
        self.unknown_commands = 0
        scanning = context.scanner is not None
        self._scanned = frozenset(({"RETR", "TOP"} if self.config.scan_top else {"RETR"})
                                  if scanning else ())
        self.messages = 0
        self.error: str | None = None
        self.started = time.monotonic()

    @property
    def state(self) -> states.SessionState:
        return self.facts.state

    @state.setter
    def state(self, value: states.SessionState) -> None:
        self.facts.state = value

    @property
    def user(self) -> str | None:
        return self.facts.user

    @property
    def uidls(self) -> dict[bytes, bytes]:
        return self.facts.uidls

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        logs.event("pop3_connect", id=self.ident, client=f"[{self.info.client[0]}]:"
                   f"{self.info.client[1]}", server=f"[{self.destination[0]}]:"
                   f"{self.destination[1]}", how=self.info.how, spoof=self.source is not None)
        try:
            await self._session()
        except _Abort as exc:
            self.error = exc.reason
            if exc.reply is not None:
                with contextlib.suppress(OSError, TimeoutError, ssl.SSLError, RuntimeError):
                    self.client_link.write(exc.reply)
                    await self.client_link.drain(5)
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            self.error = "proxy stopping"
            raise
        except Exception:  # a bug: log it with the session id, end only this session
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

    async def _close(self) -> None:
        self._disarm()
        self.client_link.listener = self.server_link.listener = None
        for link in (self.server_link, self.client_link):
            if link.transport is None or link.lost:
                continue
            with contextlib.suppress(Exception):
                link.close()  # sends what is still buffered, then closes
            deadline = self._loop.time() + 2
            with contextlib.suppress(Exception):
                while not link.lost:
                    await link.wait_data(deadline)
            if not link.lost:
                link.abort()

    # --- I/O helpers ----------------------------------------------------------------------------

    def _to_client(self, data: bytes) -> None:
        self.client_link.write(data)

    async def _flush_client(self) -> None:
        try:
            await self.client_link.drain(self.config.client_timeout)
        except TimeoutError:
            raise _Abort("the client stopped reading") from None

    async def _send_client(self, data: bytes) -> None:
        self._to_client(data)
        await self._flush_client()

    async def _send_server(self, data: bytes) -> None:
        self.server_link.write(data)
        try:
            await self.server_link.drain(self.config.server_timeout)
        except TimeoutError:
            raise _Abort("the server stopped reading", SERVER_SILENT) from None
        except OSError as exc:
            raise _Abort(f"writing to the server: {exc}", SERVER_GONE) from None

    async def _client_event(self) -> Command | SaslLine | Closed:
        """The next client event the coroutine must handle itself; plain commands met on
        the way are relayed by `_pump` meanwhile."""
        loop = self._loop
        self._idle_since = loop.time()
        parked: asyncio.Future[Command | SaslLine | Closed] = loop.create_future()
        self._parked = parked
        try:
            self._pump()
            self._arm()
            return await parked
        finally:
            self._parked = None
            self._disarm()

    async def _server_event(self, keepalive: _Held | None = None) -> ServerEvent:
        loop = self._loop
        while True:
            try:
                event = self.server.next_event()
            except RemoteProtocolError as exc:
                raise _Abort(exc.message, exc.reply or SERVER_INVALID) from None
            if not isinstance(event, NeedData):
                return event
            deadline = loop.time() + self.config.server_timeout
            while True:
                wake = deadline if keepalive is None else min(deadline,
                                                              keepalive.keepalive.next_due)
                try:
                    await self.server_link.wait_data(wake)
                    break
                except TimeoutError:
                    if loop.time() >= deadline:
                        raise _Abort("the server did not answer in time", SERVER_SILENT) from None
                    assert keepalive is not None
                    await self._keepalive_tick(keepalive)

    def _buffered_server_event(self) -> ServerEvent | None:
        """The next server event if it needs no I/O, else None."""
        try:
            event = self.server.next_event()
        except RemoteProtocolError as exc:
            raise _Abort(exc.message, exc.reply or SERVER_INVALID) from None
        return None if isinstance(event, NeedData) else event

    async def _server_status(self) -> Status:
        event = await self._server_event()
        if isinstance(event, Closed):
            raise _Abort("the server closed the connection", SERVER_GONE)
        if not isinstance(event, Status):
            raise _Abort("the server sent content where a status line belongs", SERVER_INVALID)
        return event

    async def _ask_server(self, command: Command, *, unstuff: bool = False) -> Status:
        self.server.expect(command, unstuff=unstuff)
        await self._send_server(command.raw)
        return await self._server_status()

    async def _server_body(self, limit: int) -> bytes:
        """A (small) multi-line response body, raw."""
        pieces: list[bytes] = []
        size = 0
        while True:
            event = await self._server_event()
            if isinstance(event, BodyData):
                size += len(event.data)
                if size > limit:
                    raise _Abort("the server's response is too long", SERVER_INVALID)
                pieces.append(event.data)
            elif isinstance(event, BodyEnd):
                return b"".join(pieces)
            else:
                raise _Abort("the server closed the connection mid-response", SERVER_GONE)

    # --- the session ------------------------------------------------------------------------------

    async def _session(self) -> None:
        try:
            sock = await connect_socket(self.destination, source=self.source,
                                        timeout=self.config.connect_timeout)
        except OSError as exc:
            raise _Abort(f"connecting to the server: {exc}",
                         err("[SYS/TEMP] cannot reach the mail server")) from None
        set_nodelay(sock)
        try:
            await self._loop.create_connection(lambda: self.server_link, sock=sock)
        except OSError as exc:
            sock.close()
            raise _Abort(f"connecting to the server: {exc}",
                         err("[SYS/TEMP] cannot reach the mail server")) from None
        assert self.server_link.transport is not None
        self.server_link.transport.set_write_buffer_limits(high=CHUNK)
        greeting = await self._server_status()
        if not greeting.ok:
            await self._send_client(greeting.raw)
            raise _Abort("the server refused the session")
        if self.config.tls in ("terminate", "strip"):
            await self._upgrade_server()
        await self._send_client(greeting.raw)
        while self.state is not states.SessionState.CLOSED:
            event = await self._client_event()
            if isinstance(event, Closed):
                return
            if isinstance(event, SaslLine):  # cannot happen outside AUTH; be safe
                continue
            await self._command(event)
            if self.passthrough:
                await self._relay_encrypted()
                return

    async def _command(self, command: Command) -> None:
        decision = route(command, self.state, self._scanned)
        if decision.unknown:
            self.unknown_commands += 1
            if self.unknown_commands > MAX_UNKNOWN_COMMANDS:
                raise _Abort("too many unknown commands", err("too many unknown commands"))
        if decision.action == "reply":
            await self._send_client(decision.reply)
        elif decision.action == "stls":
            await self._stls(command)
        elif decision.action == "auth":
            await self._auth(command)
        elif decision.action == "fetch":
            await self._fetch(command)
        elif decision.action == "capa":
            await self._capa(command)
        else:
            self._start_relay(command)  # `_pump` relays the response

    def _pump(self) -> None:
        """The relay's fast path, run from the links' callbacks while the coroutine waits in
        `_client_event`: plain commands go to the server and their responses back to the
        client as the bytes come, with no task switch (at 5 KB messages, the task switches
        per command and per read cost more than the relaying). It takes the next command
        only when the response before it is complete (RFC 2449 6.6: responses in order),
        and stops at the first event the coroutine must handle, handing it over."""
        parked = self._parked
        if parked is None or parked.done():
            return
        try:
            while True:
                if self._relaying is not None:
                    if not self._relay_response():
                        return
                    continue
                if self.state is states.SessionState.CLOSED:
                    parked.set_result(Closed())  # QUIT answered: the session is over
                    return
                if self.client_link.write_paused:
                    self._client_stalled()
                    return  # the client is not reading: no new command until it does
                try:
                    event = self.client.next_event()
                except RemoteProtocolError as exc:
                    if exc.reply:
                        self._to_client(exc.reply)
                        self._idle_since = self._loop.time()
                    continue
                if isinstance(event, NeedData):
                    self.client_link.consumed()
                    return
                if isinstance(event, Command) and route(event, self.state,
                                                        self._scanned).fast:
                    self._start_relay(event)
                    continue
                parked.set_result(event)
                return
        except _Abort as exc:
            parked.set_exception(exc)
        except Exception as exc:  # a bug: the coroutine logs it and ends this session only
            parked.set_exception(exc)

    def _start_relay(self, command: Command) -> None:
        self.server.expect(command)
        self.server_link.write(command.raw)
        self._relaying = ResponseRelay(command, self.server, self.facts)
        self._server_active = self._loop.time()
        self._arm()

    def _relay_response(self) -> bool:
        """Relay what has come of the response; True once it is complete. One write to the
        client per call: a small response leaves in one segment."""
        relaying = self._relaying
        assert relaying is not None
        try:
            step = relaying.step()
        except RelayFailed as exc:
            raise _Abort(exc.reason, exc.reply) from None
        if step.out:
            self._to_client(step.out)
        self.server_link.consumed()
        now = self._loop.time()
        if step.done:
            self._relaying = None
            self._idle_since = now
        else:
            self._server_active = now
            if self.client_link.write_paused:
                # The client is slower than the server: the server waits in its socket.
                self.server_link.pause_reading()
                self._client_stalled()
        return step.done

    def _client_stalled(self) -> None:
        if not self._stalled:
            self._stalled = True
            self._paused_since = self._loop.time()
            self._arm()

    def _client_writable(self) -> None:
        self._stalled = False
        self.server_link.resume_reading()
        self._idle_since = self._server_active = self._loop.time()
        self._pump()

    # The deadlines while parked, checked by one timer that is moved only when a deadline
    # comes earlier than it (not per command): RFC 1939 3's autologout from our last
    # response (a command trickling in a byte at a time does not restart it), the server's
    # silence during a response, and a client that stopped reading.

    def _deadline(self) -> tuple[float, _Abort]:
        if self._stalled:
            return (self._paused_since + self.config.client_timeout,
                    _Abort("the client stopped reading"))
        if self._relaying is not None:
            return (self._server_active + self.config.server_timeout,
                    _Abort("the server did not answer in time",
                           None if self._relaying.started else SERVER_SILENT))
        return (self._idle_since + self.config.client_timeout,
                _Abort("client idle: autologout",
                       err("[SYS/TEMP] autologout: idle for too long")))

    def _arm(self) -> None:
        if self._parked is None:
            return
        deadline, _abort = self._deadline()
        if self._wake is None or deadline < self._wake_at:
            self._disarm()
            self._wake_at = deadline
            self._wake = self._loop.call_at(deadline, self._woken)

    def _disarm(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None

    def _woken(self) -> None:
        self._wake = None
        parked = self._parked
        if parked is None or parked.done():
            return
        deadline, abort = self._deadline()
        if self._loop.time() >= deadline:
            parked.set_exception(abort)
        else:
            self._arm()

    async def _capa(self, command: Command) -> None:
        status = await self._ask_server(command)
        self.state = states.next_state(self.state, command.verb, status.ok)
        if not (status.ok and self.server.state == "body"):
            await self._send_client(status.raw)
            return
        body = await self._server_body(MAX_CAPA_SIZE)
        offer_stls = (self.config.tls == "terminate" and not self.client_tls
                      and self.server_offers_stls and self.context.tls_server is not None)
        await self._send_client(multiline(status.raw, client_capabilities(
            body, self.config.tls, offer_stls)))

    # --- TLS ----------------------------------------------------------------------------------

    async def _upgrade_server(self) -> None:
        """STLS towards the server right after its greeting, when it offers it (RFC 2595 4).

        A server that offers STLS and then fails it ends the session: going on in plain text
        would be the silent downgrade the TLS modes exist to prevent.
        """
        status = await self._ask_server(_command("CAPA"))
        if not status.ok:
            return  # no CAPA (RFC 1939-only server): no STLS either
        body = await self._server_body(MAX_CAPA_SIZE)
        capabilities = {line.split()[0].upper() for line in body.split(b"\r\n") if line.split()}
        if b"STLS" not in capabilities:
            logs.event("pop3_server_without_tls", id=self.ident,
                       server=f"[{self.destination[0]}]:{self.destination[1]}")
            return
        self.server_offers_stls = True
        status = await self._ask_server(_command("STLS"))
        if not status.ok:
            raise _Abort("the server offered STLS and then refused it",
                         err("[SYS/TEMP] TLS with the mail server failed"))
        if self.server.take_buffer():
            raise _Abort("the server sent plaintext after STLS", SERVER_INVALID)
        try:
            await self.server_link.start_tls(
                self.context.tls_client or ssl.create_default_context(), server_side=False,
                timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise _Abort(f"TLS with the server failed: {exc}",
                         err("[SYS/TEMP] TLS with the mail server failed")) from None
        self.server_tls = True

    async def _stls(self, command: Command) -> None:
        mode = self.config.tls
        if mode == "passthrough":
            status = await self._ask_server(command)
            await self._send_client(status.raw)
            if status.ok:
                self.passthrough = True
            return
        if (mode == "strip" or self.client_tls or not self.server_offers_stls
                or self.context.tls_server is None):
            await self._send_client(err("STLS not available" if not self.client_tls
                                        else "already using TLS"))
            return
        if self.client.buffered:
            # RFC 2595 4: nothing may follow STLS before the handshake; plaintext that does
            # would be read as if it came over TLS (command injection).
            raise _Abort("the client sent data after STLS before the TLS handshake",
                         err("nothing may follow STLS before the TLS handshake"))
        await self._send_client(b"+OK Begin TLS negotiation now\r\n")
        try:
            await self.client_link.start_tls(self.context.tls_server, server_side=True,
                                             timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise _Abort(f"TLS with the client failed: {exc}") from None
        self.client_tls = True

    async def _relay_encrypted(self) -> None:
        """After a passed-through STLS: bytes both ways, unscanned, until both sides end
        (each FIN passed on, RFC 9293 3.6) or neither sends for client_timeout."""
        logs.warning("pop3_tls_passthrough", id=self.ident,
                     server=f"[{self.destination[0]}]:{self.destination[1]}",
                     detail="TLS relayed end to end: this session's mail is not scanned")
        client, server = self.client_link, self.server_link
        client.listener = server.listener = None
        done = self._loop.create_future()
        last = [self._loop.time()]

        def ended(side: Link, to: Link) -> None:
            if to.transport is not None and not to.lost and to.transport.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    to.transport.write_eof()
            if ((client.eof and server.eof) or client.lost or server.lost) and not done.done():
                done.set_result(None)

        def writable(side: Link, other: Link) -> None:
            other.resume_reading()

        # Flow control as in proxies.tcprelay: a side over its high-water mark stops the
        # other's reading until it drains.
        for side, other in ((client, server), (server, client)):
            side.raw = functools.partial(self._forward_raw, other, side, last)
            side.raw_eof = functools.partial(ended, side, other)
            side.on_writable = functools.partial(writable, side, other)
        server.write(self.client.discard_buffer())
        client.write(self.server.take_buffer())
        client.resume_reading()
        server.resume_reading()
        if client.eof:
            ended(client, server)
        if server.eof:
            ended(server, client)
        while not done.done():
            remaining = last[0] + self.config.client_timeout - self._loop.time()
            if remaining <= 0:
                self.error = "passthrough: idle for too long"
                return
            await asyncio.wait({done}, timeout=remaining)

    def _forward_raw(self, to: Link, source: Link, last: list[float], data: bytes) -> None:
        last[0] = self._loop.time()
        to.write(data)
        if to.write_paused:
            source.pause_reading()

    # --- AUTH -----------------------------------------------------------------------------------

    async def _auth(self, command: Command) -> None:
        """A SASL exchange (RFC 5034), relayed line by line; the lines are never logged."""
        exchange = AuthExchange(command, self.facts)
        status = await self._ask_server(command)
        while status.kind == "continue":
            await self._send_client(status.raw)
            self.client.expect_sasl()
            event = await self._client_event()
            if not isinstance(event, SaslLine):
                raise _Abort("the client left during AUTH")
            exchange.client_line(event.data)
            await self._send_server(event.raw)
            status = await self._server_status()
        exchange.finished(status)
        await self._send_client(status.raw)

    # --- RETR and TOP -----------------------------------------------------------------------------

    async def _cache_key(self, command: Command) -> CacheKey | None:
        arguments = command.arguments
        if not self.context.cache.enabled or self.user is None or not arguments:
            return None
        number = arguments[0]
        if not number.isdigit():
            return None
        if number not in self.uidls:
            status = await self._ask_server(_command(f"UIDL {number.decode()}"))
            if not status.ok:
                return None
            self.facts.learn_uidl(status.text)
            if number not in self.uidls:
                return None
        scope = "RETR" if command.verb == "RETR" else "TOP " + b" ".join(arguments[1:]).decode()
        return CacheKey(self.destination, self.user, self.uidls[number], scope)

    async def _fetch(self, command: Command) -> None:
        key = await self._cache_key(command)
        status = await self._ask_server(command, unstuff=True)
        if not (status.ok and self.server.state == "body"):
            await self._send_client(status.raw)
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        held = _Held(status.raw, Keepalive(started, self.config.keepalive_after,
                                           self.config.keepalive_interval), DotStuffer())
        spool = Spool(self.config.spool_threshold, self.config.spool_dir)
        try:
            await self._fetch_spooled(command, key, held, spool, started)
        except _Abort as exc:
            if held.keepalive.status_sent:
                # Too late for -ERR: end without the final "." (an incomplete download).
                raise _Abort(exc.reason) from None
            raise
        finally:
            spool.close()

    async def _fetch_spooled(self, command: Command, key: CacheKey | None, held: _Held,
                             spool: Spool, started: float) -> None:
        header: Header | None = None
        while True:
            event = await self._server_event(held)
            if isinstance(event, BodyData):
                if spool.size + len(event.data) > self.config.max_scan_size:
                    # It will not be scanned whatever comes, so nothing more need wait, and
                    # the spool (and the disk under it) never holds more than max_scan_size,
                    # even if the response never ends, as a hostile server's may not.
                    await self._oversize(command, held, spool, event.data, started)
                    return
                spool.write(event.data)
                if header is None and spool.size - len(event.data) < rewrite.HEADER_LIMIT:
                    header = parse_header(spool.head(rewrite.HEADER_LIMIT), False)
                    if header is not None:
                        held.keepalive.offer(header.data[:rewrite.trace_length(header)])
            elif isinstance(event, BodyEnd):
                break
            else:
                raise _Abort("the server closed the connection mid-message", SERVER_GONE)
        if header is None:
            header = parse_header(spool.head(rewrite.HEADER_LIMIT),
                                  spool.size <= rewrite.HEADER_LIMIT)
        if header is None:
            header = Header(b"", 0, b"\r\n", ())
        cached = self.context.cache.get(key) if key is not None else None
        quarantine_id = cached.quarantine_id if cached else None
        if cached is not None:
            result: ScanResult | None = cached.result
        else:
            result = await self._scan(spool.getvalue(), held)
        outcome = decide(result, self.config)
        tempfail_reason = ("message too large to scan" if result is None or result.oversize
                           else "content scanner failed")
        if outcome == "replace" and quarantine_id is None:
            assert result is not None
            try:
                quarantine_id = await self._quarantine(spool, result, command)
            except _QuarantineFailed:
                # As SMTP answers 451: a notice would tell the client the message is gone
                # while its original is nowhere, so the message stays on the server instead.
                outcome, tempfail_reason = "tempfail", "quarantine write failed"
        if key is not None and result is not None and cached is None:
            self.context.cache.put(key, result, quarantine_id)
        self.messages += 1
        fields: dict[str, Any] = {
            "id": self.ident, "command": command.loggable(), "size": spool.size,
            "verdict": "oversize" if result is None else result.verdict, "action": outcome,
            "cached": cached is not None, "spooled": spool.on_disk,
            "seconds": round(asyncio.get_running_loop().time() - started, 3)}
        if result is not None and result.virus:
            fields["virus"] = result.virus
        if result is not None and result.reason:
            fields["reason"] = result.reason
        if quarantine_id:
            fields["quarantine"] = quarantine_id
        logs.event("pop3_message", **fields)
        metrics.current.pop3_retrieval(outcome, fields["verdict"])
        if outcome == "tempfail":
            if held.keepalive.status_sent:
                # Too late for -ERR: an incomplete download instead.
                raise _Abort(tempfail_reason)
            # The whole response was read, so the session goes on; the message stays.
            await self._send_client(err(f"[SYS/TEMP] message temporarily unavailable "
                                        f"({tempfail_reason}), try again later"))
            return
        pieces = rewrite.retrieved(outcome, header, result, spool,
                                   subject_prefix=self.config.subject_prefix,
                                   sent_early=held.keepalive.sent,
                                   quarantine_id=quarantine_id, hostname=self.context.hostname)
        await self._deliver(held, pieces)

    async def _oversize(self, command: Command, held: _Held, spool: Spool, pending: bytes,
                        started: float) -> None:
        """The message passed max_scan_size while it arrived: [pop3] oversize_action, now.

        `pending`: the piece that did not fit. "pass": what is spooled and `pending` go to
        the client and the rest is relayed as it comes, so
        the proxy holds at most max_scan_size of it. "tempfail": -ERR [SYS/TEMP] (or, after
        an early status line, a close without the final "."), and the session ends: the rest
        of the response would have to be read to go on, and it may never end. The client
        never sent QUIT, so the message stays on the server either way.
        """
        outcome = decide(None, self.config)
        fields: dict[str, Any] = {
            "id": self.ident, "command": command.loggable(), "verdict": "oversize",
            "action": outcome, "cached": False, "spooled": spool.on_disk}
        if outcome == "tempfail":
            self.messages += 1
            logs.event("pop3_message", size=spool.size + len(pending), **fields,
                       seconds=round(asyncio.get_running_loop().time() - started, 3))
            metrics.current.pop3_retrieval(outcome, "oversize")
            raise _Abort("message too large to scan", err(
                "[SYS/TEMP] message temporarily unavailable (message too large to scan), "
                "try again later"))
        size = spool.size + len(pending)
        await self._deliver(held, itertools.chain(spool.chunks(), [pending]), end=False)
        spool.close()
        out: list[bytes] = []
        buffered = 0
        while True:
            event = self._buffered_server_event()
            if event is None:
                if out:
                    self._to_client(b"".join(out))
                    out.clear()
                    buffered = 0
                    await self._flush_client()
                event = await self._server_event()
            if isinstance(event, BodyData):
                size += len(event.data)
                out.append(held.stuffer.send(event.data))
                buffered += len(event.data)
                if buffered >= CHUNK:
                    self._to_client(b"".join(out))
                    out.clear()
                    buffered = 0
                    await self._flush_client()
            elif isinstance(event, BodyEnd):
                break
            else:
                # The status line has gone: a close without the final "." is all that is left.
                raise _Abort("the server closed the connection mid-message")
        out.append(held.stuffer.end())
        await self._send_client(b"".join(out))
        self.messages += 1
        logs.event("pop3_message", size=size, **fields,
                   seconds=round(asyncio.get_running_loop().time() - started, 3))
        metrics.current.pop3_retrieval(outcome, "oversize")

    async def _deliver(self, held: _Held, pieces: Iterable[bytes], *, end: bool = True) -> None:
        out = [] if held.keepalive.status_sent else [held.status]
        skip = held.keepalive.sent  # sent early; every outcome starts with these bytes
        for piece in pieces:
            if skip:
                cut = min(skip, len(piece))
                piece, skip = piece[cut:], skip - cut
            if piece:
                out.append(held.stuffer.send(piece))
                if sum(map(len, out)) >= CHUNK:
                    self._to_client(b"".join(out))
                    out.clear()
                    await self._flush_client()
        if end:
            out.append(held.stuffer.end())
        await self._send_client(b"".join(out))
        held.keepalive.status_sent = True  # what follows is past any -ERR

    async def _keepalive_tick(self, held: _Held) -> None:
        step = held.keepalive.due(asyncio.get_running_loop().time())
        if step is None:
            return
        if step.send_status:
            self._to_client(held.status)
            logs.event("pop3_keepalive", id=self.ident, detail="status line sent early")
        if step.content:
            self._to_client(held.stuffer.send(step.content))
        await self._flush_client()

    async def _scan(self, content: bytes, held: _Held) -> ScanResult:
        scanner = self.context.scanner
        assert scanner is not None
        task = self.context.spawn(_scan_into(scanner, content, box := _Box()),
                                  f"pop3-{self.ident}-scan")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.scan_timeout
        try:
            while not task.done():
                wake = min(deadline, held.keepalive.next_due)
                await asyncio.wait({task}, timeout=max(0.0, wake - loop.time()))
                if task.done():
                    break
                if loop.time() >= deadline:
                    return ScanResult("failed", reason="scan timed out", timed_out=True)
                await self._keepalive_tick(held)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return box.result or ScanResult("failed", reason="scanner gave no result")

    async def _quarantine(self, spool: Spool, result: ScanResult,
                          command: Command) -> str | None:
        """The quarantine id of the original, None when the proxy runs without a quarantine;
        `_QuarantineFailed` when it could not be stored."""
        store = self.context.quarantine
        if store is None:
            return None
        origin = {"client_address": self.info.client[0],
                  "client_port": str(self.info.client[1]),
                  "server_host": self.destination[0], "server_port": str(self.destination[1]),
                  "user": self.user or "", "command": command.loggable()}
        content = spool.getvalue()
        try:
            return await asyncio.to_thread(store.store, content, result, origin)
        except Exception as exc:  # OSError from the disk, or whatever the store raises
            logs.error("pop3_quarantine_failed", id=self.ident, exc_info=True)
            raise _QuarantineFailed from exc




class _QuarantineFailed(Exception):
    """The original of a message to be replaced could not be stored in the quarantine."""


@dataclass
class _Held:
    """A RETR/TOP response being held back: the server's status line, the keep-alive clock,
    and the stuffer that keeps the client's byte stream consistent across both."""

    status: bytes
    keepalive: Keepalive
    stuffer: DotStuffer


@dataclass
class _Box:
    result: ScanResult | None = None


async def _scan_into(scanner: ContentScanner, content: bytes, box: _Box) -> None:
    try:
        box.result = await scanner.scan(content)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a scanner bug or outage is a failed scan, not a dead session
        box.result = ScanResult("failed", reason=f"scanner error: {type(exc).__name__}")
