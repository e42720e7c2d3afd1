"""The POP3 proxy's pure parts: config, policy table, header rewriting, keep-alive clock, cache
and spool."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from netsetup.configfile import Section
from proxies.mail.headers import parse_header
from proxies.pop3 import rewrite
from proxies.pop3.cache import CacheKey, ScanCache
from proxies.pop3.config import Pop3Config, pop3_from_section
from proxies.pop3.keepalive import Keepalive, KeepaliveStep
from proxies.pop3.policy import decide
from proxies.pop3.spool import Spool
from proxies.scan.api import ScanResult
from tests.unit.test_pop3_support import message

# --- config ----------------------------------------------------------------------------------


def test_config_defaults() -> None:
    section = Section("mailgate.toml", "pop3", {})
    config = pop3_from_section(section)
    assert section.finish() == []
    assert config == Pop3Config()
    assert (config.listen_port, config.tls, config.fail_mode, config.spool_threshold,
            config.scan_top) == (10110, "terminate", "tempfail", 8 << 20, True)


def test_config_values_and_problems_reported_together() -> None:
    section = Section("mailgate.toml", "pop3", {
        "enabled": True, "listen": 1110, "spool_threshold": "16M", "cache_ttl": "2h",
        "tls": "sometimes", "fail_mode": "pass", "max_connections": 0, "tls_cert": "/c.pem",
        "subject_prefix": "[SPÄM] ", "colour": "blue"})
    config = pop3_from_section(section)
    problems = {p.key: p.message for p in section.finish()}
    assert config.enabled and config.listen_port == 1110 and config.fail_mode == "pass"
    assert config.spool_threshold == 16 << 20 and config.cache_ttl == 7200
    assert set(problems) == {"pop3.tls", "pop3.max_connections", "pop3.tls_cert",
                             "pop3.subject_prefix", "pop3.colour"}
    assert problems["pop3.colour"] == "unknown key"


# --- policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("result", "changes", "outcome"), [
    (ScanResult("clean"), {}, "deliver"),
    (ScanResult("spam"), {}, "tag"),
    (ScanResult("spam"), {"spam_action": "pass"}, "deliver"),
    (ScanResult("virus"), {}, "replace"),
    (ScanResult("banned"), {}, "replace"),
    (ScanResult("banned", action="tag"), {}, "tag"),
    (ScanResult("failed"), {}, "tempfail"),
    (ScanResult("failed"), {"fail_mode": "pass"}, "unscanned"),
    (ScanResult("failed", oversize=True), {}, "deliver"),
    (None, {}, "deliver"),
    (None, {"oversize_action": "tempfail"}, "tempfail"),
])
def test_policy(result: ScanResult | None, changes: dict[str, Any], outcome: str) -> None:
    assert decide(result, dataclasses.replace(Pop3Config(), **changes)) == outcome


# --- rewriting -------------------------------------------------------------------------------

SPAM = ScanResult("spam", score=1000.0, threshold=5.0, rules=("GTUBE",), scanners=("spamd",))
VIRUS = ScanResult("virus", virus="Eicar-Test-Signature", scanners=("clamd",))


def test_trace_block_and_tagging_keep_the_original_prefix() -> None:
    original = message("hello", trace=2)
    header = parse_header(original, complete=True)
    assert header is not None
    trace = original[:rewrite.trace_length(header)]
    assert trace.startswith(b"Return-Path:") and trace.count(b"Received:") == 2
    assert b"From:" not in trace
    tagged = rewrite.tag_spam(header, SPAM, "[SPAM] ", protected=len(trace))
    assert tagged.startswith(trace)
    assert b"Subject: [SPAM] hello\r\n" in tagged
    assert tagged.endswith(b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=1000.0 "
                           b"required=5.0 tests=GTUBE\r\nX-Mailgate-Scan: spam; "
                           b"scanners=spamd\r\n")
    again = parse_header(tagged + b"\r\nbody", complete=True)
    assert again is not None
    assert b"[SPAM] [SPAM]" not in rewrite.tag_spam(again, SPAM, "[SPAM] ", 0)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_tagging_removes_forged_copies_of_our_fields(eol: bytes) -> None:
    """A sender's `X-Spam-Flag: NO` must not stand above ours, as SMTP tagging has it
    (test_scan_filter.py); the trace fields the keep-alive may have sent stay first."""
    forged = (b"X-Spam-Flag: NO\r\nx-spam-score: -100\r\nX-Spam-Status : No,\r\n\tscore=-100"
              b"\r\nX-Mailgate-Scan: clean\r\n")
    plain_message = message("hello", trace=2)
    at = plain_message.index(b"From:")
    forged_message = plain_message[:at] + forged + plain_message[at:]
    header, clean_header = (parse_header(m.replace(b"\r\n", eol), complete=True)
                            for m in (forged_message, plain_message))
    assert header is not None and clean_header is not None
    trace = header.data[:rewrite.trace_length(header)]
    tagged = rewrite.tag_spam(header, SPAM, "[SPAM] ", protected=len(trace))
    assert tagged == rewrite.tag_spam(clean_header, SPAM, "[SPAM] ", protected=len(trace))
    assert tagged.startswith(trace) and tagged.count(b"X-Spam-Flag") == 1
    assert b"NO" not in tagged and b"-100" not in tagged
    unscanned = rewrite.unscanned(header, "scanner failed")
    assert unscanned.count(b"X-Mailgate-Scan:") == 1


def test_notice_is_well_formed_and_starts_with_the_trace() -> None:
    import email

    original = message("=?utf-8?q?R=C3=A9sum=C3=A9?=", trace=1)
    header = parse_header(original, complete=True)
    assert header is not None
    notice = rewrite.build_notice(header, VIRUS, size=len(original), quarantine_id="q1",
                                  hostname="gw.example")
    assert notice.startswith(original[:rewrite.trace_length(header)])
    parsed = email.message_from_bytes(notice)
    assert parsed["From"] == "Alice <alice@example.org>"
    assert parsed["Subject"].startswith("[VIRUS REMOVED]")
    assert parsed["Date"] == "Mon, 1 Jan 2024 00:00:00 +0000"
    body = parsed.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert "Résumé".encode() in body and b"Eicar-Test-Signature" in body and b"q1" in body


@pytest.mark.parametrize("outcome", ["deliver", "tag", "unscanned", "replace"])
def test_what_the_client_gets_for_each_outcome(outcome: str) -> None:
    original = message("hello", body=b"The body.\r\n" * 50, trace=2)
    spool = Spool(1 << 20)
    spool.write(original)
    header = parse_header(original, complete=True)
    assert header is not None
    trace = len(original[:rewrite.trace_length(header)])
    result = {"deliver": None, "tag": SPAM, "unscanned": ScanResult("failed", reason="down"),
              "replace": VIRUS}[outcome]
    got = b"".join(rewrite.retrieved(outcome, header, result, spool, subject_prefix="[SPAM] ",
                                     sent_early=trace, quarantine_id="q1",
                                     hostname="gw.example"))
    # Every outcome starts with the trace the keep-alive may have sent already.
    assert got.startswith(original[:trace])
    body = original[len(header.data):]
    if outcome == "deliver":
        assert got == original
    elif outcome == "tag":
        assert got.endswith(body) and b"Subject: [SPAM] hello" in got
    elif outcome == "unscanned":
        assert got.endswith(body) and b"X-Mailgate-Scan: unscanned" in got
    else:
        assert body not in got and b"q1" in got


# --- keep-alive ------------------------------------------------------------------------------


def test_keepalive_holds_then_trickles_the_trace() -> None:
    keepalive = Keepalive(started=100.0, after=10.0, interval=5.0)
    keepalive.offer(b"Received: x\r\n")
    assert keepalive.next_due == 110.0
    assert keepalive.due(109.9) is None
    assert keepalive.due(110.0) == KeepaliveStep(True, b"R")
    assert keepalive.next_due == 115.0 and keepalive.due(114.0) is None
    assert keepalive.due(115.0) == KeepaliveStep(False, b"e")
    assert keepalive.sent == 2


def test_keepalive_without_trace_sends_only_the_status() -> None:
    keepalive = Keepalive(started=0.0, after=1.0, interval=1.0)
    assert keepalive.due(1.0) == KeepaliveStep(True, b"")
    assert keepalive.due(2.0) is None


# --- cache and spool -------------------------------------------------------------------------


def test_cache_remembers_for_ttl_and_never_failures() -> None:
    now = [0.0]
    cache = ScanCache(ttl=60, clock=lambda: now[0])
    key = CacheKey(("192.0.2.1", 110), "bob", b"uid1", "RETR")
    cache.put(key, VIRUS, "q1")
    cache.put(CacheKey(("192.0.2.1", 110), "bob", b"uid2", "RETR"), ScanResult("failed"))
    hit = cache.get(key)
    assert hit is not None and hit.result == VIRUS and hit.quarantine_id == "q1"
    assert len(cache) == 1
    now[0] = 61
    assert cache.get(key) is None


def test_spool_moves_to_disk_above_the_threshold(tmp_path: Path) -> None:
    spool = Spool(threshold=10, directory=tmp_path)
    spool.write(b"0123456")
    assert not spool.on_disk
    spool.write(b"789abc")
    assert spool.on_disk and spool.size == 13
    assert spool.head(4) == b"0123" and spool.getvalue() == b"0123456789abc"
    assert b"".join(spool.chunks(3, size=4)) == b"3456789abc"
    assert list(tmp_path.iterdir()) == []  # unlinked from the start
    spool.close()


def test_spool_in_memory_keeps_the_pieces_it_was_given() -> None:
    pieces = [b"0123456", b"789", b"abcdefghij"]
    spool = Spool(threshold=1 << 20)
    for piece in pieces:
        spool.write(piece)
    assert not spool.on_disk and spool.size == 20
    assert [c is p for c, p in zip(spool.chunks(), pieces, strict=True)] == [True] * 3
    assert spool.head(9) == b"012345678" and spool.head(100) == b"0123456789abcdefghij"
    for start in range(21):
        for size in (1, 4, 100):
            chunks = list(spool.chunks(start, size=size))
            assert b"".join(chunks) == b"0123456789abcdefghij"[start:]
            assert all(len(c) <= max(size, 10) for c in chunks)
    whole = spool.getvalue()
    assert whole == b"0123456789abcdefghij" and next(spool.chunks()) is whole  # joined once
    single = Spool(threshold=1 << 20)
    single.write(pieces[2])
    assert single.getvalue() is pieces[2]  # one read: never copied
