"""The durable queue: acceptance, recovery, scheduling, bounces and administration."""

from __future__ import annotations

import asyncio
import email
import email.policy
import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxies.config import SmtpConfig
from proxies.queue import (
    AttemptOutcome,
    ClaimedMessage,
    DeliveryResult,
    Envelope,
    Queue,
    QueueFullError,
    QueueWriteError,
    RecipientStatus,
)
from proxies.queue import store as store_module
from proxies.queue.queuefile import MAGIC, is_queue_id
from proxies.smtp.delivery import DeliveryAgent

CONTENT = b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
OK = DeliveryResult(250, "2.0.0 Ok: queued as X")
LATER = DeliveryResult(451, "4.7.1 try again later")
UNKNOWN = DeliveryResult(550, "5.1.1 <bob@example.org>: user unknown")


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def envelope(sender: str = "alice@example.com",
             recipients: tuple[str, ...] = ("bob@example.org",)) -> Envelope:
    return Envelope(sender=sender, recipients=recipients, client_address="192.0.2.10",
                    client_port=41000, original_destination=("198.51.100.25", 25),
                    helo="client.example", protocol="ESMTPS", smtputf8=True, body_8bit=True,
                    tls=True)


def make_queue(path: Path, clock: Clock | None = None, *, retry_min: float = 300.0,
               retry_max: float = 4000.0, lifetime: float = 5 * 86400.0) -> Queue:
    # A file per message from the start (the default, use_journal=False): these tests are
    # about the directories, where every message not delivered at once ends up
    # (test_queue_journal.py has the journal in front of them).
    return Queue(path, hostname="gw.example.net", clock=clock or Clock(), retry_min=retry_min,
                 retry_max=retry_max, lifetime=lifetime)


def accept(queue: Queue, env: Envelope | None = None, content: bytes = CONTENT) -> str:
    async def go() -> str:
        return await queue.accept(env or envelope(), content)
    return asyncio.run(go())


def files(queue_dir: Path, status: str) -> list[str]:
    return sorted(os.listdir(queue_dir / status))


# --- acceptance -----------------------------------------------------------------------------


def test_accept_is_complete_on_disk_and_survives_reopening(tmp_path: Path) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    queue_id = accept(queue)
    assert is_queue_id(queue_id)
    assert files(tmp_path, "incoming") == [queue_id]  # no temporary file left
    data = (tmp_path / "incoming" / queue_id).read_bytes()
    assert data.startswith(MAGIC) and data.rstrip(b"\n").rsplit(b"\n", 1)[-1].startswith(b"X ")
    queue.close()

    reopened = make_queue(tmp_path, clock)
    [entry] = reopened.list()
    assert entry.queue_id == queue_id and entry.status == "incoming"
    assert entry.size == len(CONTENT) and entry.arrival == clock.now
    assert entry.envelope == envelope().__class__(**{**envelope().__dict__, "arrival": clock.now})
    assert [r.status for r in entry.recipients] == [RecipientStatus.PENDING]
    assert reopened.show(queue_id)[1] == CONTENT
    assert reopened.due() == [queue_id]


