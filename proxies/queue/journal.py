"""The accept journal: new messages appended to one segment file per acceptor, one fdatasync
per group commit, read back by the delivery process.

Why: on ext4 creating a file costs ~0.7 ms of kernel time (inode allocation skips inodes freed
in the last seconds, and a mail queue frees one per message), its fsync a journal commit,
and unlinking it again more; measured, a file per message was the largest single cost of
accepting (PERF-FACTS.md). An append into an existing file costs a few tens of microseconds
and one fdatasync makes a whole batch durable. Most messages are delivered at their first
attempt and never need a file of their own; those that do not get one then (the delivery
process "materializes" them into the directories of store.py, where everything else about
the queue happens: deferral, hold, bounces, the CLI).

Layout, in `<queue>/journal/`:

    <pid>-<seq>.seg    records appended by process <pid>; <seq> counts its segments
    <pid>-<seq>.done   ids of that segment's messages that have left it (delivered or
                       materialized), one per line, appended by the delivery process
    materialize        a request (from `mailgate queue hold/delete`): move every waiting
                       message into incoming/ now

A record is a header (magic, payload length, CRC-32 of the payload, length of the id), the
queue id, then the payload: exactly the bytes of a queue file (queuefile.py), end record
included. A record proves itself complete (length, CRC, the queue file's own end record); a
torn tail (a crash in the middle of a write) ends the segment for a reader. A writer never
appends after a failed write: it truncates back, or, if that fails, starts a new segment.

The done marks are not fsynced: a process crash keeps them (page cache); a machine crash may
lose the last ones, and then recovery hands those messages to delivery again, so a recipient
may get one twice, as SMTP allows. A message is never lost: a segment is removed only when
every record in it is marked done and its writer has moved on or is gone.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from proxies.mail.durable import fsync_directory, write_all
from proxies.queue import queuefile

JOURNAL_DIR = "journal"
MATERIALIZE_REQUEST = "materialize"
_MAGIC = b"MGJ1"
_HEADER = struct.Struct(">4sQII")  # magic, payload length, crc32(payload), id length
# A writer starts a new segment once its current one is this large.
ROTATE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Record:
    """Where one message is: `offset` and `length` of its payload in `segment`."""

    queue_id: str
    segment: str
    offset: int
    length: int


def segment_name(pid: int, seq: int) -> str:
    return f"{pid}-{seq:06d}.seg"


def segment_writer(name: str) -> tuple[int, int] | None:
    """(pid, seq) from a segment's file name; None for any other name."""
    stem, dot, suffix = name.rpartition(".")
    pid, dash, seq = stem.partition("-")
    if not dot or suffix != "seg" or not dash or not pid.isdecimal() or not seq.isdecimal():
        return None
    return int(pid), int(seq)


def writer_alive(pid: int) -> bool:
    """Is `pid` a live mailgate process (that may still append)? Another process that got
    the pid after a reboot is not: its segments are a dead writer's."""
    if pid == os.getpid():
        return False  # ours are excluded by name (JournalWriter.created); any other is old
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        return True  # cannot tell: assume it may still write
    return b"proxies" in cmdline or b"mailgate" in cmdline


