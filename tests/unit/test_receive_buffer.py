"""Reads into the one shared buffer (`proxies.receivebuffer`): what each protocol built on it
does with a read, when the next read overwrites the buffer as soon as it returns.

Each test fills the buffer as asyncio does (get_buffer, then buffer_updated), then clobbers it
as the next read on any connection of the thread would, and checks that what the protocol
took is still what arrived: the POP3 links (both codecs and the passthrough relay), the byte
relay, and the SMTP front end (tests/unit/test_smtp_frontend.py).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, cast

from proxies.pop3.codec import NEED_DATA, BodyData, BodyEnd, ClientReader, Command, ServerReader
from proxies.pop3.link import Link
from proxies.receivebuffer import SIZE, receive_buffer
from proxies.tcprelay import _Side


def read(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """One read of `data` as asyncio makes it, then the buffer reused by the next read."""
    view = memoryview(protocol.get_buffer(-1))
    assert len(view) >= len(data)
    view[:len(data)] = data
    protocol.buffer_updated(len(data))
    view[:len(data)] = b"\xff" * len(data)


class Writes:
    """A transport that keeps what it is given, as one whose socket is full does."""

    def __init__(self) -> None:
        self.kept: list[Any] = []

    def write(self, data: Any) -> None:
        self.kept.append(data)

    def set_write_buffer_limits(self, high: int) -> None:
        pass


def test_one_buffer_per_thread_of_asyncio_s_read_size() -> None:
    here = receive_buffer()
    assert receive_buffer() is here and len(here) == SIZE
    other: list[memoryview] = []
    thread = threading.Thread(target=lambda: other.append(receive_buffer()))
    thread.start()
    thread.join()
    assert other[0].obj is not here.obj


def test_a_pop3_link_s_commands_survive_the_next_read() -> None:
    reader = ClientReader()
    link = Link(reader)
    read(link, b"USER alice\r\nPASS sec")
    read(link, b"ret\r\nSTAT\r\n")
    commands = []
    while (event := reader.next_event()) is not NEED_DATA:
        commands.append(cast(Command, event).raw)
    assert commands == [b"USER alice\r\n", b"PASS secret\r\n", b"STAT\r\n"]


def test_a_pop3_link_s_response_survives_the_next_read() -> None:
    reader = ServerReader()
    link = Link(reader)
    read(link, b"+OK ready\r\n")
    assert reader.next_event() is not NEED_DATA
    reader.expect(Command("RETR", b"1", b"RETR 1\r\n"))
    read(link, b"+OK 9 octets\r\nSubject: x\r\n")
    read(link, b"\r\nhi\r\n.\r\n")
    events = []
    while (event := reader.next_event()) is not NEED_DATA:
        events.append(event)
    body = b"".join(e.data for e in events if isinstance(e, BodyData))
    assert body == b"Subject: x\r\n\r\nhi\r\n"
    assert isinstance(events[-1], BodyEnd)


def test_a_passthrough_link_hands_on_a_copy() -> None:
    """Relayed TLS goes to the other transport, which may keep what it cannot send yet."""
    link = Link(ClientReader())
    got: list[bytes] = []
    link.raw = got.append
    read(link, b"\x16\x03\x01 a ClientHello")
    assert got == [b"\x16\x03\x01 a ClientHello"] and type(got[0]) is bytes


def test_the_byte_relay_hands_on_a_copy() -> None:
    server, client = _Side("server"), _Side("client")
    server.other, client.other = client, server
    kept = Writes()
    client.transport = cast(asyncio.Transport, kept)
    read(server, b"+OK hello\r\n")
    read(server, b"second read\r\n")
    assert [bytes(data) for data in kept.kept] == [b"+OK hello\r\n", b"second read\r\n"]
