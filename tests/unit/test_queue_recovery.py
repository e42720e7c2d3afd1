"""Queue recovery on the files a crash, a reused pid, a damaged disk or a human leave behind.

What `Queue.recover` must do (store.py, Postfix's qmgr and postsuper as the model):

- a temporary file `incoming/<id>.<pid>.tmp` is deleted when its writer is gone: its pid is
  dead, or the file is older than an hour, whoever has that pid now (pids are reused), and
  never while this process is writing it;
- an unreadable queue file (empty, garbage, cut short, bad checksum) in any state directory
  is moved, unchanged, to corrupt/ for a human to look at, logged once with its name, and
  counted; every other message carries on;
- a file whose name is not the queue's (an editor's backup, NFS's `.nfs*`, a README, a
  directory) is not parsed, moved or deleted: it is left where it is, logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxies.queue import DeliveryResult, Envelope, Queue
from proxies.queue import store as store_module
from proxies.queue.queuefile import MAGIC

CONTENT = b"From: alice@example.com\r\nSubject: recovery\r\n\r\nhello\r\n"
LATER = DeliveryResult(451, "4.7.1 try again later")
DEAD_PID = 2**22 + 1  # above the largest pid_max Linux allows: never a live process
HOUR = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()  # compared with real file mtimes, so a real start

    def __call__(self) -> float:
        return self.now


def make_queue(path: Path, clock: Clock) -> Queue:
    # Files from the start: these are about recovering the directories (the journal's own
    # recovery is in test_queue_journal.py).
    return Queue(path, hostname="gw.example.net", clock=clock)


def accept(queue: Queue) -> str:
    async def go() -> str:
        return await queue.accept(Envelope(sender="alice@example.com",
                                           recipients=("bob@example.org",)), CONTENT)
    return asyncio.run(go())


def files(queue_dir: Path, status: str) -> list[str]:
    return sorted(os.listdir(queue_dir / status))


def one_in_each(queue: Queue) -> dict[str, str]:
    """A message in incoming/, one cut off in active/, one deferred and one held."""
    ids = {"incoming": accept(queue), "active": accept(queue), "deferred": accept(queue),
           "hold": accept(queue)}
    assert queue.claim(ids["active"]) is not None
    assert queue.claim(ids["deferred"]) is not None
    assert queue.record_attempt(ids["deferred"], LATER).deferred
    assert queue.hold(ids["hold"])
    return ids


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    return [dict(getattr(r, "fields", {})) for r in caplog.records if r.getMessage() == name]


@pytest.fixture
def other_process() -> Iterator[int]:
    """The pid of a live process that is no queue writer: what a dead writer's pid can be
    given to. Our own child, ended here."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield child.pid
    finally:
        child.kill()
        child.wait()


# --- temporary files: by pid, and by age when the pid is alive ------------------------------


def tmp_file(queue: Queue, pid: int, age: float, clock: Clock) -> Path:
    path = queue.directory / "incoming" / f"{queue.new_id()}.{pid}.tmp"
    path.write_bytes(MAGIC + b"E 40\n{\"sender\":")  # a writer stopped mid-envelope
    os.utime(path, (clock.now - age, clock.now - age))
    return path


