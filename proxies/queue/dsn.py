"""Delivery status notifications (bounces and delay warnings), RFC 3464 in RFC 6522's
multipart/report.

The report has three parts (RFC 6522 3): a text/plain explanation for people, the
machine-readable message/delivery-status (RFC 3464 2.2, 2.3), and the original message's
headers as text/rfc822-headers (RFC 6522 4: the headers only, as Postfix does by default, so a
bounce never carries a whole message back). Where an address is not ASCII (SMTPUTF8), RFC 6533
applies: message/global-delivery-status, the "utf-8" address type and message/global-headers.

The notification goes from the null sender (RFC 5321 4.5.5) to the original sender; the caller
must never make one for a message whose sender was null.
"""

from __future__ import annotations

import re
import secrets
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

CRLF = "\r\n"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class DsnRecipient:
    """One recipient's line in the report (RFC 3464 2.3).

    `action` is "failed" or "delayed" (also "delivered", "relayed", "expanded");
    `status` an RFC 3463 code such as "5.1.1"; `diagnostic` the remote server's reply with its
    code, e.g. "550 5.1.1 <bob@example.org>: user unknown", given as Diagnostic-Code type
    `diagnostic_type` ("smtp" for a server's reply, "X-mailgate" for our own finding such as a
    refused connection).
    """

    address: str
    action: str
    status: str
    diagnostic: str | None = None
    diagnostic_type: str = "smtp"
    remote_mta: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None


def header_block(content: bytes) -> bytes:
    """The header section of a message (without the empty line that ends it)."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        index = content.find(separator)
        if index != -1:
            return content[:index + len(separator) // 2]
    return content


def build_dsn(*, reporting_mta: str, sender: str, recipients: Sequence[DsnRecipient],
              original: bytes, arrival: float, queue_id: str | None = None,
              now: float | None = None) -> bytes:
    """A complete notification message (CRLF line ends), to be queued from '' to `sender`.

    `original` is the original message (only its headers are used); `arrival` when we
    accepted it. The subject and explanation follow the recipients' actions: "failed" makes
    a bounce, only "delayed" a warning.
    """
    if not recipients:
        raise ValueError("a delivery status notification needs at least one recipient")
    if not sender:
        raise ValueError("never send a notification to the null sender (RFC 5321 4.5.5)")
    now = time.time() if now is None else now
    failed = any(r.action == "failed" for r in recipients)
    is_global = not sender.isascii() or not all(r.address.isascii() for r in recipients)
    boundary = f"=_mailgate_{secrets.token_hex(12)}"
    headers = header_block(original)
    eight_bit = not headers.isascii()

    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{_clean(sender)}>",
        "Subject: " + ("Undelivered Mail Returned to Sender" if failed
                       else "Delayed Mail (still being retried)"),
        f"Date: {_date(now)}",
        f"Message-ID: <{queue_id or 'dsn'}.{secrets.token_hex(6)}@{reporting_mta}>",
        # RFC 3834 5: mark it automatic so that auto-responders stay quiet.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: " + ("8bit" if eight_bit or is_global else "7bit"),
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    text = _explanation(reporting_mta, recipients, failed, now, arrival)
    text_part = [
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: " + ("7bit" if text.isascii() else "8bit"),
        "",
        text,
        "",
    ]
    status_fields = [f"Reporting-MTA: dns; {reporting_mta}"]
    if queue_id:
        status_fields.append(f"X-Mailgate-Queue-ID: {queue_id}")
    status_fields.append(f"Arrival-Date: {_date(arrival)}")
    status_fields.append("")
    for rcpt in recipients:
        address_type = "rfc822" if rcpt.address.isascii() else "utf-8"
        status_fields.append(f"Final-Recipient: {address_type}; {_clean(rcpt.address)}")
        status_fields.append(f"Action: {rcpt.action}")
        status_fields.append(f"Status: {rcpt.status}")
        if rcpt.remote_mta:
            status_fields.append(f"Remote-MTA: dns; {_clean(rcpt.remote_mta)}")
        if rcpt.diagnostic:
            status_fields.append(_fold(
                f"Diagnostic-Code: {rcpt.diagnostic_type}; {_clean(rcpt.diagnostic)}"))
        if rcpt.last_attempt is not None:
            status_fields.append(f"Last-Attempt-Date: {_date(rcpt.last_attempt)}")
        if rcpt.will_retry_until is not None:
            status_fields.append(f"Will-Retry-Until: {_date(rcpt.will_retry_until)}")
        status_fields.append("")
    status_type = "message/global-delivery-status" if is_global else "message/delivery-status"
    status_part = [
        f"--{boundary}",
        "Content-Description: Delivery report",
        f"Content-Type: {status_type}",
        "",
        *status_fields,
    ]
    header_type = "message/global-headers" if is_global else "text/rfc822-headers"
    head = CRLF.join([*top, *text_part, *status_part,
                      f"--{boundary}",
                      "Content-Description: Undelivered Message Headers",
                      f"Content-Type: {header_type}",
                      "Content-Transfer-Encoding: " + ("8bit" if eight_bit else "7bit"),
                      "", ""])
    headers = headers.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if headers and not headers.endswith(b"\r\n"):
        headers += b"\r\n"
    tail = f"{CRLF}--{boundary}--{CRLF}"
    return head.encode("utf-8", "surrogateescape") + headers + tail.encode("ascii")


def _explanation(reporting_mta: str, recipients: Sequence[DsnRecipient], failed: bool,
                 now: float, arrival: float) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if failed:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
            "For further assistance, please send mail to postmaster.",
            "",
            "If you do so, please include this problem report. You can",
            "delete your own text from the attached returned message.",
        ]
    else:
        hours = max(0, int((now - arrival) // 3600))
        until = [r.will_retry_until for r in recipients if r.will_retry_until is not None]
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            *textwrap.wrap(f"Your message could not be delivered for {hours} hour(s)."
                           + (f" It will be retried until {_date(max(until))}." if until
                              else ""), 72),
        ]
    lines.append("")
    for rcpt in recipients:
        reason = rcpt.diagnostic or f"status {rcpt.status}"
        where = f"host {rcpt.remote_mta} said: " if rcpt.remote_mta and rcpt.diagnostic else ""
        lines += textwrap.wrap(f"<{_clean(rcpt.address)}> ({rcpt.action}): {where}"
                               f"{_clean(reason)}", 72, subsequent_indent="    ",
                               break_long_words=False, break_on_hyphens=False)
    return CRLF.join(lines)


def _date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, tz=UTC))


def _clean(text: str) -> str:
    """One line of text: a reply may span lines and may hold control characters."""
    return _CONTROL.sub(" ", text).strip()


def _fold(line: str, width: int = 78) -> str:
    """Fold a long field at spaces (RFC 5322 2.2.3): continuation lines start with a tab."""
    if len(line) <= width:
        return line
    out: list[str] = []
    current = ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > width:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    out.append(current)
    return (CRLF + "\t").join(out)
