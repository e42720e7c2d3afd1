"""The TCP relay over loopback, without interception: listeners are plain (transparent=False)
and the destination is given, so only the byte moving, half-close and cleanup are tested here.
Interception itself is tested in tests/lab."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxies import tcprelay
from proxies.tcprelay import Event, TcpRelay

ROOT = Path(__file__).resolve().parents[2]
ServerHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A loopback server running `handler` for each connection."""

    def __init__(self, handler: ServerHandler) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.peers: list[tuple[str, int]] = []
        self.address = ("", 0)

    async def __aenter__(self) -> Upstream:
        async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.peers.append(writer.get_extra_info("peername")[:2])
            try:
                await self.handler(reader, writer)
            finally:
                writer.close()

        self.server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        self.address = (str(host), int(port))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def relay_to(destination: tuple[str, int], events: list[Event]) -> TcpRelay:
    relay = TcpRelay([0], spoof_source=False, on_connection=events.append, families=(4,),
                     transparent=False, destination=destination, connect_timeout=2)
    await relay.start()
    return relay


async def wait_for_event(events: list[Event], name: str, count: int = 1,
                         timeout: float = 5) -> list[Event]:
    async def poll() -> list[Event]:
        while True:
            found = [e for e in events if e["event"] == name]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.005)

    return await asyncio.wait_for(poll(), timeout)


def run(coro: Awaitable[Any]) -> Any:
    """Run on a fresh loop and fail on anything sent to its exception handler, where asyncio
    reports "Task was destroyed but it is pending" and errors in callbacks."""
    loop = asyncio.new_event_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        assert not errors, errors


def test_bytes_move_both_ways_with_half_close() -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Reads until the client's FIN, then still answers: needs the relay to pass the
        # half-close on and keep the other direction open.
        data = await reader.read()
        writer.write(b"got %d\r\n" % len(data) + data[::-1])
        await writer.drain()

    async def scenario() -> None:
        events: list[Event] = []
        async with Upstream(upstream) as server:
            relay = await relay_to(server.address, events)
            try:
                reader, writer = await asyncio.open_connection(*relay.addresses[0])
                writer.write(payload)
                writer.write_eof()
                answer = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                await writer.wait_closed()
                closed = await wait_for_event(events, "closed")
            finally:
                await relay.close()
        assert answer == b"got %d\r\n" % len(payload) + payload[::-1]
        intercepted = events[0]
        assert intercepted["event"] == "intercepted"
        assert intercepted["destination"] == list(server.address)
        assert closed[0]["bytes_from_client"] == len(payload)
        assert closed[0]["bytes_from_server"] == len(answer)
        assert "error" not in closed[0]
        assert not relay.connections and not relay.tasks

    run(scenario())


def test_server_half_close_first_keeps_client_direction_open() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"greeting, and that is all from me\r\n")
        await writer.drain()
        writer.write_eof()
        data = await reader.read()
        assert data == b"late words\r\n"

    async def scenario() -> None:
        events: list[Event] = []
        async with Upstream(upstream) as server:
            relay = await relay_to(server.address, events)
            try:
                reader, writer = await asyncio.open_connection(*relay.addresses[0])
                assert await asyncio.wait_for(reader.read(), 5) == \
                    b"greeting, and that is all from me\r\n"
                writer.write(b"late words\r\n")
                writer.write_eof()
                closed = await wait_for_event(events, "closed")
                writer.close()
                await writer.wait_closed()
            finally:
                await relay.close()
        assert closed[0]["bytes_from_client"] == len(b"late words\r\n")

    run(scenario())


def test_many_concurrent_connections() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async def one(address: tuple[str, int], index: int) -> bytes:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"%d\r\n" % index)
        writer.write_eof()
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        return data

    async def scenario() -> None:
        events: list[Event] = []
        async with Upstream(echo) as server:
            relay = await relay_to(server.address, events)
            try:
                answers = await asyncio.gather(*(one(relay.addresses[0], i) for i in range(200)))
                await wait_for_event(events, "closed", 200)
            finally:
                await relay.close()
        assert answers == [b"%d\r\n" % i for i in range(200)]

    run(scenario())


