"""Proxy health over time, with a stand-in kernel and a hand-moved clock: a listener that hangs,
intercepted connections that never complete (half-open, or dropped by the listener), what keeps
a SYN flood from switching interception off, what the interceptor logs and the stats file and
`mailgate status` show. Also the kernel glue's parsing (sock_diag messages, /proc/net/snmp)."""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from interceptor import sockdiag
from interceptor.cli import health_lines
from interceptor.config import InterceptorConfig
from interceptor.health import HOLD, STUCK_AFTER, WINDOW, CounterWindow, HealthProbe
from interceptor.policy import Service, Verdict
from interceptor.service import Interceptor, Settings
from interceptor.sockdiag import TCP_ESTABLISHED, TCP_LISTEN, TCP_SYN_RECV, SocketInfo
from netsetup.config import Interception, NetworkConfig
from tests.unit.test_interceptor_policy import syn

SMTP = Service("smtp", 25, 10025, 0)
TICK = 0.2
V4 = socket.AF_INET


def listener(rqueue: int = 0, backlog: int = 128, drops: int = 0) -> SocketInfo:
    return SocketInfo(TCP_LISTEN, 10025, rqueue, backlog, drops=drops)


def half_open(client_port: int) -> SocketInfo:
    return SocketInfo(TCP_SYN_RECV, 25, 0, 0, retrans=2, local="198.51.100.25",
                      remote="192.0.2.10", remote_port=client_port)


def established(client_port: int, accepted: bool) -> SocketInfo:
    return SocketInfo(TCP_ESTABLISHED, 25, 0, 0, inode=4242 if accepted else 0,
                      local="198.51.100.25", remote="192.0.2.10", remote_port=client_port)


@dataclass
class FakeKernel:
    """What the probe would read from sock_diag and /proc/net/snmp, set by the test."""

    listening: dict[int, list[SocketInfo]] = field(
        default_factory=lambda: {V4: [listener()], socket.AF_INET6: [listener()]})
    held: list[SocketInfo] = field(default_factory=list)
    syn_recv: list[SocketInfo] = field(default_factory=list)
    opens: int | None = 100
    calls: list[str] = field(default_factory=list)

    def listeners(self, family: int, port: int) -> list[SocketInfo]:
        self.calls.append("listeners")
        return self.listening.get(family, [])

    def connections(self, family: int, port: int) -> list[SocketInfo]:
        self.calls.append("connections")
        return self.held if family == V4 else []

    def half_open(self, family: int, port: int) -> list[SocketInfo]:
        self.calls.append("half_open")
        return self.syn_recv if family == V4 else []

    def passive_opens(self) -> int | None:
        self.calls.append("passive_opens")
        return self.opens


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_probe(kernel: FakeKernel, **kwargs: float) -> tuple[HealthProbe, Clock]:
    clock = Clock()
    return HealthProbe(kernel, clock=clock, **kwargs), clock  # type: ignore[arg-type]


def run_for(probe: HealthProbe, clock: Clock, seconds: float, service: Service = SMTP,
            each_tick: object = None) -> list[str]:
    """Probe every TICK for `seconds`; the IPv4 condition seen at each tick."""
    seen = []
    for _ in range(round(seconds / TICK)):
        clock.now += TICK
        if callable(each_tick):
            each_tick()
        seen.append(probe.probe([service], (4,))[0].condition)
    return seen


def test_the_completion_counter_window() -> None:
    window = CounterWindow(3.0)
    assert window.update(0.0, 10) is None  # not watched for a whole window yet
    assert window.update(2.9, 12) is None
    assert window.update(3.0, 12) == 2
    assert window.update(5.0, 12) == 2  # the baseline is the reading at or before 2.0
    assert window.update(6.1, 12) == 0
    assert window.update(6.2, 3) is None  # went down: a new socket, its readings start again
    assert window.update(9.3, 5) == 2


