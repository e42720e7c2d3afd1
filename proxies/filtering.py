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


@dataclass(frozen=True)
class FilterVerdict:
    action: Action = "pass"
    # The SMTP reply for reject/tempfail, e.g. "554 5.7.1 Virus found: Eicar-Test-Signature".
    reply: str | None = None
    # The message to queue instead of the original (tag: added headers, subject prefix).
    content: bytes | None = None
    reason: str = ""


PASS = FilterVerdict()


class MessageFilter(Protocol):
    async def check(self, message: FilterInput, content: bytes) -> FilterVerdict: ...


class NoFilter:
    """Used when no scanner is configured: every message passes unchanged."""

    async def check(self, message: FilterInput, content: bytes) -> FilterVerdict:
        return PASS