class JournalWriter:
    """One acceptor process's appends. Not thread-safe: one committer calls append()."""

    def __init__(self, directory: Path, pid: int | None = None,
                 rotate_bytes: int = ROTATE_BYTES) -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self.rotate_bytes = rotate_bytes
        self._seq = 0
        self._fd: int | None = None
        self._name = ""
        self._size = 0
        # Every segment this writer made; a reader in the same process must not take them
        # for a dead writer's.
        self.created: set[str] = set()

    def append(self, items: list[tuple[str, list[bytes]]]) -> list[Record]:
        """Append one record per (queue id, queue-file chunks) and make them durable with
        one fdatasync. Raises OSError with nothing of the batch left behind to be read."""
        if self._fd is None or self._size >= self.rotate_bytes:
            self._open_next()
        assert self._fd is not None
        start = self._size
        chunks: list[bytes] = []
        records = []
        position = start
        for queue_id, payload in items:
            length = sum(len(c) for c in payload)
            crc = 0
            for chunk in payload:
                crc = zlib.crc32(chunk, crc)
            ident = queue_id.encode("ascii")
            chunks.append(_HEADER.pack(_MAGIC, length, crc, len(ident)) + ident)
            chunks.extend(payload)
            position += _HEADER.size + len(ident)
            records.append(Record(queue_id, self._name, position, length))
            position += length
        try:
            write_all(self._fd, chunks)
            os.fdatasync(self._fd)
        except OSError:
            self._undo(start)
            raise
        self._size = position
        return records

    def _open_next(self) -> None:
        self.close()
        self._seq += 1
        name = segment_name(self.pid, self._seq)
        self.created.add(name)
        fd = os.open(self.directory / name,
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fsync_directory(self.directory)  # the segment's name must survive a crash too
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.directory / name)
            raise
        self._fd, self._name, self._size = fd, name, 0

    def _undo(self, start: int) -> None:
        # A failed write or fdatasync: the batch's clients get 4xx, so none of it may be
        # delivered later. Cut it off (O_APPEND: the next write goes to the new end); if even
        # that fails, leave the segment for good (a reader stops at the first bad record)
        # and write the next batch elsewhere.
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, start)
            os.fdatasync(self._fd)
        except OSError:
            self.close()

    @property
    def segment(self) -> str:
        return self._name

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def read_records(path: Path, *, check: bool = True) -> Iterator[Record]:
    """The complete records of a segment, in order, up to the first torn or corrupt one
    (payloads are read to check their CRC, not kept; with `check` false, not even read: for
    counting, e.g. metrics)."""
    name = path.name
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        return
    with handle:
        offset = 0
        while True:
            head = handle.read(_HEADER.size)
            if len(head) < _HEADER.size:
                return
            magic, length, crc, id_length = _HEADER.unpack(head)
            if magic != _MAGIC or id_length > 64:
                return
            ident = handle.read(id_length)
            try:
                queue_id = ident.decode("ascii")
            except UnicodeDecodeError:
                return
            if len(ident) < id_length or not queuefile.is_queue_id(queue_id):
                return
            start = offset + _HEADER.size + id_length
            if check:
                payload = handle.read(length)
                if len(payload) < length or zlib.crc32(payload) != crc:
                    return
            elif handle.seek(length, os.SEEK_CUR) > os.fstat(handle.fileno()).st_size:
                return
            yield Record(queue_id, name, start, length)
            offset = start + length