def test_stuck_half_open_with_none_completing_is_a_blackhole_until_they_are_gone() -> None:
    kernel = FakeKernel()
    probe, clock = make_probe(kernel)
    assert set(run_for(probe, clock, WINDOW)) == {"accepting"}  # history for the window
    kernel.syn_recv = [half_open(41000 + i) for i in range(3)]
    seen = run_for(probe, clock, STUCK_AFTER + TICK)
    # Healthy while they are young; not completing once they have waited STUCK_AFTER.
    assert seen[0] == "accepting" and seen[-1] == "not_completing"
    assert seen.index("not_completing") == pytest.approx(STUCK_AFTER / TICK, abs=1)
    state = probe.probe([SMTP], (4,))[0]
    assert not state.accepting and state.half_open_stuck == 3 and state.completed == 0
    assert state.reason() == (f"intercepted connections do not complete: 3 half-open for "
                              f"{STUCK_AFTER:g} s or more, none completed in {WINDOW:g} s")
    assert state.example == "192.0.2.10:41000 -> 198.51.100.25:25"  # the oldest, first seen
    # Failing open: nothing new is intercepted; a completion elsewhere does not clear it.
    kernel.opens = 101
    assert set(run_for(probe, clock, 2.0)) == {"not_completing"}
    # The half-open ones expire: unhealthy for HOLD more, then interception is tried again.
    kernel.syn_recv = []
    seen = run_for(probe, clock, HOLD + 2 * TICK)
    assert seen[0] == "not_completing" and seen[-1] == "accepting"
    assert seen.count("not_completing") == pytest.approx(HOLD / TICK, abs=1)
    # Other families keep their own health.
    assert probe.probe([SMTP], (4, 6))[1].accepting


def test_completions_keep_it_healthy_through_a_spoofed_syn_flood() -> None:
    kernel = FakeKernel()
    probe, clock = make_probe(kernel)
    kernel.syn_recv = [half_open(40000 + i) for i in range(200)]  # SYN-ACKs that go nowhere
    ticks = 0

    def live_traffic() -> None:
        nonlocal ticks
        ticks += 1
        if ticks % 10 == 0:  # one real connection completes every 2 s
            kernel.opens = (kernel.opens or 0) + 1

    assert set(run_for(probe, clock, 20.0, each_tick=live_traffic)) == {"accepting"}
    # Without it, the same flood counts (the trade-off the README states).
    assert run_for(probe, clock, WINDOW + TICK)[-1] == "not_completing"


def test_too_few_stuck_or_no_history_is_not_a_blackhole() -> None:
    kernel = FakeKernel(syn_recv=[half_open(41000), half_open(41001)])
    probe, clock = make_probe(kernel)
    assert set(run_for(probe, clock, 10.0)) == {"accepting"}
    kernel.opens = None  # no /proc/net/snmp: never a blackhole verdict
    kernel.syn_recv = [half_open(41000 + i) for i in range(10)]
    assert set(run_for(probe, clock, 10.0)) == {"accepting"}


