"""rspamd's actions mean what they say: its JSON read as typed data, the one table that says
what each action means to SMTP and to POP3, the replies, and our Authentication-Results.

The JSON replies are shaped as Debian 12's rspamd 3.4 answered in the lab (greylist module
on Redis, SPF/DKIM/DMARC against the lab's DNS: tests/lab/test_rspamd_actions.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from proxies.filtering import FilterInput, FilterVerdict
from proxies.mail.actions import SMTP_SCANNER_ACTIONS, ActionTable, action_for
from proxies.pop3.config import Pop3Config
from proxies.pop3.policy import decide
from proxies.scan.api import AuthResult, ScanEnvelope, ScannerAction, ScanResult
from proxies.scan.config import PolicyConfig, QuarantineConfig, ScanConfig, SocketAddress
from proxies.scan.engine import combine
from proxies.scan.filter import ScanFilter
from proxies.scan.rspamd import checkv2_request, result_from_json
from tests.unit.scan_messages import plain

MESSAGE = plain(subject="hello", body="Hello there.\r\n")
INPUT = FilterInput("alice@sender.example", ("bob@example.com", "carol@example.com"),
                    "192.0.2.10", "mail.sender.example", received_by="gw.lab.example")
SYMBOLS: dict[str, Any] = {
    "R_SPF_ALLOW": {"name": "R_SPF_ALLOW", "score": -0.2, "options": ["+ip4:192.0.2.10"]},
    "DMARC_POLICY_ALLOW": {"name": "DMARC_POLICY_ALLOW", "score": -0.5,
                           "options": ["sender.example", "reject"]},
    "R_DKIM_NA": {"name": "R_DKIM_NA", "score": 0.0},
    "RDNS_NONE": {"name": "RDNS_NONE", "score": 1.0},
}


def reply(action: str, score: float = 1.4, symbols: dict[str, Any] | None = None,
          message: str | None = None) -> bytes:
    data: dict[str, Any] = {"is_skipped": False, "score": score, "required_score": 15.0,
                            "action": action, "symbols": SYMBOLS if symbols is None else symbols,
                            "messages": {"smtp_message": message} if message else {}}
    return json.dumps(data).encode()


def smtp_filter(tmp_path: Path, result: ScanResult, **policy: Any) -> FilterVerdict:
    class Fixed:
        async def scan(self, content: bytes, envelope: ScanEnvelope | None = None
                       ) -> ScanResult:
            return result

    config = ScanConfig(policy=PolicyConfig(**policy),
                        quarantine=QuarantineConfig(dir=tmp_path / "q"))
    return asyncio.run(ScanFilter(config, Fixed()).check(INPUT, MESSAGE))


# --- reading rspamd's reply ------------------------------------------------------------------


@pytest.mark.parametrize(("action", "verdict"), [
    ("no action", "clean"), ("greylist", "clean"), ("soft reject", "clean"),
    ("add header", "spam"), ("rewrite subject", "spam"), ("reject", "spam"),
    ("quarantine", "spam"), ("discard", "spam"),
])
def test_each_action_is_typed_data(action: ScannerAction, verdict: str) -> None:
    result = result_from_json(reply(action))
    assert (result.scanner_action, result.verdict) == (action, verdict)
    assert result.output[0].startswith(f"rspamd: action={action!r} score=1.4")


def test_a_custom_action_is_no_request_and_the_score_decides() -> None:
    low = result_from_json(reply("my action", score=3.0))
    high = result_from_json(reply("my action", score=20.0))
    assert (low.scanner_action, low.verdict) == (None, "clean")
    assert (high.scanner_action, high.verdict) == (None, "spam")


def test_rspamds_words_for_the_client_become_one_safe_line() -> None:
    result = result_from_json(reply("soft reject", message="Try again\r\n250 later\x00 é"))
    assert result.scanner_message == "Try again 250 later"


def test_spf_dkim_and_dmarc_results_are_read_from_the_symbols() -> None:
    result = result_from_json(reply("no action"))
    assert result.auth == (AuthResult("spf", "pass"), AuthResult("dkim", "none"),
                           AuthResult("dmarc", "pass", "sender.example"))
    forged = result_from_json(reply("add header", 8.6, {
        "R_SPF_FAIL": {"options": ["-all"]},
        "DMARC_POLICY_REJECT": {"options": ["forged.example : No valid SPF, No valid DKIM",
                                            "reject"]},
        "R_DKIM_ALLOW": {"options": ["a.example:s=sel1", "b.example"]},
    }))
    assert forged.auth == (AuthResult("spf", "fail"),
                           AuthResult("dkim", "pass", "a.example", "sel1"),
                           AuthResult("dkim", "pass", "b.example"),
                           AuthResult("dmarc", "fail", "forged.example"))
    assert result_from_json(reply("no action", symbols={})).auth == ()


def test_the_envelope_goes_in_rspamds_request_headers() -> None:
    envelope = ScanEnvelope("192.0.2.10", "mail.sender.example\r\nX-Evil: 1", "",
                            ("bob@example.com", "carol@example.com"), "gw.lab.example")
    request = checkv2_request(SocketAddress(host="127.0.0.1", port=11333), b"x", envelope)
    head = request.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head == [b"POST /checkv2 HTTP/1.1", b"Host: 127.0.0.1:11333", b"IP: 192.0.2.10",
                    b"Helo: mail.sender.exampleX-Evil: 1", b"From: <>",
                    b"Rcpt: bob@example.com", b"Rcpt: carol@example.com",
                    b"MTA-Name: gw.lab.example", b"Content-Length: 1", b"Connection: close"]


def test_the_smtp_filter_gives_the_scanners_the_envelope() -> None:
    seen: list[ScanEnvelope | None] = []

    class Recording:
        async def scan(self, content: bytes, envelope: ScanEnvelope | None = None
                       ) -> ScanResult:
            seen.append(envelope)
            return ScanResult("clean")

    asyncio.run(ScanFilter(ScanConfig(), Recording()).check(INPUT, MESSAGE))
    assert seen == [ScanEnvelope("192.0.2.10", "mail.sender.example", "alice@sender.example",
                                 ("bob@example.com", "carol@example.com"), "gw.lab.example")]


def test_combining_scanners_keeps_rspamds_action_and_results() -> None:
    rspamd = result_from_json(reply("greylist", message="Try again later"))
    both = combine([ScanResult("clean", scanners=("clamd",)), rspamd])
    assert (both.scanner_action, both.scanner_message) == ("greylist", "Try again later")
    assert both.auth == rspamd.auth


# --- the table -------------------------------------------------------------------------------

SMTP = ActionTable(spam="tag", virus="reject", banned="reject", oversize="pass",
                   failed="tempfail", scanner=SMTP_SCANNER_ACTIONS)


@pytest.mark.parametrize(("action", "expected"), [
    ("greylist", "tempfail"), ("soft reject", "tempfail"), ("reject", "reject"),
    ("add header", "tag"), ("rewrite subject", "tag"), ("quarantine", "quarantine"),
    ("discard", "drop"), ("no action", "pass"),
])
def test_smtp_table(action: ScannerAction, expected: str) -> None:
    assert action_for(result_from_json(reply(action)), SMTP) == expected


def test_virus_banned_and_failures_come_before_rspamds_request() -> None:
    greylisted = {"scanner_action": "greylist"}
    virus = ScanResult("virus", virus="Eicar", **greylisted)  # type: ignore[arg-type]
    failed = ScanResult("failed", reason="clamd: down", **greylisted)  # type: ignore[arg-type]
    assert action_for(virus, SMTP) == "reject"
    assert action_for(failed, dataclasses.replace(SMTP, failed="pass")) == "pass"
    # Greylisting first even when another scanner calls it spam: the retry is scanned again.
    spam = ScanResult("spam", score=30.0, **greylisted)  # type: ignore[arg-type]
    assert action_for(spam, dataclasses.replace(SMTP, spam_reject_score=10.0)) == "tempfail"


@pytest.mark.parametrize(("action", "outcome"), [
    ("greylist", "deliver"), ("soft reject", "deliver"), ("no action", "deliver"),
    ("add header", "tag"), ("reject", "tag"), ("discard", "tag"),
])
def test_pop3_has_no_sender_to_retry_or_refuse(action: ScannerAction, outcome: str) -> None:
    assert decide(result_from_json(reply(action)), Pop3Config()) == outcome
    # A greylisted message another scanner calls spam is still tagged.
    spam = ScanResult("spam", score=9.0, scanner_action="greylist")
    assert decide(spam, Pop3Config()) == "tag"


# --- what the SMTP client hears --------------------------------------------------------------


def test_greylisting_answers_451_with_rspamds_words(tmp_path: Path) -> None:
    first = smtp_filter(tmp_path, result_from_json(reply("soft reject",
                                                         message="Try again later")))
    assert (first.action, first.reply) == ("tempfail", "451 4.7.1 Try again later")
    assert first.reason == "rspamd action 'soft reject'"
    bare = smtp_filter(tmp_path, result_from_json(reply("greylist", symbols={})))
    assert bare.reply == "451 4.7.1 Greylisted, try again later"


def test_rspamds_reject_is_refused_at_the_final_dot(tmp_path: Path) -> None:
    verdict = smtp_filter(tmp_path, result_from_json(reply("reject", 1000.0,
                                                           {"GTUBE": {"score": 0}},
                                                           message="Gtube pattern")))
    assert (verdict.action, verdict.reply) == (
        "reject", "554 5.7.1 Message rejected as spam (Gtube pattern)")


def test_delivered_mail_carries_our_results_and_loses_forged_ones(tmp_path: Path) -> None:
    clean = smtp_filter(tmp_path, result_from_json(reply("no action")))
    assert clean.action == "pass"
    assert clean.content == (b"Authentication-Results: gw.lab.example;\r\n"
                             b"\tspf=pass smtp.mailfrom=alice@sender.example;\r\n"
                             b"\tdkim=none;\r\n\tdmarc=pass header.from=sender.example\r\n"
                             + MESSAGE)
    tagged = smtp_filter(tmp_path, result_from_json(reply("add header", 8.0)),
                         authserv_id="filter.lab.example")
    assert tagged.action == "tag" and tagged.content is not None
    assert tagged.content.startswith(b"Authentication-Results: filter.lab.example;\r\n")
    assert b"\r\nX-Spam-Flag: YES\r\n" in tagged.content
    # No results (rspamd's modules off, or no rspamd): nothing added, byte for byte.
    plain_clean = smtp_filter(tmp_path, ScanResult("clean", scanners=("clamd",)))
    assert plain_clean.content is None


def test_forged_results_go_before_scanning_decides_anything(tmp_path: Path) -> None:
    forged = b"Authentication-Results: GW.LAB.EXAMPLE; dmarc=pass\r\n"
    theirs = b"Authentication-Results: mx.sender.example; spf=pass\r\n"

    class Fixed:
        async def scan(self, content: bytes, envelope: ScanEnvelope | None = None
                       ) -> ScanResult:
            return ScanResult("clean", scanners=("clamd",))

    config = ScanConfig(quarantine=QuarantineConfig(dir=tmp_path / "q"))
    verdict = asyncio.run(ScanFilter(config, Fixed()).check(INPUT, forged + theirs + MESSAGE))
    assert (verdict.action, verdict.content) == ("pass", theirs + MESSAGE)
