"""The SMTP proxy's queue with real peers (router mode): mail waits while the server is down and
goes once it is back; a server's permanent refusal and an expired queue lifetime send a DSN
that the gateway delivers to the sender's own Postfix; SIGTERM stops `mailgate run` cleanly
with the queue intact; `kill -9` under load loses no message that got its `250`.

The sender's Postfix listens on its lab address too, and the gateway routes sender.example
there by its transport table: that is how a bounce finds its way back.
"""

from __future__ import annotations

import collections
import re
import smtplib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from netsetup.lab.peers._common import wait_until
from netsetup.lab.peers.postfix import Delivery, Postfix, PostfixInstance
from netsetup.lab.peers.sink import SmtpSink, swaks
from netsetup.lab.topology import Lab
from tests.lab.smtp_helpers import (
    GATEWAY_HOSTNAME,
    SENDER_DOMAIN,
    Gateway,
    kill_gateways,
    message,
    per_test,
    qid_of,
    sender_address,
    server_address,
    smtp_client,
)

# Where the gateway sends mail for the sender's domain (bounces): the sender's Postfix.
SENDER_ROUTE = {SENDER_DOMAIN: "192.0.2.10:25"}


@dataclass
class Env:
    lab: Lab
    sender: PostfixInstance
    base: Path
    gateways: list[Gateway] = field(default_factory=list)
    peers: list[Callable[[], None]] = field(default_factory=list)
    count: int = 0

    def gateway(self, **smtp: object) -> Gateway:
        """A fresh `mailgate run` (own folder, own queue), started."""
        self.count += 1
        gateway = Gateway(self.lab, self.base / f"gateway{self.count}")
        # verify_recipients = false: these tests are about what the queue does with mail
        # accepted while the server is down or for recipients it refuses at delivery, which
        # recipient verification would refuse at RCPT (tests/lab/test_smtp_verify.py).
        smtp = {"verify_recipients": False, **smtp}
        gateway.write_config(transport=SENDER_ROUTE, **smtp)  # type: ignore[arg-type]
        self.gateways.append(gateway)
        return gateway.start()

    def receiver(self, **kwargs: object) -> PostfixInstance:
        self.count += 1
        instance = Postfix.receiver(self.lab, self.lab.server, ["example.com"],
                                    self.base / f"receiver{self.count}", **kwargs)  # type: ignore[arg-type]
        self.peers.append(instance.stop)
        return instance

    def cleanup(self) -> None:
        kill_gateways(self.gateways)
        for stop in self.peers:
            stop()
        self.peers.clear()


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("smtp-queue")
    lab = Lab("router")
    try:
        lab.up()
        first = Gateway(lab, base / "network")
        first.apply_network()
        hop = f"[{server_address(lab)}]:25"
        # Listening on its lab address too: the gateway brings bounces there.
        sender = Postfix.sender(lab, lab.sender, {"example.com": hop}, base / "sender",
                                listen=["127.0.0.1:25", f"{sender_address(lab)}:25"])
        yield Env(lab, sender, base)
    finally:
        lab.down()


@pytest.fixture
def env(lab_env: Env, tmp_path: Path) -> Iterator[Env]:
    yield from per_test(lab_env, tmp_path)


def dsns(sender: PostfixInstance, before: int) -> list[Delivery]:
    return [d for d in sender.deliveries()[before:]
            if b"Content-Type: multipart/report" in d.raw]


def wait_dsns(sender: PostfixInstance, before: int, count: int = 1,
              timeout: float = 20) -> list[Delivery]:
    wait_until(lambda: len(dsns(sender, before)) >= count, f"{count} DSN(s) at the sender",
               timeout, sender.process, (sender.log_path,))
    return dsns(sender, before)


