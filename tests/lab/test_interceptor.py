"""The interceptor in a lab gateway: per-connection decisions, proxy health, its own absence.

The gateway runs `netsetup apply` with [interceptor] enabled (NFQUEUE for SYNs, TPROXY only
for what the interceptor marks), the transparent relay as the proxy on 10025/10110, and
`mailgate intercept`; the server host echoes who connected. A second sender address is on the
interceptor's bypass list (not netsetup's: that one is decided in the kernel).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from interceptor.service import read_stats
from netsetup.lab.topology import Lab
from tests.lab.tcp_probes import JsonLines, event_is

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BYPASSED = {4: "192.0.2.11", 6: "2001:db8:1::11"}

LabFactory = Callable[..., Lab]


def config_text(lab: Lab, stats: Path, fail: str = "open") -> str:
    lines = [
        "[network]",
        f'mode = "{lab.mode}"',
        "listen = { smtp = 10025, pop3 = 10110 }",
    ]
    if lab.mode == "bridge":
        lines += [f"ports = {json.dumps(list(lab.bridge_ports))}",
                  'bridged_networks = ["192.0.2.0/24", "2001:db8:1::/64"]']
    lines += [
        "[interceptor]",
        "enabled = true",
        f'fail = "{fail}"',
        f"bypass_sources = {json.dumps([BYPASSED[4] + '/32', BYPASSED[6] + '/128'])}",
        "health_interval = 0.1",
        "stats_interval = 0.1",
        f'stats_file = "{stats}"',
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Gateway:
    lab: Lab
    config: Path
    stats: Path
    server: JsonLines
    relay: JsonLines | None = None
    interceptor: subprocess.Popen[bytes] | None = None

    def start_relay(self) -> JsonLines:
        argv = [PYTHON, "-m", "proxies.tcprelay", "--port", "10025", "--port", "10110",
                "--json-events"]
        self.relay = JsonLines(self.lab.spawn(self.lab.gateway, argv, stdout=subprocess.PIPE,
                                              cwd=ROOT))
        self.relay.wait_for(event_is("listening"), what="relay listening")
        return self.relay

    def kill_relay(self) -> None:
        assert self.relay is not None
        self.relay.process.kill()
        self.relay.process.wait(timeout=10)

    def start_interceptor(self) -> None:
        started = time.time()
        self.interceptor = self.lab.spawn(
            self.lab.gateway, [PYTHON, "-m", "proxies.cli", "intercept", "--config",
                               str(self.config)], cwd=ROOT)
        self.wait_stats(lambda s: s["pid"] == self.interceptor_pid() and s["updated"] > started,
                        "interceptor running")

    def interceptor_pid(self) -> int:
        # `ip netns exec` execs the program: the spawned pid is the interceptor's.
        assert self.interceptor is not None
        return self.interceptor.pid

    def kill_interceptor(self) -> None:
        assert self.interceptor is not None
        self.interceptor.send_signal(signal.SIGKILL)
        self.interceptor.wait(timeout=10)

    def wait_stats(self, match: Callable[[dict[str, Any]], bool], what: str,
                   timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            stats = read_stats(self.stats)
            if stats is not None and match(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout}s; stats: {stats}")
            time.sleep(0.05)

    def connect(self, family: int, port: int = 25, source: str | None = None,
                timeout: float = 5.0) -> dict[str, Any]:
        host = self.lab.server.ipv4 if family == 4 else self.lab.server.ipv6
        sender = self.lab.sender.ipv4 if family == 4 else self.lab.sender.ipv6
        argv = [PYTHON, "-m", "tests.lab.tcp_probes", "connect", f"[{host}]:{port}",
                "--source", source or str(sender), "--timeout", str(timeout)]
        result = self.lab.run(self.lab.sender, argv, cwd=ROOT, timeout=60)
        answer: dict[str, Any] = json.loads(result.stdout.splitlines()[0])
        return answer

    def intercepted(self, answer: dict[str, Any]) -> bool:
        """The relay took the connection (and relayed it to the server)."""
        assert answer["ok"], answer
        assert self.relay is not None
        return any(event_is("intercepted", client=answer["local"])(e)
                   for e in self.relay.settle(0.05))

    def until(self, family: int, want_intercepted: bool, what: str,
              timeout: float = 5.0) -> float:
        """Connect until the connection is (not) intercepted; seconds it took."""
        start = time.monotonic()
        while True:
            answer = self.connect(family)
            if answer["ok"] and self.intercepted(answer) == want_intercepted:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{what}: still not so after {timeout}s: {answer}")


def make_gateway(lab: Lab, tmp_path: Path, fail: str = "open") -> Gateway:
    for family, prefix in ((4, 24), (6, 64)):
        lab.ip(lab.sender, f"-{family}", "addr", "add", f"{BYPASSED[family]}/{prefix}",
               "dev", "eth0", *(["nodad"] if family == 6 else []))
    config, stats = tmp_path / "mailgate.toml", tmp_path / "interceptor.json"
    config.write_text(config_text(lab, stats, fail))
    argv = [PYTHON, "-m", "netsetup.cli", "--config", str(config), "--state-file",
            str(tmp_path / "netsetup-state.json"), "apply"]
    result = lab.run(lab.gateway, argv, check=False, cwd=ROOT, timeout=60)
    assert result.returncode == 0, f"netsetup apply failed:\n{result.stdout}\n{result.stderr}"
    server = JsonLines(lab.spawn(lab.server, [PYTHON, "-m", "tests.lab.tcp_probes", "serve",
                                              "--port", "25", "--port", "110"],
                                 stdout=subprocess.PIPE, cwd=ROOT))
    server.wait_for(event_is("listening"), what="server listening")
    return Gateway(lab, config, stats, server)


def test_decisions_health_and_interceptor_restart(lab_factory: LabFactory,
                                                  tmp_path: Path) -> None:
    gw = make_gateway(lab_factory("router"), tmp_path)
    gw.start_relay()
    gw.start_interceptor()

    # Others are intercepted: the relay takes it, the server sees the sender (spoofed).
    for family in (4, 6):
        for port in (25, 110):
            answer = gw.connect(family, port)
            assert gw.intercepted(answer), (family, port, answer)
            assert answer["peer"][0] == (gw.lab.sender.ipv4 if family == 4
                                         else gw.lab.sender.ipv6)
    # A bypassed source reaches the server itself; the relay never hears of it.
    for family in (4, 6):
        answer = gw.connect(family, source=BYPASSED[family])
        assert answer["ok"] and answer["peer"] == [BYPASSED[family], answer["local"][1]]
        assert not gw.intercepted(answer), answer
    stats = gw.wait_stats(lambda s: s["by_reason"]["source"] >= 2, "source bypasses counted")
    assert stats["counters"]["intercepted"] >= 4

    # The proxy dies: new connections go to the server directly, within a second or two.
    gw.kill_relay()
    took = gw.until(4, want_intercepted=False, what="direct after proxy down")
    assert took < 2.5, took
    answer = gw.connect(6)
    assert answer["ok"] and answer["peer"][0] == gw.lab.sender.ipv6, answer
    gw.wait_stats(lambda s: s["counters"]["bypassed_health"] >= 2, "health bypasses counted")
    # It comes back: intercepted again.
    gw.start_relay()
    gw.until(4, want_intercepted=True, what="intercepted after proxy up")
    assert gw.intercepted(gw.connect(6))

    # The interceptor dies: the kernel passes new connections uninspected ...
    gw.kill_interceptor()
    for family in (4, 6):
        answer = gw.connect(family, timeout=3)
        assert answer["ok"] and not gw.intercepted(answer), answer
    # ... and `mailgate status` says so.
    status = gw.lab.run(gw.lab.gateway, [PYTHON, "-m", "proxies.cli", "status", "--config",
                                         str(gw.config), "--json"], cwd=ROOT)
    shown = json.loads(status.stdout)
    assert shown["interceptor"]["queue_bound"] is False
    assert shown["interceptor"]["running"] is False
    assert {(p["service"], p["family"]) for p in shown["proxies"] if p["listening"]} == {
        ("smtp", 4), ("smtp", 6), ("pop3", 4), ("pop3", 6)}
    # Back: decisions resume for new connections.
    gw.start_interceptor()
    assert gw.intercepted(gw.connect(4))
    answer = gw.connect(4, source=BYPASSED[4])
    assert not gw.intercepted(answer)
    status = gw.lab.run(gw.lab.gateway, [PYTHON, "-m", "proxies.cli", "status", "--config",
                                         str(gw.config)], cwd=ROOT)
    assert "running, bound to NFQUEUE 0" in status.stdout, status.stdout
    assert "intercepted=1" in status.stdout or "intercepted=" in status.stdout


def test_fail_closed_refuses_while_the_proxy_is_down(lab_factory: LabFactory,
                                                     tmp_path: Path) -> None:
    gw = make_gateway(lab_factory("router"), tmp_path, fail="closed")
    gw.start_interceptor()  # no proxy yet
    for family in (4, 6):
        answer = gw.connect(family, timeout=3)
        # A reset in the server's name: refused at once, not a timeout.
        assert not answer["ok"] and "ConnectionRefusedError" in answer["error"], answer
    seen = gw.server.settle(0.1)
    assert not [e for e in seen if e["event"] == "connection"], seen
    # The bypass list still applies.
    assert gw.connect(4, source=BYPASSED[4])["ok"]
    stats = gw.wait_stats(lambda s: s["counters"]["refused"] >= 2, "refusals counted")
    assert stats["counters"]["bypassed_health"] == 0
    gw.start_relay()
    gw.until(4, want_intercepted=True, what="intercepted after proxy up")
    assert gw.intercepted(gw.connect(6))


@pytest.mark.parametrize("mode", ["bridge"])
def test_bridge_mode_decisions(lab_factory: LabFactory, tmp_path: Path, mode: str) -> None:
    gw = make_gateway(lab_factory(mode, make_bridge=False), tmp_path)
    gw.start_relay()
    gw.start_interceptor()
    for family in (4, 6):
        answer = gw.connect(family)
        assert gw.intercepted(answer), (family, answer)
        answer = gw.connect(family, source=BYPASSED[family])
        assert answer["ok"] and answer["peer"] == [BYPASSED[family], answer["local"][1]]
        assert not gw.intercepted(answer), answer
    gw.kill_relay()
    gw.until(4, want_intercepted=False, what="direct after proxy down")
    assert gw.connect(6)["ok"]


CRAFT = """
import sys
from scapy.all import IP, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, TCP, send
sender4, sender6, bypass4, bypass6, server4, server6 = sys.argv[1:7]
odd = [("MSS", 536), ("NOP", None), ("WScale", 14), ("SAckOK", b""), ("Timestamp", (7, 0)),
       (254, b"\\x12\\x34"), ("EOL", None)]
