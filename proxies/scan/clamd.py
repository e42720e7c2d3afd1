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

`ClamdClient.stream` starts the INSTREAM while the message still arrives (the POP3 proxy feeds
it from the server's response), so that clamd has the message soon after its last byte and only
its scan is left to wait for (see ClamdStream).

Sans-I/O parts (framing and reply parsing) are plain functions, tested without clamd.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from proxies.scan.api import ScanEnvelope, ScanResult
from proxies.scan.config import ScannerConfig
from proxies.scan.connection import Connection, ConnectionPool, ScannerError, connect

NAME = "clamd"
CHUNK = 64 * 1024
INSTREAM = b"zINSTREAM\0"
END_OF_STREAM = struct.pack("!L", 0)
# A stream that has this much waiting for clamd (clamd reads slower than the server sends) stops
# streaming, and the message is scanned whole at its end: what waits is bounded.
STREAM_BACKLOG = 1 << 20


def instream_chunks(content: bytes, chunk: int = CHUNK) -> Iterator[tuple[bytes, memoryview]]:
    """`content` as zINSTREAM chunks: each one's length prefix and a view of its bytes (written
    as they are: no copy of the content)."""
    view = memoryview(content)
    for start in range(0, len(content), chunk):
        piece = view[start:start + chunk]
        yield struct.pack("!L", len(piece)), piece


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
        self._streaming = 0  # ClamdStreams not yet done

    async def scan(self, content: bytes, envelope: ScanEnvelope | None = None) -> ScanResult:
        # `envelope` unused: clamd judges the content alone.
        if len(content) > self.config.max_size:
            return ScanResult("failed", reason=f"{NAME}: message larger than the scan limit "
                              f"({self.config.max_size} bytes)", oversize=True)
        try:
            async with asyncio.timeout(self.config.timeout):
                slot = await self._slot()
                try:
                    reply = await self._scan(content, slot)
                finally:
                    slot.release()
        except TimeoutError:
            return ScanResult("failed", reason=f"{NAME}: no answer within "
                              f"{self.config.timeout:g} s", timed_out=True)
        except (OSError, ScannerError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            return ScanResult("failed", reason=_describe(exc))
        return result_from_reply(reply)

    def stream(self) -> ClamdStream | None:
        """An INSTREAM fed as the message arrives, or None when `concurrency` streams are
        already being fed (the message is then scanned whole at its end, as `scan` does).
        A stream takes one of the `concurrency` slots only for its end, when clamd scans: a
        slow server's transfer holds a connection, not a scan."""
        if self._streaming >= self.config.concurrency:
            return None
        self._streaming += 1
        stream = ClamdStream(self)
        stream.done.add_done_callback(self._stream_done)
        return stream

    def _stream_done(self, _task: object) -> None:
        self._streaming -= 1

    async def _slot(self) -> _Slot:
        await self._slots.acquire()
        return _Slot(self._slots)

    async def _answer(self, session: Connection, slot: _Slot,
                      last: bytes = b"") -> ClamdReply:
        """The reply to the INSTREAM on `session` (see `_reply`). Given up on (a timeout, a
        cancelled scan), it is still awaited in the background, for at most one more
        [scan] timeout, and `slot` stays taken meanwhile: clamd scans what it has whatever
        the client does, and a clamd that has fallen behind must not be handed more than
        `concurrency` messages at once."""
        task = asyncio.get_running_loop().create_task(self._reply(session, last),
                                                      name="clamd-reply")
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            slot.hold_until(task, self.config.timeout)
            raise

    async def _session(self) -> Connection:
        """A pooled IDSESSION, or a new one."""
        return self._pool.take() or await self._new_session()

    async def _new_session(self) -> Connection:
        session = await connect(self.config.address)
        session.writer.write(b"zIDSESSION\0")
        return session

    async def _reply(self, session: Connection, last: bytes = b"") -> ClamdReply:
        """clamd's reply to the INSTREAM sent on `session` (once `last` is written too), which
        goes back to the pool unless the reply is an ERROR (after which clamd may end the
        session)."""
        keep = False
        try:
            if last:
                session.writer.write(last)
            raw = await session.reader.readuntil(b"\0")
            reply = parse_reply(raw[:-1], session.requests)
            keep = reply.status != "ERROR"
            return reply
        finally:
            if keep:
                self._pool.give_back(session)
            else:
                session.close()

    async def _scan(self, content: bytes, slot: _Slot) -> ClamdReply:
        session = self._pool.take()
        if session is not None:
            try:
                return await self._command(session, content, slot)
            except (OSError, asyncio.IncompleteReadError) as exc:
                # A pooled session clamd closed meanwhile (ReadTimeout, restart): a fresh one.
                if not _closed_early(exc):
                    raise
        return await self._command(await self._new_session(), content, slot)

    async def _command(self, session: Connection, content: bytes,
                       slot: _Slot) -> ClamdReply:
        session.requests += 1
        try:
            session.writer.write(INSTREAM)
            for prefix, piece in instream_chunks(content):
                session.writer.write(prefix)
                session.writer.write(piece)
                await session.writer.drain()  # at most a chunk waits beyond the buffer
            session.writer.write(END_OF_STREAM)
        except BaseException:
            session.close()
            raise
        return await self._answer(session, slot)

    def close(self) -> None:
        self._pool.close()


class ClamdStream:
    """One INSTREAM, fed while the message arrives; `finish` gives the verdict.

    Streaming only saves time: whatever stops it (clamd reading slower than the server sends,
    a pooled session clamd had closed, clamd gone, more than max_size) ends it quietly, and
    `finish` then scans the whole content as `ClamdClient.scan` does. Only a reply, or no
    reply within the timeout once the message is complete, is the stream's own answer.
    """

    def __init__(self, client: ClamdClient) -> None:
        self._client = client
        self._waiting: deque[bytes] = deque()
        self._backlog = 0
        self._fed = 0
        self._complete = False
        self._given_up = False
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="clamd-stream")

    @property
    def done(self) -> asyncio.Task[ClamdReply | None]:
        """The stream's task: done once it has its reply, or has given up."""
        return self._task

    @property
    def streaming(self) -> bool:
        """False once it has given up or broken: `finish` will scan the whole content."""
        return not self._given_up

    def feed(self, data: bytes) -> None:
        if self._given_up or not data:
            return
        self._fed += len(data)
        self._backlog += len(data)
        if self._fed > self._client.config.max_size or self._backlog > STREAM_BACKLOG:
            self.cancel()
            return
        self._waiting.append(data)
        self._wake.set()

    async def finish(self, content: bytes) -> ScanResult:
        self._complete = True
        self._wake.set()
        timeout = self._client.config.timeout
        # One timeout for the stream's end and any whole scan after it: never twice as long.
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                if not self._given_up:
                    try:
                        reply = await self._task  # our timeout or cancel cancels it too
                    except asyncio.CancelledError:
                        # A cancel() of the stream meanwhile, not of us: scan it whole.
                        if (current := asyncio.current_task()) and current.cancelling():
                            raise
                        reply = None
                    if reply is not None:
                        return result_from_reply(reply)
                return await self._client.scan(content)
        except TimeoutError:
            return ScanResult("failed", reason=f"{NAME}: no answer within {timeout:g} s",
                              timed_out=True)

    def cancel(self) -> None:
        self._given_up = True
        self._waiting.clear()
        self._task.cancel()

    async def _run(self) -> ClamdReply | None:
        """clamd's reply, or None when the stream could not be completed."""
        client = self._client
        try:
            async with asyncio.timeout(client.config.timeout):
                session = await client._session()
            session.requests += 1
            try:
                session.writer.write(INSTREAM)
                while True:
                    while self._waiting:
                        data = self._waiting.popleft()
                        self._backlog -= len(data)
                        for prefix, piece in instream_chunks(data):
                            session.writer.write(prefix)
                            session.writer.write(piece)
                        await session.writer.drain()
                    if self._complete:
                        break
                    self._wake.clear()
                    await self._wake.wait()
                # The end marker starts clamd's scan: only within the scans' bound.
                slot = await client._slot()
            except BaseException:
                session.close()
                raise
            try:
                return await client._answer(session, slot, END_OF_STREAM)
            finally:
                slot.release()
        except (OSError, ScannerError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, TimeoutError):
            self._given_up = True
            self._waiting.clear()
            return None


class _Slot:
    """One of the client's `concurrency` scan slots, released once."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots: asyncio.Semaphore | None = slots

    def hold_until(self, task: asyncio.Task[ClamdReply], timeout: float) -> None:
        """Keep the slot until `task` (clamd's reply) ends, or `timeout` from now."""
        slots, self._slots = self._slots, None
        if slots is None:
            return
        late = asyncio.get_running_loop().call_later(timeout, task.cancel)

        def ended(task: asyncio.Task[ClamdReply]) -> None:
            late.cancel()
            slots.release()
            if not task.cancelled():
                task.exception()  # nobody waits for it any more: not an unretrieved error

        task.add_done_callback(ended)

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.release()


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
