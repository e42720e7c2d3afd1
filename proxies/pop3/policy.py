"""What happens to a fetched message, from the scan verdict and the `[pop3]` actions.

The verdict -> action table is the one SMTP uses (`proxies.mail.actions`); this module fills it
from `[pop3]` and says what each action means here. Pure data in, one of five outcomes out, so
it is tested without any I/O:
- "deliver": the original, byte for byte;
- "tag": spam, header fields added (and the Subject prefixed);
- "replace": a notice instead, the original quarantined (when the quarantine cannot take it,
  the session answers as for "tempfail": a notice is never handed out for a lost original);
- "unscanned": the original with a header saying it was not scanned (fail_mode = "pass");
- "tempfail": the client gets -ERR [SYS/TEMP]; the message stays on the server.

rspamd's own action means nothing here beyond its verdict: its "greylist" and "soft reject"
ask the sending MTA to retry, and a message in a mailbox has no sender left to retry (a
-ERR would only make the client fetch it again and again), so such a message is delivered
as its verdict says; its "reject" is spam, and [pop3] spam applies. The table's `scanner`
map is therefore empty.
"""

from __future__ import annotations

from typing import Literal

from proxies.filtering import Action
from proxies.mail.actions import ActionTable, action_for
from proxies.pop3.config import Pop3Config
from proxies.scan.api import ScanResult

__all__ = ["Outcome", "decide"]

Outcome = Literal["deliver", "tag", "replace", "unscanned", "tempfail"]

# An action (`proxies.mail.actions`) in POP3 terms: a message cannot be refused or dropped once
# it sits in the mailbox, only replaced; "pass" is "deliver", or "unscanned" after a failure.
_OUTCOMES: dict[Action, Outcome] = {
    "pass": "deliver", "tag": "tag", "reject": "replace", "quarantine": "replace",
    "drop": "replace", "tempfail": "tempfail",
}


def actions(config: Pop3Config) -> ActionTable:
    """The `[pop3]` choices as the shared table ("replace" keeps the original: quarantine)."""
    return ActionTable(
        spam="tag" if config.spam_action == "tag" else "pass",
        virus="quarantine" if config.virus_action == "replace" else "pass",
        banned="quarantine" if config.banned_action == "replace" else "pass",
        oversize="pass" if config.oversize_action == "pass" else "tempfail",
        failed="tempfail" if config.fail_mode == "tempfail" else "pass",
        scanner={})  # see the module docstring: the verdict decides


def decide(result: ScanResult | None, config: Pop3Config) -> Outcome:
    """`result` None: the message was larger than max_scan_size and not scanned."""
    action = action_for(result, actions(config))
    if action == "pass" and result is not None and result.verdict == "failed" \
            and not result.oversize:
        return "unscanned"
    return _OUTCOMES[action]
