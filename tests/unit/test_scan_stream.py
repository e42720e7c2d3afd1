"""Scans fed while the message arrives (MultiScanner.stream, ClamdStream), where no clamd is
needed: which scanners stream and which get the whole message, what the content rules do to
a stream, and each way a clamd stream gives up and leaves the message to a whole scan.
(Against the real clamd: tests/lab/test_scan_peers.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

from proxies.scan.api import ScanResult, StreamingScanner
from proxies.scan.clamd import STREAM_BACKLOG, ClamdClient
from proxies.scan.config import PolicyConfig, ScannerConfig, SocketAddress
from proxies.scan.connection import ConnectionPool
from proxies.scan.engine import PARSE_IN_THREAD, MultiScanner
from proxies.scan.rules import ContentRules
from tests.unit.scan_messages import with_attachments

MESSAGE = b"Subject: hi\r\n\r\n" + b"hello\r\n" * 100


class WholeScanner:
    """A scanner that takes only whole messages (as spamd)."""

    def __init__(self, name: str = "spamd") -> None:
        self.name = name
        self.scanned: list[bytes] = []

    async def scan(self, content: bytes) -> ScanResult:
        self.scanned.append(content)
        return ScanResult("clean", scanners=(self.name,))

    def close(self) -> None:
        pass


class PieceStream:
    def __init__(self, owner: PieceScanner) -> None:
        self.owner = owner
        self.pieces: list[bytes] = []
        self.cancelled = False
        self.finished: bytes | None = None

    def feed(self, data: bytes) -> None:
        self.pieces.append(data)

    async def finish(self, content: bytes) -> ScanResult:
        self.finished = content
        whole = b"".join(self.pieces)
        return ScanResult("virus" if b"EICAR" in whole else "clean", virus="Eicar" if
                          b"EICAR" in whole else None, scanners=(self.owner.name,))

    def cancel(self) -> None:
        self.cancelled = True


class PieceScanner(WholeScanner):
    """A scanner that can take a message in pieces (as clamd), while it has room."""

    def __init__(self, room: bool = True) -> None:
        super().__init__("clamd")
        self.room = room
        self.streams: list[PieceStream] = []

    def stream(self) -> PieceStream | None:
        if not self.room:
            return None
        self.streams.append(PieceStream(self))
        return self.streams[-1]


def test_the_streaming_scanner_gets_the_pieces_and_the_others_the_whole_message() -> None:
    pieces, whole = PieceScanner(), WholeScanner()
    scanner = MultiScanner([pieces, whole], ContentRules(PolicyConfig()), 1 << 20)
    assert isinstance(scanner, StreamingScanner)

    async def main() -> ScanResult:
        stream = scanner.stream()
        assert stream is not None
        content = MESSAGE + b"EICAR\r\n"
        for start in range(0, len(content), 100):
            stream.feed(content[start:start + 100])
        return await stream.finish(content)

    result = asyncio.run(main())
    assert result.verdict == "virus" and result.scanners == ("clamd", "spamd")
    assert len(pieces.streams[0].pieces) > 1
    assert pieces.scanned == [] and whole.scanned == [MESSAGE + b"EICAR\r\n"]


def test_no_stream_when_no_scanner_can_start_one() -> None:
    rules = ContentRules(PolicyConfig())
    only_whole = MultiScanner([WholeScanner()], rules, 1 << 20)
    assert not only_whole.can_stream and only_whole.stream() is None  # the layer never asks
    busy = MultiScanner([PieceScanner(room=False), WholeScanner()], rules, 1 << 20)
    assert busy.can_stream and busy.stream() is None


def streamed_whole(scanner: MultiScanner, content: bytes) -> ScanResult:
    """`content` fed to a stream of `scanner` in one piece, and its verdict."""
    async def main() -> ScanResult:
        stream = scanner.stream()
        assert stream is not None
        stream.feed(content)
        return await stream.finish(content)

    return asyncio.run(main())


def banning(scanner: PieceScanner, max_size: int) -> MultiScanner:
    return MultiScanner([scanner], ContentRules(PolicyConfig(banned_extensions=("exe",))),
                        max_size)


def test_a_banned_attachment_ends_the_stream_unfinished() -> None:
    pieces = PieceScanner()
    scanner = banning(pieces, 1 << 20)
    content = with_attachments(("setup.exe", b"MZ", "application/octet-stream"))

    assert streamed_whole(scanner, content).verdict == "banned"
    assert pieces.streams[0].cancelled and pieces.streams[0].finished is None


def test_the_stream_s_scan_runs_while_the_rules_parse_a_large_message() -> None:
    """Over PARSE_IN_THREAD the rules parse in a thread: meanwhile the stream's end has
    started clamd's scan; a banned verdict still wins, and the stream ends with it."""
    pieces = PieceScanner()
    scanner = banning(pieces, 1 << 22)
    content = with_attachments(("setup.exe", b"MZ" + b"\0" * PARSE_IN_THREAD,
                                "application/octet-stream"))

    assert streamed_whole(scanner, content).verdict == "banned"
    assert pieces.streams[0].finished == content and pieces.streams[0].cancelled


