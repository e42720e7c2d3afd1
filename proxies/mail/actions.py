"""The scan verdict -> action table, one for both protocols.

Each protocol fills an `ActionTable` from its own config (SMTP's `[policy]` and `[scan]`, POP3's
`[pop3]`) and turns the action into what it can do: SMTP answers the final dot (reject is a
5xx, tempfail a 451, quarantine keeps it), POP3 can only hand out the message, a tagged copy or
a notice, or say -ERR [SYS/TEMP] (a message in a mailbox cannot be refused any more).

    verdict    action
    clean      pass
    spam       table.spam; reject at or above table.spam_reject_score
    virus      table.virus
    banned     the header rule's own action, else table.banned
    failed     table.oversize when the message was too big to scan, else table.failed
"""

from __future__ import annotations

from dataclasses import dataclass

from proxies.filtering import Action
from proxies.scan.api import ScanResult

__all__ = ["Action", "ActionTable", "action_for", "parse_action"]

_ACTIONS: dict[str, Action] = {"pass": "pass", "tag": "tag", "reject": "reject",
                               "quarantine": "quarantine", "drop": "drop",
                               "tempfail": "tempfail"}


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

    def over_reject_score(self, result: ScanResult) -> bool:
        limit = self.spam_reject_score
        return limit is not None and result.score is not None and result.score >= limit


def action_for(result: ScanResult | None, table: ActionTable) -> Action:
    """The action for a scan result; None: not scanned, being over the protocol's own size
    limit (the same as a result that says oversize)."""
    if result is None or (result.verdict == "failed" and result.oversize):
        return table.oversize
    if result.verdict == "clean":
        return "pass"
    if result.verdict == "spam":
        return "reject" if table.over_reject_score(result) else table.spam
    if result.verdict == "virus":
        return table.virus
    if result.verdict == "banned":
        return parse_action(result.action) if result.action else table.banned
    return table.failed
