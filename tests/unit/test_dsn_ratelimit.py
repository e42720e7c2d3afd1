"""Bounces only when unavoidable: the notification (DSN) rate limit per sender domain, and no
notification ever for a message our filter found to be spam or a virus.

The limiter is tested with its clock in the test's hands, across processes (one sqlite file),
and inside the queue: N bounces from one sender domain make only the limit's worth of DSNs, the
rest are bounced all the same, logged and counted. The spam/virus rule is tested from the real
handler and content filter (with a scanner that answers what the test says) to the queue.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from netsetup.configfile import ConfigError
from proxies import metrics
from proxies.config import SmtpConfig, load_config
from proxies.metrics.recorder import PrometheusRecorder, Recorder
from proxies.queue import DeliveryResult, Envelope, Queue
from proxies.queue.ratelimit import DB_FILE, BounceRateLimit, sender_domain
from proxies.scan.api import ScanResult
from proxies.scan.config import PolicyConfig, QuarantineConfig, ScanConfig
from proxies.scan.filter import ScanFilter
from proxies.smtp.handler import ClientInfo, GatewayHandler

ROOT = Path(__file__).resolve().parents[2]
CONTENT = b"From: someone@sender.example\r\nSubject: hi\r\n\r\nhello\r\n"
REFUSED = DeliveryResult(550, "5.1.1 <bob@example.com>: user unknown")
LATER = DeliveryResult(451, "4.7.1 try again later")
NOW = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def counted() -> Iterator[PrometheusRecorder]:
    """Metrics on, process-local, for the test's duration."""
    recorder = PrometheusRecorder()
    metrics.use(recorder)
    try:
        yield recorder
    finally:
        metrics.use(Recorder())


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [dict(getattr(r, "fields", {})) for r in caplog.records if r.getMessage() == name]


# --- the limiter --------------------------------------------------------------------------------


def test_at_most_the_limit_per_domain_in_a_sliding_window(tmp_path: Path) -> None:
    clock = Clock()
    limit = BounceRateLimit(tmp_path / DB_FILE, 3, 60.0, clock=clock)
    for at in (0.0, 10.0, 20.0):
        clock.now = NOW + at
        assert limit.reserve("sender.example") is not None
    clock.now = NOW + 30
    assert limit.reserve("sender.example") is None
    assert limit.reserve("other.example") is not None  # each domain has its own count
    # The first notification leaves the window at +60, the second at +70.
    clock.now = NOW + 60.5
    assert limit.reserve("sender.example") is not None
    assert limit.reserve("sender.example") is None
    clock.now = NOW + 70.5
    assert limit.reserve("sender.example") is not None
    assert limit.counted("sender.example") == 3


def test_a_cancelled_reservation_gives_its_slot_back(tmp_path: Path) -> None:
    limit = BounceRateLimit(tmp_path / DB_FILE, 1, 60.0, clock=Clock())
    taken = limit.reserve("sender.example")
    assert taken is not None and limit.reserve("sender.example") is None
    limit.cancel(taken)
    assert limit.reserve("sender.example") is not None


def test_a_clock_set_back_does_not_block_a_domain_until_it_catches_up(tmp_path: Path) -> None:
    clock = Clock()
    limit = BounceRateLimit(tmp_path / DB_FILE, 1, 60.0, clock=clock)
    assert limit.reserve("sender.example") is not None
    clock.now = NOW - 86400  # a day back: the entry is "in the future", forgotten
    assert limit.reserve("sender.example") is not None


def test_the_count_holds_across_processes_and_restarts(tmp_path: Path) -> None:
    """Four processes race for ten slots of one domain: exactly ten win."""
    script = textwrap.dedent("""\
        import sys
        from pathlib import Path
        from proxies.queue.ratelimit import BounceRateLimit
        limit = BounceRateLimit(Path(sys.argv[1]), 10, 3600.0)
        print(sum(limit.reserve("sender.example") is not None for _ in range(8)))
        """)
    path = tmp_path / DB_FILE
    runs = [subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True) for _ in range(4)]
    granted = [int(run.communicate(timeout=60)[0]) for run in runs]
    assert sum(granted) == 10, granted
    # A new limiter on the same file (a restart) sees the ten.
    assert BounceRateLimit(path, 10, 3600.0).reserve("sender.example") is None


