"""The asyncio driver of the SMTP front end, scripted with a fake transport (no sockets).

What is checked is what a client sees: each write the driver makes. One command in, one
complete reply out, in one write; a pipelined group, one write with every reply; the policy
handler's answers and the core's own; a crash in a hook contained to its connection; the
idle timeout's 421; connection limits.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope, Session

from proxies.config import SmtpConfig
from proxies.smtp.frontend import MailgateFrontEnd, SmtpConnection
from proxies.smtp.handler import ConnectionGate

LISTEN = 10025


class FakeSocket:
    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", LISTEN)  # addressed to the proxy itself: not intercepted

    def getpeername(self) -> tuple[str, int]:
        return ("192.0.2.10", 40000)

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        raise OSError(errno.ENOENT, "no conntrack")


@dataclass
class FakeTransport(asyncio.Transport):
    writes: list[bytes] = field(default_factory=list)
    closed: bool = False
    paused: bool = False

    def __post_init__(self) -> None:
        super().__init__()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"socket": FakeSocket(), "peername": ("192.0.2.10", 40000)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


Hook = Callable[..., Awaitable[str]]


class ScriptedHandler:
    """A policy that accepts everything, with a place to put a slow or broken hook."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.data_hook: Hook | None = None

    async def handle_EHLO(self, server: Any, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return responses

    async def handle_HELO(self, server: Any, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: Any, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        envelope.mail_from = address
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address.endswith("@foreign.example"):
            return "554 5.7.1 Relay access denied"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        if self.data_hook is not None:
            return await self.data_hook(envelope)
        assert isinstance(envelope.content, bytes)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Ok: queued as TEST1"


@dataclass
class Conversation:
    connection: SmtpConnection
    transport: FakeTransport
    handler: ScriptedHandler

    async def say(self, data: bytes) -> list[bytes]:
        """Feed bytes, let the driver settle, return the writes it made meanwhile."""
        before = len(self.transport.writes)
        self.connection.data_received(data)
        for _ in range(20):
            await asyncio.sleep(0)
        return self.transport.writes[before:]


async def converse(handler: ScriptedHandler | None = None,
                   **smtp: Any) -> Conversation:
    settings: dict[str, Any] = {"hostname": "gw.example", "tls": False, **smtp}
    config = SmtpConfig(**settings)
    handler = handler or ScriptedHandler()
    front = MailgateFrontEnd(config, handler, None, ConnectionGate(10, 2))
    connection = front.protocol()
    transport = FakeTransport()
    connection.connection_made(transport)
    await asyncio.sleep(0)
    return Conversation(connection, transport, handler)


def test_greeting_then_one_write_per_reply() -> None:
    async def run() -> None:
        talk = await converse()
        assert talk.transport.writes == [b"220 gw.example ESMTP mailgate\r\n"]
        # A multi-line reply is one write: a client reading once gets all of it.
        (ehlo,) = await talk.say(b"EHLO client.example\r\n")
        lines = ehlo.split(b"\r\n")
        assert lines[0] == b"250-gw.example" and lines[-2].startswith(b"250 ")
        assert b"PIPELINING" in ehlo and b"ENHANCEDSTATUSCODES" in ehlo
        assert await talk.say(b"MAIL FROM:<a@sender.example>\r\n") == [b"250 2.1.0 Ok\r\n"]
        assert await talk.say(b"RCPT TO:<b@example.com>\r\n") == [b"250 2.1.5 Ok\r\n"]
        assert await talk.say(b"DATA\r\n") == [b"354 End data with <CR><LF>.<CR><LF>\r\n"]
        assert await talk.say(b"Subject: x\r\n\r\nhello\r\n.\r\n") == [
            b"250 2.0.0 Ok: queued as TEST1\r\n"]
        assert talk.handler.messages == [("a@sender.example", ["b@example.com"],
                                          b"Subject: x\r\n\r\nhello\r\n")]
        assert await talk.say(b"QUIT\r\n") == [b"221 2.0.0 Bye\r\n"]
        assert talk.transport.closed

    asyncio.run(run())


def test_reads_into_the_shared_buffer_are_taken_before_the_next_read() -> None:
    """As asyncio reads (get_buffer, buffer_updated), with the buffer overwritten by the next
    read at once (proxies/receivebuffer.py): the commands and the message are what was sent."""
    async def run() -> None:
        talk = await converse()

        async def read(data: bytes) -> list[bytes]:
            before = len(talk.transport.writes)
            view = memoryview(talk.connection.get_buffer(-1))
            view[:len(data)] = data
            talk.connection.buffer_updated(len(data))
            view[:len(data)] = b"\xff" * len(data)
            for _ in range(20):
                await asyncio.sleep(0)
            return talk.transport.writes[before:]

        (ehlo,) = await read(b"EHLO client.example\r\nMAIL FROM:<a@sender.example>\r\n"
                             b"RCPT TO:<b@exa")
        assert ehlo.endswith(b"\r\n250 2.1.0 Ok\r\n")
        assert await read(b"mple.com>\r\nDATA\r\n") == [
            b"250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"]
        await read(b"Subject: x\r\n\r\nfirst ")
        assert await read(b"line\r\n.\r\n") == [b"250 2.0.0 Ok: queued as TEST1\r\n"]
        assert talk.handler.messages == [("a@sender.example", ["b@example.com"],
                                          b"Subject: x\r\n\r\nfirst line\r\n")]

    asyncio.run(run())


def test_a_pipelined_group_gets_its_replies_in_one_write() -> None:
    async def run() -> None:
        talk = await converse()
        await talk.say(b"EHLO client.example\r\n")
        group = (b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<b@example.com>\r\n"
                 b"RCPT TO:<c@foreign.example>\r\nRCPT TO:<d@example.com>\r\nDATA\r\n")
        assert await talk.say(group) == [
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n554 5.7.1 Relay access denied\r\n"
            b"250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"]
        # The message and a command after the final dot, in one packet (RFC 2920 3.1).
        assert await talk.say(b"hi\r\n.\r\nNOOP\r\n") == [
            b"250 2.0.0 Ok: queued as TEST1\r\n250 2.0.0 OK\r\n"]

    asyncio.run(run())


def test_protocol_errors_come_from_the_core() -> None:
    async def run() -> None:
        talk = await converse()
        assert (await talk.say(b"MAIL FROM:<a@sender.example>\r\n"))[0].startswith(
            b"503 5.5.1")
        await talk.say(b"EHLO client.example\r\n")
        assert (await talk.say(b"BDAT 10 LAST\r\n"))[0].startswith(b"502 5.5.1")
        assert (await talk.say(b"X" * 600 + b"\r\n"))[0].startswith(b"500 5.5.2")
        (nul,) = await talk.say(b"MAIL FROM:<a@s.example>\r\nRCPT TO:<b@example.com>\r\n"
                                b"DATA\r\n")
        assert nul.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        assert await talk.say(b"a\0b\r\n.\r\n") == [
            b"550 5.6.0 Message contains NUL characters\r\n"]
        assert talk.handler.messages == []

    asyncio.run(run())


def test_a_crashing_hook_ends_only_its_connection_without_internals() -> None:
    async def run() -> None:
        handler = ScriptedHandler()

        async def broken(envelope: Envelope) -> str:
            raise RuntimeError("secret internal detail")

        handler.data_hook = broken
        talk = await converse(handler)
        await talk.say(b"EHLO c.example\r\nMAIL FROM:<a@s.example>\r\nRCPT TO:<b@example.com>"
                       b"\r\nDATA\r\n")
        (reply,) = await talk.say(b"x\r\n.\r\n")
        assert reply == b"451 4.3.0 Internal error, try again later\r\n"
        assert b"secret" not in b"".join(talk.transport.writes)
        # The session goes on: the failure was the hook's, not the protocol's.
        assert await talk.say(b"NOOP\r\n") == [b"250 2.0.0 OK\r\n"]
        other = await converse(handler)
        assert other.transport.writes == [b"220 gw.example ESMTP mailgate\r\n"]

    asyncio.run(run())


def test_replies_wait_for_a_slow_hook_and_keep_their_order() -> None:
    async def run() -> None:
        handler = ScriptedHandler()
        release = asyncio.Event()

        async def slow(envelope: Envelope) -> str:
            await release.wait()
            return "250 2.0.0 Ok: queued as SLOW"

        handler.data_hook = slow
        talk = await converse(handler)
        await talk.say(b"EHLO c.example\r\nMAIL FROM:<a@s.example>\r\nRCPT TO:<b@example.com>"
                       b"\r\nDATA\r\n")
        assert await talk.say(b"x\r\n.\r\nNOOP\r\n") == []  # nothing before the 250
        release.set()
        for _ in range(20):
            await asyncio.sleep(0)
        assert talk.transport.writes[-1] == b"250 2.0.0 Ok: queued as SLOW\r\n250 2.0.0 OK\r\n"

    asyncio.run(run())


def test_idle_timeout_says_421_then_closes() -> None:
    async def run() -> None:
        talk = await converse(command_timeout=0.05)
        await asyncio.sleep(0.15)
        assert talk.transport.writes[-1] == b"421 4.4.2 gw.example Error: timeout exceeded\r\n"
        assert talk.transport.closed

    asyncio.run(run())


async def _in_data(**smtp: Any) -> Conversation:
    talk = await converse(**smtp)
    await talk.say(b"EHLO c.example\r\nMAIL FROM:<a@s.example>\r\nRCPT TO:<b@example.com>\r\n")
    (reply,) = await talk.say(b"DATA\r\n")
    assert reply.startswith(b"354")
    return talk


async def _trickle(talk: Conversation, chunk: bytes, every: float, seconds: float) -> None:
    for _ in range(round(seconds / every)):
        if talk.transport.closed:
            return
        await talk.say(chunk)
        await asyncio.sleep(every)


def test_content_trickled_below_min_data_rate_times_out() -> None:
    # A byte every 0.1 s keeps each read well inside data_timeout (0.4 s), but earns only
    # 0.01 s a byte at 100 bytes/s: the deadline set at the 354 comes about 0.45 s later.
    async def run() -> None:
        talk = await _in_data(data_timeout=0.4, min_data_rate=100)
        await _trickle(talk, b"x", 0.1, 1.2)
        assert talk.transport.writes[-1] == b"421 4.4.2 gw.example Error: timeout exceeded\r\n"
        assert talk.transport.closed and talk.handler.messages == []

    asyncio.run(run())


def test_content_at_min_data_rate_outlasts_data_timeout() -> None:
    # 40 bytes every 0.1 s (400 bytes/s, above the 100 required) for 1 s, 2.5 data_timeouts.
    async def run() -> None:
        talk = await _in_data(data_timeout=0.4, min_data_rate=100)
        await _trickle(talk, b"Subject: slow\r\n" + b"y" * 22 + b"\r\n", 0.1, 1.0)
        assert not talk.transport.closed
        (reply,) = await talk.say(b".\r\n")
        assert reply.startswith(b"250 ") and len(talk.handler.messages) == 1

    asyncio.run(run())


def test_min_data_rate_zero_times_only_the_gap_between_reads() -> None:
    async def run() -> None:
        talk = await _in_data(data_timeout=0.4, min_data_rate=0)
        await _trickle(talk, b"z", 0.1, 1.0)
        assert not talk.transport.closed
        await talk.say(b"\r\n")
        (reply,) = await talk.say(b".\r\n")
        assert reply.startswith(b"250 ")

    asyncio.run(run())


def test_connection_limit_per_client() -> None:
    async def run() -> None:
        # One front end, three connections from one client allowed two:
        config = SmtpConfig(hostname="gw.example", tls=False)
        front = MailgateFrontEnd(config, ScriptedHandler(), None, ConnectionGate(10, 2))
        transports = []
        for _ in range(3):
            connection = front.protocol()
            transport = FakeTransport()
            connection.connection_made(transport)
            transports.append(transport)
        assert transports[2].writes == [b"421 4.7.0 Too many connections, try again later\r\n"]
        assert transports[2].closed and not transports[0].closed
        for task in list(front.tasks):
            task.cancel()

    asyncio.run(run())


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_input_split_anywhere_gives_the_same_writes_per_round(chunk: int) -> None:
    async def run() -> None:
        talk = await converse()
        data = b"EHLO c.example\r\nMAIL FROM:<a@s.example>\r\nRCPT TO:<b@example.com>\r\n"
        got = b""
        for start in range(0, len(data), chunk):
            got += b"".join(await talk.say(data[start:start + chunk]))
        assert got.count(b"\r\n250 2.1.0 Ok\r\n") == 1 and got.endswith(b"250 2.1.5 Ok\r\n")

    asyncio.run(run())