def test_syns_the_listener_drops_with_none_completing() -> None:
    """No route back: the kernel makes no request socket, the listener counts a drop."""
    kernel = FakeKernel()
    probe, clock = make_probe(kernel)
    run_for(probe, clock, WINDOW)
    drops = 0

    def one_dropped_syn_per_second() -> None:
        nonlocal drops
        drops += 1
        kernel.listening[V4] = [listener(drops=drops // 5)]

    seen = run_for(probe, clock, 4.0, each_tick=one_dropped_syn_per_second)
    assert seen[-1] == "not_completing" and seen.index("not_completing") < 4.0 / TICK
    state = probe.probe([SMTP], (4,))[0]
    assert state.listen_drops >= 3 and "the listener dropped" in state.reason()
    # Failing open, no more drops: the window empties, then the hold runs, then it is tried
    # again.
    run_for(probe, clock, WINDOW + TICK)
    state = probe.probe([SMTP], (4,))[0]
    assert state.condition == "not_completing" and state.listen_drops == 0
    assert state.reason().startswith("intercepted connections do not complete: none seen "
                                     "stuck lately, trying again in ")
    assert 0 < state.retry_in < HOLD
    seen = run_for(probe, clock, HOLD)
    assert seen[-1] == "accepting"


def test_a_listener_that_does_not_accept() -> None:
    kernel = FakeKernel()
    probe, clock = make_probe(kernel, accept_stall=2.0)
    run_for(probe, clock, 1.0)
    assert "connections" not in kernel.calls  # an empty accept queue: nothing to look at
    kernel.listening[V4] = [listener(rqueue=1)]
    kernel.held = [established(41000, accepted=True), established(41001, accepted=False)]
    seen = run_for(probe, clock, 2.0 + TICK)
    assert seen[0] == "accepting" and seen[-1] == "not_accepting"
    state = probe.probe([SMTP], (4,))[0]
    assert state.stalled == 1 and state.reason().startswith(
        "listening but not accepting: 1 connection(s) waiting 2.")
    # Accepted at last: healthy at once.
    kernel.listening[V4] = [listener()]
    kernel.held = [established(41001, accepted=True)]
    assert run_for(probe, clock, TICK) == ["accepting"]


def test_limits_and_basic_states_and_switches() -> None:
    kernel = FakeKernel(held=[established(p, True) for p in range(3)])
    probe, clock = make_probe(kernel)
    assert run_for(probe, clock, TICK, Service("smtp", 25, 10025, 3)) == ["at_limit"]
    kernel.listening[V4] = [listener(rqueue=128, backlog=128)]
    assert run_for(probe, clock, TICK) == ["accept_queue_full"]
    kernel.listening[V4] = []
    assert run_for(probe, clock, TICK) == ["not_listening"]
    # Both checks off: no half-open or /proc reading at all.
    kernel = FakeKernel(syn_recv=[half_open(p) for p in range(10)], opens=5)
    probe, clock = make_probe(kernel, blackhole_threshold=0, accept_stall=0)
    assert set(run_for(probe, clock, 10.0)) == {"accepting"}
    assert not {"half_open", "passive_opens", "connections"} & set(kernel.calls)


NETWORK = NetworkConfig(intercept=(Interception("smtp", 25, 10025),))


def test_the_interceptor_logs_each_change_once_and_records_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailgate")
    kernel = FakeKernel()
    clock = Clock()
    settings = Settings(NETWORK, InterceptorConfig(enabled=True, stats_file=tmp_path / "s.json",
                                                   accept_stall=0), {})
    interceptor = Interceptor(settings, health=HealthProbe(kernel, clock=clock))
    assert interceptor.health.accept_stall == 0  # from the config

    def tick(seconds: float) -> None:
        for _ in range(round(seconds / TICK)):
            clock.now += TICK
            interceptor.refresh()

    tick(WINDOW)
    packet = syn("192.0.2.10", "198.51.100.25")
    assert interceptor.policy.decide(packet) == (Verdict.INTERCEPT, "intercepted")
    kernel.syn_recv = [half_open(41000 + i) for i in range(4)]
    tick(STUCK_AFTER + 1.0)
    assert interceptor.policy.decide(packet) == (Verdict.PASS, "health")
    changes = [r for r in caplog.records if r.getMessage() == "interceptor_health_changed"]
    assert len(changes) == 1, changes  # once, though the counts are re-read every tick
    fields = changes[0].fields  # type: ignore[attr-defined]
    assert changes[0].levelno == logging.WARNING
    assert fields["condition"] == "not_completing" and fields["was"] == "accepting"
    assert fields["reason"].startswith("intercepted connections do not complete: 4 half-open")
    assert fields["action"] == "passing new connections"
    assert fields["example"].endswith("-> 198.51.100.25:25")
    snapshot = interceptor.snapshot()
    smtp4 = next(p for p in snapshot["proxies"] if p["family"] == 4)
    assert smtp4["condition"] == "not_completing" and smtp4["half_open_stuck"] == 4
    assert smtp4["accepting"] is False and smtp4["since"] is not None
    assert smtp4["action"] == "passing new connections"
    smtp6 = next(p for p in snapshot["proxies"] if p["family"] == 6)
    assert smtp6["condition"] == "accepting"
    # `mailgate status` lines from that.
    lines = health_lines(snapshot["proxies"], smtp4["since"] + 12)
    assert lines[0].startswith("health smtp ipv4 (port 10025): UNHEALTHY for 12 s: "
                               "intercepted connections do not complete: 4 half-open")
    assert lines[0].endswith("; passing new connections")
    assert lines[1] == "health smtp ipv6 (port 10025): healthy for 12 s"
    # Back: one info line.
    kernel.syn_recv = []
    tick(HOLD + 1.0)
    changes = [r for r in caplog.records if r.getMessage() == "interceptor_health_changed"]
    assert len(changes) == 2 and changes[1].levelno == logging.INFO
    assert changes[1].fields["action"] == "intercepting"  # type: ignore[attr-defined]
    assert interceptor.policy.decide(packet) == (Verdict.INTERCEPT, "intercepted")


def test_fail_closed_refuses_through_a_blackhole(tmp_path: Path) -> None:
    kernel = FakeKernel()
    clock = Clock()
    settings = Settings(NETWORK, InterceptorConfig(enabled=True, fail="closed"), {})
    interceptor = Interceptor(settings, health=HealthProbe(kernel, clock=clock))
    kernel.syn_recv = [half_open(41000 + i) for i in range(3)]
    for _ in range(round((WINDOW + STUCK_AFTER) / TICK) + 1):
        clock.now += TICK
        interceptor.refresh()
    assert interceptor.policy.decide(syn("192.0.2.10", "198.51.100.25")) == (
        Verdict.REFUSE, "refused")
    assert interceptor.snapshot()["proxies"][0]["action"] == "refusing new connections"


# --- the kernel glue's parsing ------------------------------------------------------------------


def diag_message(family: int, state: int, local: str, lport: int, remote: str, rport: int,
                 retrans: int = 0, rqueue: int = 0, wqueue: int = 0, inode: int = 0,
                 cookie: int = 0, drops: int | None = None) -> bytes:
    def address(text: str) -> bytes:
        return socket.inet_pton(family, text).ljust(16, b"\0")

    body = struct.pack("=BBBB", family, state, 0, retrans)
    body += struct.pack("!HH", lport, rport) + address(local) + address(remote)
    body += struct.pack("=III", 0, cookie & 0xFFFFFFFF, cookie >> 32)
    body += struct.pack("=IIIII", 0, rqueue, wqueue, 0, inode)
    assert len(body) == 72
    if drops is not None:
        meminfo = struct.pack("=9I", *([0] * 8), drops)
        body += struct.pack("=HH", 4 + len(meminfo), sockdiag.INET_DIAG_SKMEMINFO) + meminfo
    return body


def test_sock_diag_messages_are_read() -> None:
    data = diag_message(socket.AF_INET6, TCP_SYN_RECV, "2001:db8:2::25", 25, "2001:db8:1::10",
                        41000, retrans=3, cookie=(7 << 32) | 9)
    info = sockdiag._socket_info(data, 0)
    assert (info.state, info.local_port, info.retrans, info.cookie) == (
        TCP_SYN_RECV, 25, 3, (7 << 32) | 9)
    assert info.describe() == "[2001:db8:1::10]:41000 -> [2001:db8:2::25]:25"
    data = diag_message(socket.AF_INET, TCP_LISTEN, "0.0.0.0", 10025, "0.0.0.0", 0, rqueue=2,
                        wqueue=128, inode=77, drops=5)
    info = sockdiag._socket_info(data, 0)
    assert (info.local, info.rqueue, info.wqueue, info.inode) == ("0.0.0.0", 2, 128, 77)
    assert sockdiag._meminfo_drops(data, 72, len(data)) == 5
    assert sockdiag._meminfo_drops(data[:72], 72, 72) == 0


def test_passive_opens_from_proc_net_snmp(tmp_path: Path) -> None:
    text = ("Ip: Forwarding DefaultTTL\nIp: 1 64\n"
            "Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails\n"
            "Tcp: 1 200 120000 -1 12 34 0\n")
    assert sockdiag.parse_passive_opens(text) == 34
    assert sockdiag.parse_passive_opens("Tcp: A B\n") is None
    path = tmp_path / "snmp"
    path.write_text(text)
    assert sockdiag.passive_opens(path) == 34
    assert sockdiag.passive_opens(tmp_path / "missing") is None
