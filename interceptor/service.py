"""`mailgate intercept`: the NFQUEUE program that decides, per new connection, who gets it.

Threads:
- main: netfilterqueue's receive loop (C, GIL released while waiting) calls `handle()` per
  queued SYN. `handle()` reads the header bytes (interceptor/packet.py), asks the policy
  (interceptor/policy.py), counts, and answers: *repeat* with the decision bit set (the packet
  runs through PREROUTING again and TPROXY takes it), *accept* (it leaves the mangle table and is
  forwarded untouched) or *drop* (after a reset, with `fail = "closed"`). Nothing in it blocks,
  allocates much or looks at a clock.
- monitor: every `health_interval` probes the proxies (interceptor/health.py: listening, room
  in the accept queue, accepting, under the limit, connections completing) and the schedule and
  swaps the flags the policy reads; logs each change of a proxy's health once
  (`interceptor_health_changed`); every `stats_interval` writes the counters and each proxy's
  health to `stats_file` (atomic rename), which `mailgate status` reads and a metrics exporter
  can read too; applies a config reload asked for with SIGHUP.

Only SYNs are queued (netsetup's rule), so established connections never pass through here.
If this process dies, or before it is first started, what happens to new connections is the
kernel's (netsetup's rule): with fail = "open" `--queue-bypass` lets them through uninspected;
with fail = "closed" their SYNs are dropped and the clients retry until an interceptor is bound.
The same for a SYN that finds the queue full (`queue_max_len` waiting): passed with fail =
"open" (the queue's fail-open flag, interceptor/nfqconfig.py), dropped with fail = "closed".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from interceptor.config import InterceptorConfig
from interceptor.health import HealthProbe, Monitor, ProxyState, schedule_active
from interceptor.packet import Syn, parse_syn
from interceptor.policy import PASS_REASONS, RULE_REASONS, Policy, Verdict, policy_for
from interceptor.refuse import Resetter
from netsetup.config import NetworkConfig
from proxies import logs

# Enough of each packet for the IPv6 header and several extension headers before TCP.
COPY_RANGE = 256
SOCKET_BYTES_PER_PACKET = 2048
STATS_VERSION = 2  # 2: each proxy also has condition, reason, since and the blackhole counts


class QueuedPacket(Protocol):
    """What we use of netfilterqueue.Packet (tests pass a stand-in)."""

    def get_payload(self) -> bytes: ...

    def get_mark(self) -> int: ...

    def set_mark(self, mark: int) -> None: ...

    def accept(self) -> None: ...

    def drop(self) -> None: ...

    def repeat(self) -> None: ...


@dataclass(frozen=True)
class Settings:
    """What the interceptor needs from the whole config."""

    network: NetworkConfig
    interceptor: InterceptorConfig
    proxy_limits: Mapping[str, int]


Loader = Callable[[], Settings]
Tracer = Callable[[bytes, "Syn | None", Verdict, str], None]


class Interceptor:
    def __init__(self, settings: Settings, *, resetter: Resetter | None = None,
                 tracer: Tracer | None = None, health: HealthProbe | None = None) -> None:
        self.settings = settings
        self.health = health if health is not None else HealthProbe()
        self._configure_health(settings)
        self.policy: Policy = policy_for(settings.network, settings.interceptor,
                                         settings.proxy_limits)
        self.mark = settings.interceptor.mark
        self.resetter = resetter
        self.tracer = tracer
        self.counts: dict[str, int] = dict.fromkeys(("intercepted", "refused", *PASS_REASONS), 0)
        self.proxies: list[ProxyState] = []
        # (service, family) -> wall time its condition last changed (or was first seen).
        self.since: dict[tuple[str, int], float] = {}
        self.started = time.time()
        self.errors = 0

    # --- the hot path -----------------------------------------------------------------------

    def handle(self, packet: QueuedPacket) -> None:
        try:
            data = packet.get_payload()
            syn = parse_syn(data)
            verdict, reason = self.policy.decide(syn)
        except Exception:  # a bug here must not hold the SYN: let it pass, say so once in a while
            self.errors += 1
            if self.errors & (self.errors - 1) == 0:
                logs.error("interceptor_decision_failed", exc_info=True, errors=self.errors)
            packet.accept()
            return
        self.counts[reason] += 1
        if verdict is Verdict.INTERCEPT:
            packet.set_mark(packet.get_mark() | self.mark)
            packet.repeat()
        elif verdict is Verdict.PASS:
            packet.accept()
        else:
            if self.resetter is not None and syn is not None:
                self.resetter.send(syn)
            packet.drop()
        if self.tracer is not None:
            self.tracer(data, syn, verdict, reason)

    # --- off the hot path -------------------------------------------------------------------

    def _configure_health(self, settings: Settings) -> None:
        self.health.blackhole_threshold = settings.interceptor.blackhole_threshold
        self.health.accept_stall = settings.interceptor.accept_stall

    def action(self, state: ProxyState) -> str:
        """What new connections for this proxy get now."""
        if state.accepting:
            return "intercepting"
        return "passing new connections" if self.policy.fail_open else "refusing new connections"

    def refresh(self, now: time.struct_time | None = None) -> None:
        """Probe the proxies and the schedule; swap in the flags the hot path reads."""
        previous = {(p.service, p.family): p for p in self.proxies}
        services = list(self.policy.services.values())
        self.proxies = self.health.probe(services, self.settings.network.families)
        self.policy.healthy = {(p.family, p.listen_port): p.accepting for p in self.proxies}
        active = schedule_active(self.settings.interceptor.schedule, now or time.localtime())
        if active != self.policy.schedule_active:
            logs.event("interceptor_schedule", active=active)
        self.policy.schedule_active = active
        wall = time.time()
        for state in self.proxies:
            key = (state.service, state.family)
            before = previous.get(key)
            if before is not None and before.condition == state.condition:
                continue
            self.since[key] = wall
            if before is None:  # the first probe: interceptor_ready reports it
                continue
            # Once per change of condition (not per tick, and not when only a count moves).
            fields: dict[str, Any] = {
                "service": state.service, "family": state.family, "port": state.listen_port,
                "healthy": state.accepting, "condition": state.condition,
                "was": before.condition, "reason": state.reason(), "action": self.action(state)}
            if state.example and not state.accepting:
                fields["example"] = state.example
            logs.event("interceptor_health_changed",
                       logging.INFO if state.accepting else logging.WARNING, **fields)

    def reload(self, settings: Settings) -> None:
        """New decisions from a re-read config; the health flags carry over."""
        policy = policy_for(settings.network, settings.interceptor, settings.proxy_limits)
        policy.healthy = self.policy.healthy
        policy.schedule_active = self.policy.schedule_active
        self._configure_health(settings)
        self.settings = settings
        self.policy = policy  # one assignment: the hot path sees the old or the new policy
        logs.event("interceptor_reloaded", services=sorted(policy.services))

    def snapshot(self, queue_state: Mapping[str, int] | None = None) -> dict[str, Any]:
        counts = dict(self.counts)
        return {
            "version": STATS_VERSION,
            "pid": os.getpid(),
            "queue": self.settings.interceptor.queue,
            "started": self.started,
            "updated": time.time(),
            "fail": self.settings.interceptor.fail,
            "schedule_active": self.policy.schedule_active,
            "counters": {
                "intercepted": counts["intercepted"],
                "bypassed_rule": sum(counts[r] for r in RULE_REASONS),
                "bypassed_health": counts["health"],
                "refused": counts["refused"],
                "unparsable": counts["unparsable"],
            },
            "by_reason": counts,
            "errors": self.errors,
            # What `mailgate status` shows and a metrics exporter would export, per proxy and
            # family: `condition` is one of health.CONDITIONS, `reason` its text, `since` when
            # it last changed (epoch seconds), `action` what new connections get.
            "proxies": [{"service": p.service, "family": p.family, "port": p.listen_port,
                         "accepting": p.accepting, "condition": p.condition,
                         "state": p.reason(),  # the version 1 name of `reason`
                         "reason": p.reason(), "action": self.action(p),
                         "since": self.since.get((p.service, p.family)),
                         "connections": p.connections, "limit": p.limit,
                         "stalled": p.stalled, "stalled_for": p.stalled_for,
                         "half_open_stuck": p.half_open_stuck, "listen_drops": p.listen_drops,
                         "completed_recently": p.completed}
                        for p in self.proxies],
            **({"kernel_queue": dict(queue_state)} if queue_state else {}),
        }


def write_stats(path: Path, snapshot: Mapping[str, Any]) -> None:
    """Whole or not at all: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(snapshot, indent=1) + "\n")
    os.replace(temporary, path)


