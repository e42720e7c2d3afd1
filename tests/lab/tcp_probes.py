"""TCP peers for lab tests: a server that tells each client the address it saw, and a client
that prints what it was told.

    python -m tests.lab.tcp_probes serve --port 25 --port 110
        prints {"event": "listening", ...} once, then {"event": "connection", "peer": [...],
        "local": [...]} for each connection; greets each client with
        "PEER <address> <port> LOCAL <address> <port>\\r\\n", then echoes until EOF.
    python -m tests.lab.tcp_probes connect 198.51.100.25:25 [2001:db8:2::25]:110 [--source A]
        prints one JSON object per target: {"target", "ok", "greeting", "peer", "echo", ...}.
    python -m tests.lab.tcp_probes classify --port 10025 [--dual-stack]
        listens like a proxy (proxies.transparent.make_listener) and prints, per connection,
        what proxies.transparent.connection_info makes of it.

`JsonLines` reads such a program's stdout from a test, with timeouts instead of sleeps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

Event = dict[str, Any]


def _say(event: Event) -> None:
    print(json.dumps(event), flush=True)


def _plain(sockaddr: Any) -> list[Any]:
    host = str(sockaddr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return [host, int(sockaddr[1])]


async def _serve(ports: Sequence[int]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _plain(writer.get_extra_info("peername"))
        local = _plain(writer.get_extra_info("sockname"))
        _say({"event": "connection", "peer": peer, "local": local})
        try:
            writer.write(f"PEER {peer[0]} {peer[1]} LOCAL {local[0]} {local[1]}\r\n".encode())
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    servers = []
    for port in ports:
        for host in ("0.0.0.0", "::"):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            servers.append(await asyncio.start_server(handle, sock=sock))
    _say({"event": "listening", "ports": list(ports)})
    await asyncio.Event().wait()


async def _classify(port: int, dual_stack: bool, transparent: bool) -> None:
    """Listen as a proxy would and report how proxies.transparent sees each connection."""
    from proxies.transparent import connection_info, make_listener

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = connection_info(writer.get_extra_info("socket"), port)
        _say({"event": "connection", "client": list(info.client), "local": list(info.local),
              "original_destination": list(info.original_destination), "how": info.how,
              "intercepted": info.intercepted})
        writer.write(b"PEER %s %d LOCAL %s %d\r\n" % (
            info.client[0].encode(), info.client[1], info.local[0].encode(), info.local[1]))
        await reader.read()
        writer.close()

    hosts = ["::"] if dual_stack else ["0.0.0.0", "::"]
    servers = [await asyncio.start_server(
        handle, sock=make_listener(host, port, transparent=transparent, v6only=not dual_stack))
        for host in hosts]
    _say({"event": "listening", "sockets": [s.sockets[0].getsockname()[:2] for s in servers]})
    await asyncio.Event().wait()


def _target(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def _connect(target: str, source: str | None, timeout: float) -> Event:
    host, port = _target(target)
    result: Event = {"target": [host, port], "ok": False}
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            if source:
                sock.bind((source, 0))
            sock.connect((host, port))
            result["local"] = _plain(sock.getsockname())
            stream = sock.makefile("rb")
            greeting = stream.readline().decode().strip()
            result["greeting"] = greeting
            words = greeting.split()
            if len(words) == 6 and words[0] == "PEER":
                result["peer"] = [words[1], int(words[2])]
                result["server_local"] = [words[4], int(words[5])]
            sock.sendall(b"echo me\r\n")
            sock.shutdown(socket.SHUT_WR)
            result["echo"] = stream.read().decode()
            result["ok"] = True
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lab.tcp_probes")
    verbs = parser.add_subparsers(dest="verb", required=True)
    serve = verbs.add_parser("serve")
    serve.add_argument("--port", dest="ports", type=int, action="append", required=True)
    classify = verbs.add_parser("classify")
    classify.add_argument("--port", type=int, required=True)
    classify.add_argument("--dual-stack", action="store_true",
                          help="one '::' socket without IPV6_V6ONLY instead of one per family")
    classify.add_argument("--no-transparent", dest="transparent", action="store_false")
    connect = verbs.add_parser("connect")
    connect.add_argument("targets", nargs="+", metavar="ADDRESS:PORT")
    connect.add_argument("--source", help="bind to this address first")
    connect.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.verb == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args.ports))
        return 0
    if args.verb == "classify":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_classify(args.port, args.dual_stack, args.transparent))
        return 0
    for target in args.targets:
        _say(_connect(target, args.source, args.timeout))
    return 0


# --- test side --------------------------------------------------------------------------------


def event_is(name: str, **fields: object) -> Callable[[Event], bool]:
    """A `JsonLines.wait_for` predicate: this event with these field values."""
    return lambda event: event.get("event") == name and all(
        event.get(key) == value for key, value in fields.items())


class JsonLines:
    """Collects the JSON lines a spawned process prints, on a thread, for polling with a
    deadline. Lines that are not JSON are kept as {"event": "text", "text": ...}."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None, "spawn the process with stdout=subprocess.PIPE"
        self.process = process
        self.events: list[Event] = []
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True,
                                        name=f"jsonlines-{process.pid}")
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "text", "text": line}
            self._queue.put(event)
        self._queue.put(None)

    def _drain(self, block_for: float) -> bool:
        """Move what arrived into `events`; False once the process's stdout has ended."""
        try:
            item = self._queue.get(timeout=block_for)
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            self.events.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True

    def wait_for(self, match: Callable[[Event], bool], timeout: float = 10.0,
                 what: str = "event") -> Event:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if match(event):
                    return event
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout}s; got {self.events}")
            if not self._drain(min(remaining, 0.2)) and len(self.events) == seen:
                raise AssertionError(
                    f"process ended (exit {self.process.poll()}) before {what}; got {self.events}")

    def settle(self, quiet: float = 0.3) -> list[Event]:
        """Everything printed so far, after waiting `quiet` seconds for stragglers."""
        deadline = time.monotonic() + quiet
        while (remaining := deadline - time.monotonic()) > 0 and self._drain(remaining):
            pass
        return list(self.events)


if __name__ == "__main__":
    sys.exit(main())
