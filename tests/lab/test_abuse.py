"""`mailgate run` under attack (issue 15, items 2-4): the CI slice of the abuse campaign.

One router-mode lab: smtp-sink and Dovecot in the server host, with the hostile POP3 server of
`netsetup.lab.abuse` on two more addresses there (a fake: no real server makes those faults on
demand); `mailgate run` with two SMTP workers, POP3 on and clamd scanning in the gateway. Every
attack comes from an address of its own in the sender host, so the per-client limits answer
each one apart; the probe clients (one SMTP, one POP3) use yet another address and must keep
getting their mail through, during the attack and after it. The limits are set low
(`LIMITS`), so floods and slow clients reach them within seconds.

What must hold: no reply is malformed or carries internal text; each limit answers with its
reply (421 4.7.0 past the connection limits, 421 4.4.2 for a slow client, 452 4.5.3 past the
recipients, 552 5.3.4 past the size, 500 5.5.2 for an overlong line); every attacking session
ends; every probe message is accepted and delivered, every message an attacker got a 250 for
too; memory stays bounded; and once mailgate has stopped, its log has no error line, no
traceback, no line that is not structured, no asyncio task warning and no client-caused warning
without the connection's id. `python -m bench.abuse` runs the same at length.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import secrets
import smtplib
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netsetup.lab.abuse import Tally, check_log, connection_flood_plan
from netsetup.lab.peers._common import in_netns, wait_until
from netsetup.lab.peers.clamd import Clamd
from netsetup.lab.peers.dovecot import DovecotInstance
from netsetup.lab.peers.sink import SmtpSink
from netsetup.lab.topology import Lab
from tests.lab.smtp_helpers import GATEWAY_HOSTNAME, HELO, Gateway, message, toml_value
from tests.lab.test_pop3_lab import BoundPOP3

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
USER, PASSWORD = "bob", "secret"
SERVER = "198.51.100.25"
HOSTILE, HOSTILE_GREETING = "198.51.100.26", "198.51.100.27"
PROBE_SOURCE = "192.0.2.20"
ATTACK_SOURCES = [f"192.0.2.{30 + n}" for n in range(12)]
FLOOD_SOURCES = [f"192.0.2.{60 + n}" for n in range(8)]
LIMITS: dict[str, dict[str, Any]] = {
    "smtp": {"max_connections": 60, "max_connections_per_client": 10,
             "command_timeout": "3s", "data_timeout": "4s", "max_message_size": "256K",
             "max_recipients": 20, "verify_timeout": "5s"},
    "pop3": {"max_connections": 40, "max_connections_per_client": 6, "client_timeout": "3s",
             "server_timeout": "3s", "connect_timeout": "3s", "keepalive_after": "1s",
             "keepalive_interval": "1s", "spool_threshold": "64K", "max_scan_size": "1M",
             "scan_timeout": "5s"},
}
ATTACK_SECONDS = 18.0
# What one process may grow by at its peak while attacked (VmHWM after - VmRSS before).
PEAK_GROWTH_BOUND = 96 << 20


def config_text(base: Path, log_level: str = "info", workers: int = 2) -> str:
    sections: dict[str, dict[str, Any]] = {
        "network": {"mode": "router", "intercept": ["smtp", "pop3"], "ipv6": False,
                    "spoof_source": True},
        "smtp": {"listen": 10025, "hostname": GATEWAY_HOSTNAME, "queue_dir": str(base / "queue"),
                 "relay_domains": ["example.com"], "retry_min": "1s", "retry_max": "2s",
                 "queue_scan_interval": "1s", "connect_timeout": "3s",
                 "delivery_timeout": "20s", "workers": workers, **LIMITS["smtp"]},
        "pop3": {"enabled": True, "listen": 10110, **LIMITS["pop3"]},
        "scan": {"clamd": f"unix:{base / 'clamd' / 'clamd.sock'}"},
        "quarantine": {"dir": str(base / "quarantine")},
        "log": {"level": log_level},
    }
    return "".join(f"[{name}]\n" + "".join(f"{key} = {toml_value(value)}\n"
                                           for key, value in values.items()) + "\n"
                   for name, values in sections.items())


@dataclass
class Env:
    lab: Lab
    base: Path
    gateway: Gateway
    sink: SmtpSink
    dovecot: DovecotInstance
    pop3_probe_message: bytes


def add_addresses(lab: Lab) -> None:
    for address in [PROBE_SOURCE, *ATTACK_SOURCES, *FLOOD_SOURCES]:
        lab.ip(lab.sender, "addr", "add", f"{address}/24", "dev", "eth0")
    for address in (HOSTILE, HOSTILE_GREETING):
        lab.ip(lab.server, "addr", "add", f"{address}/24", "dev", "eth0")


def start_hostile_pop3(lab: Lab) -> subprocess.Popen[bytes]:
    process = lab.spawn(lab.server, [PYTHON, "-m", "netsetup.lab.abuse", "pop3-server",
                                     "--listen", f"{HOSTILE}:110", "--greeting-listen",
                                     f"{HOSTILE_GREETING}:110"],
                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.strip() == b"ready", line
    return process


def build(lab: Lab, base: Path, log_level: str = "info", workers: int = 2) -> Env:
    """The lab's peers and a running mailgate (see the module docstring)."""
    add_addresses(lab)
    sink = SmtpSink.start(lab, lab.server, base / "sink", dump=True, backlog=1024)
    dovecot = DovecotInstance(lab, lab.server, base / "dovecot", {USER: PASSWORD}, SERVER, 110,
                              False).start()
    probe_message = message("pop3 probe", b"The POP3 probe's message.\r\n" * 20)
    stored = dovecot.deliver(USER, probe_message).read_bytes()
    start_hostile_pop3(lab)
    Clamd.start(lab, lab.gateway, base / "clamd", tcp=None)
    gateway = Gateway(lab, base / "gateway")
    gateway.config_path.write_text(config_text(base, log_level, workers))
    gateway.apply_network()
    gateway.start(timeout=30)
    return Env(lab, base, gateway, sink, dovecot, stored)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    tmp_path.chmod(0o755)  # Dovecot's and smtp-sink's users must reach their folders
    lab = Lab("router", name="abu" + secrets.token_hex(2))
    try:
        lab.up()
        yield build(lab, tmp_path)
    finally:
        lab.down()