def read_stats(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class _Stop(Exception):
    pass


def serve(load: Loader, *, trace: bool = False) -> int:
    """Bind the queue and decide until SIGTERM/SIGINT; SIGHUP re-reads the config."""
    from netfilterqueue import NetfilterQueue

    from interceptor import queuestate

    settings = load()
    config = settings.interceptor
    resetter = Resetter() if config.fail == "closed" and config.refuse == "reset" else None
    interceptor = Interceptor(settings, resetter=resetter,
                              tracer=trace_printer() if trace else None)
    interceptor.refresh()
    reload_requested = threading.Event()
    last_stats = 0.0

    def tick() -> None:
        nonlocal last_stats
        if reload_requested.is_set():
            reload_requested.clear()
            try:
                interceptor.reload(load())
            except Exception as exc:  # a broken config keeps the running policy
                logs.error("interceptor_reload_failed", error=str(exc))
        try:
            interceptor.refresh()
        except OSError as exc:
            logs.error("interceptor_probe_failed", error=str(exc))
        now = time.monotonic()
        if now - last_stats >= interceptor.settings.interceptor.stats_interval:
            last_stats = now
            _write_snapshot(interceptor, queuestate.read().get(config.queue))

    def stop(signum: int, frame: object) -> None:
        raise _Stop

    queue = NetfilterQueue()
    try:
        # The netlink socket buffer, not the queue length, is what overflows first in a burst
        # (each queued packet takes ~1-2 KiB there): size it for the whole queue.
        queue.bind(config.queue, interceptor.handle, max_len=config.queue_max_len,
                   range=COPY_RANGE, sock_len=config.queue_max_len * SOCKET_BYTES_PER_PACKET)
    except OSError as exc:
        print(f"mailgate intercept: cannot bind NFQUEUE {config.queue}: {exc} (is another "
              "interceptor running? are we root?)", file=sys.stderr)
        return 1
    queue_full = _configure_queue(queue.get_fd(), config)
    monitor = Monitor(config.health_interval, tick, name="interceptor-monitor")
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: reload_requested.set())
    monitor.start()
    _write_snapshot(interceptor, None)
    logs.event("interceptor_ready", queue=config.queue, fail=config.fail, queue_full=queue_full,
               services=sorted(interceptor.policy.services),
               proxies={f"{p.service}/ipv{p.family}": p.reason() for p in interceptor.proxies})
    try:
        queue.run(block=True)
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        queue.unbind()
        monitor.stop()
        if resetter is not None:
            resetter.close()
        final = interceptor.snapshot()
        final["stopped"] = time.time()
        with contextlib.suppress(OSError):
            write_stats(interceptor.settings.interceptor.stats_file, final)
    logs.event("interceptor_stopped", **final["counters"])
    return 0


