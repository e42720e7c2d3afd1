"""How many delivery status notifications one sender domain may get: `[smtp] bounce_rate_limit`
per `bounce_rate_window`.

Recipient verification keeps most bounces from ever being needed; what is left (a server that
took a recipient at probe time and refuses it at delivery, a queue lifetime that ran out) can
still be a flood when spam with one forged sender domain gets through: every notification goes
to an innocent third party ("backscatter"). So past the limit the notification is not made; the
recipients are bounced all the same (the message leaves the queue, the log and the metrics say
so), because keeping undeliverable mail around to notify later would only move the flood.

The window slides: a notification counts for `window` seconds after it was made. The counts
live in sqlite (`bounces.db` in the queue directory), like the verification cache, so the limit
holds across processes and restarts; times are wall-clock for the same reason. Checking and
counting are one `BEGIN IMMEDIATE` transaction, so two processes cannot both take the last slot.
Each call opens its own connection: notifications are rare, and the caller is a worker thread of
the delivery process (a connection may not move between threads, nor survive a fork).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from proxies.config import SmtpConfig

__all__ = ["DB_FILE", "BounceRateLimit", "Reservation", "sender_domain"]

DB_FILE: Final = "bounces.db"
# Another process holds the write lock for one short transaction at most.
_BUSY_TIMEOUT: Final = 5.0
# Entries this far in the future are a clock that was set back: forgotten, or they would count
# against the domain until the clock caught up again.
_CLOCK_SLACK: Final = 60.0


def sender_domain(sender: str) -> str:
    """The domain a notification to `sender` counts against ('' when it has none)."""
    if "@" not in sender:
        return ""
    # RFC 5321 2.4: domain names are case-insensitive; a trailing dot names the same domain.
    return sender.rpartition("@")[2].lower().rstrip(".")


@dataclass(frozen=True)
class Reservation:
    """A notification counted against its domain; `BounceRateLimit.cancel` takes it back."""

    domain: str
    row: int


class BounceRateLimit:
    """At most `limit` notifications per sender domain in any `window` seconds."""

    def __init__(self, path: Path, limit: int, window: float, *,
                 clock: Callable[[], float] = time.time) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("need limit >= 1 and window > 0 (no limit: no BounceRateLimit)")
        self.path = path
        self.limit = limit
        self.window = window
        self.clock = clock

    @classmethod
    def for_queue(cls, config: SmtpConfig) -> BounceRateLimit | None:
        """The limit `[smtp]` asks for, kept in its queue directory; None: bounce_rate_limit = 0."""
        if config.bounce_rate_limit == 0:
            return None
        return cls(config.queue_dir / DB_FILE, config.bounce_rate_limit,
                   config.bounce_rate_window)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT, isolation_level=None)
        try:
            # Switching a new file to WAL takes an exclusive lock and sqlite reports a busy
            # one at once, without its busy handler: several processes meeting a new file
            # (the first bounces after a start) wait their turn here instead.
            deadline = time.monotonic() + _BUSY_TIMEOUT
            while True:
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.05)
            # A lost count after a power cut only lets one more notification through.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS dsn_sent (domain TEXT NOT NULL, "
                       "at REAL NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS dsn_sent_domain ON dsn_sent (domain, at)")
            yield db
        finally:
            db.close()

    def reserve(self, domain: str) -> Reservation | None:
        """Count one notification for `domain` if it is under the limit; None if it is not.

        Raises sqlite3.Error when the file cannot be used (the caller decides what then).
        """
        now = self.clock()
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM dsn_sent WHERE at <= ? OR at > ?",
                           (now - self.window, now + _CLOCK_SLACK))
                (count,) = db.execute("SELECT count(*) FROM dsn_sent WHERE domain = ?",
                                      (domain,)).fetchone()
                if count >= self.limit:
                    db.execute("COMMIT")
                    return None
                cursor = db.execute("INSERT INTO dsn_sent (domain, at) VALUES (?, ?)",
                                    (domain, now))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        assert cursor.lastrowid is not None
        return Reservation(domain, cursor.lastrowid)

    def cancel(self, reservation: Reservation) -> None:
        """The notification was not made after all (it could not be queued): uncount it."""
        with self._connection() as db:
            db.execute("DELETE FROM dsn_sent WHERE rowid = ?", (reservation.row,))

    def counted(self, domain: str) -> int:
        """Notifications counted against `domain` in the current window."""
        now = self.clock()
        with self._connection() as db:
            (count,) = db.execute(
                "SELECT count(*) FROM dsn_sent WHERE domain = ? AND at > ? AND at <= ?",
                (domain, now - self.window, now + _CLOCK_SLACK)).fetchone()
        return int(count)
