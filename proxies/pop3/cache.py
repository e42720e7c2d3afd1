"""Scan results remembered per (server, user, UIDL), so a client that leaves its mail on the
server (fetchmail keep, most desktop clients) does not have every message scanned again at
each poll.

RFC 1939 7: a unique-id is "unique within the maildrop and persistent across sessions", so it
names the same content for the same user on the same server. What was fetched is part of the
key too: a whole message (RETR) and the first lines of it (TOP n) are scanned apart.
A failed scan is never remembered.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from proxies.scan.api import ScanResult

__all__ = ["CacheKey", "CachedScan", "ScanCache"]


@dataclass(frozen=True)
class CacheKey:
    server: tuple[str, int]
    user: str
    uidl: bytes
    scope: str  # "RETR" or "TOP <lines>"


@dataclass(frozen=True)
class CachedScan:
    result: ScanResult
    quarantine_id: str | None  # where the original went, when it was replaced


class ScanCache:
    def __init__(self, ttl: float, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[CacheKey, tuple[float, CachedScan]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def get(self, key: CacheKey) -> CachedScan | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, result = entry
        if expires <= self.clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return result

    def put(self, key: CacheKey, result: ScanResult, quarantine_id: str | None = None) -> None:
        if not self.enabled or result.verdict == "failed":
            return
        self._entries[key] = (self.clock() + self.ttl, CachedScan(result, quarantine_id))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
