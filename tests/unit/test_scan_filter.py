"""Verdict -> action -> SMTP outcome, tagging byte for byte, failures and held timeouts."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from proxies.filtering import FilterInput, FilterVerdict
from proxies.quarantine import Quarantine
from proxies.scan.api import ScanEnvelope, ScanResult
from proxies.scan.config import PolicyConfig, QuarantineConfig, ScanConfig
from proxies.scan.engine import combine
from proxies.scan.filter import BorderFilter, ScanFilter, build_filter, build_scanner
from tests.unit.scan_messages import plain
from tests.unit.test_quarantine_store import broken_quarantine

MESSAGE = plain(subject="Cheap stuff", body="Buy now.\r\n.dot line\r\n")
INPUT = FilterInput("alice@sender.example", ("bob@example.com",), "192.0.2.10", "sender",
                    client_port=40000, original_destination=("198.51.100.25", 25))
SPAM = ScanResult("spam", score=7.5, threshold=5.0, rules=("GTUBE", "MISSING_DATE"),
                  scanners=("clamd", "spamd"))


class FixedScanner:
    def __init__(self, *results: ScanResult) -> None:
        self.results = list(results)
        self.calls = 0
        self.envelopes: list[ScanEnvelope | None] = []

    async def scan(self, content: bytes, envelope: ScanEnvelope | None = None) -> ScanResult:
        self.calls += 1
        self.envelopes.append(envelope)
        return self.results[min(self.calls, len(self.results)) - 1]


def run_filter(result: ScanResult, tmp_path: Path, content: bytes = MESSAGE,
               **changes: object) -> FilterVerdict:
    policy_changes = {k: v for k, v in changes.items() if k in PolicyConfig.__annotations__}
    scan_changes = {k: v for k, v in changes.items() if k not in policy_changes}
    config = ScanConfig(policy=PolicyConfig(**policy_changes),  # type: ignore[arg-type]
                        quarantine=QuarantineConfig(dir=tmp_path / "q"),
                        **scan_changes)  # type: ignore[arg-type]
    return asyncio.run(ScanFilter(config, FixedScanner(result)).check(INPUT, content))


def test_clean_mail_passes_byte_identical(tmp_path: Path) -> None:
    verdict = run_filter(ScanResult("clean", scanners=("clamd",)), tmp_path)
    assert verdict.action == "pass" and verdict.content is None


def test_clean_mail_gets_the_scan_header_only_when_configured(tmp_path: Path) -> None:
    verdict = run_filter(ScanResult("clean", scanners=("clamd", "spamd")), tmp_path,
                         add_scan_header=True)
    assert verdict.content == b"X-Mailgate-Scan: clean (clamd, spamd)\r\n" + MESSAGE


def test_spam_is_tagged_exactly(tmp_path: Path) -> None:
    forged = b"X-Spam-Flag: NO\r\nX-Spam-Status: No,\r\n\tscore=0\r\n" + MESSAGE
    verdict = run_filter(SPAM, tmp_path, forged, subject_prefix="[SPAM] ")
    assert verdict.action == "tag"
    expected = (
        b"X-Spam-Flag: YES\r\n"
        b"X-Spam-Score: 7.5\r\n"
        b"X-Spam-Status: Yes, score=7.5 required=5.0 tests=GTUBE,MISSING_DATE\r\n"
        b"X-Mailgate-Scan: spam score=7.5 required=5.0 (clamd, spamd)\r\n"
        + MESSAGE.replace(b"Subject: Cheap stuff", b"Subject: [SPAM] Cheap stuff"))
    assert verdict.content == expected


@pytest.mark.parametrize("forged", [
    b"X-Spam-Flag: NO\r\n",
    b"x-spam-flag: NO\r\n",  # field names are case-insensitive (RFC 5322 1.2.2)
    b"X-Spam-Flag : NO\r\n",  # obsolete white space before the colon (RFC 5322 4.5)
    b"X-Spam-Score: -100\r\n",
    b"X-Spam-Status: No,\r\n\tscore=-100\r\n",  # folded
    b"X-Mailgate-Scan: clean (clamd)\r\n",
], ids=["flag", "lower-case", "space-before-colon", "score", "folded-status", "scan"])
def test_forged_copies_of_our_fields_are_removed(forged: bytes, tmp_path: Path) -> None:
    """Wherever the sender put them, so the first one a reader finds is ours; the POP3 side
    of the same rule: test_pop3_parts.py and test_pop3_proxy.py."""
    head, _, body = MESSAGE.partition(b"\r\n\r\n")
    content = forged + head + b"\r\n" + forged + b"\r\n" + body  # on top and among the rest
    tagged = run_filter(SPAM, tmp_path, content).content
    assert tagged == run_filter(SPAM, tmp_path).content
    # A clean message that only gets X-Mailgate-Scan loses a forged one of those too.
    clean = ScanResult("clean", scanners=("clamd",))
    if forged.startswith(b"X-Mailgate-Scan"):
        assert run_filter(clean, tmp_path, content, add_scan_header=True).content == \
            b"X-Mailgate-Scan: clean (clamd)\r\n" + MESSAGE


def test_spam_above_the_reject_score_is_rejected(tmp_path: Path) -> None:
    verdict = run_filter(dataclasses.replace(SPAM, score=20.0), tmp_path,
                         spam_reject_score=15.0)
    assert verdict.action == "reject"
    assert verdict.reply == "554 5.7.1 Message rejected as spam (spam score 20 >= 15)"
    assert run_filter(SPAM, tmp_path, spam_reject_score=15.0).action == "tag"


@pytest.mark.parametrize(("result", "reply"), [
    (ScanResult("virus", virus="Eicar-Test-Signature.UNOFFICIAL", scanners=("clamd",)),
     "554 5.7.1 Virus found: Eicar-Test-Signature.UNOFFICIAL"),
    (ScanResult("virus", virus="Evil\r\n250 ok"), "554 5.7.1 Virus found: Evil  250 ok"),
    (ScanResult("banned", reason="banned attachment name 'a.exe'"),
     "554 5.7.1 Message rejected: banned attachment name 'a.exe'"),
])
def test_rejections_name_what_was_found(result: ScanResult, reply: str,
                                        tmp_path: Path) -> None:
    verdict = run_filter(result, tmp_path)
    assert (verdict.action, verdict.reply) == ("reject", reply)


@pytest.mark.parametrize("action", ["pass", "drop", "quarantine", "tag"])
def test_policy_actions(action: str, tmp_path: Path) -> None:
    result = ScanResult("virus", virus="V", scanners=("clamd",))
    verdict = run_filter(result, tmp_path, virus=action)
    assert verdict.action == action
    if action == "pass":
        assert verdict.content is None
    if action == "tag":
        assert verdict.content is not None
        assert verdict.content.startswith(b"X-Mailgate-Scan: virus V (clamd)\r\n")
    if action == "quarantine":
        assert verdict.reply is not None and verdict.reply.startswith(
            "250 2.0.0 Ok: quarantined as ")
        entry_id = verdict.reply.rsplit(" ", 1)[1]
        quarantine = Quarantine(tmp_path / "q")
        assert quarantine.content(entry_id) == MESSAGE
        entry = quarantine.entry(entry_id)
        assert entry.result == result
        assert entry.original_destination == ("198.51.100.25", 25)


def test_a_failed_quarantine_write_answers_451(tmp_path: Path) -> None:
    """The sender keeps the message and retries; the POP3 side of the same rule (-ERR
    [SYS/TEMP], never a notice): test_pop3_proxy.py."""
    config = ScanConfig(policy=PolicyConfig(virus="quarantine"),
                        quarantine=QuarantineConfig(dir=tmp_path / "q"))
    scan_filter = ScanFilter(config, FixedScanner(ScanResult("virus", virus="V")),
                             broken_quarantine(tmp_path / "q"))
    verdict = asyncio.run(scan_filter.check(INPUT, MESSAGE))
    assert (verdict.action, verdict.reply) == ("tempfail",
                                               "451 4.3.0 Error: quarantine write error")
    assert Quarantine(tmp_path / "q", create=False).list() == []


def test_a_header_rule_action_overrides_the_banned_policy(tmp_path: Path) -> None:
    verdict = run_filter(ScanResult("banned", reason="header", action="drop"), tmp_path)
    assert verdict.action == "drop"


def test_scanner_failure_tempfails_by_default(tmp_path: Path) -> None:
    verdict = run_filter(ScanResult("failed", reason="clamd: Connection refused"), tmp_path)
    assert verdict.action == "tempfail"
    assert verdict.reply == "451 4.7.1 Message cannot be scanned now, try again later"


def test_fail_mode_pass_delivers_with_a_header(tmp_path: Path) -> None:
    verdict = run_filter(ScanResult("failed", reason="clamd: Connection refused",
                                    scanners=("spamd",)), tmp_path, fail_mode="pass")
    assert verdict.action == "pass"
    assert verdict.content == (b"X-Mailgate-Scan: not scanned: clamd: Connection refused "
                               b"(spamd)\r\n" + MESSAGE)


def test_oversize_follows_oversize_action(tmp_path: Path) -> None:
    over = ScanResult("failed", reason="message over the scan limit", oversize=True)
    verdict = run_filter(over, tmp_path)
    assert verdict.action == "pass" and verdict.content is not None
    assert verdict.content.startswith(b"X-Mailgate-Scan: not scanned: message over")
    assert run_filter(over, tmp_path, oversize_action="reject").reply == \
        "552 5.3.4 Message too big to be scanned"


def test_repeated_timeouts_of_the_same_content_are_quarantined(tmp_path: Path) -> None:
    timed_out = ScanResult("failed", reason="clamd: no answer within 2 s", timed_out=True)
    config = ScanConfig(max_timeouts=3, quarantine=QuarantineConfig(dir=tmp_path / "q"))
    scan_filter = ScanFilter(config, FixedScanner(timed_out))

    async def three_times(content: bytes) -> list[str]:
        return [(await scan_filter.check(INPUT, content)).action for _ in range(3)]

    assert asyncio.run(three_times(MESSAGE)) == ["tempfail", "tempfail", "quarantine"]
    entries = Quarantine(tmp_path / "q").list()
    assert [e.reason for e in entries] == ["scan timed out 3 times"]
    # Other content has its own count.
    assert asyncio.run(scan_filter.check(INPUT, MESSAGE + b"x")).action == "tempfail"


def test_combine_orders_by_severity() -> None:
    clean = ScanResult("clean", scanners=("clamd",))
    virus = ScanResult("virus", virus="V", scanners=("clamd",))
    failed = ScanResult("failed", reason="spamd: timeout", timed_out=True)
    assert combine([virus, failed]).verdict == "virus"
    both = combine([clean, SPAM])
    assert (both.verdict, both.score, both.scanners) == ("spam", 7.5,
                                                          ("clamd", "clamd", "spamd"))
    failing = combine([clean, failed, SPAM])
    assert failing.verdict == "failed" and failing.timed_out
    assert failing.reason == "spamd: timeout"


def test_build_filter_and_scanner(tmp_path: Path) -> None:
    # Nothing to scan: only forged Authentication-Results go (tests/unit/test_authresults.py).
    assert isinstance(build_filter(ScanConfig()), BorderFilter)
    assert build_scanner(ScanConfig()) is None
    with_rules = ScanConfig(policy=PolicyConfig(banned_extensions=("exe",)))
    assert isinstance(build_filter(with_rules), ScanFilter)
    scanner = build_scanner(with_rules)
    assert scanner is not None
    assert asyncio.run(scanner.scan(MESSAGE)).verdict == "clean"
