"""An asyncio client for clamd (ClamAV's daemon): INSTREAM inside an IDSESSION.

The protocol (clamd(8), "COMMANDS"): a command prefixed with `z` ends with NUL and so does its
reply. `zINSTREAM` sends the data as chunks, each after its length as a 4-byte big-endian
number, and a zero length ends the stream; the reply is `stream: OK`, `stream: NAME FOUND`
or `... ERROR` (`INSTREAM size limit exceeded. ERROR` once StreamMaxLength is passed).
`zIDSESSION` keeps the connection open for more commands; each reply is then prefixed with
the number of its command in the session (`3: stream: OK`), and `zEND` ends it. clamd ends a
session itself when no command comes for ReadTimeout seconds (120 by default; IdleTimeout is
about its threads, not sessions), writing the line `COMMAND READ TIMED OUT` (newline-ended, not
NUL) before it closes, and a restarted clamd has closed them all. So a pooled session that turns
out to be closed before it answered our command is retried once on a fresh one.

Sans-I/O parts (framing and reply parsing) are plain functions, tested without clamd.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from proxies.scan.api import ScanEnvelope, ScanResult
from proxies.scan.config import ScannerConfig
from proxies.scan.connection import Connection, ConnectionPool, ScannerError, connect

NAME = "clamd"
CHUNK = 64 * 1024


def instream_frames(content: bytes, chunk: int = CHUNK) -> Iterator[bytes]:
    """The bytes of one zINSTREAM command: command, length-prefixed chunks, end marker."""
    yield b"zINSTREAM\0"
    view = memoryview(content)
    for start in range(0, len(content), chunk):
        piece = view[start:start + chunk]
        yield struct.pack("!L", len(piece)) + bytes(piece)
    yield struct.pack("!L", 0)


@dataclass(frozen=True)
class ClamdReply:
    status: str  # "OK", "FOUND" or "ERROR"
    detail: str  # the virus name for FOUND, clamd's message for ERROR
    raw: str


def parse_reply(raw: bytes, session_id: int | None = None) -> ClamdReply:
    """One NUL-less reply line: `[N: ]stream: OK`, `stream: NAME FOUND`, `... ERROR`."""
    text = raw.decode("utf-8", "replace").strip()
    if session_id is not None:
        number, sep, rest = text.partition(": ")
        if not sep or not number.isdigit():
            raise ScannerError(f"clamd: unexpected reply {text[:200]!r}")
        if int(number) != session_id:
            raise ScannerError(f"clamd: reply for command {number}, expected {session_id}")
        text = rest
    body = text.removeprefix("stream: ")
    if body == "OK":
        return ClamdReply("OK", "", text)
    if body.endswith(" FOUND"):
        return ClamdReply("FOUND", body.removesuffix(" FOUND").strip(), text)
    if body.endswith("ERROR"):
        return ClamdReply("ERROR", body.removesuffix("ERROR").strip().rstrip("."), text)
    raise ScannerError(f"clamd: unexpected reply {text[:200]!r}")


def result_from_reply(reply: ClamdReply) -> ScanResult:
    output = (f"{NAME}: {reply.raw}",)
    if reply.status == "OK":
        return ScanResult("clean", scanners=(NAME,), output=output)
    if reply.status == "FOUND":
        return ScanResult("virus", virus=reply.detail, scanners=(NAME,), output=output)
    oversize = "size limit" in reply.detail.lower()
    return ScanResult("failed", reason=f"{NAME}: {reply.detail}", scanners=(NAME,),
                      oversize=oversize, output=output)


class ClamdClient:
    """Scans with clamd; `scan` never raises for scanner trouble: it returns verdict failed."""

    name = NAME

    def __init__(self, config: ScannerConfig) -> None:
        self.config = config
        self._slots = asyncio.Semaphore(config.concurrency)
        self._pool = ConnectionPool(config.concurrency)

    async def scan(self, content: bytes, envelope: ScanEnvelope | None = None) -> ScanResult:
        # `envelope` unused: clamd judges the content alone.
        if len(content) > self.config.max_size:
            return ScanResult("failed", reason=f"{NAME}: message larger than the scan limit "
                              f"({self.config.max_size} bytes)", oversize=True)
        try:
            async with asyncio.timeout(self.config.timeout), self._slots:
                reply = await self._scan(content)
        except TimeoutError:
            return ScanResult("failed", reason=f"{NAME}: no answer within "
                              f"{self.config.timeout:g} s", timed_out=True)
        except (OSError, ScannerError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            return ScanResult("failed", reason=_describe(exc))
        return result_from_reply(reply)

    async def _scan(self, content: bytes) -> ClamdReply:
        session = self._pool.take()
        if session is not None:
            try:
                return await self._command(session, content)
            except (OSError, asyncio.IncompleteReadError) as exc:
                # A pooled session clamd closed meanwhile (ReadTimeout, restart): a fresh one.
                if not _closed_early(exc):
                    raise
        session = await connect(self.config.address)
        session.writer.write(b"zIDSESSION\0")
        return await self._command(session, content)

    async def _command(self, session: Connection, content: bytes) -> ClamdReply:
        session.requests += 1
        keep = False
        try:
            for frame in instream_frames(content):
                session.writer.write(frame)
                await session.writer.drain()
            raw = await session.reader.readuntil(b"\0")
            reply = parse_reply(raw[:-1], session.requests)
            # After an ERROR clamd may end the session; start afresh next time.
            keep = reply.status != "ERROR"
            return reply
        finally:
            if keep:
                self._pool.give_back(session)
            else:
                session.close()

    def close(self) -> None:
        self._pool.close()


# What clamd writes on a session it ends for ReadTimeout (see the module's docstring).
TIMED_OUT_NOTICE = b"COMMAND READ TIMED OUT"


def _closed_early(exc: BaseException) -> bool:
    """clamd had closed the session before it read our command. We learn it from the write (a
    reset, a broken pipe) or, when clamd's reset has not come back yet (a clamd across a
    network), from the read: the end of the stream, after nothing or after its notice."""
    if isinstance(exc, asyncio.IncompleteReadError):
        return exc.partial.strip() in (b"", TIMED_OUT_NOTICE)
    return isinstance(exc, ConnectionResetError | BrokenPipeError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ScannerError):
        return str(exc)
    if isinstance(exc, asyncio.IncompleteReadError):
        return f"{NAME}: connection closed before a reply"
    if isinstance(exc, OSError):
        return f"{NAME}: {exc.strerror or exc}"
    return f"{NAME}: {exc}"
