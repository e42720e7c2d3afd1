"""A transparent TCP relay: accept what TPROXY (or REDIRECT) hands us and pass the bytes on to
where the client was going, from the client's own address when spoofing is on.

It knows no protocol. The demo and the lab tests use it to show interception working before (and
independently of) the SMTP and POP3 proxies, and it is the baseline their throughput is measured
against.

Run it as `python -m proxies.tcprelay --port 10025 --port 10110 --json-events` (or `mailgate
relay`): one JSON line per event on stdout, "listening" once, then "intercepted" and "closed"
for each connection.

Bytes move with asyncio Protocols, not a read/write loop: each read (into the one buffer of
`proxies.receivebuffer`) goes straight to the other transport's write(), which sends at once
when the socket has room, and the transports' flow control (pause_writing -> pause the other
side's reading) bounds memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

from proxies.receivebuffer import SharedBufferProtocol
from proxies.transparent import (
    Address,
    ConnectionInfo,
    TransparentError,
    accepted,
    connect_socket,
    make_listeners,
)

log = logging.getLogger("mailgate.tcprelay")

Event = dict[str, Any]
EventCallback = Callable[[Event], None]

# Above this many unsent bytes on one side, stop reading from the other (asyncio's default high
# water mark is 64 KiB; a larger window keeps both sockets busy on fast links).
WRITE_HIGH_WATER = 1 << 20


def _addr(address: Address) -> list[object]:
    return [address[0], address[1]]


def _reason(exc: BaseException) -> str:
    """'Connection refused' rather than asyncio's 'Connect call failed (...)'."""
    if isinstance(exc, TransparentError | TimeoutError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


class _Side(SharedBufferProtocol):
    """One socket of a relayed connection; what it reads is written to the other side."""

    def __init__(self, name: str) -> None:
        self.relayed: RelayedConnection | None = None  # None until the connection is classified
        self.name = name  # "client" or "server"
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.received = 0
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not derive from asyncio's.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes | memoryview) -> None:
        # A copy: the other transport keeps what it cannot send at once, and the shared
        # buffer is the next read's.
        data = bytes(data)
        self.received += len(data)
        other = self.other
        relayed = self.relayed
        # The client's bytes wait in `early` until connect() has sent what came before them:
        # the server's transport exists (connection_made) before connect() resumes, and a
        # chunk written straight away then would overtake the early ones (seen under load:
        # a 3 MB upload arrived reordered).
        held = self.name == "client" and relayed is not None and not relayed.flowing
        if other is not None and other.transport is not None and not held:
            other.transport.write(data)
        elif relayed is not None:
            # Reading is paused until the onward connection is up; this only guards the chunk
            # a transport may deliver in the same loop iteration as the pause.
            relayed.early.append(data)

    def eof_received(self) -> bool:
        # TCP half-close (RFC 9293 3.6): a side that is done sending may still receive, as an
        # SMTP client that shuts down its write side may still wait for the final reply. Pass
        # the FIN on and keep the connection open until both directions are finished.
        self.eof = True
        if self.relayed is not None:
            self.relayed.eof_from(self)
        return True

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.relayed is not None:
            self.relayed.lost(self, exc)


class _ClientSide(_Side):
    """The accepted socket: the relay classifies it as soon as it exists."""

    def __init__(self, relay: TcpRelay, listen_port: int) -> None:
        super().__init__("client")
        self.relay = relay
        self.listen_port = listen_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.relay.accepted(self, self.listen_port)


class RelayedConnection:
    """One client connection and its onward connection, from accept to the last byte."""

    def __init__(self, relay: TcpRelay, ident: int, info: ConnectionInfo, client: _Side,
                 destination: Address, source: str | None) -> None:
        self.relay = relay
        self.ident = ident
        self.info = info
        self.destination = destination
        self.source = source
        self.client = client
        self.server = _Side("server")
        for side in (self.client, self.server):
            side.relayed = self
        self.client.other, self.server.other = self.server, self.client
        self.early: list[bytes] = []
        self.flowing = False  # the early client bytes are sent: new ones go straight on
        self.error: str | None = None
        self.started = time.monotonic()
        self.done = asyncio.get_running_loop().create_future()
        self.connect_task: asyncio.Task[None] | None = None
        self._closing = False

    # --- lifecycle --------------------------------------------------------------------------

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = await connect_socket(self.destination, source=self.source,
                                        timeout=self.relay.connect_timeout)
        except OSError as exc:  # TimeoutError included
            self.error = (f"connecting to [{self.destination[0]}]:{self.destination[1]}: "
                          f"{_reason(exc)}")
            self.close(abort=True)
            return
        if self._closing:  # the client went away while we connected
            sock.close()
            return
        try:
            await loop.create_connection(lambda: self.server, sock=sock)
        except OSError as exc:
            sock.close()
            self.error = f"onward connection: {_reason(exc)}"
            self.close(abort=True)
            return
        if self._closing:
            self.close(abort=True)
            return
        server_transport = self.server.transport
        client_transport = self.client.transport
        assert server_transport is not None and client_transport is not None
        for chunk in self.early:
            server_transport.write(chunk)
        self.early.clear()
        self.flowing = True
        if self.client.eof:
            self.eof_from(self.client)
        client_transport.resume_reading()

    def eof_from(self, side: _Side) -> None:
        other = side.other
        assert other is not None
        if other.transport is None:
            return  # not connected yet; connect() passes the EOF on
        if other.transport.can_write_eof() and not other.transport.is_closing():
            other.transport.write_eof()
        if self.client.eof and self.server.eof:
            # Both directions finished: close() still flushes what is buffered.
            self.close()

    def lost(self, side: _Side, exc: Exception | None) -> None:
        if exc is not None and self.error is None:
            self.error = f"{side.name} side: {_reason(exc)}"
        # A reset or a full close on one side ends the relay: an abrupt end is passed on as one
        # (abort sends RST), an orderly one as an orderly close after the buffered data.
        self.close(abort=exc is not None)

    def close(self, abort: bool = False) -> None:
        self._closing = True
        for side in (self.client, self.server):
            transport = side.transport
            if transport is None or transport.is_closing():
                continue
            if abort:
                transport.abort()
            else:
                transport.close()
        self._maybe_done()

    def _maybe_done(self) -> None:
        sides_gone = all(s.transport is None or s.lost for s in (self.client, self.server))
        connecting = self.connect_task is not None and not self.connect_task.done()
        if sides_gone and not connecting and not self.done.done():
            self.done.set_result(None)
            self.relay.finished(self)

    def connect_finished(self) -> None:
        self._maybe_done()


class TcpRelay:
    """Listen on `ports` and relay every connection to its original destination.

    `destination`: relay everything there instead (for tests without interception).
    `spoof_source`: connect onward from the client's address (needs the DIVERT rule netsetup
    installs, or replies never reach us).
    """

    def __init__(self, ports: Iterable[int], *, spoof_source: bool = True,
                 on_connection: EventCallback | None = None, families: Iterable[int] = (4, 6),
                 transparent: bool = True, destination: Address | None = None,
                 connect_timeout: float = 10.0, reuse_port: bool = False) -> None:
        self.ports = list(ports)
        self.spoof_source = spoof_source
        self.on_connection = on_connection
        self.families = tuple(families)
        self.transparent = transparent
        self.destination = destination
        self.connect_timeout = connect_timeout
        self.reuse_port = reuse_port
        self.servers: list[asyncio.Server] = []
        self.connections: dict[int, RelayedConnection] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    @property
    def addresses(self) -> list[Address]:
        """Where the relay listens (with the real port when 0 was asked for)."""
        result = []
        for server in self.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                result.append((str(name[0]), int(name[1])))
        return result

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for port in self.ports:
                for sock in make_listeners(port, self.families, transparent=self.transparent,
                                           reuse_port=self.reuse_port):
                    try:
                        server = await loop.create_server(
                            functools.partial(_ClientSide, self, sock.getsockname()[1]),
                            sock=sock)
                    except BaseException:
                        sock.close()
                        raise
                    self.servers.append(server)
        except BaseException:
            await self.close()
            raise

    def accepted(self, side: _ClientSide, listen_port: int) -> None:
        transport = side.transport
        assert transport is not None
        # Nothing is read until the onward connection can take it (flow control starts here).
        transport.pause_reading()
        try:
            info = accepted(transport, listen_port)
        except OSError as exc:
            log.warning("cannot read the addresses of an accepted connection: %s", exc)
            transport.abort()
            return
        ident = next(self._ids)
        destination = self.destination or (info.original_destination if info.intercepted
                                            else None)
        if destination is None:
            # Addressed to the relay itself: there is nowhere to relay to, and connecting to
            # our own address would only loop.
            self._emit({"event": "refused", "id": ident, "client": _addr(info.client),
                        "local": _addr(info.local),
                        "reason": "addressed to the relay itself, not intercepted"})
            transport.close()
            return
        source = info.client[0] if self.spoof_source else None
        relayed = RelayedConnection(self, ident, info, side, destination, source)
        self.connections[ident] = relayed
        self._emit({"event": "intercepted", "id": ident, "client": _addr(info.client),
                    "original_destination": _addr(info.original_destination),
                    "how": info.how, "destination": _addr(destination),
                    "spoof_source": self.spoof_source})
        task = asyncio.get_running_loop().create_task(
            relayed.connect(), name=f"tcprelay-{ident}-connect")
        relayed.connect_task = task
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        task.add_done_callback(lambda _t: relayed.connect_finished())

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("relay task %s failed", task.get_name(), exc_info=task.exception())

    def finished(self, relayed: RelayedConnection) -> None:
        self.connections.pop(relayed.ident, None)
        event: Event = {
            "event": "closed", "id": relayed.ident, "client": _addr(relayed.info.client),
            "original_destination": _addr(relayed.info.original_destination),
            "bytes_from_client": relayed.client.received,
            "bytes_from_server": relayed.server.received,
            "seconds": round(time.monotonic() - relayed.started, 6),
        }
        if relayed.error:
            event["error"] = relayed.error
        self._emit(event)

    def _emit(self, event: Event) -> None:
        if self.on_connection is None:
            return
        try:
            self.on_connection(event)
        except Exception:
            log.exception("on_connection callback failed for %s", event.get("event"))

    async def close(self) -> None:
        """Stop listening, end every relayed connection, and wait for the tasks."""
        for server in self.servers:
            server.close()
        for relayed in list(self.connections.values()):
            relayed.close(abort=True)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for server in self.servers:
            await server.wait_closed()
        # Transports call connection_lost on the next loop iterations.
        for _ in range(3):
            if not self.connections:
                break
            await asyncio.sleep(0)
        self.servers.clear()

    async def __aenter__(self) -> TcpRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def serve_relay(listen_ports: Iterable[int], *, spoof_source: bool = True,
                      on_connection: EventCallback | None = None,
                      stop: asyncio.Event | None = None, **options: Any) -> None:
    """Run a TcpRelay until `stop` is set or the task is cancelled; close it either way."""
    relay = TcpRelay(listen_ports, spoof_source=spoof_source, on_connection=on_connection,
                     **options)
    await relay.start()
    try:
        if on_connection is not None:
            on_connection({"event": "listening",
                           "addresses": [_addr(a) for a in relay.addresses]})
        await (stop or asyncio.Event()).wait()
    finally:
        await relay.close()


# --- command line -----------------------------------------------------------------------------


def _destination(value: str) -> Address:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ADDRESS:PORT such as 198.51.100.25:25 or [2001:db8::25]:25, got {value!r}"
        ) from None
    if not sep or not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"not a port number in {value!r}")
    return host, number


