"""The SMTP acceptor workers under `kill -9` (router mode, smtp.workers = 2, smtp-sink as the
server): the master replaces killed workers and SMTP answers again within seconds; a killed
master (workers and all) is started again as systemd would, recovers its queue and delivers it;
workers that keep dying make the master give up with exit status 1 (for systemd to restart).
In both cases every message a client got its `250` for arrives (twice is allowed: a message
can be delivered and then killed before the queue heard of it).

The load is a bounded loop of smtplib transactions from the sender, several threads, each
retrying with a fresh Message-ID when a session breaks; only the Message-IDs that got a `250`
are counted as accepted.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import secrets
import signal
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from netsetup.lab.peers._common import wait_until
from netsetup.lab.peers.sink import SmtpSink
from netsetup.lab.topology import Lab
from tests.lab.smtp_helpers import (
    SENDER_DOMAIN,
    Gateway,
    RawSmtp,
    message,
    per_test,
    qid_of,
    server_address,
    smtp_client,
)

WORKERS = 2
THREADS = 4
MESSAGES = 240
KILL_AFTER = 60
ANSWER_AGAIN_WITHIN = 5.0


@dataclass
class Env:
    lab: Lab
    base: Path
    gateways: list[Gateway] = field(default_factory=list)
    peers: list[Callable[[], None]] = field(default_factory=list)

    def gateway(self, name: str, **smtp: object) -> Gateway:
        gateway = Gateway(self.lab, self.base / name)
        # Per client: every load thread and the probe, and no more: connections a dead
        # worker did not release would lock the sender out.
        gateway.write_config(workers=WORKERS, max_connections_per_client=THREADS + 1,
                             **smtp)  # type: ignore[arg-type]
        self.gateways.append(gateway)
        return gateway.start()

    def sink(self, name: str) -> SmtpSink:
        sink = SmtpSink.start(self.lab, self.lab.server, self.base / name, dump=True)
        self.peers.append(sink.stop)
        return sink

    def cleanup(self) -> None:
        for gateway in self.gateways:
            for pid in [*live_workers(gateway), *master_pid(gateway)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if gateway.process is not None:
                with contextlib.suppress(Exception):
                    gateway.process.wait(timeout=10)
        self.gateways.clear()
        for stop in self.peers:
            stop()
        self.peers.clear()


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("smtp-workers")
    lab = Lab("router", name="wrk" + secrets.token_hex(2))
    try:
        lab.up()
        Gateway(lab, base / "network").apply_network()
        yield Env(lab, base)
    finally:
        lab.down()


@pytest.fixture
def env(lab_env: Env, tmp_path: Path) -> Iterator[Env]:
    yield from per_test(lab_env, tmp_path)


def master_pid(gateway: Gateway) -> list[int]:
    process = gateway.process
    return [process.pid] if process is not None and process.poll() is None else []


def live_workers(gateway: Gateway) -> list[int]:
    """The workers the master's log says are running (started, not yet exited)."""
    started = [int(e["pid"]) for e in gateway.events("worker_started")]
    exited = {int(e["pid"]) for e in gateway.events("worker_exited")}
    return [pid for pid in started if pid not in exited and os.path.exists(f"/proc/{pid}")]


def answers(lab: Lab) -> bool:
    """Whether a new connection through the gateway gets a 220 greeting."""
    try:
        with RawSmtp(lab.sender, server_address(lab), 25, timeout=2) as raw:
            greeting = raw.reply()
            raw.command(b"QUIT")
            return greeting.startswith(b"220")
    except OSError:
        return False


def send_one(client: smtplib.SMTP, content: bytes) -> str:
    """One transaction; the queue id from the 250 to DATA (smtplib's sendmail drops it)."""
    client.ehlo_or_helo_if_needed()
    code, text = client.mail(f"load@{SENDER_DOMAIN}")
    assert code == 250, (code, text)
    code, text = client.rcpt("alice@example.com")
    assert code == 250, (code, text)
    code, text = client.data(content)
    if code != 250:
        raise smtplib.SMTPDataError(code, text)
    return qid_of(text)