def test_server_down_queued_retried_then_delivered(env: Env) -> None:
    gateway = env.gateway()
    content = message("while-the-server-is-down")
    result = swaks(env.lab, env.lab.sender, server_address(env.lab),
                   mail_from=f"hal@{SENDER_DOMAIN}", rcpt="alice@example.com", data=content)
    qid = qid_of(result.stdout)

    def retried() -> bool:
        entries = {e["queue_id"]: e for e in gateway.queue_list()}
        return qid in entries and entries[qid]["attempts"] >= 2

    wait_until(retried, "two failed attempts", 15, gateway.process, (gateway.log_path,))
    (entry,) = gateway.queue_list()
    assert entry["queue_id"] == qid
    assert entry["status"] in ("deferred", "active")
    assert entry["recipients"][0]["status"] == "deferred"
    assert "refused" in (entry["last_error"] or "").lower(), entry
    assert entry["original_destination"] == [server_address(env.lab), 25]

    receiver = env.receiver()
    (delivery,) = receiver.wait_for_messages(1, timeout=15)
    assert delivery.content.endswith(content)
    gateway.wait_queue_empty()
    assert gateway.events("delivery", qid=qid)[-1]["reply"].startswith("250")


def test_retry_comes_within_seconds_of_the_server_coming_back(env: Env) -> None:
    """With the default scan interval (60 s) only the deferrals themselves can wake the
    scheduler: a message deferred with retry_max 4 s arrives within 5 s of the server's
    return, wherever in the backoff that falls."""
    gateway = env.gateway(retry_min="2s", retry_max="4s", queue_scan_interval="60s")
    result = swaks(env.lab, env.lab.sender, server_address(env.lab),
                   mail_from=f"oscar@{SENDER_DOMAIN}", rcpt="alice@example.com",
                   data=message("retried-on-time"))
    qid = qid_of(result.stdout)

    def attempts() -> int:
        entries = {e["queue_id"]: e for e in gateway.queue_list()}
        return int(entries[qid]["attempts"]) if qid in entries else 0

    # Three refused attempts (at 0, 2 and 6 s): the backoff is at retry_max now. Without the
    # wake-up the second would wait for the scan, a minute later.
    wait_until(lambda: attempts() >= 3, "three refused attempts", 15, gateway.process,
               (gateway.log_path,))
    sink = SmtpSink.start(env.lab, env.lab.server, env.base / "sink", dump=True)
    env.peers.append(sink.stop)
    back = time.monotonic()
    (sunk,) = sink.wait_for_messages(1, timeout=15)
    took = time.monotonic() - back
    assert took < 5, f"delivered {took:.1f} s after the server came back"
    assert b"Subject: retried-on-time" in sunk.content
    gateway.wait_queue_empty()
    assert gateway.events("delivery", qid=qid)[-1]["reply"].startswith("250")


def test_partial_refusal_delivers_the_rest_and_bounces_to_the_sender(env: Env) -> None:
    gateway = env.gateway()
    receiver = env.receiver(users=["alice@example.com"])
    before = len(env.sender.deliveries())
    content = message("one-known-one-unknown", to="alice@example.com, bob@example.com")
    env.sender.send(f"carol@{SENDER_DOMAIN}", ["alice@example.com", "bob@example.com"],
                    content)
    (delivery,) = receiver.wait_for_messages(1, timeout=15)
    assert delivery.header("X-Original-To") == "alice@example.com"
    (dsn,) = wait_dsns(env.sender, before)
    raw = dsn.raw.decode()
    assert f"From: Mail Delivery System <MAILER-DAEMON@{GATEWAY_HOSTNAME}>" in raw
    assert "Final-Recipient: rfc822; bob@example.com" in raw
    assert "alice@example.com" not in raw.split("Content-Type: message/delivery-status")[1] \
        .split("Content-Type: text/rfc822-headers")[0]
    assert "Status: 5.1.1" in raw
    assert re.search(r"Diagnostic-Code: smtp; 550 5\.1\.1", raw), raw
    assert "Subject: one-known-one-unknown" in raw  # the original headers come back
    assert dsn.header("X-Original-To") == f"carol@{SENDER_DOMAIN}"
    gateway.wait_queue_empty()
    bounced = gateway.wait_event("queue_bounced")
    assert bounced[0]["rcpts"] == "bob@example.com"


