"""What the client gets instead of the original: a spam-tagged header, or a notice message.

Both keep the original's leading trace fields (Return-Path, Received, ...) as their first
bytes. That is what lets the keep-alive (`proxies.pop3.keepalive`) send those bytes to a
waiting client before the verdict is known: whatever the verdict, every message the client
can get starts with them. Added header fields go at the *end* of the header section, for the
same reason.

Headers are handled as bytes, field by field (RFC 5322 2.2: a field is a line starting with a
name and a colon, plus the folded lines after it that start with a space or tab); nothing is
re-encoded, so what is not changed stays byte-identical.
"""

from __future__ import annotations

import email.header
import email.utils
import re
import secrets
import time
from dataclasses import dataclass

from proxies.scan.api import ScanResult

__all__ = ["Header", "build_notice", "parse_header", "tag_spam", "trace_length", "unscanned"]

# Fields a delivering MTA or MDA puts on top of a message (RFC 5321 4.4, RFC 9228); everything
# we send before a verdict comes from these.
TRACE_FIELDS = frozenset({"return-path", "received", "delivered-to", "x-original-to",
                          "envelope-to", "x-envelope-from", "x-envelope-to"})
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
# How much of a message is looked at to find its header section.
HEADER_LIMIT = 256 * 1024


@dataclass(frozen=True)
class Header:
    """The header section of a message: `data` (up to and including the last field's line end),
    where the body starts, and the line ending the message uses."""

    data: bytes
    body_start: int
    eol: bytes
    fields: tuple[tuple[str, bytes], ...]  # (lower-case name, raw field with its line end)

    def first(self, name: str) -> bytes | None:
        """The raw value of the first field `name`, unfolded, without the line end."""
        for field_name, raw in self.fields:
            if field_name == name:
                value = raw.split(b":", 1)[1]
                return re.sub(rb"\r?\n(?=[ \t])", b"", value).strip()
        return None

    def offset_of(self, name: str) -> int | None:
        offset = 0
        for field_name, raw in self.fields:
            if field_name == name:
                return offset
            offset += len(raw)
        return None


def parse_header(head: bytes, complete: bool) -> Header | None:
    """The header section of a message starting with `head`.

    `complete`: `head` is the whole message, so one without an empty line is all header
    (TOP n 0 of a message with no body). None when the end of the header is not in `head`.
    """
    crlf, lf = head.find(b"\r\n\r\n"), head.find(b"\n\n")
    if head.startswith(b"\r\n"):
        end, body = 0, 2
    elif head.startswith(b"\n"):
        end, body = 0, 1
    elif crlf >= 0 and (lf < 0 or crlf < lf):
        end, body = crlf + 2, crlf + 4
    elif lf >= 0:
        end, body = lf + 1, lf + 2
    elif complete:
        end = body = len(head)
    else:
        return None
    data = head[:end]
    eol = b"\n" if b"\r\n" not in data and b"\n" in data else b"\r\n"
    fields: list[tuple[str, bytes]] = []
    for line in data.splitlines(keepends=True):
        match = _FIELD_NAME.match(line)
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
        elif match:
            fields.append((match.group(1).decode("ascii").lower(), line))
        else:
            fields.append(("", line))  # not a field: kept as it is, never matched
    return Header(data, body, eol, tuple(fields))


def trace_length(header: Header) -> int:
    """Octets of the leading trace fields: what may go to the client before the verdict."""
    length = 0
    for name, raw in header.fields:
        if name not in TRACE_FIELDS or not raw.endswith(b"\n"):
            break
        length += len(raw)
    return length


def _text(value: str, eol: bytes) -> bytes:
    # Our own header values are ASCII; fold nothing, strip line breaks a value may carry.
    return value.replace("\r", " ").replace("\n", " ").encode("ascii", "replace") + eol


def spam_fields(result: ScanResult, eol: bytes) -> bytes:
    score = "" if result.score is None else f" score={result.score:.1f}"
    required = "" if result.threshold is None else f" required={result.threshold:.1f}"
    tests = f" tests={','.join(result.rules)}" if result.rules else ""
    scanners = ",".join(result.scanners) or "unknown"
    return (_text("X-Spam-Flag: YES", eol)
            + _text(f"X-Spam-Status: Yes,{score}{required}{tests}"[:900], eol)
            + _text(f"X-Mailgate-Scan: spam; scanners={scanners}", eol))


def tag_spam(header: Header, result: ScanResult, subject_prefix: str, protected: int) -> bytes:
    """The header section of a spam message after tagging (replaces `header.data`).

    The Subject gets `subject_prefix` unless it already has it or it lies within the first
    `protected` octets (already sent by the keep-alive; trace fields never include it).
    """
    fields = [raw for _name, raw in header.fields]
    subject_at = header.offset_of("subject")
    prefix = subject_prefix.encode("utf-8")
    if prefix and subject_at is not None and subject_at >= protected:
        index = [name for name, _raw in header.fields].index("subject")
        raw = fields[index]
        name, _, value = raw.partition(b":")
        if not value.lstrip().startswith(prefix.strip()):
            fields[index] = name + b": " + prefix + value.lstrip(b" \t")
    elif prefix and subject_at is None:
        fields.append(b"Subject: " + prefix.rstrip() + header.eol)
    return b"".join(fields) + spam_fields(result, header.eol)


def unscanned(header: Header, reason: str) -> bytes:
    """The header section with a field saying the message passed unscanned (fail_mode pass)."""
    return header.data + _text(f"X-Mailgate-Scan: unscanned; reason={reason}"[:900], header.eol)


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
    out.append(_text(f"Message-ID: <{secrets.token_hex(12)}.notice@{hostname}>", eol))
    if original["message-id"]:
        out.append(b"X-Mailgate-Original-Message-ID: " + original["message-id"] + eol)
    out.append(_text("MIME-Version: 1.0", eol))
    out.append(_text("Content-Type: text/plain; charset=utf-8", eol))
    out.append(_text("Content-Transfer-Encoding: 8bit", eol))
    what = result.virus if result.verdict == "virus" else (result.reason or "banned")
    quarantined = f"; quarantine={quarantine_id}" if quarantine_id else ""
    out.append(_text(f"X-Mailgate-Scan: {result.verdict}; found={what}{quarantined}", eol))
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
         "The original could not be quarantined; ask your administrator."),
    ]
    body = "".join(line + eol.decode() for line in lines)
    out.append(body.encode("utf-8"))
    return b"".join(out)
