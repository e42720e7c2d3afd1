"""The accept journal in front of the queue directories: a message accepted is a record in a
segment, delivered from there, and gets a file of its own only when it must (deferred, held,
deleted by the administrator, recovered after a crash)."""

from __future__ import annotations

import asyncio
import errno
import os
from dataclasses import replace
from pathlib import Path

import pytest

from proxies.queue import DeliveryResult, Envelope, Queue, QueueFullError, journal, queuefile
from proxies.queue.journal import JournalReader, JournalWriter, read_records

CONTENT = b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
OK = DeliveryResult(250, "2.0.0 Ok")
LATER = DeliveryResult(451, "4.7.1 try again later")


def envelope() -> Envelope:
    return Envelope(sender="alice@example.com", recipients=("bob@example.org",),
                    client_address="192.0.2.10", original_destination=("198.51.100.25", 25))


def make_queue(path: Path, **kwargs: object) -> Queue:
    return Queue(path, hostname="gw.example.net", retry_min=60.0,  # type: ignore[arg-type]
                 use_journal=True, **kwargs)


def accept(queue: Queue, count: int = 1) -> list[str]:
    async def go() -> list[str]:
        return list(await asyncio.gather(*(queue.accept(envelope(), CONTENT)
                                           for _ in range(count))))
    return asyncio.run(go())


def names(path: Path, status: str) -> list[str]:
    return sorted(os.listdir(path / status))


def cli_for(queue: Queue) -> Queue:
    """The CLI in another process: its poke makes the delivering queue look again."""
    cli = make_queue(queue.directory, delivers=False)

    def poke() -> int:
        queue.rescan()
        return 1

    cli.poke = poke
    return cli


