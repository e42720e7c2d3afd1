"""The queue's data: the envelope kept with each message, delivery state, and the errors.

Everything here is a frozen value; `proxies.queue.store.Queue` is what reads and writes them.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any


class QueueError(Exception):
    """Base class of the queue's errors."""


class QueueWriteError(QueueError):
    """The message could not be made durable; nothing of it is left in the queue.

    The SMTP front end answers `smtp_reply` (RFC 3463 4.3.0: "other or undefined mail system
    status"), so the client keeps the message and tries again later.
    """

    smtp_reply = "451 4.3.0 Error: queue file write error"


class QueueFullError(QueueWriteError):
    """The queue's file system is full (ENOSPC) or over quota (EDQUOT); nothing is left behind.

    RFC 5321 4.2.2 / RFC 3463 4.3.1: "452 Insufficient system storage".
    """

    smtp_reply = "452 4.3.1 Insufficient system storage"


class NoSuchMessage(QueueError, LookupError):
    """No message with this queue id is in the queue (any more)."""


class CorruptQueueFile(QueueError):
    """A queue file that cannot be parsed: incomplete (no end record) or damaged."""


@dataclass(frozen=True)
class Envelope:
    """What the SMTP session told us about a message, besides its content.

    `sender` is the reverse path without angle brackets; '' is the null sender (RFC 5321 4.5.5:
    bounces, which must never cause another bounce). `recipients` keeps RCPT order; duplicates
    are dropped. `client_address` is '' for messages this gateway made itself (notifications).
    `arrival` is filled in by `Queue.accept` when left None.

    `verification` says per recipient how its RCPT was checked against the server
    (proxies.smtp.verify.VERIFICATION: "live", "cache", "off", "relay-client", ...), as pairs
    (recipient, how) in RCPT order; it is empty for messages the gateway made itself, released
    from the quarantine, or queued by a version that did not record it. `verdict` is the
    content filter's ("spam", "virus", "banned"; "" clean or not scanned): a message our filter
    found to be spam or a virus never makes a notification, whatever happens to it.
    `crlf_only` says the SMTP handler made sure the content has CRLF line ends only (bare CR
    and LF normalised or refused) before it queued it, so delivery need not look again; a
    file from anywhere else (another tool, a restored backup) is checked on the way out.
    """

    sender: str
    recipients: tuple[str, ...]
    client_address: str = ""
    client_port: int = 0
    # Where the client was connecting to when we intercepted it; None when not intercepted.
    original_destination: tuple[str, int] | None = None
    helo: str = ""
    # The "with" protocol name of the Received: header (RFC 3848): SMTP, ESMTP, ESMTPS, ...
    protocol: str = "SMTP"
    smtputf8: bool = False
    body_8bit: bool = False
    tls: bool = False
    arrival: float | None = None
    verification: tuple[tuple[str, str], ...] = ()
    verdict: str = ""
    crlf_only: bool = False

    def __post_init__(self) -> None:
        recipients = tuple(dict.fromkeys(self.recipients))
        if not recipients:
            raise ValueError("an envelope needs at least one recipient")
        if not all(isinstance(r, str) and r for r in recipients):
            raise ValueError("recipients must be non-empty strings")
        object.__setattr__(self, "recipients", recipients)
        if self.original_destination is not None:
            host, port = self.original_destination
            object.__setattr__(self, "original_destination", (str(host), int(port)))
        if self.verification and tuple(r for r, _how in self.verification) != recipients:
            # One entry per recipient of this envelope (the first, as for the recipients).
            listed = set(recipients)
            shown = {rcpt: how for rcpt, how in reversed(self.verification) if rcpt in listed}
            object.__setattr__(self, "verification",
                               tuple((r, shown[r]) for r in recipients if r in shown))

    def verification_of(self, recipient: str) -> str:
        """How `recipient` was checked at RCPT; '' when that was not recorded."""
        for rcpt, how in self.verification:
            if rcpt == recipient:
                return how
        return ""


class RecipientStatus(enum.StrEnum):
    PENDING = "pending"  # not tried yet
    DEFERRED = "deferred"  # a temporary failure; will be tried again
    DELIVERED = "delivered"  # the next hop answered 2xx
    BOUNCED = "bounced"  # 5xx, or given up after the queue lifetime; a DSN was queued

    @property
    def is_final(self) -> bool:
        return self in (RecipientStatus.DELIVERED, RecipientStatus.BOUNCED)


@dataclass(frozen=True)
class RecipientState:
    address: str
    status: RecipientStatus = RecipientStatus.PENDING
    # The last reply for this recipient: SMTP code (0 when there was none) and text.
    code: int | None = None
    text: str = ""
    remote_mta: str | None = None
    connected: bool = True  # the reply came from a server (not e.g. "connection refused")
    expired: bool = False  # bounced because the queue lifetime ran out


# Why bounced recipients got no notification (AttemptOutcome.no_dsn, the queue_bounced log
# line, mailgate_bounce_notifications_total's result): RFC 5321 4.5.5 for the null sender; a
# spam or virus verdict of our own filter; the sender domain over [smtp] bounce_rate_limit.
NO_DSN_NULL_SENDER = "null_sender"
NO_DSN_SPAM = "spam_verdict"
NO_DSN_VIRUS = "virus_verdict"
NO_DSN_RATE_LIMITED = "rate_limited"


@dataclass(frozen=True)
class DeliveryState:
    """The part of a queue file that changes: written whole after each attempt."""

    recipients: tuple[RecipientState, ...]
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None
    last_error: str | None = None

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(r.address for r in self.recipients if not r.status.is_final)


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


