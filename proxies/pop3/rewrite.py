"""What the client gets instead of the original: a spam-tagged header, or a notice message.

Both keep the original's leading trace fields (Return-Path, Received, ...) as their first
bytes. That is what lets the keep-alive (`proxies.pop3.keepalive`) send those bytes to a
waiting client before the verdict is known: whatever the verdict, every message the client
can get starts with them. Added header fields go at the *end* of the header section, for the
same reason.

Headers are handled as bytes, field by field (`proxies.mail.headers`), and tagged the way SMTP
tags them (`proxies.mail.tagging`: forged copies of our fields removed); nothing is re-encoded,
so what is not changed stays byte-identical.
"""

from __future__ import annotations

import email.header
import email.utils
import itertools
import secrets
import time
from collections.abc import Iterator

from proxies.mail.headers import Header
from proxies.mail.tagging import OUR_FIELDS, SCAN_FIELD, field, tag_header
from proxies.pop3.spool import Spool
from proxies.scan.api import ScanResult

__all__ = ["build_notice", "retrieved", "tag_spam", "trace_length", "unscanned"]

# Fields a delivering MTA or MDA puts on top of a message (RFC 5321 4.4, RFC 9228); everything
# we send before a verdict comes from these.
TRACE_FIELDS = frozenset({"return-path", "received", "delivered-to", "x-original-to",
                          "envelope-to", "x-envelope-from", "x-envelope-to"})
# How much of a message is looked at to find its header section.
HEADER_LIMIT = 256 * 1024


def trace_length(header: Header) -> int:
    """Octets of the leading trace fields: what may go to the client before the verdict."""
    length = 0
    for name, raw in header.fields:
        if name not in TRACE_FIELDS or not raw.endswith(b"\n"):
            break
        length += len(raw)
    return length


def spam_fields(result: ScanResult, eol: bytes) -> list[bytes]:
    score = "" if result.score is None else f" score={result.score:.1f}"
    required = "" if result.threshold is None else f" required={result.threshold:.1f}"
    tests = f" tests={','.join(result.rules)}" if result.rules else ""
    scanners = ",".join(result.scanners) or "unknown"
    return [field("X-Spam-Flag", "YES", eol),
            field("X-Spam-Status", f"Yes,{score}{required}{tests}"[:900], eol),
            field(SCAN_FIELD, f"spam; scanners={scanners}", eol)]


def tag_spam(header: Header, result: ScanResult, subject_prefix: str, protected: int) -> bytes:
    """The header section of a spam message after tagging (replaces `header.data`).

    The Subject gets `subject_prefix` unless it already has it or it lies within the first
    `protected` octets (already sent by the keep-alive; trace fields never include it).
    """
    return tag_header(header, spam_fields(result, header.eol), remove=OUR_FIELDS,
                      subject_prefix=subject_prefix, place="end", protected=protected)


def unscanned(header: Header, reason: str, protected: int = 0) -> bytes:
    """The header section with a field saying the message passed unscanned (fail_mode pass)."""
    return tag_header(header, [field(SCAN_FIELD, f"unscanned; reason={reason}"[:900],
                                     header.eol)], place="end", protected=protected)


def _display(value: bytes | None) -> str:
    """A header value for a human: RFC 2047 words decoded, 8-bit taken as UTF-8."""
    if value is None:
        return "(none)"
    text = value.decode("utf-8", "replace")
    try:
        return str(email.header.make_header(email.header.decode_header(text)))[:200]
    except (ValueError, LookupError):  # malformed encoded words, unknown charsets
        return text[:200]


def build_notice(header: Header, result: ScanResult, *, size: int, quarantine_id: str | None,
                 hostname: str, now: float | None = None) -> bytes:
    """A short, well-formed message standing in for one that carried a virus or banned
    content: the original's trace fields, From, To, Date and Subject (marked), and a plain text
    body saying what was found and where the original went."""
    eol = header.eol
    found = (f"a virus: {result.virus}" if result.verdict == "virus"
             else f"banned content: {result.reason or 'a blocked attachment'}")
    marker = "[VIRUS REMOVED]" if result.verdict == "virus" else "[BLOCKED CONTENT REMOVED]"
    trace = header.data[:trace_length(header)]
    original = {name: header.first(name) for name in ("from", "to", "subject", "date",
                                                      "message-id")}
    when = email.utils.formatdate(now if now is not None else time.time(), localtime=False)
    out = [trace]
    out.append(b"From: " + (original["from"] or f"MAILER-DAEMON@{hostname}".encode()) + eol)
    if original["to"]:
        out.append(b"To: " + original["to"] + eol)
    out.append(b"Date: " + (original["date"] or when.encode()) + eol)
    out.append(b"Subject: " + marker.encode() + b" " + (original["subject"] or b"") + eol)
    out.append(field("Message-ID", f"<{secrets.token_hex(12)}.notice@{hostname}>", eol))
    if original["message-id"]:
        out.append(b"X-Mailgate-Original-Message-ID: " + original["message-id"] + eol)
    out.append(field("MIME-Version", "1.0", eol))
    out.append(field("Content-Type", "text/plain; charset=utf-8", eol))
    out.append(field("Content-Transfer-Encoding", "8bit", eol))
    what = result.virus if result.verdict == "virus" else (result.reason or "banned")
    quarantined = f"; quarantine={quarantine_id}" if quarantine_id else ""
    out.append(field(SCAN_FIELD, f"{result.verdict}; found={what}{quarantined}", eol))
    out.append(eol)
    lines = [
        f"The mail filter on your network (mailgate on {hostname}) removed a message",
        f"addressed to you because it contained {found}.",
        "",
        f"  From:    {_display(original['from'])}",
        f"  Subject: {_display(original['subject'])}",
        f"  Date:    {_display(original['date'])}",
        f"  Size:    {size} bytes",
        "",
        (f"The original was quarantined (id {quarantine_id}); ask your administrator if you "
         "need it." if quarantine_id else
         # A failed quarantine write never gets here (the client gets -ERR [SYS/TEMP] and
         # the message stays on the server); only a proxy run without a quarantine does.
         "The original was not kept: this gateway has no quarantine."),
    ]
    body = "".join(line + eol.decode() for line in lines)
    out.append(body.encode("utf-8"))
    return b"".join(out)


def retrieved(outcome: str, header: Header, result: ScanResult | None, spool: Spool, *,
              subject_prefix: str, sent_early: int, quarantine_id: str | None,
              hostname: str) -> Iterator[bytes]:
    """The message the client gets for `outcome` (proxies.pop3.policy.decide), in pieces:
    the original ("deliver"), the original with a tagged header ("tag", "unscanned"), or a
    notice instead ("replace"). `sent_early`: the leading bytes the keep-alive has sent
    already, which a tagged header keeps where they are."""
    if outcome == "deliver":
        return spool.chunks()
    assert result is not None, outcome
    rest = spool.chunks(len(header.data))
    if outcome == "tag":
        return itertools.chain([tag_spam(header, result, subject_prefix, sent_early)], rest)
    if outcome == "unscanned":
        return itertools.chain([unscanned(header, result.reason or "scanner failed",
                                          sent_early)], rest)
    return iter([build_notice(header, result, size=spool.size, quarantine_id=quarantine_id,
                              hostname=hostname)])
