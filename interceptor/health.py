"""Keeping the hot path's flags current: proxy health and the schedule, off the hot path.

A proxy counts as accepting on one address family when all of these hold; the first that fails
is its `condition` (and the reason logged and shown):

1. a socket listens on its port in that family ("not_listening");
2. the accept queue of at least one such listener has room ("accept_queue_full");
3. nothing has waited in its accept queue for `accept_stall` seconds: a proxy that listens but
   hangs (a blocked event loop, a stopped process) leaves completed connections there, which
   the kernel shows as sockets on the service's port that no process holds ("not_accepting");
4. the connections it holds are below its limit, if one is set ("at_limit");
5. the connections given to it complete ("not_completing", see below).

The probe asks the kernel (interceptor/sockdiag.py) and never connects to the proxy.

Why 5: a proxy can listen and accept and still never get a connection, when its answers cannot
reach the client (no route back from the box, an asymmetric path, a filter on the way). Then
every intercepted SYN ends in one of two visible ways:

- the listener drops it because the SYN-ACK cannot be routed (no request socket is made; the
  listener's drop counter rises);
- the SYN-ACK leaves and is lost: the request socket stays half-open (SYN_RECV) and is
  retransmitted until it expires (net.ipv4.tcp_synack_retries: about a minute by default);
  the client's own retransmitted SYNs, which find it still waiting, count as listener drops
  too (measured: tcp_v4_rcv discards them against the listener).

So: at least `blackhole_threshold` such connections (half-open for `STUCK_AFTER` or more, or
dropped by the listener within `WINDOW`) while *no* handshake completed in the whole network
namespace within `WINDOW` (`Tcp: PassiveOpens`) is a blackhole. Requiring "none completed" is
what keeps a spoofed SYN flood (whose SYN-ACKs go nowhere, by design) from switching
interception off while real clients still get through; the counter is namespace-wide rather than
per port because the kernel keeps no per-port count, which errs on the side of intercepting.
Once seen, a blackhole lasts while the evidence does, plus `HOLD`: failing open stops new
evidence (nothing is intercepted), so the half-open ones running out (or, for drops, the hold)
is what lets interception be tried again; if the path is still broken it trips again.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from interceptor import sockdiag
from interceptor.config import Window
from interceptor.policy import Service

FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}

# A handshake half-open this long has lost its SYN-ACK (or the client's ACK) at least twice:
# the SYN-ACK is resent after 1 s, then 2 s more (TCP_TIMEOUT_INIT, doubling; RFC 6298 2.1,
# 5.5), while a healthy handshake takes one round trip.
STUCK_AFTER = 3.0
# How far back drops and completed handshakes are counted: as long as a stuck one has waited.
WINDOW = 3.0
# How long a blackhole stays declared after its evidence is gone (dropped SYNs leave no trace:
# without a hold, interception would be retried, and tripped again, every WINDOW seconds).
HOLD = 5.0

CONDITIONS = ("accepting", "not_listening", "accept_queue_full", "not_accepting", "at_limit",
              "not_completing")


@dataclass(frozen=True)
class ProxyState:
    service: str
    family: int
    listen_port: int
    listening: bool
    backlog_full: bool
    connections: int
    limit: int
    stalled: int = 0  # connections waiting at least accept_stall to be accepted
    stalled_for: float = 0.0  # the longest wait among them, seconds
    half_open_stuck: int = 0  # intercepted handshakes half-open for STUCK_AFTER or more
    listen_drops: int = 0  # SYNs its listeners dropped within WINDOW
    completed: int | None = None  # handshakes completed in the namespace within WINDOW
    blackhole: bool = False
    retry_in: float = 0.0  # a blackhole whose evidence is gone: interception is tried again then
    example: str = ""  # one stuck or stalled connection, for the log

    @property
    def condition(self) -> str:
        if not self.listening:
            return "not_listening"
        if self.backlog_full:
            return "accept_queue_full"
        if self.stalled:
            return "not_accepting"
        if self.limit and self.connections >= self.limit:
            return "at_limit"
        if self.blackhole:
            return "not_completing"
        return "accepting"

    @property
    def accepting(self) -> bool:
        return self.condition == "accepting"

    def reason(self) -> str:
        condition = self.condition
        if condition == "not_listening":
            return "not listening"
        if condition == "accept_queue_full":
            return "accept queue full"
        if condition == "not_accepting":
            return (f"listening but not accepting: {self.stalled} connection(s) waiting "
                    f"{self.stalled_for:.1f} s to be accepted")
        if condition == "at_limit":
            return f"at its connection limit ({self.connections}/{self.limit})"
        if condition == "not_completing":
            seen = []
            if self.half_open_stuck:
                seen.append(f"{self.half_open_stuck} half-open for {STUCK_AFTER:g} s or more")
            if self.listen_drops:
                seen.append(f"{self.listen_drops} SYN(s) the listener dropped (no route back "
                            "to the client, or retransmitted for a half-open one)")
            if not seen:
                return ("intercepted connections do not complete: none seen stuck lately, "
                        f"trying again in {self.retry_in:.1f} s")
            return (f"intercepted connections do not complete: {', '.join(seen)}, none "
                    f"completed in {WINDOW:g} s")
        return "accepting"


class Kernel(Protocol):
    """What the probe asks the kernel (tests pass a stand-in); families are AF_INET/AF_INET6."""

    def listeners(self, family: int, port: int) -> list[sockdiag.SocketInfo]: ...

    def connections(self, family: int, port: int) -> list[sockdiag.SocketInfo]: ...

    def half_open(self, family: int, port: int) -> list[sockdiag.SocketInfo]: ...

    def passive_opens(self) -> int | None: ...


class SockDiag:
    """The real kernel, through sock_diag and /proc/net/snmp."""

    def listeners(self, family: int, port: int) -> list[sockdiag.SocketInfo]:
        return sockdiag.listeners(family, port)

    def connections(self, family: int, port: int) -> list[sockdiag.SocketInfo]:
        return sockdiag.connections(family, port)

    def half_open(self, family: int, port: int) -> list[sockdiag.SocketInfo]:
        return sockdiag.half_open(family, port)

    def passive_opens(self) -> int | None:
        return sockdiag.passive_opens()


class CounterWindow:
    """How much a kernel counter rose over the last `window` seconds, from one reading a tick.

    None until the readings cover the whole window (just started: not known yet). A counter
    that went down belongs to a new socket (a restarted proxy): its readings start again.
    """

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._readings: deque[tuple[float, int]] = deque()

    def update(self, now: float, value: int) -> int | None:
        if self._readings and value < self._readings[-1][1]:
            self._readings.clear()
        self._readings.append((now, value))
        start = now - self.window
        # Keep the newest reading at or before the window's start: the baseline.
        while len(self._readings) >= 2 and self._readings[1][0] <= start:
            self._readings.popleft()
        taken, baseline = self._readings[0]
        if taken > start:
            return None
        return value - baseline


def _peer_key(info: sockdiag.SocketInfo) -> tuple[str, int, str]:
    # A request socket's cookie is not stable from one dump to the next (measured); the
    # addresses and the client's port name one connection on one service port.
    return (info.remote, info.remote_port, info.local)


class _Ages:
    """When each connection was first seen in some state, kept across ticks."""

    def __init__(self) -> None:
        self._first_seen: dict[tuple[str, int, str], float] = {}

    def update(self, now: float, found: Sequence[sockdiag.SocketInfo]
               ) -> list[tuple[float, sockdiag.SocketInfo]]:
        """(seconds since first seen, socket) for `found`, oldest first; forgets the rest."""
        seen = {_peer_key(s): self._first_seen.get(_peer_key(s), now) for s in found}
        self._first_seen = seen
        return sorted(((now - seen[_peer_key(s)], s) for s in found), key=lambda a: -a[0])


@dataclass
class _Track:
    """What the probe remembers about one proxy in one family between ticks."""

    unaccepted: _Ages
    half_open: _Ages
    drops: CounterWindow
    evidence_at: float | None = None  # a blackhole's evidence last seen (None: no blackhole)


class HealthProbe:
    """Probes the proxies once per `probe()`; remembers what judging over time needs.

    Sans-I/O apart from `kernel`: every fact comes from it and every time from `clock`, so the
    tests drive it with a stand-in kernel and a hand-moved clock.
    """

    def __init__(self, kernel: Kernel | None = None, *, blackhole_threshold: int = 3,
                 accept_stall: float = 3.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kernel: Kernel = kernel if kernel is not None else SockDiag()
        self.blackhole_threshold = blackhole_threshold  # 0: not checked
        self.accept_stall = accept_stall  # 0: not checked
        self.clock = clock
        self._completions = CounterWindow()
        self._tracks: dict[tuple[int, int], _Track] = {}

    def probe(self, services: Iterable[Service], families: Iterable[int]) -> list[ProxyState]:
        now = self.clock()
        opens = self.kernel.passive_opens() if self.blackhole_threshold else None
        completed = self._completions.update(now, opens) if opens is not None else None
        families = tuple(families)
        states = []
        tracked = set()
        for service in services:
            found = {f: self.kernel.listeners(FAMILIES[f], service.listen_port) for f in families}
            # Only when needed: the proxy's connections can be many; a listener with an empty
            # accept queue holds nothing that waits to be accepted.
            held = {f: self.kernel.connections(FAMILIES[f], service.port)
                    if service.max_connections or (self.accept_stall and
                                                   any(s.rqueue for s in found[f])) else []
                    for f in families}
            # The proxy's limit is across both families.
            total = sum(len(h) for h in held.values()) if service.max_connections else 0
            for family in families:
                key = (family, service.listen_port)
                tracked.add(key)
                track = self._tracks.get(key)
                if track is None:
                    track = self._tracks[key] = _Track(_Ages(), _Ages(), CounterWindow())
                states.append(self._judge(now, service, family, track, found[family],
                                          held[family], total, completed))
        for key in set(self._tracks) - tracked:  # a service dropped by a reload
            del self._tracks[key]
        return states

    def _judge(self, now: float, service: Service, family: int, track: _Track,
               found: list[sockdiag.SocketInfo], held: list[sockdiag.SocketInfo], total: int,
               completed: int | None) -> ProxyState:
        listening = bool(found)
        example = ""
        waiting = track.unaccepted.update(now, [s for s in held if s.inode == 0])
        stalled = [(age, s) for age, s in waiting
                   if self.accept_stall and age >= self.accept_stall]
        if stalled:
            example = stalled[0][1].describe()
        stuck, drops, blackhole, retry_in = 0, 0, False, 0.0
        if self.blackhole_threshold and listening:
            half_open = track.half_open.update(now, self.kernel.half_open(FAMILIES[family],
                                                                          service.port))
            stuck_ones = [s for age, s in half_open if age >= STUCK_AFTER]
            stuck = len(stuck_ones)
            drops = track.drops.update(now, sum(s.drops for s in found)) or 0
            blackhole = self._blackhole(track, now, stuck + drops, completed)
            if blackhole and track.evidence_at is not None and track.evidence_at < now:
                retry_in = round(HOLD - (now - track.evidence_at), 1)
            if stuck_ones and not example:
                example = stuck_ones[0].describe()
        else:
            track.evidence_at = None
        return ProxyState(
            service.name, family, service.listen_port, listening=listening,
            backlog_full=listening and all(s.rqueue >= max(s.wqueue, 1) for s in found),
            connections=total, limit=service.max_connections,
            stalled=len(stalled), stalled_for=round(stalled[0][0], 1) if stalled else 0.0,
            half_open_stuck=stuck, listen_drops=drops, completed=completed,
            blackhole=blackhole, retry_in=retry_in, example=example)

    def _blackhole(self, track: _Track, now: float, evidence: int,
                   completed: int | None) -> bool:
        enough = evidence >= self.blackhole_threshold
        if enough and (track.evidence_at is not None or completed == 0):
            # Once declared, completions elsewhere in the namespace do not clear it: with
            # nothing intercepted they say nothing about this proxy's path.
            track.evidence_at = now
            return True
        if track.evidence_at is not None and now - track.evidence_at < HOLD:
            return True
        track.evidence_at = None
        return False


def probe_proxies(services: Iterable[Service], families: Iterable[int],
                  kernel: Kernel | None = None) -> list[ProxyState]:
    """One probe without history: listening, accept queue, limit (no stall or blackhole)."""
    return HealthProbe(kernel, blackhole_threshold=0, accept_stall=0).probe(services, families)


def schedule_active(schedule: Iterable[Window], now: time.struct_time) -> bool:
    windows = tuple(schedule)
    minute = now.tm_hour * 60 + now.tm_min
    return not windows or any(w.covers(now.tm_wday, minute) for w in windows)


class Monitor:
    """A thread that calls `tick()` every `interval` seconds until `stop()`."""

    def __init__(self, interval: float, tick: Callable[[], None], name: str) -> None:
        self.interval = interval
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