def test_accepted_message_is_a_journal_record_and_delivery_leaves_nothing(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    [queue_id] = accept(queue)
    assert names(tmp_path, "incoming") == []  # no file per message
    [segment] = journal.segments(tmp_path / "journal")
    assert [r.queue_id for r in read_records(tmp_path / "journal" / segment)] == [queue_id]
    assert [e.queue_id for e in make_queue(tmp_path, delivers=False).list()] == [queue_id]

    assert queue.due() == [queue_id]
    claimed = queue.claim(queue_id)
    assert claimed is not None and claimed.content == CONTENT
    assert queue.claim(queue_id) is None  # claimed once
    outcome = queue.record_delivered(queue_id, claimed.pending)
    assert outcome.removed and queue.due() == [] and queue.list() == []
    for status in ("incoming", "active", "deferred"):
        assert names(tmp_path, status) == []


def test_a_deferred_message_gets_a_file_of_its_own(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    [queue_id] = accept(queue)
    assert queue.claim(queue_id) is not None
    outcome = queue.record_attempt(queue_id, LATER)
    assert outcome.deferred == ("bob@example.org",)
    assert names(tmp_path, "deferred") == [queue_id]
    assert queue.journal.waiting == {}
    entry = queue.entry(queue_id)
    assert entry.attempts == 1 and entry.status == "deferred"


def test_group_commit_one_record_each(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    ids = accept(queue, 30)
    [segment] = journal.segments(tmp_path / "journal")
    assert sorted(r.queue_id for r in read_records(tmp_path / "journal" / segment)) == sorted(ids)
    assert sorted(queue.due()) == sorted(ids)


def test_crash_recovery_materializes_waiting_and_skips_delivered(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    first, second, third = accept(queue, 3)
    claimed = queue.claim(first)
    assert claimed is not None
    queue.record_delivered(first, claimed.pending)
    assert queue.claim(second) is not None  # under way when the process is killed
    # kill -9: nothing closed, nothing flushed. A new delivery process starts.
    restarted = make_queue(tmp_path)
    report = restarted.recover()
    assert sorted(names(tmp_path, "incoming")) == sorted([second, third])
    assert report.queued == 2
    assert journal.segments(tmp_path / "journal") == []  # every record has a file now
    assert sorted(restarted.due()) == sorted([second, third])
    claimed = restarted.claim(second)
    assert claimed is not None and claimed.content == CONTENT


def test_torn_tail_is_not_a_message(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    directory.mkdir()
    writer = JournalWriter(directory, pid=999_999_999)
    [good] = writer.append([("6619C8100A809E66551CA", [b"x" * 100])])
    writer.close()
    with open(directory / good.segment, "ab") as handle:  # a crash in the middle of a write
        handle.write(b"MGJ1\0\0\0\0\0\0\0\x50")
    assert [r.queue_id for r in read_records(directory / good.segment)] == [good.queue_id]
    with open(directory / good.segment, "r+b") as handle:  # a flipped bit in the payload
        handle.seek(good.offset + 10)
        handle.write(b"y")
    assert list(read_records(directory / good.segment)) == []


def test_failed_append_leaves_nothing_to_deliver(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    queue = make_queue(tmp_path)
    accept(queue)
    real = os.fdatasync

    calls = []

    def full(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:  # the batch's fdatasync; the cut-off's own one works
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(journal.os, "fdatasync", full)
    with pytest.raises(QueueFullError):
        accept(queue)
    monkeypatch.setattr(journal.os, "fdatasync", real)
    [later] = accept(queue)
    [segment] = journal.segments(tmp_path / "journal")
    records = list(read_records(tmp_path / "journal" / segment))
    assert len(records) == 2 and records[-1].queue_id == later  # the failed one was cut off


def test_writer_that_died_before_telling_is_read_when_it_exits(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    queue = make_queue(tmp_path)
    worker = make_queue(tmp_path, delivers=False)
    told: list[journal.Record] = []
    worker.on_durable = told.append
    accept(worker, 2)
    queue.notice(told[0].queue_id, told[0])  # the second line never reached the master
    assert queue.due() == [told[0].queue_id]
    pid = os.getpid()
    queue.writer_gone(pid)
    assert sorted(queue.due()) == sorted(r.queue_id for r in told)
    for record in told:
        claimed = queue.claim(record.queue_id)
        assert claimed is not None
        queue.record_delivered(record.queue_id, claimed.pending)
    assert journal.segments(directory) == []  # closed and all done: removed


def test_rotation_removes_finished_segments(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    accept(queue)
    assert queue._journal_writer is not None
    queue._journal_writer.rotate_bytes = 1  # every batch in a new segment
    ids = [accept(queue)[0] for _ in range(3)]
    assert len(journal.segments(tmp_path / "journal")) == 4
    for queue_id in queue.due():
        claimed = queue.claim(queue_id)
        assert claimed is not None
        queue.record_delivered(queue_id, claimed.pending)
    # Only the segment still being written stays (empty of waiting messages).
    [left] = journal.segments(tmp_path / "journal")
    assert ids[-1] in {r.queue_id for r in read_records(tmp_path / "journal" / left)}


def test_hold_and_delete_of_a_journaled_message(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    first, second = accept(queue, 2)
    cli = cli_for(queue)
    assert cli.hold(first) and names(tmp_path, "hold") == [first]
    queue.rescan()  # as the master does when told (SIGUSR1)
    assert queue.due() == [second] and queue.claim(first) is None
    assert cli.delete(second) and cli.list()[0].queue_id == first
    queue.rescan()
    assert queue.due() == []


def test_hold_during_delivery_from_the_journal_keeps_it_held(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    [queue_id] = accept(queue)
    claimed = queue.claim(queue_id)
    assert claimed is not None
    assert cli_for(queue).hold(queue_id)
    outcome = queue.record_attempt(queue_id, LATER)
    assert outcome.deferred and names(tmp_path, "hold") == [queue_id]
    assert queue.due() == []


def test_cli_without_a_master_recovers_dead_writers(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    directory.mkdir()
    queue = make_queue(tmp_path)  # the directories
    payload = b"".join(queuefile.encode_message(replace(envelope(), arrival=1.0), CONTENT))
    dead = JournalWriter(directory, pid=999_999_999)
    [record] = dead.append([("6619C8100A809E66551CA", [payload])])
    dead.close()
    cli = make_queue(tmp_path, delivers=False)
    cli.poke = lambda: None  # no master running
    assert [e.queue_id for e in cli.list()] == [record.queue_id]
    assert cli.hold(record.queue_id) and names(tmp_path, "hold") == [record.queue_id]
    assert journal.segments(directory) == []
    queue.close()


def test_reader_ignores_segments_of_live_writers(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    directory.mkdir()
    reader = JournalReader(directory)
    writer = JournalWriter(directory)  # this process: alive, and not the reader's own
    writer.append([("6619C8100A809E66551CA", [b"x"])])
    assert reader.untracked(writer.created) == []
    writer.close()


def test_metrics_count_journaled_messages_as_incoming(tmp_path: Path) -> None:
    from proxies.metrics.collectors import QueueCollector

    queue = make_queue(tmp_path)
    accept(queue, 3)
    [length, _age] = list(QueueCollector(tmp_path).collect())
    counts = {s.labels["state"]: s.value for s in length.samples}
    assert counts["incoming"] == 3
