"""The master's process model (proxies.process) with trivial children: a killed worker comes
back, respawns back off, a crash loop makes the supervisor give up, nothing is respawned
during shutdown; and the connection counts, per slot, cleared when a worker dies."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from proxies.process import Backoff, ConnectionSlots, CrashLimit, Supervisor


def forking(child: Callable[[int], int | None], started: list[tuple[int, int, float]]
            ) -> Callable[[int], int]:
    """A spawn function that forks `child(slot)`; records (slot, pid, time) of each start."""

    def spawn(slot: int) -> int:
        pid = os.fork()
        if pid == 0:  # never back into pytest or its event loop
            code = 0
            try:
                signal.set_wakeup_fd(-1)  # the parent loop's wake-up pipe is not ours
                for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGINT):
                    signal.signal(signum, signal.SIG_DFL)
                code = child(slot) or 0
            finally:
                os._exit(code)
        started.append((slot, pid, time.monotonic()))
        return pid

    return spawn


def sleep_forever(slot: int) -> int:
    time.sleep(60)
    return 0


def exit_at_once(slot: int) -> int:
    return 3


def run(coro: Coroutine[Any, Any, None], timeout: float = 20.0) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[str], list[dict[str, Any]]]]:
    caplog.set_level(logging.DEBUG, logger="mailgate")

    def named(name: str) -> list[dict[str, Any]]:
        return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == name]

    yield named


@contextlib.contextmanager
def reaping(started: list[tuple[int, int, float]]) -> Iterator[None]:
    """Whatever a failed test leaves running is killed and reaped."""
    try:
        yield
    finally:
        for _, pid, _ in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def test_a_killed_worker_is_logged_and_replaced_in_its_slot(events: Any) -> None:
    started: list[tuple[int, int, float]] = []
    exits: list[tuple[int, int]] = []

    async def scenario() -> None:
        supervisor = Supervisor("test", 2, forking(sleep_forever, started),
                                on_exit=lambda slot, pid: exits.append((slot, pid)))
        supervisor.start()
        assert sorted(supervisor.slots.values()) == [0, 1]
        victim = next(pid for pid, slot in supervisor.slots.items() if slot == 1)
        os.kill(victim, signal.SIGKILL)
        await until(lambda: len(started) == 3, "the respawn")
        assert started[2][0] == 1  # the same slot
        assert victim not in supervisor.slots
        assert sorted(supervisor.slots.values()) == [0, 1]
        assert exits == [(1, victim)]
        (exited,) = events("worker_exited")
        assert exited["pid"] == victim and exited["slot"] == 1
        assert exited["signal"] == "SIGKILL" and exited["expected"] is False
        assert [e["delay"] for e in events("worker_respawn_scheduled")] == [0.1]
        await supervisor.stop(5.0)

    with reaping(started):
        run(scenario())


def test_respawns_back_off_doubling_and_reset_after_a_healthy_life(events: Any) -> None:
    started: list[tuple[int, int, float]] = []
    backoff = Backoff(first=0.05, longest=0.2, healthy_after=10.0)

    async def scenario() -> None:
        supervisor = Supervisor("test", 1, forking(exit_at_once, started), backoff=backoff,
                                crash_limit=CrashLimit(exits=100, within=60))
        supervisor.start()
        await until(lambda: len(started) >= 6, "six starts")
        await supervisor.stop(1.0)

    with reaping(started):
        run(scenario())
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(started)][:5]
    for gap, delay in zip(gaps, [0.05, 0.1, 0.2, 0.2, 0.2], strict=True):
        assert delay <= gap < delay + 0.5, gaps  # plus a fork and a reap, on a busy box
    scheduled = [e["delay"] for e in events("worker_respawn_scheduled")][:5]
    assert scheduled == [0.05, 0.1, 0.2, 0.2, 0.2]
    assert {e.get("exit_code") for e in events("worker_exited") if not e["expected"]} == {3}

    # A worker that lived past healthy_after starts its slot's backoff afresh.
    started.clear()
    healthy = Backoff(first=0.05, longest=1.0, healthy_after=0.1)

    def live_a_while(slot: int) -> int:
        time.sleep(0.15)
        return 1

    async def healthy_scenario() -> None:
        supervisor = Supervisor("test", 1, forking(live_a_while, started), backoff=healthy)
        supervisor.start()
        await until(lambda: len(started) >= 4, "four starts")
        await supervisor.stop(1.0)

    before = len(events("worker_respawn_scheduled"))
    with reaping(started):
        run(healthy_scenario())
    assert [e["delay"] for e in events("worker_respawn_scheduled")[before:]][:3] == [0.05] * 3


def test_gives_up_after_too_many_exits_in_the_window(events: Any) -> None:
    started: list[tuple[int, int, float]] = []

    async def scenario() -> None:
        supervisor = Supervisor("test", 2, forking(exit_at_once, started),
                                backoff=Backoff(first=0.01, longest=0.02),
                                crash_limit=CrashLimit(exits=5, within=30))
        supervisor.start()
        await asyncio.wait_for(supervisor.gave_up.wait(), 10)
        at_give_up = len(started)  # 5 exits, and at most one more still running
        assert at_give_up in (5, 6)
        await asyncio.sleep(0.2)  # nothing more is started once it gave up
        assert len(started) == at_give_up
        await supervisor.stop(1.0)

    with reaping(started):
        run(scenario())
    (failing,) = events("workers_failing")
    assert failing["exits"] == 5


def test_exits_spread_beyond_the_window_do_not_give_up() -> None:
    started: list[tuple[int, int, float]] = []

    def live_briefly(slot: int) -> int:
        time.sleep(0.1)
        return 1

    async def scenario() -> None:
        supervisor = Supervisor("test", 1, forking(live_briefly, started),
                                backoff=Backoff(first=0.01, longest=0.01),
                                crash_limit=CrashLimit(exits=3, within=0.2))
        supervisor.start()
        await until(lambda: len(started) >= 6, "six starts")
        assert not supervisor.gave_up.is_set()
        await supervisor.stop(1.0)

    with reaping(started):
        run(scenario())


def test_stop_tells_every_worker_and_respawns_nothing(events: Any) -> None:
    started: list[tuple[int, int, float]] = []

    ignoring, said_so = os.pipe()

    def ignore_sigterm(slot: int) -> int:
        if slot == 1:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.write(said_so, b"!")
        time.sleep(60)
        return 0

    async def scenario() -> None:
        supervisor = Supervisor("test", 2, forking(ignore_sigterm, started))
        supervisor.start()
        await asyncio.get_running_loop().run_in_executor(None, os.read, ignoring, 1)
        begun = time.monotonic()
        await supervisor.stop(0.5)
        assert 0.5 <= time.monotonic() - begun < 3
        assert not supervisor.slots
        await asyncio.sleep(0.3)  # past Backoff.first: no respawn was pending
        assert len(started) == 2

    try:
        with reaping(started):
            run(scenario())
    finally:
        os.close(ignoring)
        os.close(said_so)
    exited = {e["slot"]: e for e in events("worker_exited")}
    assert exited[0]["signal"] == "SIGTERM" and exited[0]["expected"] is True
    assert exited[1]["signal"] == "SIGKILL"  # it ignored SIGTERM for the whole grace
    assert not events("worker_respawn_scheduled")


def test_stop_cancels_a_pending_respawn() -> None:
    started: list[tuple[int, int, float]] = []

    async def scenario() -> None:
        supervisor = Supervisor("test", 1, forking(sleep_forever, started),
                                backoff=Backoff(first=0.5))
        supervisor.start()
        os.kill(started[0][1], signal.SIGKILL)
        await until(lambda: not supervisor.slots, "the reap")
        await supervisor.stop(1.0)
        await asyncio.sleep(0.7)
        assert len(started) == 1

    with reaping(started):
        run(scenario())


# --- connection counting ------------------------------------------------------------------------


def test_limits_hold_over_all_slots_and_a_reset_releases_a_slot() -> None:
    counts = ConnectionSlots(3, total=5, per_client=2)
    assert counts.admit(0, "192.0.2.1")
    assert counts.admit(1, "::ffff:192.0.2.1") is True  # the same client, mapped
    assert not counts.admit(2, "192.0.2.1")  # two already, over two slots
    assert counts.admit(2, "2001:db8::1")
    assert counts.admit(2, "2001:db8::2")
    assert counts.admit(1, "2001:db8::3")
    assert counts.count == 5
    assert not counts.admit(0, "2001:db8::4")  # the total
    counts.release(0, "192.0.2.1")
    assert counts.admit(2, "192.0.2.1")
    assert (counts.held(0), counts.held(1), counts.held(2)) == (0, 2, 3)
    counts.reset(2)
    assert counts.count == 2
    assert counts.admit(0, "192.0.2.1")  # slot 2's connection of this client is gone
    counts.release(2, "2001:db8::1")  # a release after the reset changes nothing
    assert counts.count == 3


def test_the_table_stays_exact_through_collisions_and_deletions() -> None:
    counts = ConnectionSlots(2, total=400, per_client=3)
    clients = [f"198.51.100.{i}" for i in range(1, 101)]
    for client in clients:
        assert counts.admit(0, client)
        assert counts.admit(1, client)
    for client in clients[::2]:
        counts.release(0, client)
    for client in clients[1::2]:
        assert counts.admit(0, client)
        assert not counts.admit(1, client)  # three of three
    for client in clients[::2]:
        assert counts.admit(1, client)
    assert (counts.held(0), counts.held(1)) == (100, 150)
    for client in clients:
        counts.release(1, client)
    assert (counts.held(0), counts.held(1)) == (100, 50)
    for client in clients[::2]:
        assert counts.admit(0, client) and counts.admit(0, client)
        assert not counts.admit(1, client)


def test_a_killed_worker_leaves_no_lock_and_no_connections_behind() -> None:
    """A worker holding the lock and a connection is killed -9: the kernel drops its record
    lock, and the supervisor's on_exit clears its slot."""
    counts = ConnectionSlots(2, total=10, per_client=1)
    started: list[tuple[int, int, float]] = []

    def hold_lock_and_connection(slot: int) -> int:
        assert counts.admit(slot, "192.0.2.7")
        fcntl.lockf(counts.fd, fcntl.LOCK_EX)
        time.sleep(60)
        return 0

    def lock_is_free() -> bool:
        # Our own POSIX lock cannot conflict with us: ask from another process.
        pid = os.fork()
        if pid == 0:
            try:
                fcntl.lockf(counts.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os._exit(0)
            except OSError:
                os._exit(1)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0

    async def scenario() -> None:
        supervisor = Supervisor("test", 1, forking(hold_lock_and_connection, started),
                                on_exit=lambda slot, pid: counts.reset(slot),
                                backoff=Backoff(first=5.0))
        supervisor.start()
        await until(lambda: counts.count == 1, "the worker's connection")
        await until(lambda: not lock_is_free(), "the worker's lock")
        os.kill(started[0][1], signal.SIGKILL)
        await until(lambda: not supervisor.slots, "the reap")
        assert lock_is_free()
        assert counts.count == 0
        assert counts.admit(1, "192.0.2.7")
        await supervisor.stop(1.0)

    with reaping(started):
        run(scenario())
