"""The master's process model, after Postfix's master(8): it starts a fixed number of workers,
notices each one's death, says so in the log, and starts another in its place; when it cannot
keep them up it gives up, so that the master exits non-zero and its own supervisor (systemd,
`Restart=on-failure`) starts everything afresh.

- Deaths are noticed through a pidfd per worker (`loop.add_reader`; not SIGCHLD, which
  uvloop reserves), and only our own pids are reaped with `waitpid(pid, WNOHANG)`: never
  `waitpid(-1)`, which would steal the exit status of a child asyncio's subprocess watcher is
  waiting for (the interceptor companion). Nothing here blocks the loop.
- Respawning backs off per slot: 0.1 s, doubling up to 5 s; a worker that lived 10 s was
  healthy and its slot starts again at 0.1 s (Postfix waits a fixed `service_throttle_time`;
  a doubling delay gets a worker back fast after one kill and still spares a crash loop).
- Giving up: 10 unrequested exits within 60 s. A worker that always crashes (a broken
  scanner library, a port taken by something else) is then a failed unit in systemd, not a
  master that quietly respawns forever.
- `stop()` tells every worker (SIGTERM), respawns nothing more, and waits for them all.

How a worker is made is the caller's business (`spawn(slot) -> pid`); so is what it runs.
`ConnectionSlots` is the other half of the model: the one place connections are counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import ipaddress
import mmap
import os
import signal
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from proxies import logs, metrics


@dataclass(frozen=True)
class Backoff:
    """The delay before a slot's worker is started again."""

    first: float = 0.1
    longest: float = 5.0
    # A worker that lived this long was healthy: its slot's next delay is `first` again.
    healthy_after: float = 10.0


@dataclass(frozen=True)
class CrashLimit:
    """Give up after `exits` unrequested worker exits within `within` seconds."""

    exits: int = 10
    within: float = 60.0


