"""The scan verdict -> action table, one for both protocols.

Each protocol fills an `ActionTable` from its own config (SMTP's `[policy]` and `[scan]`, POP3's
`[pop3]`) and turns the action into what it can do: SMTP answers the final dot (reject is a
5xx, tempfail a 451, quarantine keeps it), POP3 can only hand out the message, a tagged copy or
a notice, or say -ERR [SYS/TEMP] (a message in a mailbox cannot be refused any more).

    verdict    action (first row that applies)
    (none)     table.oversize: not scanned, over the protocol's own size limit
    failed     table.oversize when the message was too big to scan, else table.failed
    banned     the header rule's own action, else table.banned
    virus      table.virus
    any other  table.scanner[rspamd's action], when the table has that action
    spam       reject at or above table.spam_reject_score, else table.spam
    clean      pass

rspamd's actions (`ScanResult.scanner_action`) in SMTP's table (`SMTP_SCANNER_ACTIONS`):
"greylist" and "soft reject" are `tempfail` (451 4.7.1: the sender's queue retries, which is
how greylisting works), "reject" is `reject`, "quarantine" `quarantine`, "discard" `drop`;
"add header" and "rewrite subject" are spam, so `[policy] spam` (tag by default). They come
after virus, banned and failed: a virus is refused at once rather than greylisted, and a
scanner failure is not hidden by another scanner's request. POP3's table is empty: the
message is in the mailbox already, nobody can retry or refuse it, so rspamd's action means
nothing there beyond its verdict (spam for the marking and refusing actions, else clean).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from proxies.filtering import Action
from proxies.scan.api import ScannerAction, ScanResult

__all__ = ["SMTP_SCANNER_ACTIONS", "Action", "ActionTable", "action_for", "parse_action"]

_ACTIONS: dict[str, Action] = {"pass": "pass", "tag": "tag", "reject": "reject",
                               "quarantine": "quarantine", "drop": "drop",
                               "tempfail": "tempfail"}

# What rspamd's actions mean to an SMTP server (rspamd's "Actions" documentation: what the MTA
# is asked to do). Those not here are decided by the verdict.
SMTP_SCANNER_ACTIONS: Mapping[ScannerAction, Action] = MappingProxyType({
    "greylist": "tempfail",
    "soft reject": "tempfail",
    "reject": "reject",
    "quarantine": "quarantine",
    "discard": "drop",
})


def parse_action(name: str) -> Action:
    """A config value as an Action; the config checked the name already (KeyError if not)."""
    return _ACTIONS[name]


@dataclass(frozen=True)
class ActionTable:
    """What each verdict gets."""

    spam: Action
    virus: Action
    banned: Action
    # Not (fully) scanned because the message is larger than the scan limit.
    oversize: Action
    # A scanner failed (down, timed out, an error): "tempfail", or "pass" unscanned.
    failed: Action
    spam_reject_score: float | None = None
    # What a scanner's own action means (rspamd's); an action not in it goes by the verdict.
    scanner: Mapping[ScannerAction, Action] = field(
        default_factory=lambda: MappingProxyType({}))

    def over_reject_score(self, result: ScanResult) -> bool:
        limit = self.spam_reject_score
        return limit is not None and result.score is not None and result.score >= limit

    def scanner_request(self, result: ScanResult) -> Action | None:
        """The action the scanner's own action stands for here, or None."""
        if result.scanner_action is None:
            return None
        return self.scanner.get(result.scanner_action)


def action_for(result: ScanResult | None, table: ActionTable) -> Action:
    """The action for a scan result; None: not scanned, being over the protocol's own size
    limit (the same as a result that says oversize)."""
    if result is None or (result.verdict == "failed" and result.oversize):
        return table.oversize
    if result.verdict == "failed":
        return table.failed
    if result.verdict == "banned":
        return parse_action(result.action) if result.action else table.banned
    if result.verdict == "virus":
        return table.virus
    requested = table.scanner_request(result)
    if requested is not None:
        return requested
    if result.verdict == "spam":
        return "reject" if table.over_reject_score(result) else table.spam
    return "pass"