def test_stale_temp_file_of_a_reused_pid_goes_by_age(tmp_path: Path, other_process: int,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The pid in the name is alive, but not the writer's any more: an old file goes, a young
    one (it may be a live acceptor's) stays, and goes at a later recovery once old."""
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    message = accept(queue)
    stale = tmp_file(queue, other_process, 2 * HOUR, clock)
    young = tmp_file(queue, other_process, 10 * 60, clock)

    report = queue.recover()
    assert report.as_fields() == {"removed_partial": 1, "requeued_active": 0, "corrupt": 0,
                                  "queued": 1, "held": 0, "foreign": 0}
    assert files(tmp_path, "incoming") == sorted([message, young.name])
    assert not stale.exists()
    assert queue.due() == [message]  # a temporary file is never taken for a message

    # Not kept for ever: the next recovery, once it is an hour old, removes it.
    clock.now += HOUR
    assert queue.recover().removed_partial == 1
    assert files(tmp_path, "incoming") == [message]
    assert files(tmp_path, "corrupt") == []
    assert events(caplog, "queue_file_corrupt") == events(caplog, "queue_foreign_file") == []


def test_temp_files_of_dead_writers_go_and_this_process_keeps_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    dead_young = tmp_file(queue, DEAD_PID, 5, clock)
    # This process's pid: its own name is all that tells a file being written from a leftover
    # of a dead process that had the same pid (in another pid namespace, or long ago).
    mine_writing = tmp_file(queue, os.getpid(), 2 * HOUR, clock)
    mine_leftover = tmp_file(queue, os.getpid(), 5, clock)
    monkeypatch.setattr(store_module, "_INFLIGHT", {mine_writing.name})

    report = queue.recover()
    assert report.removed_partial == 2
    assert report.queued == report.corrupt == report.foreign == 0
    assert files(tmp_path, "incoming") == [mine_writing.name]
    assert not dead_young.exists() and not mine_leftover.exists()


# --- corrupt queue files ---------------------------------------------------------------------


def damaged(data: bytes, kind: str) -> bytes:
    """A queue file's bytes, damaged as a crash, a bad disk or a stray program would."""
    content_at = data.index(b"\nC ") + 1
    content_at = data.index(b"\n", content_at) + 1
    return {
        "empty": b"",
        "garbage": b"\x00\xffthis is not a queue file\r\n" * 20,
        "other version": b"mailgate-queue 2\n" + data[len(MAGIC):],
        "cut in the envelope": data[:len(MAGIC) + 12],
        "cut in the content": data[:content_at + 3],
        "no end record": data[:data.rindex(b"\nX ") + 1],
        "envelope checksum": data.replace(b'"sender":"alice', b'"sender":"alicf', 1),
    }[kind]


DAMAGE = {
    "empty": "bad magic line",
    "garbage": "bad magic line",
    "other version": "bad magic line",
    "cut in the envelope": "envelope record cut short",
    "cut in the content": "content cut short",
    "no end record": "no end record",
    "envelope checksum": "envelope checksum mismatch",
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_corrupt_file_in_active_is_kept_aside_and_the_rest_recovered(
        tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    ids = one_in_each(queue)
    broken = accept(queue)
    assert queue.claim(broken) is not None  # in active/, as a crash during delivery leaves it
    bad = damaged((tmp_path / "active" / broken).read_bytes(), kind)
    (tmp_path / "active" / broken).write_bytes(bad)
    queue.close()

    reopened = make_queue(tmp_path, clock)
    with caplog.at_level(logging.WARNING, logger="mailgate"):
        report = reopened.recover()
    assert report.as_fields() == {"removed_partial": 0, "requeued_active": 1, "corrupt": 1,
                                  "queued": 3, "held": 1, "foreign": 0}
    # Kept for inspection, exactly as it was, under its own name.
    assert files(tmp_path, "corrupt") == [broken]
    assert (tmp_path / "corrupt" / broken).read_bytes() == bad
    [logged] = events(caplog, "queue_file_corrupt")
    assert logged["qid"] == broken and logged["queue"] == "active"
    assert DAMAGE[kind] in str(logged["error"])
    # Nothing else is lost: the cut-off delivery is due again, the others where they were.
    assert files(tmp_path, "active") == []
    assert files(tmp_path, "incoming") == [ids["incoming"]]
    assert files(tmp_path, "deferred") == sorted([ids["active"], ids["deferred"]])
    assert files(tmp_path, "hold") == [ids["hold"]]
    assert sorted(reopened.due()) == sorted([ids["incoming"], ids["active"]])
    claimed = reopened.claim(ids["active"])
    assert claimed is not None and claimed.content == CONTENT


@pytest.mark.parametrize("status", ["incoming", "deferred", "hold"])
@pytest.mark.parametrize("kind", ["empty", "garbage", "no end record"])
def test_corrupt_file_in_other_directories(tmp_path: Path, status: str, kind: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    ids = one_in_each(queue)
    broken = queue.new_id()
    bad = damaged((tmp_path / "incoming" / ids["incoming"]).read_bytes(), kind)
    (tmp_path / status / broken).write_bytes(bad)

    with caplog.at_level(logging.WARNING, logger="mailgate"):
        report = queue.recover()
    assert (report.corrupt, report.requeued_active, report.queued, report.held) == (1, 1, 3, 1)
    assert files(tmp_path, "corrupt") == [broken]
    assert (tmp_path / "corrupt" / broken).read_bytes() == bad
    assert [(e["qid"], e["queue"]) for e in events(caplog, "queue_file_corrupt")] \
        == [(broken, status)]
    assert broken not in queue.due()
    assert sorted(e.queue_id for e in queue.list()) == sorted(ids.values())


def test_torn_state_record_is_no_corruption_and_bad_content_is_caught_at_claim(
        tmp_path: Path) -> None:
    """Recovery reads envelopes, not contents: a torn last state record (a crash while
    appending) is a normal file, and damaged content goes to corrupt/ when claimed."""
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    torn, flipped = accept(queue), accept(queue)
    for queue_id in (torn, flipped):
        assert queue.claim(queue_id) is not None
    with open(tmp_path / "active" / torn, "ab") as handle:
        handle.write(b"S 120 0badf00d\n{\"attempts\":")
    data = (tmp_path / "active" / flipped).read_bytes()
    (tmp_path / "active" / flipped).write_bytes(data.replace(b"hello", b"jello"))

    report = queue.recover()
    assert (report.requeued_active, report.corrupt, report.queued) == (2, 0, 2)
    claimed = queue.claim(torn)
    assert claimed is not None and claimed.content == CONTENT and claimed.attempts == 0
    assert queue.claim(flipped) is None
    assert files(tmp_path, "corrupt") == [flipped]


# --- files that are not the queue's ---------------------------------------------------------


def foreign_files(queue_dir: Path, status: str, message: bytes) -> dict[str, bytes | None]:
    """Put in `status` what people and programs leave in directories; None: a directory."""
    some_id = "0" * 13 + "DEADBEEF"
    made: dict[str, bytes | None] = {
        f"{some_id}~": message,  # an editor's backup of a message: parses fine, is not one
        f".{some_id}.swp": b"b0VIM 9.0\x00" * 8,
        ".nfs000000000012345600000001": message,  # NFS: a deleted file still held open
        some_id.lower(): message,  # not a queue id (they are upper case)
        f"{some_id}.bak": message,
        "README": b"what these files are\n",
        "notes.tmp": b"someone's notes\n",  # .tmp, but not <queue id>.<pid>.tmp
        f"NOT-AN-ID.{DEAD_PID}.tmp": b"x\n",
        "lost+found": None,
    }
    for name, data in made.items():
        if data is None:
            (queue_dir / status / name).mkdir()
        else:
            (queue_dir / status / name).write_bytes(data)
    return made


def test_foreign_files_are_left_alone_and_reported(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    ids = one_in_each(queue)
    message = (tmp_path / "deferred" / ids["deferred"]).read_bytes()
    placed = {status: foreign_files(tmp_path, status, message)
              for status in ("incoming", "active", "deferred", "hold")}
    queue.close()

    reopened = make_queue(tmp_path, clock)
    with caplog.at_level(logging.WARNING, logger="mailgate"):
        report = reopened.recover()
    count = sum(len(made) for made in placed.values())
    assert report.as_fields() == {"removed_partial": 0, "requeued_active": 1, "corrupt": 0,
                                  "queued": 3, "held": 1, "foreign": count}
    # Each one named once, where it is; none parsed, moved or deleted.
    logged = sorted((str(e["queue"]), str(e["file"]))
                    for e in events(caplog, "queue_foreign_file"))
    assert logged == sorted((status, name) for status, made in placed.items() for name in made)
    assert events(caplog, "queue_file_corrupt") == []
    for status, made in placed.items():
        for name, data in made.items():
            path = tmp_path / status / name
            if data is None:
                assert path.is_dir()
            else:
                assert path.read_bytes() == data, (status, name)
    assert files(tmp_path, "corrupt") == []
    # The messages themselves recovered as always; the foreign files are no messages.
    assert files(tmp_path, "active") == sorted(placed["active"])
    assert sorted(reopened.due()) == sorted([ids["incoming"], ids["active"]])
    assert sorted(e.queue_id for e in reopened.list()) == sorted(ids.values())
    # A second recovery finds them again, and still changes nothing.
    assert reopened.recover().foreign == count
    assert all((tmp_path / s / n).exists() for s, made in placed.items() for n in made)
