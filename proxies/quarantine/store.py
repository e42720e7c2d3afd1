"""The quarantine: messages kept instead of delivered, with why, until released or purged.

Layout of the quarantine directory:

    <id>.eml    the message exactly as it arrived (what `release` delivers)
    <id>.json   envelope, time, verdict, scanner output; written last, so it marks the entry
                complete: an .eml without its .json is an interrupted store, removed by purge
    tmp/        files being written

Both files are written to tmp/ and fsynced, renamed into place (.eml first), then the
directory is fsynced (`proxies.mail.durable`); only then does `store` return and the SMTP
client get its 250, or the POP3 client the notice that names the entry (the queue's rule:
nothing is acknowledged before it is on disk). When the write fails, neither does: SMTP
answers 451 and POP3 -ERR [SYS/TEMP], so the message stays with the sender or the server.

Ids sort by time: `20250131-235959-1a2b3c4d` (UTC, then random). Entries older than the
retention period are removed by `purge`, which `list` and the daemon's start call.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from proxies.mail.durable import fsync_directory, write_new_file
from proxies.queue import Envelope, Queue
from proxies.scan.api import AuthResult, ScanResult

_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{8}$")
# An .eml without its .json this old is debris of an interrupted store, not one under way.
_ORPHAN_SECONDS = 3600.0


class QuarantineError(Exception):
    """The quarantine cannot do what was asked (no such entry, unwritable directory...)."""


class NoSuchEntry(QuarantineError, LookupError):
    pass


@dataclass(frozen=True)
class QuarantineEntry:
    id: str
    time: float
    # "smtp" (kept by the SMTP filter) or "pop3" (kept by the POP3 proxy).
    source: str
    sender: str
    recipients: tuple[str, ...]
    size: int
    result: ScanResult
    # Why it was kept rather than delivered, e.g. "virus", "failed: 3 timeouts".
    reason: str = ""
    client_address: str = ""
    client_port: int = 0
    helo: str = ""
    original_destination: tuple[str, int] | None = None
    smtputf8: bool = False
    body_8bit: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["time_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuarantineEntry:
        result = dict(data["result"])
        for key in ("rules", "scanners", "output"):
            result[key] = tuple(result.get(key) or ())
        result["auth"] = tuple(AuthResult(**item) for item in result.get("auth") or ())
        destination = data.get("original_destination")
        return cls(
            id=str(data["id"]),
            time=float(data["time"]),
            source=str(data.get("source", "smtp")),
            sender=str(data["sender"]),
            recipients=tuple(data["recipients"]),
            size=int(data["size"]),
            result=ScanResult(**result),
            reason=str(data.get("reason", "")),
            client_address=str(data.get("client_address", "")),
            client_port=int(data.get("client_port", 0)),
            helo=str(data.get("helo", "")),
            original_destination=(str(destination[0]), int(destination[1]))
            if destination else None,
            smtputf8=bool(data.get("smtputf8", False)),
            body_8bit=bool(data.get("body_8bit", False)),
            extra={str(k): str(v) for k, v in (data.get("extra") or {}).items()},
        )


class Quarantine:
    """The quarantine in `directory` (created if missing, mode 0700: it holds other people's
    mail). `retention`: seconds an entry is kept. `clock` is for tests."""

    def __init__(self, directory: Path | str, *, retention: float = 30 * 86400.0,
                 clock: Callable[[], float] = time.time, create: bool = True) -> None:
        self.directory = Path(directory)
        self.retention = retention
        self.clock = clock
        if not self.directory.is_dir():
            if not create:
                raise QuarantineError(f"no quarantine at {self.directory}")
            self.directory.mkdir(parents=True, mode=0o700)
        self._tmp = self.directory / "tmp"
        if create:
            self._tmp.mkdir(mode=0o700, exist_ok=True)

    # --- storing ------------------------------------------------------------------------

    def new_id(self) -> str:
        return time.strftime("%Y%m%d-%H%M%S", time.gmtime(self.clock())) + "-" \
            + secrets.token_hex(4)

    def store(self, *, sender: str, recipients: Sequence[str], content: bytes,
              result: ScanResult, reason: str = "", source: str = "smtp",
              client_address: str = "", client_port: int = 0, helo: str = "",
              original_destination: tuple[str, int] | None = None, smtputf8: bool = False,
              body_8bit: bool = False, extra: dict[str, str] | None = None) -> str:
        """Keep a message; return its id once it is on disk. Blocking (fsync): from asyncio
        call it with `asyncio.to_thread`. Raises OSError when it cannot be written."""
        entry = QuarantineEntry(
            id=self.new_id(), time=self.clock(), source=source, sender=sender,
            recipients=tuple(recipients), size=len(content), result=result,
            reason=reason or result.verdict, client_address=client_address,
            client_port=client_port, helo=helo, original_destination=original_destination,
            smtputf8=smtputf8, body_8bit=body_8bit, extra=dict(extra or {}))
        self._tmp.mkdir(mode=0o700, exist_ok=True)
        tmp_eml = self._tmp / f"{entry.id}.eml"
        tmp_json = self._tmp / f"{entry.id}.json"
        try:
            write_new_file(tmp_eml, content)
            write_new_file(tmp_json, json.dumps(entry.as_json(), indent=1).encode())
            os.rename(tmp_eml, self._path(entry.id, "eml"))
            os.rename(tmp_json, self._path(entry.id, "json"))
            fsync_directory(self.directory)
        except BaseException:
            for path in (tmp_eml, tmp_json, self._path(entry.id, "eml")):
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        return entry.id

    # --- reading ------------------------------------------------------------------------

    def _path(self, entry_id: str, suffix: str) -> Path:
        if not _ID.match(entry_id):
            raise NoSuchEntry(f"not a quarantine id: {entry_id!r}")
        return self.directory / f"{entry_id}.{suffix}"

    def entry(self, entry_id: str) -> QuarantineEntry:
        try:
            data = json.loads(self._path(entry_id, "json").read_bytes())
        except FileNotFoundError:
            raise NoSuchEntry(f"no entry {entry_id} in the quarantine at "
                              f"{self.directory}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise QuarantineError(f"entry {entry_id} is damaged: {exc}") from None
        return QuarantineEntry.from_json(data)

    def content(self, entry_id: str) -> bytes:
        try:
            return self._path(entry_id, "eml").read_bytes()
        except FileNotFoundError:
            raise NoSuchEntry(f"no entry {entry_id} in the quarantine at "
                              f"{self.directory}") from None

    def list(self, *, purge: bool = True) -> list[QuarantineEntry]:
        """Every entry, oldest first (expired ones purged first unless purge=False)."""
        if purge:
            self.purge()
        entries = []
        for path in self.directory.glob("*.json"):
            with contextlib.suppress(QuarantineError, OSError):
                entries.append(self.entry(path.stem))
        # Ids sort by the second only; the stored time orders entries made in the same second.
        return sorted(entries, key=lambda e: (e.time, e.id))

    # --- changing -----------------------------------------------------------------------

    def delete(self, entry_id: str) -> bool:
        """Remove an entry; False if there was none."""
        json_path, eml_path = self._path(entry_id, "json"), self._path(entry_id, "eml")
        try:
            json_path.unlink()  # first: without it the entry no longer exists
        except FileNotFoundError:
            return False
        with contextlib.suppress(FileNotFoundError):
            eml_path.unlink()
        return True

    def purge(self, now: float | None = None) -> int:
        """Remove entries older than the retention period, and debris; return how many."""
        now = self.clock() if now is None else now
        removed = 0
        for path in self.directory.glob("*.json"):
            try:
                stored = self.entry(path.stem).time
            except (QuarantineError, OSError):
                continue
            if now - stored > self.retention and self.delete(path.stem):
                removed += 1
        debris = [p for p in self.directory.glob("*.eml") if not p.with_suffix(".json").exists()]
        debris += list(self._tmp.glob("*"))
        for path in debris:
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > _ORPHAN_SECONDS:
                    path.unlink()
        return removed

    async def release(self, entry_id: str, queue: Queue,
                      recipients: Sequence[str] | None = None) -> str:
        """Put the message into the mail queue for its original recipients (or
        `recipients`) and remove it from the quarantine; return its queue id. The caller
        then pokes the daemon (proxies.queue.poke_master) so it is delivered at once."""
        entry = self.entry(entry_id)
        content = self.content(entry_id)
        envelope = Envelope(
            sender=entry.sender,
            recipients=tuple(recipients or entry.recipients),
            client_address=entry.client_address,
            client_port=entry.client_port,
            original_destination=entry.original_destination,
            helo=entry.helo,
            protocol="ESMTP",
            smtputf8=entry.smtputf8,
            body_8bit=entry.body_8bit,
        )
        queue_id = await queue.accept(envelope, content)
        self.delete(entry_id)
        return queue_id
