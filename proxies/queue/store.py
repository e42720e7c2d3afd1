"""The durable queue of the SMTP proxy: directories, atomic renames and group commit.

Layout of the queue directory (Postfix's, see its qmgr(8) and OVERVIEW):

    incoming/<id>.<pid>.tmp   being written by process <pid>; never a complete message
    incoming/<id>             new, complete, waiting for its first delivery attempt
    active/<id>               claimed by the delivery process, an attempt is under way
    deferred/<id>             waiting for a retry; the file's mtime is the next attempt time
    hold/<id>                 put on hold by the administrator; never tried until released
    corrupt/<id>              unreadable files, kept for a human to look at
    journal/                  new messages, appended to segment files (journal.py)
    master.pid                the delivery daemon's pid, for `mailgate queue flush/release`

A message is accepted once its record is appended to the accepting process's journal segment
and fdatasynced (journal.py); only then does `accept` return and the front end answer 250.
Concurrent accepts share one append and one fdatasync (group commit). The delivery process
delivers straight from the journal; a message that is not delivered at its first attempt (or
that the administrator holds or deletes, or that recovery finds) is "materialized": written as
a file of its own into the directories below, where all the rest happens. With
`use_journal=False` (and for the notifications the queue makes itself) a message is a file from
the start: (1) its file, ending with the end record, is written and fsynced, (2) linked under
its final name in incoming/ and (3) incoming/ itself is fsynced, step 3 shared by a batch.

Everything after that moves the file by rename(2), which is atomic, so a message is always in
exactly one directory, and changes of delivery state are appended to it (see queuefile.py).
Moves made by the delivery cycle (claim, defer) are not fsynced: if a crash loses one, the
file is still in active/ or its old place, and recovery puts active/ back — at worst a
recipient gets a message twice, which SMTP allows; a message is never lost.

Several processes may use one queue directory at once: acceptors only create files with
unique names; claim() is a rename, so only one process can win a message; the CLI renames,
touches and deletes. No method relies on memory shared with another process: the delivery
process's schedule (the in-memory index behind due()) is rebuilt from the directories by
rescan(), which the daemon calls on SIGUSR1, which `flush`, `release` and other acceptor
processes send through `poke_master`. Within the delivery process, every change of that schedule
is told to `on_schedule` with the new due time, so the scheduler sleeps until the next due time
and is woken when one comes earlier (a deferral, a release, a flush, a new message).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from proxies import logs, metrics
from proxies.mail.durable import fsync_directory as _fsync_dir
from proxies.mail.durable import fsync_file as _fsync_path
from proxies.mail.durable import write_all
from proxies.queue import journal, queuefile
from proxies.queue.dsn import DsnRecipient, build_dsn, header_block
from proxies.queue.model import (
    NO_DSN_NULL_SENDER,
    NO_DSN_RATE_LIMITED,
    NO_DSN_SPAM,
    NO_DSN_VIRUS,
    AttemptOutcome,
    ClaimedMessage,
    CorruptQueueFile,
    DeliveryResult,
    DeliveryState,
    Envelope,
    NoSuchMessage,
    QueueEntry,
    QueueError,
    QueueFullError,
    QueueWriteError,
    RecipientState,
    RecipientStatus,
    RecoveryReport,
)
from proxies.queue.ratelimit import BounceRateLimit, sender_domain

INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT = "incoming", "active", "deferred", "hold", "corrupt"
QUEUE_DIRS = (INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT)
# Where a message can be, in the order a lookup tries them.
_MESSAGE_DIRS = (INCOMING, DEFERRED, ACTIVE, HOLD)
PID_FILE = "master.pid"
# A .tmp file older than this is garbage even if its writer's pid is alive (pid reuse).
_STALE_TMP_SECONDS = 3600.0
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Names of the .tmp files this process is writing (any Queue object), which recover() keeps.
_INFLIGHT: set[str] = set()


def _write_error(exc: OSError, what: str) -> QueueWriteError:
    cls = QueueFullError if exc.errno in _DISK_FULL else QueueWriteError
    return cls(f"{what}: {exc.strerror or exc}")


def _write_new_file(path: Path, chunks: list[bytes], sync: bool = True) -> None:
    """Create, write, fsync (unless `sync` is false: the committer does it) and close `path`;
    on any failure remove it and raise the QueueWriteError or QueueFullError that says why."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _write_error(exc, "create queue file") from exc
    try:
        try:
            write_all(fd, chunks)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)  # close can report a delayed write error too (NFS)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise _write_error(exc, "write queue file") from exc