def _port(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= number < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}")
    return number


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", dest="ports", action="append", type=_port, required=True,
                        metavar="PORT",
                        help="local port TPROXY hands connections to, e.g. 10025; repeat for "
                             "more (netsetup's [network] listen ports: smtp 10025, pop3 10110)")
    parser.add_argument("--no-spoof", dest="spoof_source", action="store_false",
                        help="connect onward from this host's own address instead of the "
                             "client's (then the server sees the gateway, as with "
                             "spoof_source = false in [network])")
    parser.add_argument("--json-events", action="store_true",
                        help="print one JSON object per line on stdout for each event "
                             "(listening, intercepted, refused, closed)")
    parser.add_argument("--ipv4-only", action="store_true",
                        help="listen for IPv4 only (as with ipv6 = false in [network])")
    parser.add_argument("--no-transparent", dest="transparent", action="store_false",
                        help="plain listeners without IP_TRANSPARENT: for REDIRECT rules, or "
                             "with --destination for a test without interception")
    parser.add_argument("--destination", type=_destination, metavar="ADDRESS:PORT",
                        help="relay every connection here instead of its original destination")
    parser.add_argument("--reuse-port", action="store_true",
                        help="set SO_REUSEPORT so several relay processes share the ports")
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="give up an onward connection after this long (default: 10)")


