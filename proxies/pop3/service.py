"""The POP3 proxy as a service: listeners, connection limits, one session task per client.

`start_pop3(config, scanner)` is what `mailgate run` calls; `Pop3Proxy` is the same thing with
its parts passed in (tests, the benchmark, `python -m proxies.pop3`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import socket
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from proxies import logs
from proxies.config import Config
from proxies.mail.limits import ConnectionGate
from proxies.pop3.cache import ScanCache
from proxies.pop3.codec import ClientReader
from proxies.pop3.config import Pop3Config
from proxies.pop3.errors import err
from proxies.pop3.link import Link
from proxies.pop3.session import Pop3Session, QuarantineStore, SessionContext, set_nodelay
from proxies.quarantine import Quarantine
from proxies.scan.api import ContentScanner, ScanResult
from proxies.tls import client_context, ensure_self_signed, server_context
from proxies.transparent import Address, accepted, make_listeners

__all__ = ["Pop3Proxy", "RunningService", "SharedQuarantine", "start_pop3"]

STOP_GRACE = 5.0
# A client's unread commands and our unsent replies to it, each at most this much.
CLIENT_BUFFER = 1 << 20


class RunningService(Protocol):
    async def stop(self) -> None: ...


class SharedQuarantine:
    """The POP3 side of the shared quarantine (`proxies.quarantine`): the original of a
    replaced message, with where it came from. Blocking; sessions call it in a thread."""

    def __init__(self, quarantine: Quarantine) -> None:
        self.quarantine = quarantine

    def store(self, content: bytes, result: ScanResult, origin: dict[str, str]) -> str:
        user = origin.get("user", "")
        return self.quarantine.store(
            sender="", recipients=[user] if user else [], content=content, result=result,
            source="pop3", client_address=origin.get("client_address", ""),
            client_port=int(origin.get("client_port", "0")),
            original_destination=(origin["server_host"], int(origin["server_port"])),
            extra={key: value for key, value in origin.items()
                   if key in ("command", "uidl", "user")})


class Pop3Proxy:
    """Listen on `config.listen_port` and run a `Pop3Session` for each intercepted client.

    `destination`: send every client there instead of its original destination (tests and
    benchmarks without interception; then `transparent=False` too).
    """

    def __init__(self, config: Pop3Config, *, scanner: ContentScanner | None,
                 quarantine: QuarantineStore | None, spoof_source: bool = True,
                 families: Iterable[int] = (4, 6), transparent: bool = True,
                 destination: Address | None = None, tls_server: ssl.SSLContext | None = None,
                 hostname: str = "localhost") -> None:
        self.config = config
        self.spoof_source = spoof_source
        self.families = tuple(families)
        self.transparent = transparent
        self.destination = destination
        self.context = SessionContext(
            config=config, scanner=scanner, quarantine=quarantine,
            cache=ScanCache(config.cache_ttl), hostname=config.hostname or hostname,
            tls_server=tls_server, tls_client=client_context())
        self.servers: list[asyncio.Server] = []
        self.gate = ConnectionGate(config.max_connections, config.max_connections_per_client)
        self._ids = itertools.count(1)

    @property
    def addresses(self) -> list[Address]:
        return [(str(sock.getsockname()[0]), int(sock.getsockname()[1]))
                for server in self.servers for sock in server.sockets]

    async def start(self, port: int | None = None) -> None:
        listen_port = self.config.listen_port if port is None else port
        try:
            for sock in make_listeners(listen_port, self.families, transparent=self.transparent):
                try:
                    port_here = int(sock.getsockname()[1])
                    server = await asyncio.get_running_loop().create_server(
                        functools.partial(self._link, port_here), sock=sock)
                except BaseException:
                    sock.close()
                    raise
                self.servers.append(server)
        except BaseException:
            await self.stop()
            raise
        logs.event("pop3_listening", addresses=[f"[{h}]:{p}" for h, p in self.addresses],
                   tls=self.config.tls, scanning=self.context.scanner is not None)

    def _link(self, listen_port: int) -> Link:
        return Link(ClientReader(), CLIENT_BUFFER,
                    on_made=functools.partial(self._accepted, listen_port))

    def _accepted(self, listen_port: int, link: Link) -> None:
        """A new connection: classify it and start its session task."""
        transport = link.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        set_nodelay(sock)
        transport.set_write_buffer_limits(high=CLIENT_BUFFER)
        ident = next(self._ids)
        try:
            info = accepted(transport, listen_port)
        except OSError as exc:
            logs.warning("pop3_accept_failed", id=ident, error=str(exc))
            transport.close()
            return
        destination = self.destination or (info.original_destination if info.intercepted
                                            else None)
        if destination is None:
            logs.warning("pop3_refused", id=ident, client=info.client[0],
                         reason="addressed to the proxy itself, not intercepted")
            transport.write(err("[SYS/PERM] this is a transparent POP3 proxy; connect to your "
                             "mail server"))
            transport.close()
            return
        client = info.client[0]
        if not self.gate.admit(client):
            logs.warning("pop3_refused", id=ident, client=client, reason="connection limit")
            transport.write(err("[SYS/TEMP] too many connections, try again later"))
            transport.close()
            return
        source = client if self.spoof_source else None
        session = Pop3Session(self.context, ident, link, info, destination, source)
        task = self.context.spawn(session.run(), f"pop3-{ident}")
        task.add_done_callback(lambda _task: self.gate.release(client))

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop listening; give sessions `grace` seconds, then end them."""
        for server in self.servers:
            server.close()
        tasks = set(self.context.tasks)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.servers.clear()


def tls_server_context(config: Pop3Config, state_dir: Path, hostname: str
                       ) -> ssl.SSLContext | None:
    """The certificate clients see in terminate mode (generated once if none is configured)."""
    if config.tls != "terminate":
        return None
    if config.tls_cert is not None and config.tls_key is not None:
        cert, key = config.tls_cert, config.tls_key
    else:
        cert, key = ensure_self_signed(state_dir / "tls", hostname)
    return server_context(cert, key)


def quarantine_for(config: Config) -> SharedQuarantine:
    settings = config.scan.quarantine
    return SharedQuarantine(Quarantine(settings.dir, retention=settings.retention))


async def start_pop3(config: Config, scanner: ContentScanner | None) -> RunningService:
    pop3 = config.pop3
    hostname = pop3.hostname or config.smtp.hostname or socket.gethostname()
    proxy = Pop3Proxy(
        pop3, scanner=scanner, quarantine=quarantine_for(config),
        spoof_source=config.network.spoof_source,
        families=(4, 6) if config.network.ipv6 else (4,),
        tls_server=tls_server_context(pop3, config.smtp.queue_dir, hostname),
        hostname=hostname)
    if scanner is None:
        logs.warning("pop3_scanning_off", reason="no scanner configured in [scan]: POP3 mail "
                     "is relayed unscanned")
    await proxy.start()
    return proxy