def describe_status(status: int) -> dict[str, object]:
    """A wait status as log fields: `exit_code=N` or `signal=SIGKILL`."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return {"signal": name}
    return {"exit_code": os.waitstatus_to_exitcode(status)}


class Supervisor:
    """Keeps `count` workers running, each in its own slot (0 .. count-1).

    `spawn(slot)` starts a worker and returns its pid; `on_exit(slot, pid)` runs once the
    worker is reaped, before anything replaces it (the master frees what the dead worker
    held there). `gave_up` is set when the crash limit is reached; the caller then stops and
    exits non-zero. Create and start it inside the running loop.
    """

    def __init__(self, name: str, count: int, spawn: Callable[[int], int], *,
                 backoff: Backoff = Backoff(), crash_limit: CrashLimit = CrashLimit(),
                 on_exit: Callable[[int, int], None] | None = None) -> None:
        self.name = name
        self.count = count
        self.spawn = spawn
        self.backoff = backoff
        self.crash_limit = crash_limit
        self.on_exit = on_exit
        self.stopping = False
        self.gave_up = asyncio.Event()
        self.slots: dict[int, int] = {}  # pid -> slot, live workers only
        self._started_at: dict[int, float] = {}
        self._delay = [backoff.first] * count
        self._respawns: dict[int, asyncio.TimerHandle] = {}
        self._started_slots: set[int] = set()  # a start in one of these is a restart
        self._exits: collections.deque[float] = collections.deque()
        self._none_left = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # One pidfd per worker (Linux 5.3): readable once the worker has exited. Not SIGCHLD:
        # uvloop keeps that signal for itself, and a pidfd names exactly one process.
        self._pidfds: dict[int, int] = {}

    @property
    def pids(self) -> list[int]:
        return list(self.slots)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for slot in range(self.count):
            self._start(slot)

    def _watch(self, pid: int) -> None:
        assert self._loop is not None
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone (and a zombie): reap it now
            self._loop.call_soon(self.reap)
            return
        self._pidfds[pid] = fd
        # A worker that died before this line leaves its pidfd readable: still seen.
        self._loop.add_reader(fd, self.reap)

    def _unwatch(self, pid: int) -> None:
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(fd)
            os.close(fd)

    def _start(self, slot: int) -> None:
        self._respawns.pop(slot, None)
        if self.stopping or self.gave_up.is_set():
            return
        try:
            pid = self.spawn(slot)
        except OSError as exc:  # EAGAIN, ENOMEM: as good as a worker that died at once
            logs.error("worker_spawn_failed", worker=self.name, slot=slot, error=str(exc))
            self._failed(slot, lived=0.0)
            return
        self.slots[pid] = slot
        self._started_at[pid] = time.monotonic()
        if slot in self._started_slots:
            metrics.current.worker_restart(self.name)
        self._started_slots.add(slot)
        self._none_left.clear()
        self._watch(pid)
        logs.event("worker_started", worker=self.name, slot=slot, pid=pid)

    def reap(self) -> None:
        """Collect every worker of ours that has exited (called when a pidfd is readable;
        each call looks at all of them)."""
        for pid in list(self.slots):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: gone, status unknown
                done, status = pid, -1
            if done == pid:
                self._exited(pid, status)

    def _exited(self, pid: int, status: int) -> None:
        self._unwatch(pid)
        slot = self.slots.pop(pid)
        lived = time.monotonic() - self._started_at.pop(pid)
        fields = describe_status(status) if status >= 0 else {"status": "unknown"}
        expected = self.stopping
        (logs.event if expected else logs.warning)(
            "worker_exited", worker=self.name, slot=slot, pid=pid, **fields,
            lived=round(lived, 3), expected=expected)
        if self.on_exit is not None:
            self.on_exit(slot, pid)
        if not self.slots:
            self._none_left.set()
        if not expected:
            self._failed(slot, lived)

    def _failed(self, slot: int, lived: float) -> None:
        now = time.monotonic()
        self._exits.append(now)
        while self._exits and self._exits[0] < now - self.crash_limit.within:
            self._exits.popleft()
        if len(self._exits) >= self.crash_limit.exits:
            if not self.gave_up.is_set():
                logs.error("workers_failing", worker=self.name, exits=len(self._exits),
                           within=self.crash_limit.within,
                           reason="workers keep exiting; the master gives up and exits")
                self.gave_up.set()
            return
        if lived >= self.backoff.healthy_after:
            self._delay[slot] = self.backoff.first
        delay = self._delay[slot]
        self._delay[slot] = min(delay * 2, self.backoff.longest)
        assert self._loop is not None
        logs.debug("worker_respawn_scheduled", worker=self.name, slot=slot, delay=delay)
        self._respawns[slot] = self._loop.call_later(delay, self._start, slot)

    def shutting_down(self) -> None:
        """From now on an exit is expected and nothing is respawned. Call it as soon as the
        stop is decided: under systemd the workers get their SIGTERM with the master's (the
        whole cgroup is signalled), and may be gone before stop() runs."""
        self.stopping = True
        for handle in self._respawns.values():
            handle.cancel()
        self._respawns.clear()

    async def stop(self, grace: float) -> None:
        """SIGTERM every worker, respawn nothing, and wait for all of them; SIGKILL whatever
        is left after `grace` seconds."""
        self.shutting_down()
        for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in self.slots:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            if not self.slots:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_left.wait(), wait)
        for pid in list(self._pidfds):
            self._unwatch(pid)


# --- connection counting (Postfix's anvil) -----------------------------------------------------


class ConnectionSlots:
    """Connection counts over every worker: the total and per client address (SO_REUSEPORT
    spreads one client's connections over the workers, so counts per process would allow it
    `workers` times its limit).

    Postfix's anvil(8) is one server every smtpd asks; asking the master over a socket would
    put a round trip before each greeting, so the counts live in one shared mapping instead,
    split into one region per worker slot. A worker writes only its own region (its own
    connections) and reads all of them under one lock to decide; the master, the owner, zeroes
    a slot when it reaps that slot's worker, so a dead worker's connections are released with
    it and never leak (a count kept in one shared table would keep a killed worker's clients
    for ever). The lock is a POSIX record lock on the mapping's memfd: the kernel drops it when
    its holder dies, where a semaphore held by a `kill -9`ed worker would stay taken and stop
    every worker from admitting anyone.

    Each region: the slot's connection count, then a table client -> count (linear probing,
    backward-shift deletion keeps it exact), twice as large as the total limit.
    """

    _KEY = 16  # a packed IPv6 address; IPv4 ones are mapped

    def __init__(self, workers: int, total: int, per_client: int, fd: int | None = None) -> None:
        self.workers = workers
        self.total = total
        self.per_client = per_client
        self._size = 1 << max(8, (2 * total).bit_length())
        self._mask = self._size - 1
        self._region = 8 + self._size * (4 + self._KEY)  # a multiple of 8: aligned regions
        length = workers * self._region
        if fd is None:  # the master makes it; workers get its descriptor
            fd = os.memfd_create("mailgate-connections", os.MFD_CLOEXEC)
            os.ftruncate(fd, length)
        self.fd = fd
        self._memory = mmap.mmap(fd, length)  # MAP_SHARED
        view = memoryview(self._memory)
        self._totals = [view[s * self._region:s * self._region + 8].cast("q")
                        for s in range(workers)]
        self._counts = [view[s * self._region + 8:s * self._region + 8 + 4 * self._size]
                        .cast("i") for s in range(workers)]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    @property
    def count(self) -> int:
        return sum(int(t[0]) for t in self._totals)

    def admit(self, slot: int, client: str) -> bool:
        key = _key(client)
        with self._locked():
            if sum(int(t[0]) for t in self._totals) >= self.total:
                return False
            found = [self._find(s, key) for s in range(self.workers)]
            if sum(self._counts[s][i] for s, i in enumerate(found)) >= self.per_client:
                return False
            index = found[slot]
            if self._counts[slot][index] == 0:
                self._set_key(slot, index, key)
            self._counts[slot][index] += 1
            self._totals[slot][0] += 1
            return True

    def release(self, slot: int, client: str) -> None:
        key = _key(client)
        with self._locked():
            index = self._find(slot, key)
            if self._counts[slot][index] <= 0:
                return  # not counted here (the slot was reset under it)
            self._totals[slot][0] -= 1
            self._counts[slot][index] -= 1
            if self._counts[slot][index] == 0:
                self._close_gap(slot, index)

    def reset(self, slot: int) -> None:
        """Forget every connection of `slot` (its worker is dead)."""
        start = slot * self._region
        with self._locked():
            self._memory[start:start + self._region] = bytes(self._region)

    def held(self, slot: int) -> int:
        return int(self._totals[slot][0])

    def _key_at(self, slot: int, index: int) -> bytes:
        start = slot * self._region + 8 + 4 * self._size + index * self._KEY
        return self._memory[start:start + self._KEY]

    def _set_key(self, slot: int, index: int, key: bytes) -> None:
        start = slot * self._region + 8 + 4 * self._size + index * self._KEY
        self._memory[start:start + self._KEY] = key

    def _home(self, key: bytes) -> int:
        return zlib.crc32(key) & self._mask

    def _find(self, slot: int, key: bytes) -> int:
        """The index holding `key` in `slot`'s table, or the empty one where it would go."""
        counts = self._counts[slot]
        index = self._home(key)
        while counts[index] > 0 and self._key_at(slot, index) != key:
            index = (index + 1) & self._mask
        return index

    def _close_gap(self, slot: int, hole: int) -> None:
        # Knuth's algorithm R: move back each later entry of the run that may sit in the hole.
        counts = self._counts[slot]
        index = hole
        while True:
            index = (index + 1) & self._mask
            if counts[index] == 0:
                return
            home = self._home(self._key_at(slot, index))
            if (home <= hole or home > index) if hole <= index \
                    else (home <= hole and home > index):
                self._set_key(slot, hole, self._key_at(slot, index))
                counts[hole] = counts[index]
                counts[index] = 0
                hole = index


def _key(client: str) -> bytes:
    address = ipaddress.ip_address(client)
    if isinstance(address, ipaddress.IPv4Address):
        return bytes(10) + b"\xff\xff" + address.packed
    return address.packed
