"""The scanner clients: protocol framing and parsing, then each client against a tiny fake
server on loopback (the real daemons are in tests/lab/test_filtering.py): connection reuse,
errors, and a server that accepts but never answers."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from proxies.scan import clamd, rspamd, spamd
from proxies.scan.clamd import ClamdClient, instream_frames
from proxies.scan.config import ScannerConfig, SocketAddress
from proxies.scan.connection import ScannerError
from proxies.scan.rspamd import RspamdClient
from proxies.scan.spamd import SpamdClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --- sans-I/O -------------------------------------------------------------------------------


def test_instream_framing() -> None:
    frames = list(instream_frames(b"abcdefghij", chunk=4))
    assert frames == [b"zINSTREAM\0", b"\0\0\0\4abcd", b"\0\0\0\4efgh", b"\0\0\0\2ij",
                      b"\0\0\0\0"]


@pytest.mark.parametrize(("raw", "session", "status", "detail"), [
    (b"stream: OK", None, "OK", ""),
    (b"1: stream: OK", 1, "OK", ""),
    (b"2: stream: Eicar-Test-Signature.UNOFFICIAL FOUND", 2, "FOUND",
     "Eicar-Test-Signature.UNOFFICIAL"),
    (b"INSTREAM size limit exceeded. ERROR", None, "ERROR", "INSTREAM size limit exceeded"),
])
def test_clamd_replies(raw: bytes, session: int | None, status: str, detail: str) -> None:
    reply = clamd.parse_reply(raw, session)
    assert (reply.status, reply.detail) == (status, detail)


def test_clamd_reply_errors() -> None:
    with pytest.raises(ScannerError, match="expected 3"):
        clamd.parse_reply(b"2: stream: OK", 3)
    with pytest.raises(ScannerError, match="unexpected reply"):
        clamd.parse_reply(b"PONG")
    over = clamd.result_from_reply(clamd.parse_reply(b"INSTREAM size limit exceeded. ERROR"))
    assert over.verdict == "failed" and over.oversize


def test_spamd_replies() -> None:
    reply = spamd.parse_reply(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 20\r\n"
                              b"Spam: True ; 1000.5 / 5.0\r\n\r\nGTUBE,MISSING_DATE")
    assert reply == spamd.SpamdReply(True, 1000.5, 5.0, ("GTUBE", "MISSING_DATE"))
    assert spamd.parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 1.2 / 5.0\r\n\r\n").rules == ()
    with pytest.raises(ScannerError, match="error 76 Bad header line"):
        spamd.parse_reply(b"SPAMD/1.0 76 Bad header line: x\r\n")
    with pytest.raises(ScannerError, match="without a Spam header"):
        spamd.parse_reply(b"SPAMD/1.1 0 EX_OK\r\n\r\n")


def test_rspamd_replies() -> None:
    body = json.dumps({"score": 1001.0, "required_score": 15.0, "action": "reject",
                       "symbols": {"GTUBE": {"score": 0}, "MISSING_DATE": {}}}).encode()
    result = rspamd.result_from_json(body)
    assert (result.verdict, result.score, result.threshold, result.rules) == (
        "spam", 1001.0, 15.0, ("GTUBE", "MISSING_DATE"))
    ham = rspamd.result_from_json(b'{"score": 1, "required_score": 15, "action": "no action"}')
    assert ham.verdict == "clean"
    with pytest.raises(ScannerError):
        rspamd.result_from_json(b"<html>")
    assert rspamd.parse_head(b"HTTP/1.1 200 OK\r\nConnection: close").keep_alive is False


# --- against fake servers -------------------------------------------------------------------


def config(address: SocketAddress, timeout: float = 2.0, max_size: int = 2**20
           ) -> ScannerConfig:
    return ScannerConfig(address, timeout=timeout, max_size=max_size, concurrency=2)


async def serve_unix(path: Path, handler: Handler) -> asyncio.Server:
    return await asyncio.start_unix_server(handler, str(path))


async def serve_tcp(handler: Handler) -> tuple[asyncio.Server, SocketAddress]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, SocketAddress(host="127.0.0.1", port=port)


async def read_instream(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while True:
        (length,) = struct.unpack("!L", await reader.readexactly(4))
        if not length:
            return data
        data += await reader.readexactly(length)


def test_clamd_reuses_its_session(tmp_path: Path) -> None:
    connections: list[int] = []

    async def fake_clamd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        assert await reader.readexactly(11) == b"zIDSESSION\0"
        number = 0
        while not reader.at_eof():
            try:
                assert await reader.readexactly(10) == b"zINSTREAM\0"
            except asyncio.IncompleteReadError:
                break
            number += 1
            data = await read_instream(reader)
            verdict = b"Test.Virus FOUND" if b"VIRUS" in data else b"OK"
            writer.write(b"%d: stream: %s\0" % (number, verdict))
        writer.close()

    async def main() -> list[str]:
        server = await serve_unix(tmp_path / "clamd.sock", fake_clamd)
        client = ClamdClient(config(SocketAddress(path=tmp_path / "clamd.sock")))
        results = [await client.scan(b"hello" * 30000), await client.scan(b"a VIRUS"),
                   await client.scan(b"fine")]
        client.close()
        server.close()
        return [r.virus or r.verdict for r in results]

    assert asyncio.run(main()) == ["clean", "Test.Virus", "clean"]
    assert len(connections) == 1


def test_clamd_retries_a_pooled_session_the_server_closed(tmp_path: Path) -> None:
    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(11 + 10)
        await read_instream(reader)
        writer.write(b"1: stream: OK\0")
        await writer.drain()
        writer.close()  # like clamd after IdleTimeout

    async def main() -> list[str]:
        server = await serve_unix(tmp_path / "c.sock", one_shot)
        client = ClamdClient(config(SocketAddress(path=tmp_path / "c.sock")))
        first = await client.scan(b"one")
        await asyncio.sleep(0)  # let the close arrive
        second = await client.scan(b"two")
        server.close()
        return [first.verdict, second.verdict]

    assert asyncio.run(main()) == ["clean", "clean"]


def test_clamd_refused_oversize_and_never_answering(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, reads, never answers

    async def main() -> list[tuple[str, bool, bool, str]]:
        server = await serve_unix(tmp_path / "silent.sock", silent)
        out: list[tuple[str, bool, bool, str]] = []
        for client, content in (
                (ClamdClient(config(SocketAddress(path=tmp_path / "none.sock"))), b"x"),
                (ClamdClient(config(SocketAddress(path=tmp_path / "silent.sock"),
                                    max_size=10)), b"x" * 11),
                (ClamdClient(config(SocketAddress(path=tmp_path / "silent.sock"),
                                    timeout=0.3)), b"x")):
            started = asyncio.get_running_loop().time()
            result = await client.scan(content)
            assert asyncio.get_running_loop().time() - started < 1.5
            out.append((result.verdict, result.timed_out, result.oversize, result.reason))
        server.close()
        return out

    refused, oversize, silent_result = asyncio.run(main())
    assert refused[:3] == ("failed", False, False) and "clamd:" in refused[3]
    assert oversize[:3] == ("failed", False, True)
    assert silent_result[:3] == ("failed", True, False)
    assert silent_result[3] == "clamd: no answer within 0.3 s"


def test_spamd_symbols() -> None:
    requests: list[bytes] = []

    async def fake_spamd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-length: ")[1].split(b"\r\n")[0])
        requests.append(head + await reader.readexactly(length))
        writer.write(b"SPAMD/1.1 0 EX_OK\r\nContent-length: 5\r\n"
                     b"Spam: True ; 1000.0 / 5.0\r\n\r\nGTUBE")
        await writer.drain()
        writer.close()

    async def main() -> tuple[str, float | None, tuple[str, ...], str]:
        server, address = await serve_tcp(fake_spamd)
        client = SpamdClient(config(address))
        result = await client.scan(b"Subject: x\r\n\r\nGTUBE\r\n")
        skipped = await SpamdClient(config(address, max_size=3)).scan(b"long")
        server.close()
        return result.verdict, result.score, result.rules, skipped.verdict

    assert asyncio.run(main()) == ("spam", 1000.0, ("GTUBE",), "clean")
    assert requests == [b"SYMBOLS SPAMC/1.5\r\nContent-length: 21\r\n\r\n"
                        b"Subject: x\r\n\r\nGTUBE\r\n"]


def test_rspamd_keeps_the_connection_alive_and_reads_chunked_replies() -> None:
    connections: list[int] = []
    body = json.dumps({"score": 6.0, "required_score": 15.0, "action": "add header",
                       "symbols": {"X": {}}}).encode()

    async def fake_rspamd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        served = 0
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            assert head.startswith(b"POST /checkv2 HTTP/1.1\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            served += 1
            if served == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                             + body)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"%x\r\n" % 5 + body[:5] + b"\r\n"
                             + b"%x\r\n" % (len(body) - 5) + body[5:] + b"\r\n0\r\n\r\n")
        writer.close()

    async def main() -> list[str]:
        server, address = await serve_tcp(fake_rspamd)
        client = RspamdClient(config(address))
        results = [await client.scan(b"one"), await client.scan(b"two")]
        client.close()
        server.close()
        return [r.verdict for r in results]

    assert asyncio.run(main()) == ["spam", "spam"]
    assert len(connections) == 1


def test_rspamd_http_error_and_silence() -> None:
    async def error(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 500 Internal\r\nContent-Length: 4\r\n\r\noops")
        await writer.drain()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def main() -> list[str]:
        out: list[str] = []
        for handler in (error, silent):
            server, address = await serve_tcp(handler)
            result = await RspamdClient(config(address, timeout=0.3)).scan(b"x")
            out.append(result.reason)
            server.close()
        return out

    assert asyncio.run(main()) == ["rspamd: HTTP 500 oops", "rspamd: no answer within 0.3 s"]