@pytest.mark.parametrize(("sender", "domain"), [
    ("alice@Sender.Example", "sender.example"),
    ("alice@sender.example.", "sender.example"),
    ('"a@b"@sender.example', "sender.example"),
    ("postmaster", ""),
])
def test_sender_domain(sender: str, domain: str) -> None:
    assert sender_domain(sender) == domain


def test_config_keys_defaults_zero_and_bad_values(tmp_path: Path) -> None:
    defaults = SmtpConfig(queue_dir=tmp_path)
    assert (defaults.bounce_rate_limit, defaults.bounce_rate_window) == (10, 3600.0)
    limit = BounceRateLimit.for_queue(defaults)
    assert limit is not None and limit.path == tmp_path / DB_FILE
    assert BounceRateLimit.for_queue(SmtpConfig(queue_dir=tmp_path, bounce_rate_limit=0)) is None
    path = tmp_path / "mailgate.toml"
    path.write_text('[smtp]\nbounce_rate_limit = 3\nbounce_rate_window = "10m"\n')
    smtp = load_config(path).smtp
    assert (smtp.bounce_rate_limit, smtp.bounce_rate_window) == (3, 600.0)
    path.write_text('[smtp]\nbounce_rate_limit = -1\nbounce_rate_window = "0s"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert sorted((p.key, p.message) for p in caught.value.problems) == [
        ("smtp.bounce_rate_limit", "must be at least 0, got -1"),
        ("smtp.bounce_rate_window", "must be more than 0")]


# --- in the queue -------------------------------------------------------------------------------


def limited_queue(directory: Path, clock: Clock, limit: int = 10,
                  lifetime: float = 5 * 86400.0) -> Queue:
    queue = Queue(directory, hostname="gw.example.net", clock=clock, lifetime=lifetime)
    queue.bounce_limit = BounceRateLimit(directory / DB_FILE, limit, 3600.0, clock=clock)
    return queue


def bounce_one(queue: Queue, sender: str, verdict: str = "",
               result: DeliveryResult = REFUSED) -> Any:
    envelope = Envelope(sender=sender, recipients=("bob@example.com",), verdict=verdict)
    queue_id = asyncio.run(queue.accept(envelope, CONTENT))
    assert queue.claim(queue_id) is not None
    return queue.record_attempt(queue_id, {"bob@example.com": result})


def notifications(queue: Queue) -> list[str]:
    """The recipients of the notifications waiting in the queue."""
    return [e.envelope.recipients[0] for e in queue.list() if e.sender == ""]


def test_n_bounces_from_one_domain_make_only_the_limits_worth_of_dsns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        counted: PrometheusRecorder) -> None:
    caplog.set_level(logging.INFO, logger="mailgate")
    clock = Clock()
    queue = limited_queue(tmp_path, clock, limit=10)
    outcomes = [bounce_one(queue, f"user{n}@sender.example") for n in range(15)]
    outcomes += [bounce_one(queue, "someone@other.example") for _ in range(2)]
    # Every recipient is bounced and every message left the queue, notified or not.
    assert all(o.bounced == ("bob@example.com",) and o.removed for o in outcomes)
    assert [o.dsn_id is not None for o in outcomes] == [True] * 10 + [False] * 5 + [True] * 2
    assert {o.no_dsn for o in outcomes[10:15]} == {"rate_limited"}
    assert sorted(notifications(queue)) == sorted(
        [f"user{n}@sender.example" for n in range(10)] + ["someone@other.example"] * 2)
    # One line per withheld notification, with its queue id and the sender's domain.
    limited = events(caplog, "dsn_rate_limited")
    assert [e["qid"] for e in limited] == [o.queue_id for o in outcomes[10:15]]
    assert {(e["sender_domain"], e["limit"], e["window"]) for e in limited} == {
        ("sender.example", 10, "3600s")}
    assert [e["no_dsn"] for e in events(caplog, "queue_bounced")] == \
        ["-"] * 10 + ["rate_limited"] * 5 + ["-"] * 2
    get = counted.registry.get_sample_value
    assert get("mailgate_bounce_notifications_total", {"result": "sent"}) == 12
    assert get("mailgate_bounce_notifications_total", {"result": "rate_limited"}) == 5

    # After a restart (a new limiter on the same directory: the queue object keeps no count
    # of its own) it still holds; an hour later the domain may be told again.
    queue.bounce_limit = BounceRateLimit(tmp_path / DB_FILE, 10, 3600.0, clock=clock)
    assert bounce_one(queue, "late@sender.example").no_dsn == "rate_limited"
    clock.now += 3601
    assert bounce_one(queue, "later@sender.example").dsn_id is not None


