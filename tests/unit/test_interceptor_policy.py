"""Decisions, the config they come from, the rules netsetup places, and the hot path's verdicts
(with a stand-in for netfilterqueue's packet)."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt

from interceptor.config import InterceptorConfig, Window, parse_window
from interceptor.health import probe_proxies, schedule_active
from interceptor.packet import Syn, parse_syn
from interceptor.policy import AddressSet, Policy, Service, Verdict, policy_for
from interceptor.queuestate import parse as parse_queue
from interceptor.service import Interceptor, Settings, read_stats, write_stats
from interceptor.sockdiag import SocketInfo
from netsetup.config import Interception, NetworkConfig, QueueSteering, load_network_config
from netsetup.configfile import ConfigError
from netsetup.desired import desired_state
from proxies.config import load_config

SMTP, POP3 = Service("smtp", 25, 10025, 0), Service("pop3", 110, 10110, 0)
NETWORK = NetworkConfig(intercept=(Interception("smtp", 25, 10025),
                                   Interception("pop3", 110, 10110)))


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def syn(src: str, dst: str, dport: int = 25, flags: str = "S") -> Syn | None:
    layer = IPv6 if ":" in src else IP
    return parse_syn(bytes(layer(src=src, dst=dst) / TCP(sport=1234, dport=dport, flags=flags)))


def healthy(policy: Policy) -> Policy:
    policy.healthy = {(f, p): True for f in (4, 6) for p in (10025, 10110)}
    return policy


def test_address_set_matches_by_prefix() -> None:
    found = AddressSet([net("192.0.2.0/24"), net("198.51.100.7/32"), net("10.0.0.0/8")], 32)
    assert int(ipaddress.ip_address("192.0.2.200")) in found
    assert int(ipaddress.ip_address("198.51.100.7")) in found
    assert int(ipaddress.ip_address("198.51.100.8")) not in found
    assert int(ipaddress.ip_address("10.255.0.1")) in found
    assert not AddressSet([], 32)


def test_decision_order() -> None:
    policy = healthy(Policy(
        [SMTP, POP3],
        bypass_sources=[net("192.0.2.99/32"), net("2001:db8:1::99/128")],
        bypass_destinations=[net("203.0.113.0/24")],
        bypass_pairs=[(net("192.0.2.0/24"), net("198.51.100.26/32")),
                      (net("2001:db8:1::/64"), net("2001:db8:2::26/128"))]))
    cases = [
        (syn("192.0.2.10", "198.51.100.25"), Verdict.INTERCEPT, "intercepted"),
        (syn("192.0.2.10", "198.51.100.25", 110), Verdict.INTERCEPT, "intercepted"),
        (syn("2001:db8:1::10", "2001:db8:2::25"), Verdict.INTERCEPT, "intercepted"),
        (syn("192.0.2.99", "198.51.100.25"), Verdict.PASS, "source"),
        (syn("2001:db8:1::99", "2001:db8:2::25"), Verdict.PASS, "source"),
        (syn("192.0.2.10", "203.0.113.5"), Verdict.PASS, "destination"),
        (syn("192.0.2.10", "198.51.100.26"), Verdict.PASS, "pair"),
        (syn("2001:db8:1::10", "2001:db8:2::26"), Verdict.PASS, "pair"),
        (syn("192.0.3.10", "198.51.100.26"), Verdict.INTERCEPT, "intercepted"),
        (syn("192.0.2.10", "198.51.100.25", 587), Verdict.PASS, "port"),
        (syn("192.0.2.10", "198.51.100.25", flags="SA"), Verdict.PASS, "unparsable"),
        (None, Verdict.PASS, "unparsable"),
    ]
    for packet, verdict, reason in cases:
        assert policy.decide(packet) == (verdict, reason), packet
    policy.schedule_active = False
    assert policy.decide(syn("192.0.2.10", "198.51.100.25")) == (Verdict.PASS, "schedule")


def test_unhealthy_proxy_fails_open_or_closed() -> None:
    for fail_open, expected in ((True, (Verdict.PASS, "health")),
                                (False, (Verdict.REFUSE, "refused"))):
        policy = healthy(Policy([SMTP, POP3], fail_open=fail_open,
                                bypass_sources=[net("192.0.2.99/32")]))
        policy.healthy[(4, 10025)] = False
        assert policy.decide(syn("192.0.2.10", "198.51.100.25")) == expected
        # Other families and ports keep their own health; bypass rules still come first.
        assert policy.decide(syn("2001:db8:1::1", "2001:db8:2::25"))[0] is Verdict.INTERCEPT
        assert policy.decide(syn("192.0.2.10", "198.51.100.25", 110))[0] is Verdict.INTERCEPT
        assert policy.decide(syn("192.0.2.99", "198.51.100.25")) == (Verdict.PASS, "source")


def test_services_narrow_and_limits_default_to_the_proxies() -> None:
    policy = policy_for(NETWORK, InterceptorConfig(services=("smtp",)), {"smtp": 200})
    assert list(policy.services) == [25]
    assert policy.services[25].max_connections == 200
    policy = policy_for(NETWORK, InterceptorConfig(max_connections=(("smtp", 5),)),
                        {"smtp": 200})
    assert policy.services[25].max_connections == 5 and 110 in policy.services


class Sockets:
    """A stand-in kernel (interceptor/health.py `Kernel`): listeners and held connections."""

    def __init__(self, held: int) -> None:
        self.held = held

    def listeners(self, family: int, port: int) -> list[SocketInfo]:
        return {10025: [SocketInfo(10, 10025, 0, 128)],
                10110: [SocketInfo(10, 10110, 128, 128)]}.get(port, [])

    def connections(self, family: int, port: int) -> list[SocketInfo]:
        return [SocketInfo(1, port, 0, 0, inode=1, remote_port=p) for p in range(self.held)]

    def half_open(self, family: int, port: int) -> list[SocketInfo]:
        return []

    def passive_opens(self) -> int | None:
        return 0


def test_proxy_health_from_sockets() -> None:
    states = probe_proxies([Service("smtp", 25, 10025, 3), POP3, Service("x", 1, 1, 0)], (4,),
                           Sockets(3))
    assert [(s.service, s.accepting, s.reason()) for s in states] == [
        ("smtp", False, "at its connection limit (3/3)"),
        ("pop3", False, "accept queue full"),
        ("x", False, "not listening")]
    states = probe_proxies([SMTP], (4, 6), Sockets(0))
    assert all(s.accepting for s in states)


@pytest.mark.parametrize(("text", "weekday", "minute", "covered"), [
    ("08:00-18:00", 6, 8 * 60, True),
    ("08:00-18:00", 0, 18 * 60, False),
    ("mon-fri 08:00-18:00", 5, 9 * 60, False),
    ("mon-fri 08:00-18:00", 4, 9 * 60, True),
    ("fri-mon 08:00-09:00", 6, 8 * 60 + 30, True),
    ("sat,sun 22:00-06:00", 6, 23 * 60, True),
    ("sat,sun 22:00-06:00", 0, 5 * 60, True),  # Sunday night into Monday
    ("sat,sun 22:00-06:00", 5, 5 * 60, False),  # Saturday morning follows Friday
])
def test_schedule_windows(text: str, weekday: int, minute: int, covered: bool) -> None:
    assert parse_window(text).covers(weekday, minute) is covered


def test_schedule_active() -> None:
    now = time.struct_time((2026, 1, 5, 9, 30, 0, 0, 5, 0))  # a Monday
    assert schedule_active((), now)
    assert schedule_active((Window(frozenset({0}), 9 * 60, 10 * 60),), now)
    assert not schedule_active((Window(frozenset({1}), 9 * 60, 10 * 60),), now)


def test_config_keys_and_problems(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text("""[interceptor]
enabled = true
queue = 3
fail = "closed"
refuse = "drop"
services = ["smtp"]
bypass_sources = ["192.0.2.0/24"]
bypass_pairs = [["192.0.2.0/24", "198.51.100.25/32"]]
schedule = ["mon-fri 08:00-18:00"]
health_interval = "0.5s"
max_connections = { smtp = 10 }
stats_file = "/tmp/x.json"
""")
    config = load_config(path)
    inter = config.interceptor
    assert (inter.enabled, inter.queue, inter.fail, inter.refuse, inter.services) == (
        True, 3, "closed", "drop", ("smtp",))
    assert inter.bypass_pairs == ((net("192.0.2.0/24"), net("198.51.100.25/32")),)
    assert inter.schedule == (Window(frozenset(range(5)), 480, 1080),)
    assert inter.health_interval == 0.5 and inter.max_connections == (("smtp", 10),)
    assert config.network.queue_steering == QueueSteering(3, 0x2, fail_open=False)
    # netsetup reads the same section for its rules.
    assert load_network_config(path).queue_steering == QueueSteering(3, 0x2, fail_open=False)
    assert (inter.blackhole_threshold, inter.accept_stall) == (3, 3.0)  # the defaults

    path.write_text("""[interceptor]
