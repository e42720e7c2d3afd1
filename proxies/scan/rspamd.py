"""An asyncio client for rspamd's normal worker: `POST /checkv2` over HTTP/1.1 keep-alive.

rspamd answers a JSON object (its "Protocol" documentation): `score`, `required_score`,
`action` ("no action", "greylist", "add header", "rewrite subject", "soft reject",
"reject") and `symbols` (name -> details). We call a message spam when rspamd's action would
mark or refuse it ("add header", "rewrite subject", "reject"); our own [policy] then decides
what to do, so both spam scanners are handled the same way.

The HTTP here is the small subset rspamd speaks: one request at a time per connection, a
Content-Length or chunked body, connections reused unless the server says `Connection: close`.
rspamd 3.4's normal worker says so on every reply (its keep-alive is for its own outgoing
requests), so against it each message has a connection of its own.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from proxies.scan.api import ScanResult
from proxies.scan.config import ScannerConfig, SocketAddress
from proxies.scan.connection import (
    MAX_REPLY,
    Connection,
    ConnectionPool,
    ScannerError,
    connect,
)

NAME = "rspamd"
SPAM_ACTIONS = ("add header", "rewrite subject", "reject")


def checkv2_request(address: SocketAddress, content: bytes) -> bytes:
    host = f"[{address.host}]" if ":" in address.host else address.host
    return (f"POST /checkv2 HTTP/1.1\r\nHost: {host}:{address.port}\r\n"
            f"Content-Length: {len(content)}\r\nConnection: keep-alive\r\n\r\n"
            ).encode("ascii") + content


@dataclass(frozen=True)
class HttpHead:
    status: int
    headers: dict[str, str]

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close"


def parse_head(raw: bytes) -> HttpHead:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ScannerError(f"{NAME}: not an HTTP reply: {lines[0][:200]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ScannerError(f"{NAME}: bad HTTP header line {line[:200]!r}")
        headers[name.strip().lower()] = value.strip()
    return HttpHead(int(parts[1]), headers)


def result_from_json(body: bytes) -> ScanResult:
    try:
        data = json.loads(body)
        score = float(data["score"])
        threshold = float(data["required_score"])
        action = str(data["action"])
        symbols = data.get("symbols") or {}
    except (ValueError, KeyError, TypeError):
        raise ScannerError(f"{NAME}: unexpected reply {body[:200]!r}") from None
    rules = tuple(sorted(symbols)) if isinstance(symbols, dict) else ()
    spam = action in SPAM_ACTIONS
    output = (f"{NAME}: action={action!r} score={score:g} required={threshold:g} "
              f"symbols={','.join(rules)}",)
    return ScanResult("spam" if spam else "clean", score=score, threshold=threshold,
                      rules=rules, scanners=(NAME,), output=output)


class RspamdClient:
    name = NAME

    def __init__(self, config: ScannerConfig) -> None:
        self.config = config
        self._slots = asyncio.Semaphore(config.concurrency)
        self._pool = ConnectionPool(config.concurrency)

    async def scan(self, content: bytes) -> ScanResult:
        if len(content) > self.config.max_size:
            return ScanResult("clean", reason=f"{NAME}: skipped, over {self.config.max_size} "
                              "bytes")
        try:
            async with asyncio.timeout(self.config.timeout), self._slots:
                body = await self._request(content)
            return result_from_json(body)
        except TimeoutError:
            return ScanResult("failed", reason=f"{NAME}: no answer within "
                              f"{self.config.timeout:g} s", timed_out=True)
        except ScannerError as exc:
            return ScanResult("failed", reason=str(exc))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return ScanResult("failed", reason=f"{NAME}: connection closed before a reply")
        except OSError as exc:
            return ScanResult("failed", reason=f"{NAME}: {exc.strerror or exc}")

    async def _request(self, content: bytes) -> bytes:
        connection = self._pool.take()
        if connection is not None:
            try:
                return await self._exchange(connection, content)
            except (OSError, asyncio.IncompleteReadError) as exc:
                # The server closed the idle connection meanwhile: once more on a new one.
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise
        return await self._exchange(await connect(self.config.address), content)

    async def _exchange(self, connection: Connection, content: bytes) -> bytes:
        keep = False
        try:
            connection.requests += 1
            connection.writer.write(checkv2_request(self.config.address, content))
            await connection.writer.drain()
            head = parse_head((await connection.reader.readuntil(b"\r\n\r\n"))[:-4])
            body = await _read_body(connection.reader, head)
            if head.status != 200:
                raise ScannerError(f"{NAME}: HTTP {head.status} "
                                   f"{body[:200].decode('utf-8', 'replace')}")
            keep = head.keep_alive
            return body
        finally:
            if keep:
                self._pool.give_back(connection)
            else:
                connection.close()

    def close(self) -> None:
        self._pool.close()


async def _read_body(reader: asyncio.StreamReader, head: HttpHead) -> bytes:
    if head.headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise ScannerError(f"{NAME}: bad chunk size {size_line[:50]!r}") from None
            if len(body) + size > MAX_REPLY:
                raise ScannerError(f"{NAME}: reply too long")
            if size == 0:
                # Trailer fields (none expected) end with an empty line.
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    length_text = head.headers.get("content-length")
    if length_text is None or not length_text.isdigit():
        raise ScannerError(f"{NAME}: reply without a Content-Length")
    length = int(length_text)
    if length > MAX_REPLY:
        raise ScannerError(f"{NAME}: reply too long")
    return await reader.readexactly(length)
