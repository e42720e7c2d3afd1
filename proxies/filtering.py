"""The filter hook: what runs on a message after DATA and before the `250`.

The content-filtering layer (antivirus, antispam, rules) implements `MessageFilter`; the SMTP
front end only acts on the verdict. Keeping the hook this small keeps policy out of the
protocol code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Action = Literal["pass", "tag", "reject", "tempfail", "quarantine", "drop"]


@dataclass(frozen=True)
class FilterInput:
    sender: str
    recipients: tuple[str, ...]
    client_address: str
    helo: str
    # Added for the quarantine, which keeps the envelope to deliver a released message the
    # way it would have gone (defaults keep older callers working).
    client_port: int = 0
    original_destination: tuple[str, int] | None = None
    smtputf8: bool = False
    body_8bit: bool = False
    # The name this gateway gives itself in the Received field it adds ([smtp] hostname):
    # the default authserv-id of the Authentication-Results field (RFC 8601 2.5).
    received_by: str = ""


@dataclass(frozen=True)
class FilterVerdict:
    action: Action = "pass"
    # The SMTP reply for reject/tempfail, e.g. "554 5.7.1 Virus found: Eicar-Test-Signature";
    # for quarantine the 250 naming the quarantine id (the filter has stored the message).
    reply: str | None = None
    # The message to queue instead of the original (tag: added headers, subject prefix).
    content: bytes | None = None
    reason: str = ""
    # What the scan found when it was not clean ("spam", "virus", "banned", "failed"), kept
    # with a message let through: the queue never bounces spam or a virus to its sender.
    verdict: str = ""


PASS = FilterVerdict()


class MessageFilter(Protocol):
    async def check(self, message: FilterInput, content: bytes) -> FilterVerdict: ...


class NoFilter:
    """Used when no scanner is configured: every message passes unchanged."""

    async def check(self, message: FilterInput, content: bytes) -> FilterVerdict:
        return PASS