def test_refused_onward_connection_closes_the_client_and_says_why() -> None:
    async def scenario() -> None:
        events: list[Event] = []
        async with Upstream(lambda r, w: asyncio.sleep(0)) as server:
            closed_address = server.address
        relay = await relay_to(closed_address, events)
        try:
            # The relay aborts the client's side: a reset when the client's bytes still wait
            # unread in its socket, an end of stream when the relay had read them already
            # (the kernel decides, not us). Either way the client gets no data and no hang.
            client = socket.create_connection(relay.addresses[0][:2], timeout=5)
            client.sendall(b"anyone there?\r\n")
            client.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=client)
            try:
                answer = await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:
                answer = b""
            assert answer == b""
            writer.close()
            closed = await wait_for_event(events, "closed")
        finally:
            await relay.close()
        assert "refused" in closed[0]["error"].lower()

    run(scenario())


def test_connection_addressed_to_the_relay_itself_is_refused() -> None:
    async def scenario() -> None:
        events: list[Event] = []
        relay = TcpRelay([0], spoof_source=False, on_connection=events.append, families=(4,),
                         transparent=False)
        await relay.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.addresses[0][1])
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await writer.wait_closed()
        finally:
            await relay.close()
        assert [e["event"] for e in events] == ["refused"]

    run(scenario())


def test_close_ends_open_connections_without_stray_tasks() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def scenario() -> None:
        events: list[Event] = []
        async with Upstream(silent) as server:
            relay = await relay_to(server.address, events)
            reader, writer = await asyncio.open_connection(*relay.addresses[0])
            writer.write(b"hello")
            await wait_for_event(events, "intercepted")
            await asyncio.sleep(0.05)
            await relay.close()
            with pytest.raises((ConnectionResetError, AssertionError)):
                assert await asyncio.wait_for(reader.read(), 5) != b""
            writer.close()
            await wait_for_event(events, "closed")
        assert not relay.tasks and not relay.connections

    run(scenario())


def test_cli_relays_prints_json_lines_and_stops_on_sigterm() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"echo: " + await reader.read())

    async def scenario() -> None:
        async with Upstream(upstream) as server:
            host, port = server.address
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxies.tcprelay", "--port", "0", "--ipv4-only",
                "--no-transparent", "--no-spoof", "--destination", f"{host}:{port}",
                "--json-events", cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert process.stdout is not None and process.stderr is not None
            try:
                listening = json.loads(await asyncio.wait_for(process.stdout.readline(), 10))
                assert listening["event"] == "listening"
                relay_port = listening["addresses"][0][1]
                reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
                writer.write(b"ping")
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 5) == b"echo: ping"
                writer.close()
                lines = [json.loads(await asyncio.wait_for(process.stdout.readline(), 5))
                         for _ in range(2)]
                # SIGTERM with a connection still open: it is closed and no task is left behind.
                _reader2, writer2 = await asyncio.open_connection("127.0.0.1", relay_port)
                lines.append(json.loads(await asyncio.wait_for(process.stdout.readline(), 5)))
                process.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(process.wait(), 10) == 0
                writer2.close()
                stderr = (await process.stderr.read()).decode()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        assert [e["event"] for e in lines] == ["intercepted", "closed", "intercepted"]
        assert stderr == ""
        assert lines[1]["bytes_from_client"] == 4 and lines[1]["bytes_from_server"] == 10

    run(scenario())


def test_cli_rejects_a_bad_destination(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        tcprelay.main(["--port", "10025", "--destination", "mail.example:25"])
    assert caught.value.code == 2
    assert "ADDRESS:PORT" in capsys.readouterr().err


def test_add_commands_registers_relay() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="mailgate")
    commands = parser.add_subparsers(dest="command", required=True)
    tcprelay.add_commands(commands)
    args = parser.parse_args(["relay", "--port", "10025", "--port", "10110", "--no-spoof"])
    assert args.ports == [10025, 10110] and not args.spoof_source and args.transparent
    assert args.handler is tcprelay.run