# --- probes ------------------------------------------------------------------------------------


@dataclass
class Probe:
    """Legitimate clients from PROBE_SOURCE, one message (or one POP3 retrieval) after the
    other until stopped, each timed and labelled with the phase it ran in."""

    lab: Lab
    pop3_expected: bytes
    phase: str = "idle"
    smtp: list[tuple[str, float, str | None, str]] = field(default_factory=list)
    pop3: list[tuple[str, float, str | None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _count: int = 0

    def send_one(self) -> tuple[float, str | None, str]:
        self._count += 1
        mid = f"probe-{self._count}-{secrets.token_hex(3)}@sender.example"
        started = time.monotonic()
        try:
            def session() -> None:
                with smtplib.SMTP(SERVER, 25, local_hostname=HELO, timeout=15,
                                  source_address=(PROBE_SOURCE, 0)) as client:
                    client.sendmail("probe@sender.example", ["alice@example.com"],
                                    message(f"probe {self._count}", message_id=mid))
            in_netns(self.lab.sender, session)
            error = None
        except (OSError, smtplib.SMTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"
        return time.monotonic() - started, error, mid

    def fetch_one(self) -> tuple[float, str | None]:
        started = time.monotonic()

        def session() -> bytes:
            pop = BoundPOP3(SERVER, 110, timeout=15, source=(PROBE_SOURCE, 0))
            try:
                pop.user(USER)
                pop.pass_(PASSWORD)
                return b"".join(line + b"\r\n" for line in pop.retr(1)[1])
            finally:
                pop.quit()
        try:
            got = in_netns(self.lab.sender, session)
            error = None if got == self.pop3_expected else f"content differs: {got[:200]!r}"
        except (OSError, poplib.error_proto) as exc:
            error = f"{type(exc).__name__}: {exc}"
        return time.monotonic() - started, error

    def _smtp_loop(self) -> None:
        while not self._stop.is_set():
            phase = self.phase
            seconds, error, mid = self.send_one()
            self.smtp.append((phase, seconds, error, mid))
            self._stop.wait(0.2)

    def _pop3_loop(self) -> None:
        while not self._stop.is_set():
            phase = self.phase
            seconds, error = self.fetch_one()
            self.pop3.append((phase, seconds, error))
            self._stop.wait(0.5)

    def start(self) -> Probe:
        self._threads = [threading.Thread(target=self._smtp_loop, name="probe-smtp"),
                         threading.Thread(target=self._pop3_loop, name="probe-pop3")]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "a probe is stuck"

    def latencies(self, phase: str) -> list[float]:
        return sorted(seconds for p, seconds, error, _mid in self.smtp if p == phase and not error)


def percentiles(values: list[float]) -> str:
    if not values:
        return "no samples"
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return (f"p50 {statistics.median(values) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
            f"({len(values)} messages)")


# --- memory ------------------------------------------------------------------------------------


def mailgate_pids(gateway: Gateway) -> dict[str, int]:
    """The master and its live workers, by name."""
    assert gateway.process is not None
    pids = {"master": gateway.process.pid}
    for event in gateway.events("worker_started"):
        pid = int(event["pid"])
        if pid not in {int(e["pid"]) for e in gateway.events("worker_exited")}:
            pids[f"worker {event['slot']}"] = pid
    return pids


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


# --- the attack --------------------------------------------------------------------------------


def attack_plan(sessions_scale: float = 1.0, seconds: float = ATTACK_SECONDS,
                seed: int = 1) -> list[dict[str, Any]]:
    """The attacks of one campaign, each from its own address (see ATTACK_SOURCES)."""
    smtp, hostile, greeting, pop3 = [SERVER, 25], [HOSTILE, 110], [HOSTILE_GREETING, 110], \
        [SERVER, 110]

    def n(count: int) -> int:
        return max(1, int(count * sessions_scale))

    plan = [
        {"attack": "smtp_mutated", "target": smtp, "sessions": n(300), "concurrency": 8},
        {"attack": "smtp_slowloris", "target": smtp, "sessions": 12,
         "seconds": min(seconds, 12), "options": {"interval": 2.0}},
        {"attack": "smtp_data_trickle", "target": smtp, "sessions": 4,
         "seconds": min(seconds, 12), "options": {"interval": 1.0}},
        {"attack": "smtp_connection_flood", "target": smtp, "sessions": n(60),
         "options": {"per_round": 20, "hold": 1.0}},
        {"attack": "smtp_pipelined_flood", "target": smtp, "sessions": n(10), "concurrency": 2,
         "options": {"noops": 5000, "unread_bytes": 8 << 20}},
        {"attack": "smtp_huge", "target": smtp, "sessions": n(8), "concurrency": 2,
         "options": {"size": 2 << 20, "endless_seconds": 3.0}},
        {"attack": "smtp_tls_garbage", "target": smtp, "sessions": n(16), "concurrency": 4,
         "options": {"stall": 5.0}},
        {"attack": "smtp_half_closed", "target": smtp, "sessions": n(15), "concurrency": 3},
        {"attack": "pop3_hostile_server", "target": hostile, "sessions": n(30),
         "concurrency": 4},
        {"attack": "pop3_greeting_faults", "target": greeting, "sessions": n(12),
         "concurrency": 3},
        {"attack": "pop3_mutated", "target": pop3, "sessions": n(60), "concurrency": 4,
         "options": {"user": USER, "password": PASSWORD}},
        {"attack": "pop3_slowloris", "target": pop3, "sessions": 8,
         "seconds": min(seconds, 12), "options": {"interval": 2.0}},
    ]
    for index, entry in enumerate(plan):
        entry.setdefault("seconds", seconds)
        entry["source"] = ATTACK_SOURCES[index]
        entry["seed"] = seed
    return plan


def run_attacks(lab: Lab, plan: list[dict[str, Any]], timeout: float) -> dict[str, Tally]:
    """The plan's attacks at once, from the sender host, in a process of their own."""
    process = lab.spawn(lab.sender, [PYTHON, "-m", "netsetup.lab.abuse", "attack", "--plan",
                                     json.dumps(plan)],
                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"the attacks did not end within {timeout:.0f} s (a hang?):\n"
                             f"{err.decode(errors='replace')[-3000:]}") from None
    assert process.returncode == 0, err.decode(errors="replace")[-3000:]
    return {t["attack"]: Tally.from_json(t) for t in json.loads(out)}


def total_flood(lab: Lab, probe: Probe) -> dict[str, Tally]:
    """The whole connection limit flooded from more addresses than it has room for, at once
    (the probe may be refused meanwhile: that is the limit at work), then the probe given the
    time to get five messages through after it."""
    probe.phase = "total flood"
    limit = LIMITS["smtp"]["max_connections_per_client"]
    total = run_attacks(lab, connection_flood_plan((SERVER, 25), FLOOD_SOURCES, limit),
                        timeout=60)
    probe.phase = "after"
    wait_until(lambda: len([p for p in probe.smtp if p[0] == "after"]) >= 5,
               "probes after the attack", 60)
    return total


def describe(tally: Tally) -> str:
    return (f"{tally.attack:22} {tally.sessions:4d} sessions in {tally.seconds:5.1f} s "
            f"(longest {tally.longest_session:4.1f} s)  "
            f"replies {dict(sorted(tally.replies.items()))}  "
            f"outcomes {dict(sorted(tally.outcomes.items()))}")


def check_tallies(tallies: dict[str, Tally]) -> None:
    """What each attack must have met (see the module docstring)."""
    for tally in tallies.values():
        assert not tally.leaks, f"{tally.attack}: replies with internal text: {tally.leaks}"
        assert not tally.malformed, f"{tally.attack}: malformed replies: {tally.malformed}"
        assert not any(k.startswith("client error Timeout") for k in tally.outcomes), tally
    mutated = tallies["smtp_mutated"]
    assert mutated.sessions >= 100, describe(mutated)
    assert mutated.replies["250 2.0.0"] > 0 and mutated.replies["500 5.5.2"] > 0

    slow = tallies["smtp_slowloris"]
    limit = LIMITS["smtp"]["max_connections_per_client"]
    assert slow.outcomes["refused"] == slow.sessions - limit, describe(slow)
    # The whole command must arrive within command_timeout, however slowly it trickles in.
    assert slow.outcomes["timed out"] == limit, describe(slow)
    assert slow.replies["421 4.4.2"] == limit

    trickle = tallies["smtp_data_trickle"]
    # A byte a second is far inside data_timeout (4 s) per read, but far below min_data_rate
    # (500 bytes/s by default): each is ended about data_timeout after its 354.
    assert trickle.outcomes["timed out"] == trickle.sessions, describe(trickle)
    assert 3.5 <= trickle.longest_session < 6.5, describe(trickle)

    flood = tallies["smtp_connection_flood"]
    assert flood.peak_open <= limit and flood.replies["421 4.7.0"] > 0, describe(flood)

    pipelined = tallies["smtp_pipelined_flood"]
    assert pipelined.outcomes["noop replies as sent"] == pipelined.sessions // 5 + (
        pipelined.sessions % 5 > 0), describe(pipelined)
    assert pipelined.replies["452 4.5.3"] > 0 and pipelined.replies["421 4.7.0"] > 0

    huge = tallies["smtp_huge"]
    assert huge.replies["552 5.3.4"] > 0 and huge.replies["500 5.5.2"] > 0, describe(huge)

    for name in ("smtp_tls_garbage", "smtp_half_closed"):
        left = {k: v for k, v in tallies[name].outcomes.items() if "left open" in k}
        assert not left, describe(tallies[name])
    half = tallies["smtp_half_closed"]
    assert len(half.accepted_ids) == half.outcomes["message then eof: closed"], describe(half)

    hostile = tallies["pop3_hostile_server"]
    assert not {k: v for k, v in hostile.outcomes.items() if k.endswith("silent")}, \
        describe(hostile)
    greeting = tallies["pop3_greeting_faults"]
    assert "silent" not in greeting.outcomes, describe(greeting)
    pop3_slow = tallies["pop3_slowloris"]
    pop3_limit = LIMITS["pop3"]["max_connections_per_client"]
    assert pop3_slow.outcomes["refused"] == pop3_slow.sessions - pop3_limit, describe(pop3_slow)
    assert pop3_slow.outcomes["timed out"] == pop3_limit, describe(pop3_slow)


def received_ids(sink: SmtpSink) -> set[str]:
    ids = set()
    for sunk in sink.messages():
        match = re.search(rb"Message-ID: <([^>]+)>", sunk.content)
        if match:
            ids.add(match.group(1).decode(errors="replace"))
    return ids


def test_mailgate_under_attack(env: Env) -> None:
    lab, gateway = env.lab, env.gateway
    began = time.monotonic()
    probe = Probe(lab, env.pop3_probe_message).start()
    try:
        wait_until(lambda: len(probe.smtp) >= 10 and len(probe.pop3) >= 3, "idle probes", 60)
        pids = mailgate_pids(gateway)
        assert len(pids) == 3, pids
        before = {name: memory(pid) for name, pid in pids.items()}
        probe.phase = "attack"
        tallies = run_attacks(lab, attack_plan(), timeout=ATTACK_SECONDS + 60)
        total = total_flood(lab, probe)
    finally:
        probe.stop()
    after = {name: memory(pid) for name, pid in pids.items()}

    print()
    for tally in [*tallies.values()]:
        print(describe(tally))
    admitted = max(t.peak_open_all for t in total.values())
    refused = sum(t.replies["421 4.7.0"] for t in total.values())
    print(f"total connection flood: at most {admitted} admitted at once, {refused} refused "
          f"with 421 4.7.0 (max_connections {LIMITS['smtp']['max_connections']})")
    for name in pids:
        print(f"{name:9} RSS {before[name]['VmRSS'] >> 20} MiB before, "
              f"{after[name]['VmRSS'] >> 20} MiB after, peak {after[name]['VmHWM'] >> 20} MiB")
    print(f"SMTP probe: idle {percentiles(probe.latencies('idle'))}; "
          f"under attack {percentiles(probe.latencies('attack'))}")

    check_tallies(tallies)
    assert refused > 0 and admitted <= LIMITS["smtp"]["max_connections"], total
    for name in pids:
        growth = after[name]["VmHWM"] - before[name]["VmRSS"]
        assert growth < PEAK_GROWTH_BOUND, (name, before[name], after[name])

    slowest = sorted(probe.smtp, key=lambda p: -p[1])[:3]
    print(f"slowest probes: {[(p[0], round(p[1], 2), p[3]) for p in slowest]}")
    failed = [p for p in probe.smtp if p[2] is not None and p[0] != "total flood"]
    assert not failed, f"probe messages refused: {failed[:5]}"
    assert len(probe.latencies("attack")) >= 10, probe.smtp
    pop3_failed = [p for p in probe.pop3 if p[2] is not None]
    assert not pop3_failed, f"POP3 probe failures: {pop3_failed[:5]}"
    assert len([p for p in probe.pop3 if p[0] == "attack"]) >= 5, probe.pop3

    # Every message a client was told was accepted reaches the server.
    accepted = {mid for _p, _s, error, mid in probe.smtp if error is None}
    accepted |= set(tallies["smtp_half_closed"].accepted_ids)
    wait_until(lambda: accepted <= received_ids(env.sink), "accepted mail at the sink", 60)

    code, seconds = gateway.stop(timeout=30)
    assert code == 0 and seconds < 15, (code, seconds)
    report = check_log(gateway.log())
    print(f"log: {report.lines} lines, {len(report.errors)} level=error, warnings by event "
          f"{dict(report.warnings.most_common())}")
    print(f"whole test {time.monotonic() - began:.1f} s")
    assert report.clean, report.problems()
    # The conditions the attacks caused were each logged, with the connection's id.
    for event in ("smtp_connection_refused", "smtp_timeout", "smtp_message_too_big",
                  "smtp_tls_failed", "pop3_refused", "pop3_close"):
        assert report.events[event] > 0, (event, report.events)
    assert os.path.exists(f"/proc/{pids['master']}") is False