def test_a_limit_of_zero_is_no_limit_and_the_null_sender_is_never_told(tmp_path: Path) -> None:
    queue = Queue(tmp_path, hostname="gw.example.net", clock=Clock())
    queue.bounce_limit = BounceRateLimit.for_queue(
        SmtpConfig(queue_dir=tmp_path, bounce_rate_limit=0))
    assert all(bounce_one(queue, f"u{n}@sender.example").dsn_id for n in range(12))
    outcome = bounce_one(queue, "")
    assert outcome.removed and outcome.dsn_id is None and outcome.no_dsn == "null_sender"
    assert not (tmp_path / DB_FILE).exists()


def test_a_notification_that_cannot_be_queued_is_not_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    queue = limited_queue(tmp_path, clock, limit=1)
    envelope = Envelope(sender="alice@sender.example", recipients=("bob@example.com",))
    queue_id = asyncio.run(queue.accept(envelope, CONTENT))
    queue.claim(queue_id)

    def disk_full(*args: object) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(queue, "_store_now", disk_full)
    with pytest.raises(OSError):
        queue.record_attempt(queue_id, {"bob@example.com": REFUSED})
    monkeypatch.undo()
    # The message is still queued, and its retry may still notify the sender.
    assert [e.queue_id for e in queue.list()] == [queue_id]
    clock.now += queue.retry_min
    queue.claim(queue_id)
    assert queue.record_attempt(queue_id, {"bob@example.com": REFUSED}).dsn_id is not None


def test_a_broken_limit_file_does_not_keep_the_sender_uninformed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailgate")
    (tmp_path / DB_FILE).write_bytes(b"not a database" * 100)
    queue = limited_queue(tmp_path, Clock())
    assert bounce_one(queue, "alice@sender.example").dsn_id is not None
    (failed,) = events(caplog, "bounce_rate_limit_failed")
    assert "not a database" in failed["error"]


# --- spam and viruses never bounce --------------------------------------------------------------


def test_no_notification_for_a_spam_or_virus_verdict_whatever_happens(
        tmp_path: Path, counted: PrometheusRecorder) -> None:
    clock = Clock()
    queue = Queue(tmp_path, hostname="gw.example.net", clock=clock, lifetime=3600.0)
    spam = bounce_one(queue, "spammer@sender.example", verdict="spam")
    virus = bounce_one(queue, "worm@sender.example", verdict="virus")
    assert (spam.bounced, spam.dsn_id, spam.no_dsn) == (("bob@example.com",), None,
                                                         "spam_verdict")
    assert (virus.dsn_id, virus.no_dsn) == (None, "virus_verdict")
    # Nor when the queue lifetime runs out.
    expired = bounce_one(queue, "spammer@sender.example", verdict="spam", result=LATER)
    assert expired.deferred and expired.dsn_id is None
    clock.now += 3600
    queue.claim(expired.queue_id)
    outcome = queue.record_attempt(expired.queue_id, LATER)
    assert outcome.bounced and outcome.dsn_id is None and outcome.no_dsn == "spam_verdict"
    assert notifications(queue) == []
    # A clean message (and a banned attachment's sender, who is likely real) is told.
    assert bounce_one(queue, "alice@sender.example").dsn_id is not None
    assert bounce_one(queue, "bob@sender.example", verdict="banned").dsn_id is not None
    get = counted.registry.get_sample_value
    assert get("mailgate_bounce_notifications_total", {"result": "spam_verdict"}) == 2
    assert get("mailgate_bounce_notifications_total", {"result": "virus_verdict"}) == 1