def test_concurrent_accepts_share_directory_fsyncs(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    queue = make_queue(tmp_path)
    syncs: list[Path] = []
    real = store_module._fsync_dir

    def counting(path: Path) -> None:
        syncs.append(path)
        real(path)

    monkeypatch.setattr(store_module, "_fsync_dir", counting)

    async def go() -> list[str]:
        return await asyncio.gather(*(queue.accept(envelope(), CONTENT + b"%d" % i)
                                      for i in range(50)))

    ids = asyncio.run(go())
    assert len(set(ids)) == 50 and sorted(ids) == files(tmp_path, "incoming")
    assert 1 <= len(syncs) < 50  # group commit: far fewer directory fsyncs than messages
    for queue_id in ids:
        assert queue.show(queue_id)[1].startswith(CONTENT)
    queue.close()


def test_ids_are_unique_and_sort_by_time(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    ids = [queue.new_id() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(is_queue_id(i) for i in ids)


def test_taken_id_is_refused_not_overwritten(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    queue_id = accept(queue)

    async def again() -> str:
        return await queue.accept(envelope(), b"other", queue_id=queue_id)

    with pytest.raises(QueueWriteError):
        asyncio.run(again())
    assert queue.show(queue_id)[1] == CONTENT
    assert files(tmp_path, "incoming") == [queue_id]


@pytest.mark.parametrize(("code", "error"), [(errno.ENOSPC, QueueFullError),
                                             (errno.EDQUOT, QueueFullError),
                                             (errno.EIO, QueueWriteError)])
def test_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      code: int, error: type[QueueWriteError]) -> None:
    queue = make_queue(tmp_path)
    real_writev = os.writev
    calls = 0

    def failing(fd: int, buffers: list[memoryview]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:  # a partial write first, as a filling disk does
            return real_writev(fd, [buffers[0][:10]])
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "writev", failing)
    with pytest.raises(error) as info:
        accept(queue)
    assert info.value.smtp_reply.startswith("452 4.3.1" if error is QueueFullError
                                            else "451 4.3.0")
    assert files(tmp_path, "incoming") == []
    monkeypatch.setattr(os, "writev", real_writev)
    assert accept(queue)  # and the queue still works
    queue.close()


def test_fsync_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = make_queue(tmp_path)

    def failing(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(QueueFullError):
        accept(queue)
    assert files(tmp_path, "incoming") == []
    queue.close()


def test_directory_fsync_failure_fails_the_batch_and_removes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = make_queue(tmp_path)

    def failing(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store_module, "_fsync_dir", failing)
    with pytest.raises(QueueWriteError):
        accept(queue)
    assert files(tmp_path, "incoming") == []
    queue.close()


@pytest.mark.parametrize("path", ["inline", "writer-thread"])
def test_cancelled_accept_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         path: str) -> None:
    """A caller cancelled before the commit leaves nothing, however its message was being
    written: a small one on the loop (the committer drops it), a big one by a writer thread
    (its file goes once the write ends). The test waits for the discard itself, no sleep: the
    writer thread is held until the caller is gone, so the cancel lands mid-write."""
    queue = make_queue(tmp_path)
    content = CONTENT
    written, release = threading.Event(), threading.Event()
    if path == "writer-thread":
        content = CONTENT + b"x" * store_module.INLINE_WRITE_LIMIT
        real_write = store_module._write_new_file

        def held_write(target: Path, chunks: list[bytes], sync: bool = True) -> None:
            real_write(target, chunks, sync)
            written.set()
            assert release.wait(10)

        monkeypatch.setattr(store_module, "_write_new_file", held_write)
    discarded: list[Path] = []

    async def go() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        real_discard = queue._discard

        def discard(tmp: Path) -> None:  # runs on the loop, in both cases
            real_discard(tmp)
            discarded.append(tmp)
            done.set()

        monkeypatch.setattr(queue, "_discard", discard)
        task = asyncio.create_task(queue.accept(envelope(), content))
        if path == "inline":
            await asyncio.sleep(0)  # one step: written, waiting for the committer
        else:
            assert await loop.run_in_executor(None, written.wait, 10)
        assert len(files(tmp_path, "incoming")) == 1  # its temporary file is there
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await asyncio.wait_for(done.wait(), 5)

    asyncio.run(go())
    assert [p.parent.name for p in discarded] == ["incoming"]
    assert files(tmp_path, "incoming") == []
    queue.close()
    assert not any(files(tmp_path, d) for d in ("incoming", "active", "deferred"))


# --- recovery -------------------------------------------------------------------------------


def test_recover_removes_half_written_files_and_puts_active_back(tmp_path: Path) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    kept = accept(queue)
    claimed = accept(queue)
    assert queue.claim(claimed) is not None
    # A writer that died mid-write (pid 2**22+1 cannot exist), and one that is complete
    # but was never linked: neither was acknowledged, both go.
    dead = 2**22 + 1
    whole = (tmp_path / "incoming" / f"{kept}.{os.getpid()}.tmp")
    (tmp_path / "incoming" / f"{queue.new_id()}.{dead}.tmp").write_bytes(MAGIC + b"E 12\n{\"sen")
    whole.write_bytes((tmp_path / "incoming" / kept).read_bytes())
    # A file in a queue directory without its end record is corrupt.
    broken = queue.new_id()
    data = (tmp_path / "incoming" / kept).read_bytes()
    (tmp_path / "deferred" / broken).write_bytes(data[:-5])
    queue.close()

    clock.now += 10
    reopened = make_queue(tmp_path, clock)
    report = reopened.recover()
    assert report.removed_partial == 2
    assert report.requeued_active == 1
    assert report.corrupt == 1
    assert report.queued == 2
    assert files(tmp_path, "incoming") == [kept]
    assert files(tmp_path, "active") == []
    assert files(tmp_path, "deferred") == [claimed]
    assert files(tmp_path, "corrupt") == [broken]
    assert sorted(reopened.due()) == sorted([kept, claimed])


def test_recover_leaves_files_of_live_writers(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    writing = tmp_path / "incoming" / f"{queue.new_id()}.1.tmp"  # pid 1 is always alive
    writing.write_bytes(MAGIC)
    assert queue.recover().removed_partial == 0
    assert writing.exists()


# --- delivery and scheduling ------------------------------------------------------------------


def test_claim_is_exclusive_and_delivery_removes(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    queue_id = accept(queue)
    other = make_queue(tmp_path)  # another process's view of the same directory
    claimed = queue.claim(queue_id)
    assert claimed is not None and claimed.content == CONTENT
    assert claimed.pending == ("bob@example.org",) and claimed.envelope.tls
    assert other.claim(queue_id) is None
    assert queue.due() == []
    outcome = queue.record_attempt(queue_id, {"bob@example.org": OK})
    assert outcome.removed and outcome.delivered == ("bob@example.org",)
    assert queue.list() == []


def test_backoff_doubles_and_caps(tmp_path: Path) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock, retry_min=300, retry_max=4000)
    queue_id = accept(queue)
    delays = []
    for _ in range(7):
        assert queue.due() == [queue_id]
        assert queue.claim(queue_id) is not None
        outcome = queue.record_attempt(queue_id, LATER)
        assert outcome.deferred == ("bob@example.org",) and not outcome.removed
        assert outcome.next_attempt is not None
        delays.append(outcome.next_attempt - clock.now)
        assert queue.due() == []  # not due before its time
        assert queue.next_due_time() == outcome.next_attempt
        clock.now = outcome.next_attempt
    assert delays == [300, 600, 1200, 2400, 4000, 4000, 4000]
    [entry] = make_queue(tmp_path, clock).list()  # the state is on disk
    assert entry.status == "deferred" and entry.attempts == 7
    assert entry.last_error == "451 4.7.1 try again later"
    assert entry.next_attempt == pytest.approx(clock.now)


def test_connection_failure_defers_the_whole_message(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    queue_id = accept(queue, envelope(recipients=("a@example.org", "b@example.org")))
    queue.claim(queue_id)
    outcome = queue.record_attempt(
        queue_id, DeliveryResult(451, "4.4.1 connect to mx: Connection refused", connected=False))
    assert outcome.deferred == ("a@example.org", "b@example.org")
    assert queue.entry(queue_id).last_error == "4.4.1 connect to mx: Connection refused"


def test_partial_delivery_keeps_only_the_deferred_recipient(tmp_path: Path) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    queue_id = accept(queue, envelope(recipients=("a@example.org", "b@example.org")))
    queue.claim(queue_id)
    outcome = queue.record_attempt(queue_id, {"a@example.org": OK, "b@example.org": LATER})
    assert outcome.delivered == ("a@example.org",) and outcome.deferred == ("b@example.org",)
    entry = queue.entry(queue_id)
    assert {r.address: r.status for r in entry.recipients} == {
        "a@example.org": RecipientStatus.DELIVERED, "b@example.org": RecipientStatus.DEFERRED}
    clock.now += 300
    claimed = queue.claim(queue_id)
    assert claimed is not None and claimed.pending == ("b@example.org",)
    assert queue.record_attempt(queue_id, {"b@example.org": OK}).removed


def report_part(message: email.message.EmailMessage) -> str:
    payload = message.get_payload()
    assert isinstance(payload, list) and len(payload) == 3
    return str(payload[1])


def dsn_of(queue: Queue, dsn_id: str) -> tuple[Envelope, email.message.EmailMessage]:
    entry, content = queue.show(dsn_id)
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return entry.envelope, message


def test_5xx_bounces_with_a_notification_to_the_sender(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    queue_id = accept(queue, envelope(recipients=("a@example.org", "bob@example.org")))
    queue.claim(queue_id)
    outcome = queue.record_attempt(queue_id, {"a@example.org": LATER,
                                              "bob@example.org": UNKNOWN})
    assert outcome.bounced == ("bob@example.org",) and outcome.dsn_id is not None
    assert not outcome.removed  # a@ is still deferred
    env, message = dsn_of(queue, outcome.dsn_id)
    assert env.sender == "" and env.recipients == ("alice@example.com",)
    assert message.get_content_type() == "multipart/report"
    report = report_part(message)
    assert "Final-Recipient: rfc822; bob@example.org" in report
    assert "Diagnostic-Code: smtp; 550 5.1.1 <bob@example.org>: user unknown" in report
    assert "Status: 5.1.1" in report
    # The notification is due at once; the original waits for its retry.
    assert queue.due() == [outcome.dsn_id]


def test_lifetime_expiry_bounces_and_removes(tmp_path: Path) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock, lifetime=3600)
    queue_id = accept(queue)
    for _ in range(10):
        if queue.claim(queue_id) is None:
            break
        outcome = queue.record_attempt(queue_id, LATER)
        if outcome.removed:
            break
        assert outcome.next_attempt is not None
        assert outcome.next_attempt <= queue.entry(queue_id).arrival + 3600  # clamped
        clock.now = outcome.next_attempt
    assert outcome.removed and outcome.bounced == ("bob@example.org",)
    assert outcome.dsn_id is not None
    assert [e.queue_id for e in queue.list()] == [outcome.dsn_id]
    _env, message = dsn_of(queue, outcome.dsn_id)
    report = report_part(message)
    assert "Status: 4.4.7" in report and "Action: failed" in report
    assert "smtp; 451 4.7.1 try again later" in report


def test_no_notification_for_the_null_sender(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    queue_id = accept(queue, envelope(sender=""))
    queue.claim(queue_id)
    outcome = queue.record_attempt(queue_id, UNKNOWN)
    assert outcome.removed and outcome.bounced and outcome.dsn_id is None
    assert queue.list() == []


def test_torn_state_record_is_ignored_and_cut_off(tmp_path: Path) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    queue_id = accept(queue, envelope(recipients=("a@example.org", "b@example.org")))
    queue.claim(queue_id)
    queue.record_attempt(queue_id, {"a@example.org": OK, "b@example.org": LATER})
    path = tmp_path / "deferred" / queue_id
    with path.open("ab") as handle:  # a crash in the middle of the next state record
        handle.write(b'S 500 0badc0de\n{"attempts": 2, "rec')
    entry = queue.entry(queue_id)
    assert entry.attempts == 1
    claimed = queue.claim(queue_id)
    assert claimed is not None and claimed.pending == ("b@example.org",)
    queue.record_attempt(queue_id, LATER)
    assert queue.entry(queue_id).attempts == 2


def test_release_claim_puts_back_untried(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    queue_id = accept(queue)
    queue.claim(queue_id)
    assert queue.release_claim(queue_id)
    assert queue.due() == [queue_id] and queue.entry(queue_id).attempts == 0


def test_every_new_due_time_is_told_to_on_schedule(tmp_path: Path) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock, retry_min=2, retry_max=4)
    told: list[float] = []
    queue.on_schedule = told.append
    queue_id = accept(queue)
    assert told == [clock.now]                      # a new message: due now
    queue.claim(queue_id)
    outcome = queue.record_attempt(queue_id, LATER)
    assert told[-1] == outcome.next_attempt == clock.now + 2 == queue.next_due_time()
    told.clear()
    assert queue.hold(queue_id) and told == []      # leaving the schedule wakes nobody
    clock.now += 1
    assert queue.release(queue_id) and told == [clock.now]
    clock.now += 1
    assert queue.flush() == 1 and told[-1] == clock.now
    queue.claim(queue_id)
    clock.now += 1
    assert queue.release_claim(queue_id) and told[-1] == clock.now
    queue.claim(queue_id)
    queue.record_attempt(queue_id, UNKNOWN)         # the bounce notification: due now
    assert told[-1] == clock.now and queue.due() != []


def test_a_deferral_wakes_the_sleeping_scheduler_at_its_due_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler sleeps until the next due time it knows of: a whole scan interval when the
    only message is being tried. The deferral must move that wake-up to the retry time."""
    retry = 0.3
    queue = Queue(tmp_path, hostname="gw.example.net", retry_min=retry, retry_max=retry)
    config = SmtpConfig(hostname="gw.example.net", queue_dir=tmp_path, retry_min=retry,
                        retry_max=retry, queue_scan_interval=60.0, workers=1)
    agent = DeliveryAgent(config, queue, spoof_source=False, tls_context=None)
    attempts: list[float] = []
    outcomes: list[AttemptOutcome] = []
    threads: list[int] = []

    async def attempt(claimed: ClaimedMessage) -> dict[str, DeliveryResult]:  # no sockets
        attempts.append(time.time())
        return dict.fromkeys(claimed.pending, LATER if len(attempts) == 1 else OK)

    record = queue.record_attempt

    def record_attempt(queue_id: str, results: dict[str, DeliveryResult]) -> AttemptOutcome:
        threads.append(threading.get_ident())
        outcome = record(queue_id, results)
        outcomes.append(outcome)
        return outcome

    delivered = queue.record_delivered

    def record_delivered(queue_id: str, recipients: tuple[str, ...]) -> AttemptOutcome:
        threads.append(threading.get_ident())
        outcome = delivered(queue_id, recipients)
        outcomes.append(outcome)
        return outcome

    monkeypatch.setattr(agent, "_attempt", attempt)
    monkeypatch.setattr(queue, "record_attempt", record_attempt)
    monkeypatch.setattr(queue, "record_delivered", record_delivered)

    async def until(done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 5
        while not done():
            assert time.monotonic() < deadline, f"{what}: still waiting after 5 s"
            await asyncio.sleep(0.01)

    async def go() -> None:
        scheduler = asyncio.create_task(agent.run(), name="test-delivery-scheduler")
        try:
            await queue.accept(envelope(), CONTENT)
            await until(lambda: len(outcomes) == 1, "first attempt")
            due = outcomes[0].next_attempt
            assert due is not None and due == pytest.approx(attempts[0] + retry, abs=0.2)
            # Asleep again, until the retry, not for queue_scan_interval.
            await until(lambda: agent.next_wakeup == due, "wake-up at the retry time")
            await until(lambda: len(outcomes) == 2, "the retry")
            assert due <= attempts[1] < due + 1.0
            assert outcomes[1].removed
        finally:
            await agent.stop()
            await scheduler

    asyncio.run(go())
    # The deferral (a state record to fsync) was recorded in a worker thread, so on_schedule
    # was called from there; the delivered one only removes the file, on the loop's thread.
    assert threads[0] != threading.get_ident() and threads[1] == threading.get_ident()
    assert queue.list() == [] and queue.on_schedule is None
    queue.close()


# --- administration -------------------------------------------------------------------------


def test_hold_release_delete_flush(tmp_path: Path) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    first, second = accept(queue), accept(queue)
    cli = make_queue(tmp_path, clock)  # the CLI, in another process

    assert cli.hold(first) and files(tmp_path, "hold") == [first]
    queue.rescan()
    assert queue.due() == [second] and queue.claim(first) is None
    assert cli.entry(first).held
    assert cli.release(first) and not cli.release(first)
    queue.rescan()
    assert queue.due() == [first, second]

    queue.claim(second)
    queue.record_attempt(second, LATER)
    assert queue.due() == [first]
    assert cli.flush() == 2  # the released one waits in deferred/ too
    queue.rescan()
    assert queue.due() == [first, second]

    assert cli.delete(first) and not cli.delete(first)
    assert not cli.hold(first) and not cli.delete("not-an-id")
    assert [e.queue_id for e in cli.list()] == [second]
    assert cli.delete_all() == 1 and cli.list() == []


def test_hold_during_delivery_keeps_it_held(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    queue_id = accept(queue)
    queue.claim(queue_id)
    assert make_queue(tmp_path).hold(queue_id)
    outcome = queue.record_attempt(queue_id, LATER)
    assert outcome.deferred and files(tmp_path, "hold") == [queue_id]
    assert queue.due() == []
    assert queue.entry(queue_id).attempts == 1


def test_delete_during_delivery(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    queue_id = accept(queue)
    queue.claim(queue_id)
    assert make_queue(tmp_path).delete(queue_id)
    outcome = queue.record_attempt(queue_id, LATER)
    assert outcome.missing and queue.list() == []


def test_state_write_failure_keeps_the_message_with_its_old_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    queue = make_queue(tmp_path, clock)
    queue_id = accept(queue)
    queue.claim(queue_id)

    def failing(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(QueueFullError):
        queue.record_attempt(queue_id, LATER)
    monkeypatch.undo()
    assert files(tmp_path, "deferred") == [queue_id]  # not stuck in active/
    entry = queue.entry(queue_id)
    assert entry.attempts == 0 and entry.next_attempt == clock.now + 300
    clock.now += 300
    assert queue.due() == [queue_id]


def test_bounce_that_cannot_be_queued_keeps_the_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = make_queue(tmp_path)
    queue_id = accept(queue)
    queue.claim(queue_id)

    def failing(path: Path, chunks: list[bytes]) -> None:
        raise QueueFullError("write queue file: No space left on device")

    monkeypatch.setattr(store_module, "_write_new_file", failing)
    with pytest.raises(QueueFullError):
        queue.record_attempt(queue_id, UNKNOWN)
    monkeypatch.undo()
    entry = queue.entry(queue_id)
    assert entry.status == "deferred" and entry.recipients[0].status == RecipientStatus.PENDING
    assert [e.queue_id for e in queue.list()] == [queue_id]  # and no half notification