enabled = true
mark = 0x1
fial = "open"
services = ["imap"]
bypass_pairs = [["192.0.2.0/24", "2001:db8::/32"]]
schedule = ["someday 08:00-09:00", "10:00-10:00"]
""")
    with pytest.raises(ConfigError) as caught:
        load_network_config(path)
    keys = sorted(p.key for p in caught.value.problems)
    assert keys == ["interceptor.bypass_pairs[0]", "interceptor.fial", "interceptor.mark",
                    "interceptor.schedule[0]", "interceptor.schedule[1]",
                    "interceptor.services"], caught.value


def test_disabled_interceptor_changes_no_rules(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text("[interceptor]\nenabled = false\n")
    assert load_network_config(path).queue_steering is None


def test_netsetup_places_nfqueue_before_marked_tproxy() -> None:
    for mode, extra in (("router", {}), ("bridge", {"ports": ("eth0", "eth1")})):
        config = NetworkConfig(mode=mode, intercept=NETWORK.intercept,
                               queue_steering=QueueSteering(0, 0x2), **extra)  # type: ignore[arg-type]
        desired = desired_state(config)
        for family in (4, 6):
            lines = desired.xtables[family].lines()
            queue = [i for i, line in enumerate(lines) if "-j NFQUEUE" in line]
            tproxy = [i for i, line in enumerate(lines) if "-j TPROXY" in line]
            assert len(queue) == 2 and len(tproxy) == 2 and max(queue) < min(tproxy)
            assert lines[queue[0]] == (
                "-A MAILGATE -p tcp -m tcp --dport 25 --tcp-flags FIN,SYN,RST,ACK SYN -m mark "
                "! --mark 0x2/0x2 -j NFQUEUE --queue-num 0 --queue-bypass")
            assert all("-m mark --mark 0x2/0x2 -j TPROXY" in lines[i] for i in tproxy)
        # fail = "closed": no bypass, so while no interceptor is bound the SYNs are held.
        closed = desired_state(NetworkConfig(
            mode=mode, intercept=NETWORK.intercept,
            queue_steering=QueueSteering(0, 0x2, fail_open=False), **extra))  # type: ignore[arg-type]
        for family in (4, 6):
            queued = [line for line in closed.xtables[family].lines() if "-j NFQUEUE" in line]
            assert len(queued) == 2 and all(line.endswith("-j NFQUEUE --queue-num 0")
                                            for line in queued), queued
        if mode == "bridge":
            # Passed connections are routed through the bridge's IP stack.
            assert desired.sysctls["net.ipv4.ip_forward"] == "1"
            assert desired.sysctls["net.ipv6.conf.all.forwarding"] == "1"


def test_kernel_queue_table() -> None:
    text = "    0  12345     3 2 256     7     1       99  1\n"
    state = parse_queue(text)[0]
    assert (state.portid, state.waiting, state.queue_dropped, state.user_dropped) == (
        12345, 3, 7, 1)
    assert parse_queue("") == {}


class FakePacket:
    def __init__(self, data: bytes, mark: int = 0) -> None:
        self.data, self.mark, self.verdict = data, mark, ""

    def get_payload(self) -> bytes:
        return self.data

    def get_mark(self) -> int:
        return self.mark

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"

    def repeat(self) -> None:
        self.verdict = "repeat"


def test_hot_path_verdicts_marks_and_counters(tmp_path: Path) -> None:
    settings = Settings(NETWORK, InterceptorConfig(
        enabled=True, fail="closed", bypass_sources=(net("192.0.2.99/32"),),
        stats_file=tmp_path / "stats.json"), {})
    interceptor = Interceptor(settings)
    healthy(interceptor.policy)
    v6 = bytes(IPv6(src="2001:db8:1::10", dst="2001:db8:2::25") / IPv6ExtHdrDestOpt() /
               TCP(dport=25, flags="S"))
    packets = [
        FakePacket(bytes(IP(src="192.0.2.10", dst="198.51.100.25") / TCP(dport=25, flags="S")),
                   mark=0x100),
        FakePacket(v6),
        FakePacket(bytes(IP(src="192.0.2.99", dst="198.51.100.25") / TCP(dport=25, flags="S"))),
        FakePacket(b"\x45garbage"),
    ]
    for packet in packets:
        interceptor.handle(packet)
    assert [(p.verdict, p.mark) for p in packets] == [
        ("repeat", 0x102), ("repeat", 0x2), ("accept", 0), ("accept", 0)]
    interceptor.policy.healthy = {}
    refused = FakePacket(packets[0].data)
    interceptor.handle(refused)
    assert refused.verdict == "drop"
    snapshot = interceptor.snapshot()
    assert snapshot["counters"] == {"intercepted": 2, "bypassed_rule": 1, "bypassed_health": 0,
                                    "refused": 1, "unparsable": 1}
    write_stats(settings.interceptor.stats_file, snapshot)
    assert read_stats(settings.interceptor.stats_file) == snapshot


def test_a_bug_in_the_decision_lets_the_packet_pass() -> None:
    interceptor = Interceptor(Settings(NETWORK, InterceptorConfig(), {}))

    def broken(syn: Syn | None) -> tuple[Verdict, str]:
        raise RuntimeError("bug")

    interceptor.policy.decide = broken  # type: ignore[method-assign]
    packet = FakePacket(bytes(IP() / TCP(dport=25, flags="S")))
    interceptor.handle(packet)
    assert packet.verdict == "accept" and interceptor.errors == 1
