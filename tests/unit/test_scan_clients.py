"""The scanner clients: protocol framing and parsing (no server at all), then a few exchanges
with a tiny fake server on loopback: the request spamd gets, and an rspamd HTTP error (a fault
no real rspamd gives on demand).

What a real daemon can be made to do is tested against the real one in the lab:
tests/lab/test_scan_peers.py (clamd's session reuse, sessions clamd ends, its size-limit error,
a clamd or rspamd that stops answering, one connection per rspamd request) and
tests/lab/test_filtering*.py (whole messages).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from proxies.scan import clamd, rspamd, spamd
from proxies.scan.clamd import ClamdClient, instream_chunks
from proxies.scan.config import ScannerConfig, SocketAddress
from proxies.scan.connection import ScannerError
from proxies.scan.rspamd import RspamdClient
from proxies.scan.spamd import SpamdClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --- sans-I/O -------------------------------------------------------------------------------


def test_instream_framing() -> None:
    chunks = [prefix + bytes(piece) for prefix, piece in instream_chunks(b"abcdefghij", 4)]
    assert chunks == [b"\0\0\0\4abcd", b"\0\0\0\4efgh", b"\0\0\0\2ij"]


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


@pytest.mark.parametrize(("error", "closed_early"), [
    (asyncio.IncompleteReadError(b"", None), True),
    # clamd's notice on a session it ends for ReadTimeout, read before its reset came back.
    (asyncio.IncompleteReadError(b"COMMAND READ TIMED OUT\n", None), True),
    (asyncio.IncompleteReadError(b"1: stream: O", None), False),  # it was answering
    (ConnectionResetError(), True),
    (BrokenPipeError(), True),
    (ConnectionRefusedError(), False),
])
def test_clamd_session_closed_before_our_command(error: BaseException,
                                                 closed_early: bool) -> None:
    assert clamd._closed_early(error) is closed_early


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


def test_rspamd_reply_framing() -> None:
    head = rspamd.parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 922")
    assert (head.status, rspamd.body_length(head)) == (200, 922)
    for raw, error in ((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked",
                        "unexpected Transfer-Encoding 'chunked'"),
                       (b"HTTP/1.1 200 OK\r\nConnection: close", "without a Content-Length"),
                       (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999", "too long")):
        with pytest.raises(ScannerError, match=error):
            rspamd.body_length(rspamd.parse_head(raw))
    with pytest.raises(ScannerError, match="not an HTTP reply"):
        rspamd.parse_head(b"RSPAMD/1.3 0 EX_OK")
    assert rspamd.checkv2_request(SocketAddress(host="::1", port=11333), b"x") == (
        b"POST /checkv2 HTTP/1.1\r\nHost: [::1]:11333\r\nContent-Length: 1\r\n"
        b"Connection: close\r\n\r\nx")


# --- against fake servers -------------------------------------------------------------------


def config(address: SocketAddress, timeout: float = 2.0, max_size: int = 2**20
           ) -> ScannerConfig:
    return ScannerConfig(address, timeout=timeout, max_size=max_size, concurrency=2)


async def serve_tcp(handler: Handler) -> tuple[asyncio.Server, SocketAddress]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, SocketAddress(host="127.0.0.1", port=port)


def test_clamd_refused_and_oversize(tmp_path: Path) -> None:
    """Neither reaches a clamd: nothing listens there; the message is over the client's limit.
    (One that stops answering: a real clamd, stopped, in tests/lab/test_scan_peers.py.)"""
    nowhere = SocketAddress(path=tmp_path / "none.sock")

    async def main() -> list[tuple[str, bool, bool, str]]:
        out: list[tuple[str, bool, bool, str]] = []
        for client, content in ((ClamdClient(config(nowhere)), b"x"),
                                (ClamdClient(config(nowhere, max_size=10)), b"x" * 11)):
            result = await client.scan(content)
            out.append((result.verdict, result.timed_out, result.oversize, result.reason))
        return out

    refused, oversize = asyncio.run(main())
    assert refused[:3] == ("failed", False, False) and "clamd:" in refused[3]
    assert oversize[:3] == ("failed", False, True)
    assert "larger than the scan limit" in oversize[3]


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


def test_rspamd_http_error() -> None:
    """An HTTP error status: a real rspamd gives none on demand for a well-formed /checkv2.
    (One that stops answering: a real rspamd, stopped, in tests/lab/test_scan_peers.py.)"""
    async def error(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 500 Internal\r\nContent-Length: 4\r\n\r\noops")
        await writer.drain()

    async def main() -> str:
        server, address = await serve_tcp(error)
        result = await RspamdClient(config(address, timeout=0.3)).scan(b"x")
        server.close()
        return result.reason

    assert asyncio.run(main()) == "rspamd: HTTP 500 oops"
