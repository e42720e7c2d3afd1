"""What a content scan says about a message, shared by the SMTP filter and the POP3 proxy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

Verdict = Literal["clean", "spam", "virus", "banned", "failed"]


@dataclass(frozen=True)
class ScanResult:
    verdict: Verdict
    # Spam: the score and the threshold it was compared with, and the rules that fired.
    score: float | None = None
    threshold: float | None = None
    rules: tuple[str, ...] = ()
    # Virus: the name the scanner gave (e.g. "Eicar-Test-Signature.UNOFFICIAL").
    virus: str | None = None
    # Banned or failed: why, in words for logs, replies and notices.
    reason: str = ""
    # Which scanners looked at it, for the X-Mailgate-Scan header.
    scanners: tuple[str, ...] = field(default_factory=tuple)
    # --- added by the filtering work (all optional, so older callers keep working) ---------
    # Banned by a header rule that names its own action ("reject", "quarantine", "drop",
    # "tag", "pass"); None means the [policy] action for the verdict applies.
    action: str | None = None
    # Failed because a scanner did not answer in time (counted towards holding the message).
    timed_out: bool = False
    # Not (fully) scanned because the message is larger than [scan] max_size or the
    # scanner's own stream limit; [scan] oversize_action applies instead of fail_mode.
    oversize: bool = False
    # What each scanner said, one "name: reply" line each, kept with quarantined mail.
    output: tuple[str, ...] = ()


class ContentScanner(Protocol):
    async def scan(self, content: bytes) -> ScanResult: ...
