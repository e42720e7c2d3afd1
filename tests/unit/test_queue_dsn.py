"""Delivery status notifications: RFC 3464 fields inside an RFC 6522 multipart/report."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest

from proxies.queue.dsn import DsnRecipient, build_dsn

ORIGINAL = (b"Received: from client.example\r\n\tby gw.example.net; Tue, 1 Jul 2025\r\n"
            b"From: alice@example.com\r\nSubject: report\r\n\r\nsecret body\r\n")


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> list[EmailMessage]:
    payload = message.get_payload()
    assert isinstance(payload, list)
    assert all(isinstance(part, EmailMessage) for part in payload)
    return payload  # type: ignore[return-value]


def test_failed_report_is_well_formed() -> None:
    data = build_dsn(
        reporting_mta="gw.example.net", sender="alice@example.com", original=ORIGINAL,
        arrival=1_700_000_000, now=1_700_000_100, queue_id="0A1B",
        recipients=[DsnRecipient("bob@example.org", "failed", "5.1.1",
                                 "550 5.1.1 <bob@example.org>:\r\n user unknown",
                                 remote_mta="mx.example.org", last_attempt=1_700_000_100)])
    assert data.isascii() and b"\n" not in data.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    message = parse(data)
    assert message["To"].addresses[0].addr_spec == "alice@example.com"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    text, status, headers = parts(message)
    assert text.get_content_type() == "text/plain"
    assert "could not" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    # RFC 3464 2.1: per-message fields, then one block per recipient.
    per_message, per_recipient = parts(status)
    assert per_message["Reporting-MTA"] == "dns; gw.example.net"
    assert per_message["Arrival-Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@example.org"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.example.org"
    assert " ".join(str(per_recipient["Diagnostic-Code"]).split()) == \
        "smtp; 550 5.1.1 <bob@example.org>: user unknown"
    assert headers.get_content_type() == "text/rfc822-headers"
    returned = headers.get_payload()
    assert isinstance(returned, str)
    assert "Subject: report" in returned and "secret body" not in returned


def test_delayed_warning_and_long_diagnostic_folding() -> None:
    long_text = "451 4.7.1 " + "greylisted " * 30
    data = build_dsn(reporting_mta="gw.example.net", sender="alice@example.com",
                     original=ORIGINAL, arrival=0, now=4 * 3600,
                     recipients=[DsnRecipient("bob@example.org", "delayed", "4.7.1", long_text,
                                              will_retry_until=5 * 86400)])
    assert all(len(line) <= 80 for line in data.split(b"\r\n"))
    message = parse(data)
    assert message["Subject"].startswith("Delayed Mail")
    text, status, _headers = parts(message)
    assert "4 hour(s)" in text.get_content()
    recipient = parts(status)[1]
    assert recipient["Action"] == "delayed" and recipient["Will-Retry-Until"]


def test_utf8_addresses_use_the_global_types() -> None:
    data = build_dsn(reporting_mta="gw.example.net", sender="jöran@example.com",
                     original=ORIGINAL, arrival=0, now=1,
                     recipients=[DsnRecipient("bjørn@example.org", "failed", "5.1.1",
                                              "550 5.1.1 unknown")])
    message = parse(data)
    assert parts(message)[1].get_content_type() == "message/global-delivery-status"
    assert "Final-Recipient: utf-8; bjørn@example.org" in data.decode()


def test_never_to_the_null_sender() -> None:
    with pytest.raises(ValueError):
        build_dsn(reporting_mta="gw", sender="", original=ORIGINAL, arrival=0,
                  recipients=[DsnRecipient("b@example.org", "failed", "5.0.0")])