class Session:
    def __init__(self) -> None:
        self.mailgate_client = ClientInfo("203.0.113.7", 40000, ("198.51.100.25", 25), "1.1")
        self.host_name = "client.example"
        self.ssl = None
        self.extended_smtp = True


class FixedScanner:
    def __init__(self, result: ScanResult) -> None:
        self.result = result

    async def scan(self, content: bytes, envelope: object = None) -> ScanResult:
        return self.result


def send_through_filter(tmp_path: Path, queue: Queue, result: ScanResult,
                        **policy: str) -> str:
    """One SMTP transaction through the real handler and content filter; its DATA reply."""
    config = SmtpConfig(relay_domains=("example.com",), queue_dir=queue.directory,
                        hostname="gw.example.net", verify_recipients=False)
    scan = ScanConfig(policy=PolicyConfig(**policy),  # type: ignore[arg-type]
                      quarantine=QuarantineConfig(dir=tmp_path / "quarantine"))
    handler = GatewayHandler(config, queue, ScanFilter(scan, FixedScanner(result)))

    async def transaction() -> str:
        session, envelope = Session(), SmtpEnvelope()
        await handler.handle_MAIL(None, session, envelope,  # type: ignore[arg-type]
                                  "forged@sender.example", [])
        await handler.handle_RCPT(None, session, envelope,  # type: ignore[arg-type]
                                  "bob@example.com", [])
        envelope.original_content = CONTENT
        return await handler.handle_DATA(None, session, envelope)  # type: ignore[arg-type]

    return asyncio.run(transaction())


@pytest.mark.parametrize(("result", "policy", "reply", "dsn"), [
    # Let through with a tag (the default for spam), then refused by the server: no DSN.
    (ScanResult("spam", score=9.0, threshold=5.0), {}, "250 ", False),
    (ScanResult("virus", virus="Eicar-Test-Signature"), {"virus": "tag"}, "250 ", False),
    # Delivered untouched by an administrator's choice: still no DSN.
    (ScanResult("spam", score=9.0, threshold=5.0), {"spam": "pass"}, "250 ", False),
    # Refused or kept at the end of DATA: nothing is queued, so nothing can bounce.
    (ScanResult("virus", virus="Eicar-Test-Signature"), {}, "554 ", False),
    (ScanResult("spam", score=9.0, threshold=5.0), {"spam": "quarantine"},
     "250 2.0.0 Ok: quarantined", False),
    (ScanResult("spam", score=9.0, threshold=5.0), {"spam": "drop"}, "250 ", False),
    # The control: clean mail the server refuses is bounced to its sender.
    (ScanResult("clean"), {}, "250 ", True),
])
def test_spam_and_viruses_from_the_filter_never_bounce(
        tmp_path: Path, result: ScanResult, policy: dict[str, str], reply: str,
        dsn: bool) -> None:
    queue = Queue(tmp_path / "queue", hostname="gw.example.net")
    answer = send_through_filter(tmp_path, queue, result, **policy)
    assert answer.startswith(reply), answer
    for entry in queue.list():
        assert entry.envelope.verdict == ("" if result.verdict == "clean" else result.verdict)
        queue.claim(entry.queue_id)
        outcome = queue.record_attempt(entry.queue_id, {"bob@example.com": REFUSED})
        assert outcome.bounced == ("bob@example.com",)
    assert notifications(queue) == (["forged@sender.example"] if dsn else [])
