"""All configured scanners as one ContentScanner, with the content rules in front.

Order: the content rules first (no I/O; a banned attachment needs no virus scan), then the
size cap, then every scanner at once. Their answers combine by severity:

    virus  >  failed (a scanner error, timeout or over its cap)  >  spam  >  clean

so a virus found by clamd is reported even when spamd timed out, and spam is never reported
for a message that was not completely scanned (failed: [scan] fail_mode decides).

`stream` is the same scan started while the message arrives: the scanners that can take a
message in pieces (clamd) get it as it comes, and at its end the rules and the others get it
whole, as `scan` gives it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from proxies import metrics
from proxies.scan.api import ScanEnvelope, ScanResult, ScanStream
from proxies.scan.rules import ContentRules

# Messages bigger than this are parsed for the content rules in a thread, so a large
# message does not stall every other session on the event loop.
PARSE_IN_THREAD = 256 * 1024
_SEVERITY = {"virus": 4, "failed": 3, "spam": 2, "clean": 1, "banned": 5}


class ScannerClient(Protocol):
    name: str

    async def scan(self, content: bytes, envelope: ScanEnvelope | None = None
                   ) -> ScanResult: ...

    def close(self) -> None: ...


@runtime_checkable
class StreamingClient(ScannerClient, Protocol):
    def stream(self) -> ScanStream | None: ...


class MultiScanner:
    def __init__(self, clients: Sequence[ScannerClient], rules: ContentRules,
                 max_size: int) -> None:
        self.clients = tuple(clients)
        # Decided once: a runtime protocol check costs more than the rest of `stream`.
        self._streaming = tuple((number, client) for number, client in enumerate(self.clients)
                                if isinstance(client, StreamingClient))
        self.rules = rules
        self.max_size = max_size

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.clients)

    async def scan(self, content: bytes, envelope: ScanEnvelope | None = None) -> ScanResult:
        return await self._scan(content, envelope, {})

    @property
    def can_stream(self) -> bool:
        return bool(self._streaming)

    def stream(self) -> MultiStream | None:
        """A scan fed as the message arrives (the POP3 proxy's), or None when no scanner
        could start one now."""
        streams: dict[int, ScanStream] = {}
        for number, client in self._streaming:
            stream = client.stream()
            if stream is not None:
                streams[number] = stream
        return MultiStream(self, streams) if streams else None

    async def _scan(self, content: bytes, envelope: ScanEnvelope | None,
                    streams: Mapping[int, ScanStream]) -> ScanResult:
        early: dict[int, asyncio.Task[ScanResult]] = {}
        if streams and self.rules.active and len(content) <= self.max_size:
            # A stream's end starts clamd's scan: now, while the rules parse the message.
            early = {number: asyncio.ensure_future(stream.finish(content))
                     for number, stream in streams.items()}
        try:
            return await self._answers(content, envelope, streams, early)
        finally:
            # What the rules or the size cap left unfinished (no-ops for what has finished).
            for task in early.values():
                task.cancel()
            for stream in streams.values():
                stream.cancel()

    async def _answers(self, content: bytes, envelope: ScanEnvelope | None,
                       streams: Mapping[int, ScanStream],
                       early: Mapping[int, Awaitable[ScanResult]]) -> ScanResult:
        if self.rules.active:
            started = time.monotonic()
            if len(content) > PARSE_IN_THREAD:
                hit = await asyncio.to_thread(self.rules.check, content)
            else:
                hit = self.rules.check(content)
            metrics.current.scan("rules", "clean" if hit is None else "banned",
                                 time.monotonic() - started)
            if hit is not None:
                return hit.result()
        if not self.clients:
            return ScanResult("clean", scanners=("rules",) if self.rules.active else ())
        if len(content) > self.max_size:
            return ScanResult("failed", oversize=True, reason=f"message of {len(content)} "
                              f"bytes is over the scan limit of {self.max_size}")
        if len(self.clients) == 1:  # the usual case, without gather's task and callbacks
            return await _timed(self.clients[0], _answer(0, self.clients[0], content, envelope,
                                                         streams, early))
        results = await asyncio.gather(*(
            _timed(client, _answer(number, client, content, envelope, streams, early))
            for number, client in enumerate(self.clients)))
        return combine(results)

    def close(self) -> None:
        for client in self.clients:
            client.close()


class MultiStream:
    """MultiScanner.stream's scan: pieces go to the scanners streaming, and `finish` is
    MultiScanner.scan with their answers in place of a whole scan."""

    def __init__(self, scanner: MultiScanner, streams: Mapping[int, ScanStream]) -> None:
        self.scanner = scanner
        self.streams = streams

    def feed(self, data: bytes) -> None:
        for stream in self.streams.values():
            stream.feed(data)

    async def finish(self, content: bytes) -> ScanResult:
        return await self.scanner._scan(content, None, self.streams)

    def cancel(self) -> None:
        for stream in self.streams.values():
            stream.cancel()


def _answer(number: int, client: ScannerClient, content: bytes, envelope: ScanEnvelope | None,
            streams: Mapping[int, ScanStream],
            early: Mapping[int, Awaitable[ScanResult]]) -> Awaitable[ScanResult]:
    if number in early:
        return early[number]
    stream = streams.get(number)
    if stream is not None:
        return stream.finish(content)
    # Without an envelope (POP3) call as before: a scanner that judges the content alone
    # need not take one.
    return client.scan(content) if envelope is None else client.scan(content, envelope)


async def _timed(client: ScannerClient, answer: Awaitable[ScanResult]) -> ScanResult:
    """One scanner's answer, told to the metrics with the time it took (per scanner, as
    the scanners run in parallel and the slowest sets the message's wait; for a stream, from
    the message's end)."""
    started = time.monotonic()
    result = await answer
    metrics.current.scan(client.name, result.verdict, time.monotonic() - started)
    return result


def combine(results: Sequence[ScanResult]) -> ScanResult:
    """One result from several scanners' (see the module docstring)."""
    worst = max(results, key=lambda r: _SEVERITY[r.verdict])
    scanners = tuple(name for r in results for name in r.scanners)
    output = tuple(line for r in results for line in r.output)
    scored = [r for r in results if r.score is not None]
    spam = next((r for r in scored if r.verdict == "spam"), scored[0] if scored else None)
    failed = [r for r in results if r.verdict == "failed"]
    return ScanResult(
        verdict=worst.verdict,
        score=spam.score if spam else None,
        threshold=spam.threshold if spam else None,
        rules=tuple(rule for r in results for rule in r.rules),
        virus=worst.virus,
        reason="; ".join(r.reason for r in failed) if worst.verdict == "failed"
        else worst.reason,
        scanners=scanners,
        action=worst.action,
        timed_out=any(r.timed_out for r in failed),
        oversize=any(r.oversize for r in failed),
        output=output,
        # Only rspamd names an action and authentication results: taken from whichever
        # result has them.
        scanner_action=next((r.scanner_action for r in results if r.scanner_action), None),
        scanner_message=next((r.scanner_message for r in results if r.scanner_message), ""),
        auth=tuple(a for r in results for a in r.auth),
    )