def _printer(json_events: bool) -> EventCallback:
    def emit(event: Event) -> None:
        if json_events:
            line = json.dumps(event, separators=(",", ":"))
        elif event["event"] == "listening":
            line = "listening on " + ", ".join(f"[{h}]:{p}" for h, p in event["addresses"])
        elif event["event"] == "intercepted":
            (ch, cp), (dh, dp) = event["client"], event["original_destination"]
            line = f"#{event['id']} [{ch}]:{cp} -> [{dh}]:{dp} ({event['how']})"
        elif event["event"] == "closed":
            line = (f"#{event['id']} closed: {event['bytes_from_client']} bytes from the "
                    f"client, {event['bytes_from_server']} from the server"
                    + (f"; {event['error']}" if "error" in event else ""))
        else:
            line = f"#{event['id']} refused: {event['reason']}"
        print(line, flush=True)

    return emit


def run(args: argparse.Namespace, prog: str = "mailgate relay") -> int:
    async def main_async() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve_relay(
            args.ports, spoof_source=args.spoof_source, on_connection=_printer(args.json_events),
            stop=stop, families=(4,) if args.ipv4_only else (4, 6),
            transparent=args.transparent, destination=args.destination,
            connect_timeout=args.connect_timeout, reuse_port=args.reuse_port)

    try:
        asyncio.run(main_async())
    except TransparentError as exc:
        print(f"{prog}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `mailgate relay`."""
    relay = subparsers.add_parser(
        "relay",
        help="transparent TCP relay: pass intercepted connections on, unfiltered",
        description=(
            "Accept the connections netsetup's TPROXY rules hand to the listen ports and relay "
            "the bytes, unchanged, to where each client was going, from the client's own "
            "address unless --no-spoof. Shows interception working without any mail "
            "processing. Needs CAP_NET_ADMIN (root). Stop it with SIGTERM or Ctrl-C."
        ),
    )
    _configure(relay)
    relay.set_defaults(handler=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxies.tcprelay",
        description="Transparent TCP relay for intercepted connections (see 'mailgate relay').")
    _configure(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    return run(args, prog="tcprelay")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
