"""What a content scan says about a message, shared by the SMTP filter and the POP3 proxy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Verdict = Literal["clean", "spam", "virus", "banned", "failed"]
# What a scanner that decides actions itself asked the MTA to do: rspamd's actions (its
# "Protocol" documentation; `discard` and `quarantine` since rspamd 2). What each means is the
# protocol's table (proxies.mail.actions), not the scanner's.
ScannerAction = Literal["no action", "greylist", "add header", "rewrite subject",
                        "soft reject", "reject", "quarantine", "discard"]
SCANNER_ACTIONS: tuple[ScannerAction, ...] = (
    "no action", "greylist", "add header", "rewrite subject", "soft reject", "reject",
    "quarantine", "discard")
# RFC 8601 2.7 methods mailgate reports (from rspamd's symbols) ...
AuthMethod = Literal["spf", "dkim", "dmarc"]
# ... and their results (RFC 8601 2.7.1-2.7.2, RFC 7489 11.2; "policy" is never reported).
AuthOutcome = Literal["pass", "fail", "softfail", "neutral", "none", "temperror",
                      "permerror"]


@dataclass(frozen=True)
class AuthResult:
    """One message authentication result a scanner reported (RFC 8601 2.2 `resinfo`)."""

    method: AuthMethod
    result: AuthOutcome
    # The domain it is about when the scanner named one: DKIM's signing domain (header.d),
    # DMARC's author domain (header.from). SPF's identity is the envelope's, not the
    # scanner's (smtp.mailfrom / smtp.helo: proxies.mail.authresults).
    domain: str = ""
    # DKIM's selector (header.s), when the scanner named it.
    selector: str = ""


@dataclass(frozen=True)
class ScanEnvelope:
    """What the SMTP session told about a message, for scanners that judge more than the
    content (rspamd: greylisting keys on client address, sender and recipients; SPF on
    address, HELO and sender)."""

    client_address: str
    helo: str
    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    # The name this gateway gives itself ([smtp] hostname).
    received_by: str = ""


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
    # rspamd's action, None when no scanner that decides actions looked; the protocol's
    # table says what it means (proxies.mail.actions).
    scanner_action: ScannerAction | None = None
    # rspamd's text for the SMTP client with that action (its `messages.smtp_message`,
    # e.g. "Try again later" for greylisting); "" when it gave none.
    scanner_message: str = ""
    # SPF, DKIM and DMARC results, for the Authentication-Results field.
    auth: tuple[AuthResult, ...] = ()


class ContentScanner(Protocol):
    async def scan(self, content: bytes, envelope: ScanEnvelope | None = None
                   ) -> ScanResult: ...


class ScanStream(Protocol):
    """A scan under way while the message still arrives (POP3: from the server).

    `feed` never blocks and never fails: what cannot be streamed (a scanner that is slower than
    the server, a connection that broke) is scanned whole by `finish`, which is given the whole
    content for that, and for whatever judges only whole messages. `cancel` when the message
    will not be finished (the server went away, it was too large, its verdict was known)."""

    def feed(self, data: bytes) -> None: ...

    async def finish(self, content: bytes) -> ScanResult: ...

    def cancel(self) -> None: ...


@runtime_checkable
class StreamingScanner(ContentScanner, Protocol):
    @property
    def can_stream(self) -> bool:
        """Whether `stream` can ever give a stream (a scanner configured that takes pieces)."""
        ...

    def stream(self) -> ScanStream | None:
        """A scan to feed as the message arrives, or None when none can be started now."""
        ...