def _tmp_writer(name: str) -> int | None:
    """The writer's pid in a temporary file's name, `<queue id>.<pid>.tmp`; None for any other
    name (a file recovery must not delete)."""
    queue_id, _, rest = name.partition(".")
    pid, _, suffix = rest.partition(".")
    if suffix != "tmp" or not queuefile.is_queue_id(queue_id) or not pid.isdecimal():
        return None
    return int(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Content up to this size is written from the event loop straight into the page cache (tens of
# microseconds) and fsynced by the committer with its batch: one thread hand-off per batch
# instead of two per message, which measured as the front end's largest cost (GIL traffic).
# Bigger content is written and fsynced in a writer thread, so the loop never stalls on it.
INLINE_WRITE_LIMIT = 256 * 1024


@dataclass
class _Pending:
    queue_id: str
    tmp: Path
    future: asyncio.Future[str]
    synced: bool = True


@dataclass
class _Journaled:
    queue_id: str
    chunks: list[bytes]
    future: asyncio.Future[str]


class Queue:
    """The message queue in `directory` (created with its subdirectories if missing).

    `retry_min`, `retry_max`: the backoff between attempts starts at retry_min and doubles up
    to retry_max; `lifetime`: a recipient still undelivered this long after arrival is
    bounced (Postfix: minimal_backoff_time 300s, maximal_backoff_time 4000s,
    maximal_queue_lifetime 5d). `hostname` names this MTA in notifications. `clock` is for
    tests. `write_threads` bounds the file writes (and fsyncs) that run at once.
    """

    def __init__(self, directory: Path | str, *, retry_min: float = 300.0,
                 retry_max: float = 4000.0, lifetime: float = 5 * 86400.0,
                 hostname: str = "", clock: Callable[[], float] = time.time,
                 create: bool = True, write_threads: int = 16,
                 use_journal: bool = False, delivers: bool = True) -> None:
        if not 0 < retry_min <= retry_max:
            raise ValueError("need 0 < retry_min <= retry_max")
        self.directory = Path(directory)
        self.retry_min = float(retry_min)
        self.retry_max = float(retry_max)
        self.lifetime = float(lifetime)
        self.hostname = hostname or _default_hostname()
        self.clock = clock
        if not self.directory.is_dir():
            if not create:
                raise QueueError(f"no queue directory at {self.directory}")
            self.directory.mkdir(parents=True, mode=0o700)
        for name in QUEUE_DIRS:
            (self.directory / name).mkdir(mode=0o700, exist_ok=True)
        self._dirs = {name: self.directory / name for name in QUEUE_DIRS}
        self._journal_dir = self.directory / journal.JOURNAL_DIR
        self._journal_dir.mkdir(mode=0o700, exist_ok=True)
        # accept() appends to the journal (journal.py) instead of writing a file per message:
        # for `mailgate run`'s own processes, which read each other's segments. A short-lived
        # writer (`mailgate quarantine release`) writes files, which the master finds at the
        # rescan it is poked for; its segment would wait until the process is gone.
        self.use_journal = use_journal
        # This process delivers (the master): it schedules what is accepted, reads the
        # journal and recovers what dead writers left there. Acceptor workers do not: they
        # tell the master instead (on_durable).
        self.delivers = delivers
        self._journal_writer: journal.JournalWriter | None = None
        self._journal_batch: list[_Journaled] = []
        self._journal_committer: asyncio.Task[None] | None = None
        self.journal = journal.JournalReader(self._journal_dir)
        self._journal_claims: set[str] = set()
        self._journal_lock = threading.Lock()
        # An acceptor worker's way to tell the master of each message made durable (even if
        # the client that sent it is gone by then): the record, so the master can read it.
        self.on_durable: Callable[[journal.Record], None] | None = None
        # How the CLI asks the delivery process to look again (tests replace it).
        self.poke: Callable[[], int | None] = lambda: poke_master(self.directory)
        self._ids = queuefile.IdGenerator()
        self._pid = os.getpid()
        self._write_threads = write_threads
        self._writers: ThreadPoolExecutor | None = None
        self._committer_pool: ThreadPoolExecutor | None = None
        self._batch: list[_Pending] = []
        self._committer: asyncio.Task[None] | None = None
        self._lock = threading.Lock()
        # The delivery schedule: queue id -> next attempt, for incoming/ and deferred/.
        self._index: dict[str, float] = {}
        self._scanned = False
        # Called with the due time each time a message is (re)scheduled, from whichever thread
        # did it (record_attempt runs in a worker thread): the delivery agent's wake-up. Only
        # earlier times matter to it; a message leaving the schedule is not told.
        self.on_schedule: Callable[[float], None] | None = None

    # --- accepting ------------------------------------------------------------------------

    def new_id(self) -> str:
        """A fresh queue id (the front end needs it before accepting, for Received:)."""
        return self._ids.new()

    async def accept(self, envelope: Envelope, content: bytes, *,
                     queue_id: str | None = None) -> str:
        """Store a message; return its queue id once it is durable (then answer 250).

        Raises QueueFullError (452 4.3.1) or QueueWriteError (451 4.3.0); then nothing of
        the message is left in the queue. If the caller is cancelled before the message is
        committed it is discarded; once committing it stays queued.
        """
        queue_id = queue_id or self.new_id()
        if not queuefile.is_queue_id(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        envelope = self._stamp(envelope)
        chunks = queuefile.encode_message(envelope, content)
        tmp = self._dirs[INCOMING] / f"{queue_id}.{self._pid}.tmp"
        loop = asyncio.get_running_loop()
        if self._writers is None:
            self._writers = ThreadPoolExecutor(self._write_threads, "queue-write")
            self._committer_pool = ThreadPoolExecutor(1, "queue-commit")
        if self.use_journal:
            return await self._accept_journaled(queue_id, chunks, loop)
        _INFLIGHT.add(tmp.name)
        if sum(len(c) for c in chunks) <= INLINE_WRITE_LIMIT:
            try:
                _write_new_file(tmp, chunks, sync=False)
            except BaseException:
                _INFLIGHT.discard(tmp.name)
                raise
            return await self._commit(queue_id, tmp, loop, synced=False)
        write = loop.run_in_executor(self._writers, _write_new_file, tmp, chunks)
        try:
            # shield: a cancelled caller must not leave the thread's file behind unnoticed.
            await asyncio.shield(write)
        except asyncio.CancelledError:
            def discard(done: asyncio.Future[None]) -> None:
                if not done.cancelled():
                    done.exception()  # retrieved: the caller is gone, the file goes too
                self._discard(tmp)

            write.add_done_callback(discard)
            raise
        except BaseException:
            _INFLIGHT.discard(tmp.name)
            raise
        return await self._commit(queue_id, tmp, loop, synced=True)

    async def _accept_journaled(self, queue_id: str, chunks: list[bytes],
                                loop: asyncio.AbstractEventLoop) -> str:
        item = _Journaled(queue_id, chunks, loop.create_future())
        self._journal_batch.append(item)
        if self._journal_committer is None or self._journal_committer.done():
            self._journal_committer = loop.create_task(self._journal_loop(),
                                                       name="queue-journal-committer")
        return await item.future

    async def _journal_loop(self) -> None:
        """Group commit into the journal: whatever waits when an append starts goes in it."""
        loop = asyncio.get_running_loop()
        while self._journal_batch:
            batch, self._journal_batch = self._journal_batch, []
            live = [item for item in batch if not item.future.cancelled()]
            if not live:
                continue
            try:
                records = await loop.run_in_executor(
                    self._committer_pool, self._journal_append,
                    [(item.queue_id, item.chunks) for item in live])
            except Exception as exc:
                error = exc if isinstance(exc, QueueError) else \
                    QueueWriteError(f"commit failed: {exc!r}")
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            now = self.clock()
            for item, record in zip(live, records, strict=True):
                self._durable(record, now)
                if not item.future.done():
                    item.future.set_result(item.queue_id)

    def _journal_append(self, items: list[tuple[str, list[bytes]]]) -> list[journal.Record]:
        if self._journal_writer is None:
            self._journal_writer = journal.JournalWriter(self._journal_dir)
        try:
            return self._journal_writer.append(items)
        except OSError as exc:
            raise _write_error(exc, "append to the queue journal") from exc

    def _durable(self, record: journal.Record, now: float) -> None:
        if self.delivers:
            with self._journal_lock:
                self.journal.announce(record)
            self._schedule(record.queue_id, now)
        elif self.on_durable is not None:
            self.on_durable(record)

    async def _commit(self, queue_id: str, tmp: Path, loop: asyncio.AbstractEventLoop, *,
                      synced: bool) -> str:
        pending = _Pending(queue_id, tmp, loop.create_future(), synced)
        self._batch.append(pending)
        if self._committer is None or self._committer.done():
            self._committer = loop.create_task(self._commit_loop(), name="queue-committer")
        return await pending.future

    def _stamp(self, envelope: Envelope) -> Envelope:
        if envelope.arrival is None:
            envelope = replace(envelope, arrival=self.clock())
        return envelope

    def _discard(self, tmp: Path) -> None:
        _INFLIGHT.discard(tmp.name)
        with contextlib.suppress(OSError):
            tmp.unlink()

    async def _commit_loop(self) -> None:
        """Group commit: whatever is waiting when a commit starts goes in one batch."""
        loop = asyncio.get_running_loop()
        assert self._committer_pool is not None
        while self._batch:
            batch, self._batch = self._batch, []
            live: list[_Pending] = []
            for item in batch:
                if item.future.cancelled():
                    self._discard(item.tmp)
                else:
                    live.append(item)
            if not live:
                continue
            try:
                results = await loop.run_in_executor(
                    self._committer_pool, self._commit_batch,
                    [(item.queue_id, item.tmp, item.synced) for item in live])
            except Exception as exc:  # the pool is gone (closed): fail the batch cleanly
                results = [QueueWriteError(f"commit failed: {exc!r}")] * len(live)
                for item in live:
                    self._discard(item.tmp)
            now = self.clock()
            for item, result in zip(live, results, strict=True):
                _INFLIGHT.discard(item.tmp.name)
                if isinstance(result, QueueError):
                    if not item.future.done():
                        item.future.set_exception(result)
                    continue
                self._schedule(item.queue_id, now)
                if not item.future.done():
                    item.future.set_result(item.queue_id)

    def _commit_batch(self, items: list[tuple[str, Path, bool]]) -> list[QueueError | None]:
        """fsync each file not yet synced, link it under its final name, then fsync incoming/
        once."""
        incoming = self._dirs[INCOMING]
        results: list[QueueError | None] = []
        for queue_id, tmp, synced in items:
            try:
                if not synced:
                    try:
                        _fsync_path(tmp)
                    except OSError as exc:
                        raise _write_error(exc, "write queue file") from exc
                self._publish(tmp, incoming / queue_id)
                results.append(None)
            except QueueWriteError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                results.append(exc)
        if any(r is None for r in results):
            try:
                _fsync_dir(incoming)
            except OSError as exc:
                error = _write_error(exc, "sync queue directory")
                for (queue_id, _tmp, _synced), result in zip(items, results, strict=True):
                    if result is None:
                        with contextlib.suppress(OSError):
                            (incoming / queue_id).unlink()
                results = [error if r is None else r for r in results]
        return results

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        # link() refuses to replace an existing name, unlike rename(): an id collision
        # (two processes, same microsecond, same 32 random bits) fails instead of
        # overwriting an accepted message.
        try:
            os.link(tmp, final)
        except FileExistsError as exc:
            raise QueueWriteError(f"queue id {final.name} is taken") from exc
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise _write_error(exc, "link queue file") from exc
            # A file system without hard links: fall back to rename.
            try:
                os.rename(tmp, final)
            except OSError as exc2:
                raise _write_error(exc2, "rename queue file") from exc2
            return
        try:
            os.unlink(tmp)
        except OSError as exc:
            with contextlib.suppress(OSError):
                final.unlink()
            raise _write_error(exc, "unlink temporary queue file") from exc

    def _store_now(self, envelope: Envelope, content: bytes) -> str:
        """accept() without asyncio, for messages the queue makes itself (notifications)."""
        queue_id = self.new_id()
        envelope = self._stamp(envelope)
        self._write_file(queue_id, queuefile.encode_message(envelope, content), INCOMING)
        self._schedule(queue_id, self.clock())
        return queue_id

    def close(self) -> None:
        """Stop the writer threads (after the writes under way)."""
        for pool in (self._writers, self._committer_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._writers = self._committer_pool = None
        if self._journal_writer is not None:
            self._journal_writer.close()
            self._journal_writer = None
        with self._journal_lock:
            self.journal.close()

    # --- the journal (journal.py) -----------------------------------------------------------

    def writer_gone(self, pid: int) -> None:
        """Acceptor `pid` exited: schedule what it made durable but never told us of."""
        with self._journal_lock:
            missed = self.journal.writer_gone(pid)
        now = self.clock()
        for record in missed:
            self._schedule(record.queue_id, now)

    def _recover_journal(self, wait: float = 0.0) -> None:
        """Segments left by writers that are gone and that we never read (a run before
        this one): their waiting messages become files in incoming/. And on request (`mailgate
        queue hold/delete` of a message still in the journal), every waiting one we know."""
        request = self._journal_dir / journal.MATERIALIZE_REQUEST
        own = set() if self._journal_writer is None else set(self._journal_writer.created)
        with self._journal_lock:
            for name in self.journal.untracked(own, wait):
                count = self.journal.recover(
                    name, lambda record, payload: self._write_file(
                        record.queue_id, [payload], INCOMING, again=True))
                logs.event("queue_journal_recovered", segment=name, messages=count)
            if not request.exists():
                return
            waiting = [(q, q in self._journal_claims) for q in self.journal.waiting]
        # Claimed ones too (into active/, as if claimed from a file): a hold or delete of a
        # message under delivery then works as it does for a file.
        for queue_id, claimed in waiting:
            self._materialize(queue_id, ACTIVE if claimed else INCOMING)
        with contextlib.suppress(FileNotFoundError):
            request.unlink()

    def _materialize(self, queue_id: str, status: str) -> None:
        """Move a message from the journal into a file of its own in `status`/."""
        with self._journal_lock:
            payload = self.journal.payload(queue_id)
            if payload is None:
                return
            self._write_file(queue_id, [payload], status, again=True)
            self.journal.done(queue_id)
            self._journal_claims.discard(queue_id)

    def _write_file(self, queue_id: str, chunks: list[bytes], status: str, *,
                    again: bool = False) -> None:
        """Write a message as a file of its own into `status`/, durably (file and directory).
        `again`: it may be there already (materialized by a run that crashed before it could
        mark its journal record done), which is no id collision."""
        tmp = self._dirs[INCOMING] / f"{queue_id}.{self._pid}.tmp"
        _INFLIGHT.add(tmp.name)
        try:
            _write_new_file(tmp, chunks)
            try:
                self._publish(tmp, self._dirs[status] / queue_id)
            except QueueWriteError:
                if again and (self._dirs[status] / queue_id).exists():
                    return
                raise
            try:
                _fsync_dir(self._dirs[status])
            except OSError as exc:
                with contextlib.suppress(OSError):
                    (self._dirs[status] / queue_id).unlink()
                raise _write_error(exc, "sync queue directory") from exc
        finally:
            self._discard(tmp)

    def _journal_entries(self) -> dict[str, journal.Record]:
        # Headers only (no CRC pass over every segment at each look, _settle polls this):
        # whoever reads a record's payload parses it, and a queue file proves itself.
        return {r.queue_id: r for r in journal.waiting_records(self._journal_dir, check=False)}

    def _settle(self, queue_id: str) -> None:
        """Before the CLI moves or removes a message: if it still waits in the journal, have
        the delivery process (or, with none running, this one) make it a file."""
        if self._locate(queue_id) is not None or queue_id not in self._journal_entries():
            return
        (self._journal_dir / journal.MATERIALIZE_REQUEST).touch()
        if self.poke() is None:
            self._recover_journal()
            return
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            if self._locate(queue_id) is not None or queue_id not in self._journal_entries():
                return
            time.sleep(0.05)

    # --- recovery and scheduling ------------------------------------------------------------

    def recover(self) -> RecoveryReport:
        """Make the queue consistent after a crash; call once, in the delivery process, before
        claiming. Deletes half-written files of writers that are gone, puts active/ back (due
        now), moves unreadable files to corrupt/, then rescans. A file whose name is not the
        queue's (an editor's backup, NFS's .nfs*, a README) is nobody's message: it is logged
        and left where it is, never parsed, moved or deleted (so does Postfix's postsuper)."""
        removed = requeued = corrupt = foreign = 0
        now = self.clock()
        incoming = self._dirs[INCOMING]
        for name in self._names(INCOMING):
            pid = _tmp_writer(name)
            if pid is not None and self._tmp_is_orphan(incoming / name, pid, name, now):
                with contextlib.suppress(FileNotFoundError):
                    (incoming / name).unlink()
                removed += 1
        for queue_id in self._names(ACTIVE):
            if not queuefile.is_queue_id(queue_id):
                self._foreign(ACTIVE, queue_id)
                foreign += 1
                continue
            path = self._dirs[ACTIVE] / queue_id
            if self._check(ACTIVE, queue_id):
                with contextlib.suppress(FileNotFoundError):
                    os.utime(path, (now, now))
                    os.rename(path, self._dirs[DEFERRED] / queue_id)
                    requeued += 1
            else:
                corrupt += 1
        for status in (INCOMING, DEFERRED, HOLD):
            for queue_id in self._names(status):
                if not queuefile.is_queue_id(queue_id):
                    if status != INCOMING or _tmp_writer(queue_id) is None:
                        self._foreign(status, queue_id)
                        foreign += 1
                    continue
                if not self._check(status, queue_id):
                    corrupt += 1
        for name in QUEUE_DIRS:
            _fsync_dir(self._dirs[name])
        # Before the rescan (which takes only dead writers' segments): a previous master's
        # workers die with it, so any still appending get a moment, then theirs are ours.
        self._recover_journal(wait=5.0)
        self.rescan()
        held = sum(1 for n in self._names(HOLD) if queuefile.is_queue_id(n))
        report = RecoveryReport(removed, requeued, corrupt, len(self._index), held, foreign)
        return report

    def _tmp_is_orphan(self, path: Path, pid: int, name: str, now: float) -> bool:
        if pid == self._pid:
            return name not in _INFLIGHT
        try:
            if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                return True
        except FileNotFoundError:
            return False
        return not _pid_alive(pid)

    def _check(self, status: str, queue_id: str) -> bool:
        """Is the file complete? If not, move it to corrupt/ and say False."""
        try:
            with open(self._dirs[status] / queue_id, "rb") as handle:
                queuefile.parse(handle)
        except FileNotFoundError:
            return True  # moved away meanwhile: not ours to judge
        except CorruptQueueFile as exc:
            self._to_corrupt(status, queue_id, str(exc))
            return False
        return True

    @staticmethod
    def _foreign(status: str, name: str) -> None:
        logs.warning("queue_foreign_file", queue=status, file=name,
                     action="left in place: not a queue file name")

    def _to_corrupt(self, status: str, name: str, why: str) -> None:
        logs.warning("queue_file_corrupt", qid=name, queue=status, error=why)
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._dirs[status] / name, self._dirs[CORRUPT] / name)

    def _names(self, status: str) -> list[str]:
        try:
            return sorted(os.listdir(self._dirs[status]))
        except FileNotFoundError:
            return []

    def notice(self, queue_id: str, record: journal.Record | None = None) -> None:
        """Another process (an acceptor worker) queued `queue_id` (in the journal at
        `record`): schedule it now, without a rescan of the directories."""
        if record is not None:
            with self._journal_lock:
                fresh = self.journal.announce(record)
            if fresh:
                self._schedule(queue_id, self.clock())
            return
        if queuefile.is_queue_id(queue_id):
            with self._lock:
                when = self._index.setdefault(queue_id, self.clock())
            self._told(when)

    def _schedule(self, queue_id: str, when: float) -> None:
        """Set a message's next attempt; the only way into the schedule besides rescan()."""
        with self._lock:
            self._index[queue_id] = when
        self._told(when)

    def _told(self, when: float) -> None:
        # Outside the lock: the listener may take its own (the event loop's).
        listener = self.on_schedule
        if listener is not None:
            listener(when)

    def rescan(self) -> int:
        """Rebuild the schedule from the directories (after another process changed them:
        other acceptors, `mailgate queue flush/release`). Returns how many are waiting."""
        if self.delivers:
            self._recover_journal()
        index: dict[str, float] = {}
        now = self.clock()
        with self._journal_lock:
            journaled = [q for q in self.journal.waiting if q not in self._journal_claims]
        for status in (INCOMING, DEFERRED):
            with contextlib.suppress(FileNotFoundError), os.scandir(self._dirs[status]) as it:
                for entry in it:
                    if queuefile.is_queue_id(entry.name):
                        with contextlib.suppress(FileNotFoundError):
                            mtime = entry.stat().st_mtime
                            index[entry.name] = mtime if status == DEFERRED else min(mtime, now)
        with self._lock:
            for queue_id in journaled:
                index.setdefault(queue_id, min(self._index.get(queue_id, now), now))
            self._index = index
            self._scanned = True
        if index:
            self._told(min(index.values()))
        return len(index)

    @staticmethod
    def _next_attempt(status: str, mtime: float, now: float) -> float | None:
        # Postfix's trick: a deferred file's mtime is its next attempt time, so scheduling
        # needs no reads. A new message (incoming/) is due at once.
        if status == DEFERRED:
            return mtime
        return min(mtime, now) if status == INCOMING else None

    def due(self, now: float | None = None) -> list[str]:
        """Ids whose next attempt is due (not held, not being delivered), oldest first."""
        if not self._scanned:
            self.rescan()
        now = self.clock() if now is None else now
        with self._lock:
            return sorted(qid for qid, when in self._index.items() if when <= now)

    def next_due_time(self) -> float | None:
        """When the next message is due (maybe in the past); None if none is waiting."""
        if not self._scanned:
            self.rescan()
        with self._lock:
            return min(self._index.values(), default=None)

    # --- delivery -----------------------------------------------------------------------------

    def claim(self, queue_id: str) -> ClaimedMessage | None:
        """Take a message for delivery (move it to active/). None if it is gone, held,
        already claimed (maybe by another process), or unreadable (moved to corrupt/)."""
        if not queuefile.is_queue_id(queue_id):
            return None
        with self._journal_lock:
            journaled = queue_id in self.journal.waiting
            if journaled and queue_id in self._journal_claims:
                return None
            if journaled:
                self._journal_claims.add(queue_id)
        with self._lock:
            self._index.pop(queue_id, None)
        if journaled:
            return self._claim_journaled(queue_id)
        active = self._dirs[ACTIVE] / queue_id
        for status in (INCOMING, DEFERRED):
            try:
                os.rename(self._dirs[status] / queue_id, active)
                break
            except FileNotFoundError:
                continue
        else:
            return None
        try:
            with open(active, "rb") as handle:
                parsed = queuefile.parse(handle, with_content=True)
        except FileNotFoundError:
            return None  # deleted under us
        except CorruptQueueFile as exc:
            self._to_corrupt(ACTIVE, queue_id, str(exc))
            return None
        assert parsed.content is not None
        pending = parsed.state.pending
        if not pending:  # finished before a crash could remove it
            with contextlib.suppress(FileNotFoundError):
                active.unlink()
            return None
        return ClaimedMessage(queue_id, parsed.envelope, pending, parsed.state.attempts,
                              parsed.content)

    def _claim_journaled(self, queue_id: str) -> ClaimedMessage | None:
        # Delivered straight from the journal: no file of its own unless it needs one
        # (record_attempt), so a message delivered at once costs no file at all.
        with self._journal_lock:
            payload = self.journal.payload(queue_id)
        try:
            if payload is None:
                raise CorruptQueueFile("its journal segment is gone")
            parsed = queuefile.parse(io.BytesIO(payload), with_content=True)
        except CorruptQueueFile as exc:
            if payload is not None:  # the CRC matched, so a human should see it
                with contextlib.suppress(QueueError):
                    self._write_file(queue_id, [payload], CORRUPT, again=True)
            logs.warning("queue_file_corrupt", qid=queue_id, queue="journal", error=str(exc))
            self._journal_done(queue_id)
            return None
        assert parsed.content is not None
        if not parsed.state.pending:
            self._journal_done(queue_id)
            return None
        return ClaimedMessage(queue_id, parsed.envelope, parsed.state.pending,
                              parsed.state.attempts, parsed.content)

    def _journal_done(self, queue_id: str) -> bool:
        """A claimed journal message is finished with; False if it was not one."""
        with self._journal_lock:
            if queue_id not in self._journal_claims:
                return False
            self._journal_claims.discard(queue_id)
            self.journal.done(queue_id)
        with self._lock:
            self._index.pop(queue_id, None)
        return True

    def release_claim(self, queue_id: str) -> bool:
        """Put a claimed message back, due now, without counting an attempt."""
        now = self.clock()
        with self._journal_lock:
            journaled = queue_id in self._journal_claims
            self._journal_claims.discard(queue_id)
        if journaled:
            self._schedule(queue_id, now)
            return True
        path = self._dirs[ACTIVE] / queue_id
        try:
            os.utime(path, (now, now))
            os.rename(path, self._dirs[DEFERRED] / queue_id)
        except FileNotFoundError:
            return False
        self._schedule(queue_id, now)
        return True

    def backoff(self, attempts: int) -> float:
        """Delay after the `attempts`-th attempt: retry_min, doubling, at most retry_max."""
        return min(self.retry_max, self.retry_min * 2.0 ** max(0, attempts - 1))

    def record_delivered(self, queue_id: str, recipients: tuple[str, ...]) -> AttemptOutcome:
        """Every recipient still pending at claim() was delivered: the message is done, and
        leaving is only removing its file from active/ (no state to write, nothing to parse
        again). Anywhere else (held or deleted meanwhile) it takes record_attempt's way."""
        if self._journal_done(queue_id):
            return AttemptOutcome(queue_id, recipients, removed=True)
        path = self._dirs[ACTIVE] / queue_id
        try:
            path.unlink()
        except FileNotFoundError:
            results = {rcpt: DeliveryResult(250, "2.0.0 Ok") for rcpt in recipients}
            return self.record_attempt(queue_id, results)
        with self._lock:
            self._index.pop(queue_id, None)
        return AttemptOutcome(queue_id, recipients, removed=True)

    def record_attempt(self, queue_id: str,
                       results: Mapping[str, DeliveryResult] | DeliveryResult) -> AttemptOutcome:
        """Record an attempt's replies: a DeliveryResult per pending recipient, or one for the
        whole message (e.g. no connection). 2xx: delivered; 5xx: bounced; anything else:
        deferred with backoff, or bounced once the message is older than the lifetime. A
        recipient missing from `results` stays pending. Bounces queue one notification to the
        sender (never to the null sender). When every recipient is final the message is
        removed; otherwise its new state is appended durably and it waits in deferred/.

        Raises QueueWriteError if the state cannot be written; the message is then put back
        for a retry after retry_min with its old state.
        """
        now = self.clock()
        with self._journal_lock:
            journaled = queue_id in self._journal_claims
        if journaled:
            # Its state must be written, so it needs a file of its own from now on.
            try:
                self._materialize(queue_id, ACTIVE)
            except QueueError:
                with self._journal_lock:
                    self._journal_claims.discard(queue_id)
                self._schedule(queue_id, now + self.retry_min)
                raise
        located = self._locate(queue_id, (ACTIVE, HOLD, DEFERRED, INCOMING))
        if located is None:
            return AttemptOutcome(queue_id, missing=True)
        status, path = located
        try:
            handle = open(path, "r+b")  # noqa: SIM115 - closed below, on every path
        except FileNotFoundError:
            return AttemptOutcome(queue_id, missing=True)
        try:
            with handle:
                return self._record(queue_id, status, path, handle, results, now)
        except CorruptQueueFile as exc:
            self._to_corrupt(status, queue_id, str(exc))
            return AttemptOutcome(queue_id, missing=True)
        except BaseException:
            # E.g. the notification could not be queued (disk full): keep the message, with
            # its old state, and try again later rather than leave it stuck in active/.
            self._defer(queue_id, status, now + self.retry_min)
            raise

    def _record(self, queue_id: str, status: str, path: Path, handle: IO[bytes],
                results: Mapping[str, DeliveryResult] | DeliveryResult,
                now: float) -> AttemptOutcome:
        """record_attempt's work, on the open file."""
        parsed = queuefile.parse(handle)
        envelope, state = parsed.envelope, parsed.state
        assert envelope.arrival is not None
        recipients, outcome = self._apply(state, results, now, envelope.arrival)
        attempts = state.attempts + 1
        last_error = next((_reply(r) for r in recipients
                           if r.address in outcome["deferred"] + outcome["bounced"]),
                          state.last_error)
        dsn_id = no_dsn = None
        newly_bounced = [r for r in recipients if r.address in outcome["bounced"]]
        if newly_bounced:
            dsn_id, no_dsn = self._bounce(queue_id, handle, parsed, newly_bounced, now)
            logs.event("queue_bounced", qid=queue_id, rcpts=",".join(outcome["bounced"]),
                       dsn=dsn_id or "-", no_dsn=no_dsn or "-")
        if not any(not r.status.is_final for r in recipients):
            handle.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            with self._lock:
                self._index.pop(queue_id, None)
            return AttemptOutcome(queue_id, outcome["delivered"], (), outcome["bounced"],
                                  None, dsn_id, no_dsn, removed=True)
        next_attempt = max(now, min(now + self.backoff(attempts),
                                    envelope.arrival + self.lifetime))
        new_state = DeliveryState(tuple(recipients), attempts, next_attempt, now, last_error)
        try:
            handle.truncate(parsed.valid_end)  # drop a torn record of an earlier crash
            handle.seek(parsed.valid_end)
            handle.write(queuefile.encode_state(new_state))
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                handle.truncate(parsed.valid_end)
            raise _write_error(exc, "record delivery state") from exc
        self._defer(queue_id, status, next_attempt)
        return AttemptOutcome(queue_id, outcome["delivered"], outcome["deferred"],
                              outcome["bounced"], next_attempt, dsn_id, no_dsn)

    def _apply(self, state: DeliveryState,
               results: Mapping[str, DeliveryResult] | DeliveryResult, now: float,
               arrival: float) -> tuple[list[RecipientState], dict[str, tuple[str, ...]]]:
        expired = now - arrival >= self.lifetime
        recipients: list[RecipientState] = []
        groups: dict[str, list[str]] = {"delivered": [], "deferred": [], "bounced": []}
        for rcpt in state.recipients:
            if rcpt.status.is_final:
                recipients.append(rcpt)
                continue
            result = results if isinstance(results, DeliveryResult) else results.get(rcpt.address)
            if result is not None:
                rcpt = RecipientState(rcpt.address, result.kind, result.code, result.text,
                                      result.remote_mta, result.connected)
            if not rcpt.status.is_final and expired:
                rcpt = replace(rcpt, status=RecipientStatus.BOUNCED, expired=True)
            recipients.append(rcpt)
            key = {RecipientStatus.DELIVERED: "delivered",
                   RecipientStatus.BOUNCED: "bounced"}.get(rcpt.status, "deferred")
            groups[key].append(rcpt.address)
        return recipients, {k: tuple(v) for k, v in groups.items()}

    # The notifications one sender domain may get ([smtp] bounce_rate_limit); None: no limit.
    # Only the process that delivers bounces; `mailgate run` sets it there.
    bounce_limit: BounceRateLimit | None = None

    def _bounce(self, queue_id: str, handle: IO[bytes], parsed: queuefile.ParsedFile,
                bounced: list[RecipientState], now: float) -> tuple[str | None, str | None]:
        """Queue the notification for `bounced` recipients unless none may be sent; return
        (its queue id, None) or (None, why not: NO_DSN_*). These are the only notifications
        mailgate makes, so every rule about when it bounces is here."""
        envelope = parsed.envelope
        limit = self.bounce_limit
        why_not = None
        if not envelope.sender:
            why_not = NO_DSN_NULL_SENDER  # RFC 5321 4.5.5: a bounce must not cause another
        elif envelope.verdict in _NO_DSN_VERDICTS:
            # Spam and viruses come with forged senders: telling them is backscatter.
            why_not = _NO_DSN_VERDICTS[envelope.verdict]
        reservation = None
        if why_not is None and limit is not None:
            domain = sender_domain(envelope.sender)
            try:
                reservation = limit.reserve(domain)
            except sqlite3.Error as exc:
                # Not knowing the count is no reason to keep a sender uninformed.
                logs.warning("bounce_rate_limit_failed", qid=queue_id, path=str(limit.path),
                             error=str(exc))
            else:
                if reservation is None:
                    why_not = NO_DSN_RATE_LIMITED
                    logs.warning("dsn_rate_limited", qid=queue_id, sender_domain=domain or "-",
                                 rcpts=",".join(r.address for r in bounced), limit=limit.limit,
                                 window=f"{limit.window:g}s")
        if why_not is not None:
            metrics.current.bounce_notification(why_not)
            return None, why_not
        try:
            dsn_id = self._queue_dsn(queue_id, handle, parsed, bounced, now)
        except BaseException:
            if limit is not None and reservation is not None:
                with contextlib.suppress(sqlite3.Error):
                    limit.cancel(reservation)
            raise
        metrics.current.bounce_notification("sent")
        return dsn_id, None

    def _queue_dsn(self, queue_id: str, handle: IO[bytes], parsed: queuefile.ParsedFile,
                   bounced: list[RecipientState], now: float) -> str:
        """Queue the notification for `bounced` recipients; return its queue id."""
        envelope = parsed.envelope
        assert envelope.arrival is not None
        handle.seek(parsed.content_offset)
        original = header_block(handle.read(min(parsed.content_length, 256 * 1024)))
        dsn_rcpts = [DsnRecipient(
            address=r.address,
            action="failed",
            # RFC 3463 4.4.7: delivery time expired.
            status="4.4.7" if r.expired else _status(r),
            diagnostic=_reply(r) if r.text else None,
            diagnostic_type="smtp" if r.connected else "X-mailgate",
            remote_mta=r.remote_mta,
            last_attempt=now,
        ) for r in bounced]
        message = build_dsn(reporting_mta=self.hostname, sender=envelope.sender,
                            recipients=dsn_rcpts, original=original, arrival=envelope.arrival,
                            queue_id=queue_id, now=now)
        dsn_envelope = Envelope(
            sender="", recipients=(envelope.sender,), helo=self.hostname, protocol="local",
            smtputf8=not envelope.sender.isascii() or not message.isascii(),
            body_8bit=not message.isascii(), arrival=now)
        return self._store_now(dsn_envelope, message)

    def _defer(self, queue_id: str, status: str, next_attempt: float) -> None:
        """Set the next attempt (the file's mtime) and move an active file to deferred/."""
        for _ in range(3):
            located = self._locate(queue_id, (status, HOLD, DEFERRED))
            if located is None:
                return  # deleted meanwhile
            status, path = located
            with contextlib.suppress(FileNotFoundError):
                os.utime(path, (self.clock(), next_attempt))
            if status == HOLD:
                return  # held while it was being delivered: it stays held
            try:
                if status != DEFERRED:
                    os.rename(path, self._dirs[DEFERRED] / queue_id)
            except FileNotFoundError:
                continue  # moved by another process (hold, delete): look again
            # The scheduler is sleeping until the next due time it knew of (or for a whole
            # scan interval if the queue was empty); this may be earlier: it must be woken.
            self._schedule(queue_id, next_attempt)
            return

    def _locate(self, queue_id: str, order: tuple[str, ...] = _MESSAGE_DIRS
                ) -> tuple[str, Path] | None:
        if not queuefile.is_queue_id(queue_id):
            return None
        for status in order:
            path = self._dirs[status] / queue_id
            if path.exists():
                return status, path
        return None

    # --- administration (mailgate queue ...) -------------------------------------------------

    def list(self) -> list[QueueEntry]:
        """Every message in the queue, oldest first."""
        entries = []
        for status in _MESSAGE_DIRS:
            for name in self._names(status):
                if queuefile.is_queue_id(name):
                    found = self._entry(name)
                    if found is not None:
                        entries.append(found[0])
        seen = {e.queue_id for e in entries}
        for queue_id, record in self._journal_entries().items():
            if queue_id not in seen:
                found = self._journal_entry(record)
                if found is not None:
                    entries.append(found[0])
        entries.sort(key=lambda e: e.queue_id)
        return entries

    def _journal_entry(self, record: journal.Record, with_content: bool = False
                       ) -> tuple[QueueEntry, bytes] | None:
        payload = journal.read_payload(self._journal_dir, record)
        if payload is None:
            return None
        try:
            parsed = queuefile.parse(io.BytesIO(payload), with_content=with_content)
        except CorruptQueueFile:
            return None
        # Waiting for its first attempt, which is due at once: it is "incoming".
        entry = QueueEntry(record.queue_id, INCOMING, parsed.content_length, parsed.envelope,
                           parsed.state, parsed.envelope.arrival)
        return entry, parsed.content or b""

    def _entry(self, queue_id: str, with_content: bool = False
               ) -> tuple[QueueEntry, bytes] | None:
        for _ in range(3):  # it may move between looking and opening
            located = self._locate(queue_id)
            if located is None:
                record = self._journal_entries().get(queue_id)
                return None if record is None else self._journal_entry(record, with_content)
            status, path = located
            try:
                with open(path, "rb") as handle:
                    mtime = os.fstat(handle.fileno()).st_mtime
                    parsed = queuefile.parse(handle, with_content=with_content)
            except FileNotFoundError:
                continue
            except CorruptQueueFile:
                return None
            next_attempt = self._next_attempt(status, mtime, self.clock())
            entry = QueueEntry(queue_id, status, parsed.content_length, parsed.envelope,
                               parsed.state, next_attempt)
            return entry, parsed.content or b""
        return None

    def entry(self, queue_id: str) -> QueueEntry:
        """One message's envelope and state; raises NoSuchMessage."""
        return self.show(queue_id, with_content=False)[0]

    def show(self, queue_id: str, *, with_content: bool = True) -> tuple[QueueEntry, bytes]:
        """One message's entry and content; raises NoSuchMessage."""
        found = self._entry(queue_id, with_content=with_content)
        if found is None:
            raise NoSuchMessage(queue_id)
        return found

    def delete(self, queue_id: str) -> bool:
        """Remove a message wherever it is (also while being delivered). False if unknown."""
        self._settle(queue_id)
        located = self._locate(queue_id)
        if located is None:
            return False
        status, path = located
        try:
            path.unlink()
        except FileNotFoundError:
            return self.delete(queue_id)
        _fsync_dir(self._dirs[status])
        with self._lock:
            self._index.pop(queue_id, None)
        return True

    def delete_all(self) -> int:
        """Remove every message (not files still being written); returns how many."""
        for queue_id in self._journal_entries():
            self._settle(queue_id)
        count = 0
        for status in _MESSAGE_DIRS:
            for name in self._names(status):
                if queuefile.is_queue_id(name):
                    with contextlib.suppress(FileNotFoundError):
                        (self._dirs[status] / name).unlink()
                        count += 1
            _fsync_dir(self._dirs[status])
        with self._lock:
            self._index.clear()
        return count

    def hold(self, queue_id: str) -> bool:
        """Put a message on hold: it is not tried until released. A message being delivered
        is held after the attempt. False if unknown; True if (already) held."""
        self._settle(queue_id)
        for _ in range(3):
            located = self._locate(queue_id)
            if located is None:
                return False
            status, path = located
            if status == HOLD:
                return True
            try:
                os.rename(path, self._dirs[HOLD] / queue_id)
            except FileNotFoundError:
                continue
            _fsync_dir(self._dirs[HOLD])
            with self._lock:
                self._index.pop(queue_id, None)
            return True
        return False

    def release(self, queue_id: str) -> bool:
        """Release a held message, due now. False if it is not on hold."""
        path = self._dirs[HOLD] / queue_id
        if not queuefile.is_queue_id(queue_id):
            return False
        now = self.clock()
        try:
            os.utime(path, (now, now))
            os.rename(path, self._dirs[DEFERRED] / queue_id)
        except FileNotFoundError:
            return False
        _fsync_dir(self._dirs[DEFERRED])
        self._schedule(queue_id, now)
        return True

    def flush(self) -> int:
        """Make every deferred message due now (like `postqueue -f`); returns how many."""
        now = self.clock()
        count = 0
        rescheduled = False
        for name in self._names(DEFERRED):
            if queuefile.is_queue_id(name):
                with contextlib.suppress(FileNotFoundError):
                    os.utime(self._dirs[DEFERRED] / name, (now, now))
                    count += 1
                    with self._lock:
                        if name in self._index:
                            self._index[name] = now
                            rescheduled = True
        if rescheduled:
            self._told(now)
        return count


# The content filter's verdicts (Envelope.verdict) that never get a notification.
_NO_DSN_VERDICTS = {"spam": NO_DSN_SPAM, "virus": NO_DSN_VIRUS}


def _status(rcpt: RecipientState) -> str:
    return DeliveryResult(rcpt.code or 0, rcpt.text, rcpt.connected).enhanced_status \
        if rcpt.code else "5.0.0"


def _reply(rcpt: RecipientState) -> str:
    return f"{rcpt.code} {rcpt.text}" if rcpt.connected and rcpt.code else rcpt.text


def _default_hostname() -> str:
    import socket

    return socket.gethostname()


def poke_master(directory: Path | str) -> int | None:
    """Ask the delivery daemon using `directory` to rescan (SIGUSR1). Returns its pid, or None
    if no daemon is running (no pid file, a stale pid, or a pid that is not mailgate's)."""
    try:
        pid = int((Path(directory) / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0 or not _pid_alive(pid):
        return None
    # SIGUSR1 kills a process that does not handle it: make sure a reused pid is not hit.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        cmdline = None
    if cmdline is not None and b"mailgate" not in cmdline and b"proxies" not in cmdline:
        return None
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return None
    return pid