def clamd_at(path: Path, max_size: int = 1 << 24, timeout: float = 5.0) -> ClamdClient:
    return ClamdClient(ScannerConfig(SocketAddress(path=path), timeout=timeout,
                                     max_size=max_size, concurrency=1))


class SlowClamd:
    """A clamd slow in ways a real one is not on demand: its n-th session waits `waits[n]`
    seconds after the end marker, then answers OK, or closes unanswered where `answers[n]`
    is False."""

    def __init__(self, waits: tuple[float, ...], answers: tuple[bool, ...]) -> None:
        self.waits, self.answers = waits, answers
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = self.connections
        self.connections += 1
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\0\0\0\0")  # zIDSESSION, zINSTREAM, ..., the end marker
            await asyncio.sleep(self.waits[n])
            if self.answers[n]:
                writer.write(b"1: stream: OK\0")
                await writer.drain()
        writer.close()


def test_a_clamd_stream_to_no_clamd_is_the_whole_scan_s_failure(tmp_path: Path) -> None:
    async def main() -> tuple[ScanResult, ScanResult]:
        client = clamd_at(tmp_path / "nowhere.sock")
        stream = client.stream()
        assert stream is not None
        stream.feed(MESSAGE)
        return await stream.finish(MESSAGE), await client.scan(MESSAGE)

    streamed, whole = asyncio.run(main())
    assert streamed.verdict == "failed" and streamed.reason == whole.reason


def test_a_clamd_stream_over_max_size_gives_up_and_the_message_is_oversize(
        tmp_path: Path) -> None:
    async def main() -> tuple[bool, ScanResult]:
        client = clamd_at(tmp_path / "nowhere.sock", max_size=500)
        stream = client.stream()
        assert stream is not None
        stream.feed(MESSAGE[:400])
        stream.feed(MESSAGE[400:])
        return stream.streaming, await stream.finish(MESSAGE)

    streaming, result = asyncio.run(main())
    assert not streaming
    assert result.verdict == "failed" and result.oversize