def read_payload(directory: Path, record: Record) -> bytes | None:
    """A record's queue-file bytes; None if its segment is gone."""
    try:
        fd = os.open(directory / record.segment, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.pread(fd, record.length, record.offset)
    finally:
        os.close(fd)
    return data if len(data) == record.length else None


def done_ids(directory: Path, segment: str) -> set[str]:
    try:
        text = (directory / _done_name(segment)).read_bytes().decode("ascii", "replace")
    except FileNotFoundError:
        return set()
    return set(text.split())


def _done_name(segment: str) -> str:
    return segment.removesuffix(".seg") + ".done"


def segments(directory: Path) -> list[str]:
    """Segment names, oldest first per writer."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(w, n) for n in names if (w := segment_writer(n)) is not None]
    return [n for _w, n in sorted(found)]


def waiting_records(directory: Path, *, check: bool = True) -> list[Record]:
    """Every record not yet marked done, in any segment (what `mailgate queue` lists)."""
    result: list[Record] = []
    for name in segments(directory):
        done = done_ids(directory, name)
        result.extend(r for r in read_records(directory / name, check=check)
                      if r.queue_id not in done)
    return result


@dataclass
class _Segment:
    records: set[str] = field(default_factory=set)  # every id known to be in it
    done: set[str] = field(default_factory=set)
    closed: bool = False  # its writer has moved on or is gone: no more records
    done_fd: int | None = None


class JournalReader:
    """The delivery process's view of the journal: the records acceptors announced, which of
    them are still waiting, and removal of segments once everything in them has left."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.waiting: dict[str, Record] = {}
        self._segments: dict[str, _Segment] = {}
        self._latest: dict[int, int] = {}  # writer pid -> its newest segment's seq

    def announce(self, record: Record) -> bool:
        """An acceptor says `record` is durable. False if it is not a record we can take
        (unknown segment name, or already done)."""
        writer = segment_writer(record.segment)
        if writer is None or not queuefile.is_queue_id(record.queue_id):
            return False
        segment = self._segments.setdefault(record.segment, _Segment())
        if record.queue_id in segment.done:
            return False
        segment.records.add(record.queue_id)
        self.waiting[record.queue_id] = record
        pid, seq = writer
        if seq > self._latest.get(pid, 0):
            self._latest[pid] = seq
            for name in list(self._segments):  # the writer moved on: its older ones are closed
                older = segment_writer(name)
                if older is not None and older[0] == pid and older[1] < seq:
                    # Alive and well (it fdatasynced all it told of): headers suffice.
                    self._close(name, check=False)
        return True

    def payload(self, queue_id: str) -> bytes | None:
        record = self.waiting.get(queue_id)
        return None if record is None else read_payload(self.directory, record)

    def done(self, queue_id: str) -> None:
        """The message has left the journal (delivered, or materialized into a file)."""
        record = self.waiting.pop(queue_id, None)
        if record is None:
            return
        segment = self._segments.get(record.segment)
        if segment is None:
            return
        segment.done.add(queue_id)
        if segment.done_fd is None:
            segment.done_fd = os.open(self.directory / _done_name(record.segment),
                                      os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                      0o600)
        os.write(segment.done_fd, queue_id.encode("ascii") + b"\n")
        self._maybe_remove(record.segment)

    def writer_gone(self, pid: int) -> list[Record]:
        """Writer `pid` exited: its segments are closed. Returns the records it made durable
        but never announced (it died between its fdatasync and telling us)."""
        missed = []
        for name in list(self._segments):
            writer = segment_writer(name)
            if writer is not None and writer[0] == pid:
                missed.extend(self._close(name, check=True))
        self._latest.pop(pid, None)
        return missed

    def untracked(self, exclude: set[str], wait: float = 0.0) -> list[str]:
        """Segments no live writer owns, not in `exclude` (this process's own writer's) and
        that this reader never heard of: left by a run before this one (recovery's work).
        With `wait`, writers still alive get that long to exit (a previous master's workers,
        dying with it), then their segments are taken too."""
        deadline = time.monotonic() + wait
        while True:
            result: list[str] = []
            alive = False
            for name in segments(self.directory):
                writer = segment_writer(name)
                assert writer is not None
                if name in self._segments or name in exclude:
                    continue
                if not writer_alive(writer[0]):
                    result.append(name)
                elif time.monotonic() < deadline:
                    alive = True
                elif wait:  # waited long enough: a writer that lives on is taken as stuck
                    result.append(name)
            if not alive:
                return result
            time.sleep(0.1)

    def recover(self, name: str, materialize: Callable[[Record, bytes], None]) -> int:
        """Hand every waiting record of segment `name` to `materialize` (which makes it a
        durable file), then remove the segment. Returns how many were handed over."""
        done = done_ids(self.directory, name)
        count = 0
        for record in read_records(self.directory / name):
            if record.queue_id in done:
                continue
            payload = read_payload(self.directory, record)
            if payload is not None:
                materialize(record, payload)
                count += 1
        self._remove(name)
        return count

    def _close(self, name: str, *, check: bool) -> list[Record]:
        segment = self._segments[name]
        if segment.closed:
            return []
        segment.closed = True
        missed = []
        for record in read_records(self.directory / name, check=check):
            if record.queue_id not in segment.records and record.queue_id not in segment.done:
                segment.records.add(record.queue_id)
                self.waiting[record.queue_id] = record
                missed.append(record)
        self._maybe_remove(name)
        return missed

    def _maybe_remove(self, name: str) -> None:
        segment = self._segments[name]
        if segment.closed and segment.records <= segment.done:
            self._remove(name)

    def _remove(self, name: str) -> None:
        segment = self._segments.pop(name, None)
        if segment is not None and segment.done_fd is not None:
            os.close(segment.done_fd)
        # The segment first: a done file without its segment is harmless, the reverse would
        # resurrect delivered messages at the next recovery.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / _done_name(name))

    def close(self) -> None:
        for segment in self._segments.values():
            if segment.done_fd is not None:
                os.close(segment.done_fd)
                segment.done_fd = None
