"""What happens to a fetched message, from the scan verdict and the `[pop3]` actions.

Pure data in, one of five outcomes out, so the table is tested without any I/O:
- "deliver": the original, byte for byte;
- "tag": spam, header fields added (and the Subject prefixed);
- "replace": a notice instead, the original quarantined;
- "unscanned": the original with a header saying it was not scanned (fail_mode = "pass");
- "tempfail": the client gets -ERR [SYS/TEMP]; the message stays on the server.
"""

from __future__ import annotations

from typing import Literal

from proxies.pop3.config import Pop3Config
from proxies.scan.api import ScanResult

__all__ = ["Outcome", "decide"]

Outcome = Literal["deliver", "tag", "replace", "unscanned", "tempfail"]

# ScanResult.action (a header rule's own action in the filtering engine) in POP3 terms: a
# message cannot be refused or dropped once it sits in the mailbox, only replaced.
_RULE_ACTIONS: dict[str, Outcome] = {
    "reject": "replace", "quarantine": "replace", "drop": "replace", "tag": "tag",
    "pass": "deliver",
}


def decide(result: ScanResult | None, config: Pop3Config) -> Outcome:
    """`result` None: the message was larger than max_scan_size and not scanned."""
    if result is None or (result.verdict == "failed" and result.oversize):
        return "deliver" if config.oversize_action == "pass" else "tempfail"
    if result.action is not None and result.action in _RULE_ACTIONS:
        return _RULE_ACTIONS[result.action]
    if result.verdict == "clean":
        return "deliver"
    if result.verdict == "spam":
        return "tag" if config.spam_action == "tag" else "deliver"
    if result.verdict == "virus":
        return "replace" if config.virus_action == "replace" else "deliver"
    if result.verdict == "banned":
        return "replace" if config.banned_action == "replace" else "deliver"
    return "tempfail" if config.fail_mode == "tempfail" else "unscanned"