def test_queue_lifetime_expiry_bounces(env: Env) -> None:
    gateway = env.gateway(queue_lifetime="3s")
    before = len(env.sender.deliveries())
    started = time.monotonic()
    env.sender.send(f"ivan@{SENDER_DOMAIN}", ["alice@example.com"], message("never-delivered"))
    (dsn,) = wait_dsns(env.sender, before, timeout=25)
    assert time.monotonic() - started >= 3
    raw = dsn.raw.decode()
    assert "Final-Recipient: rfc822; alice@example.com" in raw
    assert "Status: 4.4.7" in raw  # RFC 3463: delivery time expired
    assert "Action: failed" in raw
    gateway.wait_queue_empty()


def test_sigterm_exits_promptly_and_the_queue_survives(env: Env) -> None:
    gateway = env.gateway()
    qids = []
    for index in range(2):
        result = swaks(env.lab, env.lab.sender, server_address(env.lab),
                       mail_from=f"judy@{SENDER_DOMAIN}", rcpt="alice@example.com",
                       data=message(f"survives-restart-{index}"))
        qids.append(qid_of(result.stdout))
    wait_until(lambda: all(e["attempts"] >= 1 for e in gateway.queue_list()),
               "first attempts", 10, gateway.process, (gateway.log_path,))
    code, seconds = gateway.stop()
    assert code == 0
    assert seconds < 5, seconds
    assert "event=stopped" in gateway.log(since_start=True)
    assert "Traceback" not in gateway.log()
    assert sorted(e["queue_id"] for e in gateway.queue_list()) == sorted(qids)

    gateway.start()
    receiver = env.receiver()
    got = receiver.wait_for_messages(2, timeout=15)
    assert sorted(d.content.split(b"Subject: ")[1].split(b"\r\n")[0] for d in got) == \
        [b"survives-restart-0", b"survives-restart-1"]
    gateway.wait_queue_empty()


# --- kill -9 under load ------------------------------------------------------------------------

MESSAGES = 300


def send_one(client: smtplib.SMTP, sender: str, rcpt: str, content: bytes) -> str:
    """One transaction; the queue id from the 250 to DATA (smtplib's sendmail drops it)."""
    client.ehlo_or_helo_if_needed()
    code, text = client.mail(sender)
    assert code == 250, (code, text)
    code, text = client.rcpt(rcpt)
    assert code == 250, (code, text)
    code, text = client.data(content)
    if code != 250:
        raise smtplib.SMTPDataError(code, text)
    return qid_of(text)

THREADS = 6
KILL_AFTER = 100