class Load:
    """THREADS senders over MESSAGES message numbers; a broken session is retried with a new
    Message-ID, so `accepted` holds exactly the IDs that got a 250."""

    def __init__(self, lab: Lab, tag: str) -> None:
        self.lab = lab
        self.tag = tag
        self.accepted: dict[str, str] = {}  # Message-ID -> the queue id the client was told
        self.failed: list[str] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._sender, args=(i,), name=f"load-{i}")
                        for i in range(THREADS)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=180)
        assert not any(t.is_alive() for t in self.threads), "load threads still running"

    def _sender(self, index: int) -> None:
        client = None
        server = server_address(self.lab)
        for number in range(index, MESSAGES, THREADS):
            attempt = 0
            while True:
                mid = f"{self.tag}-{number}-{attempt}@{SENDER_DOMAIN}"
                try:
                    if client is None:
                        client = smtp_client(self.lab.sender, server, timeout=10)
                    qid = send_one(client, message(f"{self.tag} {number}", message_id=mid))
                    with self.lock:
                        self.accepted[mid] = qid
                    break
                except Exception as exc:
                    with self.lock:
                        self.failed.append(mid)
                        self.errors[type(exc).__name__] += 1
                    if client is not None:
                        with contextlib.suppress(Exception):
                            client.close()
                        client = None
                    attempt += 1
                    if attempt >= 200:
                        return  # the gateway did not come back: the test fails on the count
                    time.sleep(0.05)
        if client is not None:
            with contextlib.suppress(Exception):
                client.quit()


def received(sink: SmtpSink) -> collections.Counter[str]:
    ids: collections.Counter[str] = collections.Counter()
    for sunk in sink.messages():
        match = re.search(rb"Message-ID: <([^>]+)>", sunk.content)
        if match:
            ids[match.group(1).decode()] += 1
    return ids


def check_all_delivered(load: Load, gateways: list[Gateway], sink: SmtpSink,
                        what: str) -> None:
    numbers = {mid.rsplit("-", 1)[0] for mid in load.accepted}
    assert len(numbers) == MESSAGES, f"only {len(numbers)} of {MESSAGES} message numbers got a 250"
    gateways[-1].wait_queue_empty(timeout=60)
    wait_until(lambda: set(load.accepted) <= set(received(sink)),
               "every accepted message at the sink", 30, sink.process, (sink.log_path,))
    counts = received(sink)
    lost = [mid for mid in load.accepted if counts[mid] == 0]
    duplicated = {mid: counts[mid] for mid in load.accepted if counts[mid] > 1}
    unacknowledged = [mid for mid in load.failed if counts[mid]]
    print(f"{what}: {len(load.accepted)} accepted, {len(load.failed)} attempts without a 250 "
          f"({dict(load.errors)}; {len(unacknowledged)} of them delivered anyway), "
          f"{sum(counts[m] for m in load.accepted)} deliveries of accepted messages, "
          f"{len(duplicated)} duplicated: {sorted(duplicated)}")
    assert not lost
    delivered: set[str] = set()
    for gateway in gateways:
        delivered |= {e["qid"] for e in gateway.events("delivery")
                      if e["reply"].startswith("250")}
    assert set(load.accepted.values()) <= delivered
    for gateway in gateways:
        assert "Traceback" not in gateway.log()


