"""An asyncio client for spamd (SpamAssassin's daemon), SPAMC/1.5 `SYMBOLS`.

The protocol (spamd's PROTOCOL file): the client sends `SYMBOLS SPAMC/1.5`, a
`Content-length` header, an empty line and the message; spamd answers
`SPAMD/1.1 0 EX_OK`, a `Spam: True ; 15.3 / 5.0` header (verdict, score, required score), an
empty line and the names of the rules that fired, comma-separated, then closes the connection.
One request per connection, so there is nothing to reuse; a non-zero code (EX_* of
sysexits.h, e.g. 76 EX_PROTOCOL) is a failure.

Written here rather than taking aiospamc as a dependency: the exchange is twenty lines, and
owning it keeps the size cap, the timeout and the reply parsing in one place.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from proxies.scan.api import ScanEnvelope, ScanResult
from proxies.scan.config import ScannerConfig
from proxies.scan.connection import MAX_REPLY, ScannerError, connect

NAME = "spamd"


def symbols_request(content: bytes) -> bytes:
    return b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(content) + content


@dataclass(frozen=True)
class SpamdReply:
    is_spam: bool
    score: float
    threshold: float
    rules: tuple[str, ...]


def parse_reply(raw: bytes) -> SpamdReply:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, body = raw, b""
    lines = head.split(b"\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith(b"SPAMD/") or not status[1].isdigit():
        raise ScannerError(f"{NAME}: unexpected reply {lines[0][:200]!r}")
    if status[1] != b"0":
        message = status[2].decode("ascii", "replace") if len(status) > 2 else ""
        raise ScannerError(f"{NAME}: error {int(status[1])} {message}".rstrip())
    spam: SpamdReply | None = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() != b"spam":
            continue
        # "True ; 1000.0 / 5.0"
        flag, _, numbers = value.partition(b";")
        score, _, threshold = numbers.partition(b"/")
        try:
            spam = SpamdReply(flag.strip().lower() in (b"true", b"yes"), float(score),
                              float(threshold), ())
        except ValueError:
            raise ScannerError(f"{NAME}: bad Spam header {line[:200]!r}") from None
    if spam is None:
        raise ScannerError(f"{NAME}: reply without a Spam header")
    rules = tuple(r.strip() for r in body.decode("ascii", "replace").split(",") if r.strip())
    return SpamdReply(spam.is_spam, spam.score, spam.threshold, rules)


def result_from_reply(reply: SpamdReply) -> ScanResult:
    output = (f"{NAME}: {'spam' if reply.is_spam else 'ham'} score={reply.score:g} "
              f"required={reply.threshold:g} tests={','.join(reply.rules)}",)
    return ScanResult("spam" if reply.is_spam else "clean", score=reply.score,
                      threshold=reply.threshold, rules=reply.rules, scanners=(NAME,),
                      output=output)


class SpamdClient:
    """Checks with spamd; `scan` returns verdict failed rather than raising."""

    name = NAME

    def __init__(self, config: ScannerConfig) -> None:
        self.config = config
        self._slots = asyncio.Semaphore(config.concurrency)

    async def scan(self, content: bytes, envelope: ScanEnvelope | None = None) -> ScanResult:
        # `envelope` unused: spamd is given the content alone.
        if len(content) > self.config.max_size:
            # Like spamc, which passes large mail unchecked: big messages are rarely spam,
            # and the time spamd would take on them is out of proportion.
            return ScanResult("clean", reason=f"{NAME}: skipped, over {self.config.max_size} "
                              "bytes")
        try:
            async with asyncio.timeout(self.config.timeout), self._slots:
                raw = await self._exchange(content)
            return result_from_reply(parse_reply(raw))
        except TimeoutError:
            return ScanResult("failed", reason=f"{NAME}: no answer within "
                              f"{self.config.timeout:g} s", timed_out=True)
        except ScannerError as exc:
            return ScanResult("failed", reason=str(exc))
        except OSError as exc:
            return ScanResult("failed", reason=f"{NAME}: {exc.strerror or exc}")

    async def _exchange(self, content: bytes) -> bytes:
        connection = await connect(self.config.address)
        try:
            connection.writer.write(symbols_request(content))
            await connection.writer.drain()
            raw = await connection.reader.read(MAX_REPLY)
            while raw:
                more = await connection.reader.read(MAX_REPLY)
                if not more:
                    break
                raw += more
                if len(raw) > MAX_REPLY:
                    raise ScannerError(f"{NAME}: reply too long")
            if not raw:
                raise ScannerError(f"{NAME}: connection closed before a reply")
            return raw
        finally:
            connection.close()

    def close(self) -> None:
        pass