def test_kill_9_under_load_loses_nothing_acknowledged(env: Env, tmp_path: Path) -> None:
    """`kill -9` of the master while clients send and the gateway delivers to a live sink.

    With the default workers (one per core) the SIGKILL reaches the master only; the acceptor
    workers get SIGTERM through the parent-death signal and stop cleanly. Killing every process
    at once, with delivery held so the acknowledged mail is surely queued, and killing workers
    in the middle of their writes, are tests/lab/test_smtp_workers.py's
    (`test_kill_9_master_and_workers_then_restart_recovers_the_queue`,
    `test_kill_9_every_worker_under_load`). What this one adds: deliveries in flight at the
    kill. Checked: every message that got its 250 arrives; what had its 250 but no logged
    delivery before the restart was on disk, in the restarted master's own recovery report;
    a message may arrive twice (delivered, then killed before the queue heard of it), never
    more; how many did is printed.
    """
    lab = env.lab
    sink = SmtpSink.start(lab, lab.server, tmp_path / "sink", dump=True)
    env.peers.append(sink.stop)
    gateway = env.gateway()
    accepted: dict[str, str] = {}  # Message-ID -> the queue id the client was told
    failed: list[str] = []
    lock = threading.Lock()
    gateway_up = threading.Event()
    gateway_up.set()
    server = server_address(lab)

    def worker(index: int) -> None:
        client = None
        for number in range(index, MESSAGES, THREADS):
            attempt = 0
            while True:
                mid = f"load-{number}-{attempt}@{SENDER_DOMAIN}"
                try:
                    if client is None:
                        client = smtp_client(lab.sender, server, timeout=10)
                    qid = send_one(client, f"load@{SENDER_DOMAIN}", "alice@example.com",
                                   message(f"load {number}", message_id=mid))
                    with lock:
                        accepted[mid] = qid
                    break
                except Exception:
                    with lock:
                        failed.append(mid)
                    if client is not None:
                        try:
                            client.close()
                        finally:
                            client = None
                    attempt += 1
                    assert attempt < 50, "the gateway did not come back"
                    gateway_up.wait(30)
        if client is not None:
            try:
                client.quit()
            except Exception:
                client.close()

    threads = [threading.Thread(target=worker, args=(i,), name=f"load-{i}")
               for i in range(THREADS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(accepted) >= KILL_AFTER, f"{KILL_AFTER} accepted", 60)
        gateway_up.clear()
        gateway.kill()
        # Acknowledged by now but not delivered, as far as the log of the killed run says:
        # those must be on disk. (A 250 given later, by a worker still finishing, is on disk
        # too; a delivery that happened but was not logged is still queued: both only add.)
        with lock:
            acknowledged = set(accepted.values())
        delivered_before = {e["qid"] for e in gateway.events("delivery")
                            if e["reply"].startswith("250")}
        undelivered_at_kill = acknowledged - delivered_before
        gateway.start()
        gateway_up.set()
    finally:
        gateway_up.set()
        for thread in threads:
            thread.join(timeout=120)
    assert len(accepted) >= MESSAGES  # every message number got through once, at last
    gateway.wait_queue_empty(timeout=60)

    def received() -> collections.Counter[str]:
        ids: collections.Counter[str] = collections.Counter()
        for sunk in sink.messages():
            match = re.search(rb"Message-ID: <([^>]+)>", sunk.content)
            if match:
                ids[match.group(1).decode()] += 1
        return ids

    wait_until(lambda: set(accepted) <= set(received()), "every accepted message at the sink",
               30, sink.process, (sink.log_path,))
    counts = received()
    lost = [mid for mid in accepted if counts[mid] == 0]
    duplicated = {mid: counts[mid] for mid in accepted if counts[mid] > 1}
    assert not lost
    assert all(n == 2 for n in duplicated.values()), duplicated
    unacknowledged_delivered = [mid for mid in failed if counts[mid]]
    # The restarted master's recovery (the first start logged one too, of an empty queue).
    starts = gateway.events("queue_recovered")
    assert len(starts) == 2, starts
    recovered = starts[1]
    summary = (f"kill -9 after {len(acknowledged)} accepted, {len(undelivered_at_kill)} of them "
               f"undelivered; recovered {recovered}: {len(accepted)} accepted in total, "
               f"{len(failed)} attempts without a 250 ({len(unacknowledged_delivered)} of them "
               f"delivered anyway), {sum(counts[m] for m in accepted)} deliveries of accepted "
               f"messages, {len(duplicated)} duplicates")
    print(summary)
    assert int(recovered["queued"]) >= len(undelivered_at_kill), (recovered, summary)
    assert recovered["corrupt"] == "0", recovered
    # The queue ids the clients were told are the ones the log delivered.
    delivered_qids = {e["qid"] for e in gateway.events("delivery")
                      if e["reply"].startswith("250")}
    assert set(accepted.values()) <= delivered_qids