packets = [
    IP(src=sender4, dst=server4) / TCP(sport=41000, dport=25, flags="S", options=odd),
    IP(src=bypass4, dst=server4) / TCP(sport=41001, dport=25, flags="S", options=odd),
    IPv6(src=sender6, dst=server6) / IPv6ExtHdrDestOpt() / TCP(sport=41002, dport=25, flags="S"),
    IPv6(src=bypass6, dst=server6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
    / TCP(sport=41003, dport=110, flags="S", options=odd),
    IPv6(src=sender6, dst=server6) / TCP(sport=41004, dport=110, flags="S", options=odd),
]
for packet in packets:
    send(packet, verbose=0)
"""


def test_crafted_syns_are_decided(lab_factory: LabFactory, tmp_path: Path) -> None:
    """SYNs scapy builds on the sender (odd TCP options, IPv6, IPv6 extension headers)."""
    gw = make_gateway(lab_factory("router"), tmp_path)
    gw.start_relay()
    gw.start_interceptor()
    before = gw.wait_stats(lambda s: True, "stats")["by_reason"]
    sender, server = gw.lab.sender, gw.lab.server
    gw.lab.run(sender, [PYTHON, "-c", CRAFT, str(sender.ipv4), str(sender.ipv6), BYPASSED[4],
                        BYPASSED[6], str(server.ipv4), str(server.ipv6)], cwd=ROOT)
    after = gw.wait_stats(
        lambda s: s["by_reason"]["intercepted"] - before["intercepted"] >= 3
        and s["by_reason"]["source"] - before["source"] >= 2, "crafted SYNs decided")
    assert after["by_reason"]["intercepted"] - before["intercepted"] == 3
    assert after["by_reason"]["source"] - before["source"] == 2
    assert after["by_reason"]["unparsable"] == before["unparsable"]
