"""An asyncio client for rspamd's normal worker: `POST /checkv2`, one connection per message.

rspamd answers a JSON object (its "Protocol" documentation): `score`, `required_score`,
`action` ("no action", "greylist", "add header", "rewrite subject", "soft reject",
"reject") and `symbols` (name -> details). We call a message spam when rspamd's action would
mark or refuse it ("add header", "rewrite subject", "reject"); our own [policy] then decides
what to do, so both spam scanners are handled the same way.

Why no keep-alive and no chunked replies: rspamd's HTTP server never keeps a connection for a
second request. Its reply head always carries `Connection: close` and a `Content-Length`
(rspamd_http_message_write_header, src/libserver/http/http_connection.c, server side), and it
closes the connection after the body, whatever the request asked. Measured with Debian 12's
rspamd 3.4, normal worker and controller, HTTP/1.0 and HTTP/1.1 with `Connection: keep-alive`:
tests/lab/test_scan_peers.py keeps checking it. A connection pool and a chunked decoder would be
code that never meets a real rspamd, so there are none: we say `Connection: close` ourselves,
read the head and exactly Content-Length bytes of body, and close. A reply framed any other
way is a protocol error (ScannerError), not something to guess at.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from proxies.scan.api import ScanResult
from proxies.scan.config import ScannerConfig, SocketAddress
from proxies.scan.connection import MAX_REPLY, ScannerError, connect

NAME = "rspamd"
SPAM_ACTIONS = ("add header", "rewrite subject", "reject")


def checkv2_request(address: SocketAddress, content: bytes) -> bytes:
    host = f"[{address.host}]" if ":" in address.host else address.host
    return (f"POST /checkv2 HTTP/1.1\r\nHost: {host}:{address.port}\r\n"
            f"Content-Length: {len(content)}\r\nConnection: close\r\n\r\n"
            ).encode("ascii") + content


@dataclass(frozen=True)
class HttpHead:
    status: int
    headers: dict[str, str]


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


def body_length(head: HttpHead) -> int:
    """The length of the body that follows `head`: its Content-Length, the only framing
    rspamd uses (see the module's docstring)."""
    if "transfer-encoding" in head.headers:
        raise ScannerError(f"{NAME}: unexpected Transfer-Encoding "
                           f"{head.headers['transfer-encoding'][:50]!r}")
    length_text = head.headers.get("content-length")
    if length_text is None or not length_text.isdigit():
        raise ScannerError(f"{NAME}: reply without a Content-Length")
    length = int(length_text)
    if length > MAX_REPLY:
        raise ScannerError(f"{NAME}: reply too long")
    return length


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
        connection = await connect(self.config.address)
        try:
            connection.writer.write(checkv2_request(self.config.address, content))
            await connection.writer.drain()
            head = parse_head((await connection.reader.readuntil(b"\r\n\r\n"))[:-4])
            body = await connection.reader.readexactly(body_length(head))
            if head.status != 200:
                raise ScannerError(f"{NAME}: HTTP {head.status} "
                                   f"{body[:200].decode('utf-8', 'replace')}")
            return body
        finally:
            connection.close()

    def close(self) -> None:
        """Nothing stays open between scans; kept so every scanner client closes alike."""