@dataclass(frozen=True)
class DeliveryResult:
    """One reply of a delivery attempt, for one recipient or for the whole message.

    `code` is the SMTP reply code (2xx delivered, 4xx deferred, 5xx bounced); `text` is the
    reply text after the code, e.g. "5.1.1 <bob@example.org>: user unknown". `connected` says
    whether a server actually gave this reply (False: we never got one, e.g. connection
    refused; the code then only says how to treat it, 451 temporary, 550 permanent).
    """

    code: int
    text: str
    connected: bool = True
    remote_mta: str | None = None

    @property
    def kind(self) -> RecipientStatus:
        if 200 <= self.code < 300:
            return RecipientStatus.DELIVERED
        if 500 <= self.code < 600:
            return RecipientStatus.BOUNCED
        # 4xx, and anything unexpected, is treated as temporary: never lose mail over a
        # reply we do not understand.
        return RecipientStatus.DEFERRED

    @property
    def enhanced_status(self) -> str:
        """RFC 3463 status from the text, or a generic one from the code class."""
        match = _ENHANCED.match(self.text.strip())
        if match and match.group(1) == str(self.code)[:1]:
            return match.group(0)
        return {RecipientStatus.DELIVERED: "2.0.0", RecipientStatus.BOUNCED: "5.0.0"}.get(
            self.kind, "4.0.0")

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.connected else self.text


@dataclass(frozen=True)
class QueueEntry:
    """A message as `mailq` shows it. `status` is the directory it is in: incoming (new),
    active (being delivered), deferred (waiting for a retry) or hold."""

    queue_id: str
    status: str
    size: int
    envelope: Envelope
    state: DeliveryState
    # When it will be tried next; None while held or being delivered.
    next_attempt: float | None

    @property
    def arrival(self) -> float:
        assert self.envelope.arrival is not None
        return self.envelope.arrival

    @property
    def sender(self) -> str:
        return self.envelope.sender

    @property
    def recipients(self) -> tuple[RecipientState, ...]:
        return self.state.recipients

    @property
    def held(self) -> bool:
        return self.status == "hold"

    @property
    def last_error(self) -> str | None:
        return self.state.last_error

    @property
    def attempts(self) -> int:
        return self.state.attempts

    def as_json(self) -> dict[str, Any]:
        env = self.envelope
        return {
            "queue_id": self.queue_id,
            "status": self.status,
            "size": self.size,
            "arrival": self.arrival,
            "sender": env.sender,
            "recipients": [
                {"address": r.address, "status": str(r.status), "code": r.code,
                 "text": r.text, "remote_mta": r.remote_mta, "expired": r.expired,
                 "verification": env.verification_of(r.address) or None}
                for r in self.state.recipients
            ],
            "verdict": env.verdict or None,
            "attempts": self.state.attempts,
            "last_attempt": self.state.last_attempt,
            "last_error": self.state.last_error,
            "next_attempt": self.next_attempt,
            "held": self.held,
            "client_address": env.client_address,
            "client_port": env.client_port,
            "original_destination": list(env.original_destination)
            if env.original_destination else None,
            "helo": env.helo,
            "protocol": env.protocol,
            "smtputf8": env.smtputf8,
            "body_8bit": env.body_8bit,
            "tls": env.tls,
        }


@dataclass(frozen=True)
class ClaimedMessage:
    """A message taken for delivery (moved to active/): deliver to `pending`, then call
    `Queue.record_attempt` (or `Queue.release_claim` to put it back untried)."""

    queue_id: str
    envelope: Envelope
    pending: tuple[str, ...]
    attempts: int
    content: bytes = field(repr=False)

    def read_content(self) -> bytes:
        return self.content


@dataclass(frozen=True)
class AttemptOutcome:
    """What `Queue.record_attempt` decided, per recipient of this attempt."""

    queue_id: str
    delivered: tuple[str, ...] = ()
    deferred: tuple[str, ...] = ()
    bounced: tuple[str, ...] = ()
    next_attempt: float | None = None  # None unless something was deferred
    dsn_id: str | None = None  # queue id of the delivery status notification, if one was made
    no_dsn: str | None = None  # why bounced recipients got none (NO_DSN_*), if they did not
    removed: bool = False  # every recipient is final: the message left the queue
    missing: bool = False  # the message was deleted meanwhile (e.g. `mailgate queue delete`)

    def __str__(self) -> str:
        parts = [f"{name}={','.join(v)}" for name, v in (
            ("delivered", self.delivered), ("deferred", self.deferred),
            ("bounced", self.bounced)) if v]
        if self.dsn_id:
            parts.append(f"dsn={self.dsn_id}")
        if self.no_dsn:
            parts.append(f"no_dsn={self.no_dsn}")
        if self.removed:
            parts.append("removed")
        if self.missing:
            parts.append("missing")
        return " ".join(parts) or "nothing"


@dataclass(frozen=True)
class RecoveryReport:
    """What `Queue.recover` found and did."""

    removed_partial: int = 0  # half-written files of dead writers, deleted
    requeued_active: int = 0  # messages whose delivery was cut off, put back
    corrupt: int = 0  # unreadable files moved to corrupt/
    queued: int = 0  # messages waiting (incoming + deferred) afterwards
    held: int = 0
    foreign: int = 0  # files whose names are not the queue's, left where they are

    def as_fields(self) -> dict[str, Any]:
        """For structured logs: `logs.event("queue_recovered", **report.as_fields())`."""
        return {"removed_partial": self.removed_partial, "requeued_active": self.requeued_active,
                "corrupt": self.corrupt, "queued": self.queued, "held": self.held,
                "foreign": self.foreign}
