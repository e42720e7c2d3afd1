"""The interceptor in a lab gateway: per-connection decisions, proxy health, its own absence.

The gateway runs `netsetup apply` with [interceptor] enabled (NFQUEUE for SYNs, TPROXY only
for what the interceptor marks), the transparent relay as the proxy on 10025/10110, and
`mailgate intercept`; the server host echoes who connected. A second sender address is on the
interceptor's bypass list (not netsetup's: that one is decided in the kernel).
"""

from __future__ import annotations

import contextlib
import json
import re
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


def config_text(lab: Lab, stats: Path, fail: str = "open", extra: tuple[str, ...] = ()) -> str:
    lines = [
        "[network]",
        f'mode = "{lab.mode}"',
    ]
    if lab.mode == "bridge":
        # An invisible bridge: a bypassed connection is routed on through the egress table.
        lines += [f"ports = {json.dumps(list(lab.bridge_ports))}"]
    lines += [
        "[interceptor]",
        "enabled = true",
        f'fail = "{fail}"',
        f"bypass_sources = {json.dumps([BYPASSED[4] + '/32', BYPASSED[6] + '/128'])}",
        "health_interval = 0.1",
        "stats_interval = 0.1",
        f'stats_file = "{stats}"',
        *extra,
        # The relay stands in for both proxies, on their ports (netsetup reads them here).
        "[smtp]",
        "listen = 10025",
        "[pop3]",
        "enabled = true",
        "listen = 10110",
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

    def start_interceptor(self, log: Path | None = None) -> None:
        """`log`: its log lines (stderr) go to that file."""
        started = time.time()
        with contextlib.ExitStack() as files:
            stderr = files.enter_context(log.open("ab")) if log is not None else None
            self.interceptor = self.lab.spawn(
                self.lab.gateway, [PYTHON, "-m", "proxies.cli", "intercept", "--config",
                                   str(self.config)], cwd=ROOT, stderr=stderr)
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


def make_gateway(lab: Lab, tmp_path: Path, fail: str = "open",
                 extra: tuple[str, ...] = ()) -> Gateway:
    for family, prefix in ((4, 24), (6, 64)):
        lab.ip(lab.sender, f"-{family}", "addr", "add", f"{BYPASSED[family]}/{prefix}",
               "dev", "eth0", *(["nodad"] if family == 6 else []))
    config, stats = tmp_path / "mailgate.toml", tmp_path / "interceptor.json"
    config.write_text(config_text(lab, stats, fail, extra))
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

    # The proxy dies: new connections go to the server directly, within a second. Timed from
    # the kill to the moment the interceptor changed its decision (the `since` of the proxy's
    # health in its stats), not through a client process: spawning one costs more than that.
    gw.kill_relay()
    killed_at = time.time()
    down = gw.wait_stats(lambda s: all(not p["accepting"] for p in s["proxies"]),
                         "every proxy seen down")
    took = max(p["since"] for p in down["proxies"]) - killed_at
    assert took < 1.0, (took, down["proxies"])
    # From then on the very next connection is not intercepted: no retries needed.
    for family in (4, 6):
        answer = gw.connect(family)
        assert answer["ok"] and not gw.intercepted(answer), answer
        assert answer["peer"][0] == (gw.lab.sender.ipv4 if family == 4
                                     else gw.lab.sender.ipv6), answer
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
    # The new interceptor's counters start at zero: one connection intercepted, one bypassed.
    gw.wait_stats(lambda s: s["pid"] == gw.interceptor_pid()
                  and s["counters"]["bypassed_rule"] >= 1, "the bypass counted")
    status = gw.lab.run(gw.lab.gateway, [PYTHON, "-m", "proxies.cli", "status", "--config",
                                         str(gw.config)], cwd=ROOT)
    assert "running, bound to NFQUEUE 0" in status.stdout, status.stdout
    counters = dict(re.findall(r"\b(\w+)=(\d+)\b", status.stdout))
    assert counters.get("intercepted") == "1", status.stdout
    assert counters.get("bypassed_rule") == "1", status.stdout


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


# --- health that sees a blackhole, a proxy that hangs, and boot with fail = "closed" ----------

PARALLEL = """
import json, sys, threading
from tests.lab.tcp_probes import _connect
timeout = float(sys.argv[1])
targets = [target.split("/") for target in sys.argv[2:]]  # address:port/source
results = [None] * len(targets)
def one(index):
    results[index] = _connect(targets[index][0], targets[index][1], timeout)
threads = [threading.Thread(target=one, args=(i,)) for i in range(len(targets))]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
for result in results:
    print(json.dumps(result), flush=True)
"""


def start_parallel(gw: Gateway, count: int, timeout: float) -> JsonLines:
    """`count` connections per family from the sender to the server's port 25, all at once,
    in the background; their results come as JSON lines when all have ended."""
    # From the sender's own address: the bypassed one (also on its interface) might be chosen.
    sender, server = gw.lab.sender, gw.lab.server
    targets = [f"[{host}]:25/{source}"
               for host, source in ((server.ipv4, sender.ipv4), (server.ipv6, sender.ipv6))
               for _ in range(count)]
    return JsonLines(gw.lab.spawn(gw.lab.sender, [PYTHON, "-c", PARALLEL, str(timeout),
                                                  *targets], stdout=subprocess.PIPE, cwd=ROOT))


def results_of(lines: JsonLines, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The `count` results `start_parallel` prints once all its connections have ended."""
    lines.wait_for(lambda e: "ok" in e, timeout=timeout, what="connection results")
    results = [e for e in lines.settle(0.5) if "ok" in e]
    assert len(results) == count, lines.events
    return results


def conditions(stats: dict[str, Any]) -> dict[tuple[str, int], str]:
    return {(p["service"], p["family"]): p["condition"] for p in stats["proxies"]}


def log_events(log: Path, name: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if f"event={name} " in line]


def status_text(gw: Gateway) -> str:
    return gw.lab.run(gw.lab.gateway, [PYTHON, "-m", "proxies.cli", "status", "--config",
                                       str(gw.config)], cwd=ROOT).stdout


# Two ways the proxy's answers never reach the client, applied and removed in the lab:
# "lost": the gateway's own SYN-ACKs (TTL/hop limit 64; the server's, forwarded by the gateway,
#   arrive with 63) are dropped at the sender: half-open connections pile up on the gateway.
# "unroutable": the gateway has no route for its own packets from port 25 (a policy rule for
#   locally made packets, `iif lo`): no SYN-ACK is made at all and the listener counts drops.
#   This is the class of failure the old bridge-mode default config caused.
BREAKS = {
    "lost": ("sender", [
        ["nft", "add", "table", "inet", "mgtest"],
        ["nft", "add", "chain", "inet", "mgtest", "in",
         "{ type filter hook input priority 0; }"],
        ["nft", "add", "rule", "inet", "mgtest", "in", "ip", "ttl", "64", "tcp", "sport", "25",
         "tcp", "flags", "&", "(syn|ack)", "==", "syn|ack", "drop"],
        ["nft", "add", "rule", "inet", "mgtest", "in", "ip6", "hoplimit", "64", "tcp", "sport",
         "25", "tcp", "flags", "&", "(syn|ack)", "==", "syn|ack", "drop"],
    ], [["nft", "delete", "table", "inet", "mgtest"]]),
    "unroutable": ("gateway", [
        ["ip", f"-{family}", "rule", "add", "priority", "100", "iif", "lo", "ipproto", "tcp",
         "sport", "25", "prohibit"] for family in (4, 6)
    ], [["ip", f"-{family}", "rule", "del", "priority", "100"] for family in (4, 6)]),
}


@pytest.mark.parametrize("kind", sorted(BREAKS))
def test_connections_that_never_complete_fail_open_and_recover(
        lab_factory: LabFactory, tmp_path: Path, kind: str) -> None:
    lab = lab_factory("router")
    # Half-open connections then expire after ~7 s instead of ~63 s (1 + 2 + 4 s of SYN-ACK
    # retries), so that recovery is quick to see.
    lab.sysctl(lab.gateway, "net.ipv4.tcp_synack_retries", "2")
    gw = make_gateway(lab, tmp_path)
    log = tmp_path / "interceptor.log"
    gw.start_relay()
    gw.start_interceptor(log)
    for family in (4, 6):
        assert gw.intercepted(gw.connect(family)), family
    where, apply, remove = BREAKS[kind]
    host = lab.sender if where == "sender" else lab.gateway
    for argv in apply:
        lab.run(host, argv)
    broken_at = time.monotonic()
    # Clients that arrive now hang ... (for up to 40 s: their SYN retransmissions, at 1, 3, 7,
    # 15 and 31 s, find the proxy's half-open request socket while it lives, and each one that
    # does restarts its timer (tcp_check_req), so a client may need its 15 s or, rarely, its
    # 31 s one to reach the server; with 20 s, 1 of 8 clients timed out in 2 of ~10 runs.)
    hanging = start_parallel(gw, 4, timeout=40)
    stats = gw.wait_stats(
        lambda s: {conditions(s)[("smtp", f)] for f in (4, 6)} == {"not_completing"},
        "smtp not_completing in both families", timeout=12)
    took = time.monotonic() - broken_at
    assert took < 8, took  # STUCK_AFTER (3 s) / the drops plus a WINDOW, and some slack
    smtp4 = next(p for p in stats["proxies"] if (p["service"], p["family"]) == ("smtp", 4))
    assert smtp4["accepting"] is False and smtp4["action"] == "passing new connections"
    # The listener counts each SYN that led nowhere: unroutable ones, and (lost) the clients'
    # retransmitted SYNs that find their half-open connection still waiting.
    assert smtp4["half_open_stuck"] + smtp4["listen_drops"] >= 3, smtp4
    if kind == "unroutable":
        assert smtp4["half_open_stuck"] == 0, smtp4  # no request socket is ever made
    # ... POP3 is not hit (its SYN-ACKs are not dropped by the break), so it keeps intercepting.
    assert conditions(stats)[("pop3", 4)] == "accepting"
    # New connections now go straight to the real server: its greeting, the sender's address.
    for family in (4, 6):
        answer = gw.connect(family)
        assert answer["ok"] and not gw.intercepted(answer), answer
        assert answer["greeting"].startswith("PEER "), answer
    # And those that were hanging get through too: their retransmitted SYNs are passed.
    results = results_of(hanging, 8, timeout=50)
    assert all(r["ok"] and r["greeting"].startswith("PEER ") for r in results), results
    # Said once, with the reason, and shown by `mailgate status`.
    down = [line for line in log_events(log, "interceptor_health_changed")
            if "condition=not_completing" in line]
    assert len(down) == 2, log.read_text()  # IPv4 and IPv6, once each
    assert all("level=warning" in line and 'reason="intercepted connections do not complete'
               in line and 'action="passing new connections"' in line for line in down), down
    shown = status_text(gw)
    assert "health smtp ipv4 (port 10025): UNHEALTHY" in shown, shown
    assert "intercepted connections do not complete" in shown, shown
    # The path is mended: once the stuck ones are gone (and the hold), interception resumes.
    for argv in remove:
        lab.run(host, argv)
    gw.wait_stats(lambda s: set(conditions(s).values()) == {"accepting"}, "all accepting",
                  timeout=25)
    for family in (4, 6):
        gw.until(family, want_intercepted=True, what="intercepted after the mend")
    up = [line for line in log_events(log, "interceptor_health_changed")
          if "condition=accepting" in line]
    assert len(up) == 2 and all("level=info" in line for line in up), log.read_text()


def test_a_proxy_that_listens_but_hangs(lab_factory: LabFactory, tmp_path: Path) -> None:
    gw = make_gateway(lab_factory("router"), tmp_path, extra=('accept_stall = "1s"',))
    log = tmp_path / "interceptor.log"
    relay = gw.start_relay()
    gw.start_interceptor(log)
    assert gw.intercepted(gw.connect(4))
    relay.process.send_signal(signal.SIGSTOP)  # still listening; the kernel still completes
    try:
        answer = gw.connect(4, timeout=2)  # TCP connects, the proxy never says a word
        assert not answer["ok"] and "timed out" in answer["error"], answer
        stats = gw.wait_stats(lambda s: conditions(s)[("smtp", 4)] == "not_accepting",
                              "smtp not_accepting", timeout=5)
        smtp4 = next(p for p in stats["proxies"] if (p["service"], p["family"]) == ("smtp", 4))
        assert smtp4["reason"].startswith("listening but not accepting: 1 connection(s)"), smtp4
        answer = gw.connect(4)
        assert answer["ok"] and answer["greeting"].startswith("PEER "), answer
        assert answer["peer"][0] == gw.lab.sender.ipv4  # the real server, directly
        line, = [line for line in log_events(log, "interceptor_health_changed")
                 if "condition=not_accepting" in line]
        assert "level=warning" in line and "example=" in line, line
    finally:
        relay.process.send_signal(signal.SIGCONT)
    gw.wait_stats(lambda s: conditions(s)[("smtp", 4)] == "accepting", "smtp accepting again")
    gw.until(4, want_intercepted=True, what="intercepted after SIGCONT")


def test_fail_closed_holds_new_connections_until_the_interceptor_runs(
        lab_factory: LabFactory, tmp_path: Path) -> None:
    """Boot order with fail = "closed": netsetup is applied, nothing is bound to the queue yet."""
    gw = make_gateway(lab_factory("router"), tmp_path, fail="closed")
    rules = gw.lab.run(gw.lab.gateway, ["iptables-legacy-save", "-t", "mangle"]).stdout
    queued = [line for line in rules.splitlines() if "-j NFQUEUE" in line]
    assert queued and not [line for line in queued if "--queue-bypass" in line], rules
    # What netsetup reads back is what it asked for: nothing to change.
    status = gw.lab.run(gw.lab.gateway, [PYTHON, "-m", "netsetup.cli", "--config",
                                         str(gw.config), "--state-file",
                                         str(tmp_path / "netsetup-state.json"), "status"],
                        check=False, cwd=ROOT)
    assert status.returncode == 0, status.stdout + status.stderr
    for family in (4, 6):
        answer = gw.connect(family, timeout=3)
        assert not answer["ok"] and "timed out" in answer["error"], answer
    assert not [e for e in gw.server.settle(0.1) if e["event"] == "connection"]
    assert "held" in status_text(gw)
    # A client that keeps trying (as an MTA does) is held, then intercepted once it is up.
    waiting = start_parallel(gw, 1, timeout=20)
    time.sleep(1.5)
    gw.start_relay()
    gw.start_interceptor()
    results = results_of(waiting, 2)
    assert all(r["ok"] and gw.intercepted(r) for r in results), results
    for family in (4, 6):
        assert gw.intercepted(gw.connect(family)), family