def test_a_clamd_that_reads_slower_than_the_server_sends_ends_the_stream(
        tmp_path: Path) -> None:
    """A listener that accepts but never reads: what waits for it is bounded by
    STREAM_BACKLOG; then the stream gives up, and the whole scan at the end times out."""
    path = tmp_path / "stuck.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    piece = b"x" * 65536

    async def main() -> tuple[int, ScanResult]:
        client = clamd_at(path, timeout=0.3)
        stream = client.stream()
        assert stream is not None
        fed = 0
        while stream.streaming and fed < 64 * STREAM_BACKLOG:
            stream.feed(piece)
            fed += len(piece)
            await asyncio.sleep(0)  # the stream's turn to write what it can
        result = await stream.finish(piece * (fed // len(piece)))
        client.close()
        return fed, result

    try:
        fed, result = asyncio.run(main())
    finally:
        listener.close()
    # The kernel's buffers took some; then at most STREAM_BACKLOG waited, and it gave up.
    assert fed < 16 * STREAM_BACKLOG
    assert result.verdict == "failed" and result.timed_out


def test_at_most_concurrency_clamd_streams_at_once(tmp_path: Path) -> None:
    """Each stream holds a connection while its server sends: no more than [scan]
    concurrency of them; the message after that is scanned whole."""
    async def main() -> tuple[list[bool], bool]:
        client = ClamdClient(ScannerConfig(SocketAddress(path=tmp_path / "nowhere.sock"),
                                           timeout=1.0, max_size=1 << 20, concurrency=2))
        streams = [client.stream() for _ in range(3)]
        opened = [stream is not None for stream in streams]
        for stream in streams:
            if stream is not None:
                stream.cancel()
        await asyncio.gather(*(s.done for s in streams if s is not None),
                             return_exceptions=True)
        await asyncio.sleep(0)  # their done callbacks
        return opened, client.stream() is not None

    assert asyncio.run(main()) == ([True, True, False], True)


def test_a_clamd_stream_and_its_whole_scan_share_one_timeout(tmp_path: Path) -> None:
    """A clamd that closes the stream's session late, then is slow to answer the whole scan
    (faults a real clamd does not make on demand): the verdict still comes within [scan]
    timeout of the message's end, not twice that."""
    path = tmp_path / "late.sock"
    clamd = SlowClamd(waits=(0.6, 0.6), answers=(False, True))

    async def main() -> tuple[float, ScanResult]:
        server = await asyncio.start_unix_server(clamd.serve, path=str(path))
        client = clamd_at(path, timeout=1.0)
        stream = client.stream()
        assert stream is not None
        stream.feed(MESSAGE)
        started = time.monotonic()
        result = await stream.finish(MESSAGE)
        took = time.monotonic() - started
        client.close()
        server.close()
        return took, result

    took, result = asyncio.run(main())
    assert clamd.connections == 2  # the stream's, then the whole scan's
    assert result.verdict == "failed" and result.timed_out, result
    assert took < 1.3, took


def test_a_scan_given_up_on_keeps_its_slot_while_clamd_still_scans(tmp_path: Path) -> None:
    """A clamd slower than [scan] timeout (a fault a real one does not make on demand): each
    scan given up on still holds its slot until clamd answers, so clamd never has more than
    `concurrency` messages at once, however many scans time out meanwhile."""
    path = tmp_path / "slow.sock"
    scanning = peak = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal scanning, peak
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\0\0\0\0")  # zIDSESSION, zINSTREAM, ..., the end marker
            scanning += 1
            peak = max(peak, scanning)
            await asyncio.sleep(0.5)
            scanning -= 1
            writer.write(b"1: stream: OK\0")
            await writer.drain()
        writer.close()

    async def main() -> tuple[list[ScanResult], ScanResult]:
        server = await asyncio.start_unix_server(serve, path=str(path))
        client = clamd_at(path, timeout=0.2)
        stream = client.stream()
        assert stream is not None
        stream.feed(MESSAGE)
        given_up = await asyncio.gather(stream.finish(MESSAGE),
                                        *(client.scan(MESSAGE) for _ in range(3)))
        await asyncio.sleep(0.6)  # clamd has answered the one it scanned: the slot is free
        after = await clamd_at(path, timeout=2.0).scan(MESSAGE)
        client.close()
        server.close()
        return given_up, after

    given_up, after = asyncio.run(main())
    assert all(r.verdict == "failed" and r.timed_out for r in given_up), given_up
    assert peak == 1
    assert after.verdict == "clean"


def test_a_reply_that_comes_after_close_does_not_refill_the_pool(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\0\0\0\0")
            await asyncio.sleep(0.3)
            writer.write(b"1: stream: OK\0")
            await writer.drain()
            await reader.read()  # until the client closes
        writer.close()

    async def main() -> tuple[ScanResult, ConnectionPool]:
        server = await asyncio.start_unix_server(serve, path=str(path))
        client = clamd_at(path, timeout=0.1)
        result = await client.scan(MESSAGE)
        client.close()  # shutting down while clamd still scans
        await asyncio.sleep(0.4)  # its answer comes
        server.close()
        return result, client._pool

    result, pool = asyncio.run(main())
    assert result.timed_out
    assert pool.take() is None  # the late session was closed, not kept


def test_a_clamd_stream_cancelled_while_it_finishes_scans_the_message_whole(
        tmp_path: Path) -> None:
    """cancel() while finish() waits for the stream's reply gives the caller a verdict (the
    whole scan's), not the stream's CancelledError as though the caller had been cancelled."""
    path = tmp_path / "slow.sock"
    clamd = SlowClamd(waits=(5.0, 0.0), answers=(True, True))  # the stream's scan is slow

    async def main() -> ScanResult:
        server = await asyncio.start_unix_server(clamd.serve, path=str(path))
        # Two slots: the cancelled stream keeps its own while clamd still scans (b8e765b).
        client = ClamdClient(ScannerConfig(SocketAddress(path=path), timeout=2.0,
                                           max_size=1 << 24, concurrency=2))
        stream = client.stream()
        assert stream is not None
        stream.feed(MESSAGE)
        finishing = asyncio.ensure_future(stream.finish(MESSAGE))
        await asyncio.sleep(0.2)
        stream.cancel()
        result = await finishing
        client.close()
        server.close()
        return result

    result = asyncio.run(main())
    assert result.verdict == "clean", result
    assert clamd.connections == 2