def test_kill_9_every_worker_under_load(env: Env) -> None:
    lab = env.lab
    sink = env.sink("sink")
    gateway = env.gateway("gateway")
    first = live_workers(gateway)
    assert len(first) == WORKERS, gateway.events("worker_started")
    load = Load(lab, "workers").start()
    try:
        wait_until(lambda: len(load.accepted) >= KILL_AFTER, f"{KILL_AFTER} accepted", 60)
        at_kill = len(load.accepted)
        killed_at = time.monotonic()
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        back = wait_until(lambda: answers(lab), "an SMTP greeting after the kill",
                          ANSWER_AGAIN_WITHIN + 5, gateway.process, (gateway.log_path,))
        print(f"kill -9 of {WORKERS} workers after {at_kill} accepted: SMTP answered again "
              f"after {time.monotonic() - killed_at:.2f} s")
        assert back <= ANSWER_AGAIN_WITHIN
    finally:
        load.join()
    assert gateway.process is not None and gateway.process.poll() is None  # the master lives

    exited = {int(e["pid"]): e for e in gateway.events("worker_exited")}
    for pid in first:
        assert exited[pid]["signal"] == "SIGKILL", exited
        assert exited[pid]["expected"] == "False"
    replacements = live_workers(gateway)
    assert len(replacements) == WORKERS and not set(replacements) & set(first)
    ready = {int(e["pid"]) for e in gateway.events("worker_ready")}
    assert set(replacements) <= ready  # the new ones said they listen
    check_all_delivered(load, [gateway], sink, "kill -9 of every worker")
    # The dead workers' connections were released: the sender may again have its limit of
    # connections at once (a leak of the killed sessions would leave room for one).
    released = sum(int(e["connections"]) for e in gateway.events("worker_connections_released"))
    probes = [RawSmtp(lab.sender, server_address(lab), 25) for _ in range(THREADS + 1)]
    try:
        greetings = [probe.reply() for probe in probes]
    finally:
        for probe in probes:
            probe.close()
    assert all(g.startswith(b"220") for g in greetings), (released, greetings)

    # SIGTERM still stops everything, the replacements included, and nothing is respawned;
    # as systemd stops a unit (KillMode=control-group): the main process, then the rest.
    assert gateway.process is not None
    begun = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    for pid in replacements:
        os.kill(pid, signal.SIGTERM)
    code = gateway.process.wait(timeout=15)
    seconds = time.monotonic() - begun
    assert code == 0 and seconds < 5, (code, seconds)
    after_kill = [e for e in gateway.events("worker_exited") if int(e["pid"]) in replacements]
    assert {int(e["pid"]) for e in after_kill} == set(replacements)
    assert all(e["expected"] == "True" for e in after_kill), after_kill
    assert len(gateway.events("worker_started")) == 2 * WORKERS
    assert not any(os.path.exists(f"/proc/{pid}") for pid in replacements)


def test_kill_9_master_and_workers_then_restart_recovers_the_queue(env: Env) -> None:
    """The server is down until after the restart, so what was accepted before the kill is
    all in the queue: recovered from disk by the second master, then delivered."""
    lab = env.lab
    # verify_recipients = false: with the server down, recipient verification would answer
    # 450 4.1.1 at RCPT and nothing would be queued for the kill to put at risk.
    gateway = env.gateway("gateway", verify_recipients=False)
    load = Load(lab, "master").start()
    try:
        wait_until(lambda: len(load.accepted) >= KILL_AFTER, f"{KILL_AFTER} accepted", 60)
        victims = [*master_pid(gateway), *live_workers(gateway)]
        assert len(victims) == 1 + WORKERS
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        assert gateway.process is not None
        gateway.process.wait(timeout=10)
        wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in victims),
                   "the killed processes gone", 10)
        with load.lock:
            before_restart = set(load.accepted.values())
        # systemd's Restart=on-failure, RestartSec=3 (shortened): the same command again.
        time.sleep(0.5)
        gateway.start()
        (recovered,) = gateway.events("queue_recovered")[1:]
        print(f"restart after kill -9 of the master and {WORKERS} workers, "
              f"{len(before_restart)} accepted before: queue_recovered {recovered}")
        assert int(recovered["queued"]) + int(recovered["requeued_active"]) >= \
            len(before_restart)
        listed = {e["queue_id"] for e in gateway.queue_list()}
        assert before_restart <= listed
        assert len(live_workers(gateway)) == WORKERS
    finally:
        load.join()
    sink = env.sink("sink")
    check_all_delivered(load, [gateway], sink, "kill -9 of the master")


def test_workers_that_keep_dying_make_the_master_exit_1(env: Env) -> None:
    """Every worker killed as soon as it appears: within the crash limit (10 exits in 60 s)
    the master gives up, stops and exits 1, leaving no worker behind."""
    gateway = env.gateway("gateway")
    process = gateway.process
    assert process is not None
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        for pid in live_workers(gateway):
            if pid not in killed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.02)
    assert process.wait(timeout=15) == 1
    (failing,) = gateway.events("workers_failing")
    assert int(failing["exits"]) == 10
    assert gateway.events("stopped", exit_code="1")
    assert not any(os.path.exists(f"/proc/{pid}") for pid in killed)
    assert "Traceback" not in gateway.log()
    print(f"gave up after {len(killed)} workers killed: {failing}")