def _configure_queue(fd: int, config: InterceptorConfig) -> str:
    """Set what the kernel does with a SYN that finds the queue full (interceptor/nfqconfig.py)
    and confirm the queue length; returns it: "pass" or "drop".

    fail = "open" passes it uninspected, as while no interceptor is bound; fail = "closed"
    drops it, so the client retransmits: held, never passed uninspected."""
    from interceptor import nfqconfig

    fail_open = config.fail == "open"
    try:
        nfqconfig.apply(fd, config.queue, max_len=config.queue_max_len, fail_open=fail_open)
    except OSError as exc:  # TimeoutError too. The queue works on, without the flag.
        logs.warning("interceptor_queue_config_failed", queue=config.queue, error=str(exc),
                     queue_max_len=config.queue_max_len, queue_full="drop",
                     effect="SYNs that find the queue full are dropped (clients retransmit)")
        return "drop"
    return "pass" if fail_open else "drop"


def _write_snapshot(interceptor: Interceptor, state: object) -> None:
    from interceptor.queuestate import QueueState

    kernel = None
    if isinstance(state, QueueState):
        kernel = {"waiting": state.waiting, "queue_dropped": state.queue_dropped,
                  "user_dropped": state.user_dropped}
    try:
        write_stats(interceptor.settings.interceptor.stats_file, interceptor.snapshot(kernel))
    except OSError as exc:
        logs.error("interceptor_stats_failed", error=str(exc),
                   path=str(interceptor.settings.interceptor.stats_file))


def trace_printer() -> Tracer:
    """`--trace`: one line per decision, the packet decoded by scapy (slow: debugging only)."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    def show(data: bytes, syn: Syn | None, verdict: Verdict, reason: str) -> None:
        packet = IPv6(data) if data[:1] and data[0] >> 4 == 6 else IP(data)
        print(f"{verdict.value:9} {reason:12} {packet.summary()}", flush=True)

    return show
