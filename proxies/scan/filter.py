"""The SMTP filter hook built from the config: scan, decide, act.

What happens to a message (the README's table):

    verdict   action from           default    reply to the SMTP client
    clean     -                     pass       250 (message byte-identical, unless
                                               [policy] add_scan_header)
    spam      [policy] spam         tag        250; reject when score >= spam_reject_score
    virus     [policy] virus        reject     554 5.7.1 Virus found: NAME
    banned    [policy] banned, or   reject     554 5.7.1 Message rejected: WHY
              the header rule's action
    failed    [scan] fail_mode      tempfail   451 4.7.1; "pass": 250 with
                                               X-Mailgate-Scan: not scanned: WHY
    oversize  [scan] oversize_action pass      250 with X-Mailgate-Scan: not scanned: WHY

    rspamd's action (after virus, banned and failed; `proxies.mail.actions`)
    greylist         tempfail   451 4.7.1 and rspamd's text ("Try again later")
    soft reject      tempfail   451 4.7.1 and rspamd's text
    reject           reject     554 5.7.1 Message rejected as spam
    quarantine       quarantine 250 with the quarantine id
    discard          drop       250
    add header,      spam: [policy] spam (tag)
    rewrite subject
    no action        by the other scanners' verdict (clean: pass)

Actions: pass (deliver), tag (deliver with X-Spam-Flag/X-Spam-Score/X-Spam-Status and
X-Mailgate-Scan, any copies the sender forged removed, and [policy] subject_prefix for spam),
reject (5xx at end of DATA), quarantine (kept in [quarantine] dir, not delivered, 250 with the
quarantine id; 451 4.3.0 when it cannot be written), drop (250, discarded, logged). The table
and the tagging are the POP3 proxy's too (`proxies.mail.actions`, `proxies.mail.tagging`).

Authentication-Results (RFC 8601, `proxies.mail.authresults`): every message loses the
fields that claim our authserv-id ([policy] authserv_id, else [smtp] hostname), scanned or not
(`BorderFilter` when nothing is configured to scan); delivered mail (pass, tag) gains ours
with the SPF, DKIM and DMARC results rspamd reported, when it reported any.

One policy per message. The filter runs once, at the end of DATA, and the reply to the final
dot is the only answer SMTP gives for the content; it is the same for every recipient (RFC
5321 4.2.5 allows per-recipient replies only with LMTP). So the [policy] section applies to
the whole message whoever the recipients are; per-recipient preferences would need the
message split into one transaction per recipient, which this gateway does not do.

A message that keeps timing a scanner out is not rescanned forever: with fail_mode
"tempfail" each timeout is remembered by the SHA-256 of the content for [scan]
timeout_memory; the max_timeouts-th time the same content times out it is quarantined
(verdict failed, 250 to the client) instead of tempfailed again, for a human to look at and
release. The memory is per process (a restart or each of several workers starts afresh,
which only delays the hold).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxies import logs, metrics
from proxies.filtering import PASS, Action, FilterInput, FilterVerdict, MessageFilter
from proxies.mail.actions import SMTP_SCANNER_ACTIONS, ActionTable, action_for, parse_action
from proxies.mail.authresults import authentication_results, remove_forged, valid_authserv_id
from proxies.mail.tagging import OUR_FIELDS, SCAN_FIELD, field, sanitise, tag
from proxies.quarantine import Quarantine
from proxies.scan.api import ContentScanner, ScanEnvelope, ScanResult
from proxies.scan.clamd import ClamdClient
from proxies.scan.config import ScanConfig
from proxies.scan.engine import MultiScanner, ScannerClient
from proxies.scan.rspamd import RspamdClient
from proxies.scan.rules import ContentRules
from proxies.scan.spamd import SpamdClient

TEMPFAIL_REPLY = "451 4.7.1 Message cannot be scanned now, try again later"
# rspamd asked for a temporary failure without saying why (its greylist module says "Try
# again later" itself).
GREYLIST_REPLY = "451 4.7.1 Greylisted, try again later"
# Entries kept by TimeoutMemory at most (the oldest go first).
TIMEOUT_MEMORY_ENTRIES = 10000


class TimeoutMemory:
    """Content hash -> how often it timed a scanner out, within `window` seconds.

    With `directory`, the counts are small files there, so every SMTP worker process (and a
    restarted daemon) sees the same count; a lost update only delays the quarantine by one
    more timeout, so the files are replaced atomically but not fsynced.
    """

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic,
                 limit: int = TIMEOUT_MEMORY_ENTRIES, directory: Path | None = None) -> None:
        self.window = window
        self.clock = clock if directory is None else time.time
        self.limit = limit
        self.directory = directory
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def record(self, digest: str) -> int:
        """Count one more timeout of this content; return the count (1 the first time)."""
        now = self.clock()
        count, first = self._load(digest) if self.directory else self._seen.pop(digest, (0, now))
        if now - first > self.window:
            count, first = 0, now
        self._store(digest, count + 1, first)
        return count + 1

    def forget(self, digest: str) -> None:
        self._seen.pop(digest, None)
        if self.directory is not None:
            with contextlib.suppress(OSError):
                (self.directory / digest).unlink()

    def _load(self, digest: str) -> tuple[int, float]:
        assert self.directory is not None
        try:
            count, first = (self.directory / digest).read_text().split()
            return int(count), float(first)
        except (OSError, ValueError):
            return 0, self.clock()

    def _store(self, digest: str, count: int, first: float) -> None:
        if self.directory is None:
            self._seen[digest] = (count, first)
            while len(self._seen) > self.limit:
                self._seen.popitem(last=False)
            return
        with contextlib.suppress(OSError):
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{digest}.{os.getpid()}"
            tmp.write_text(f"{count} {first}\n")
            tmp.replace(self.directory / digest)


class ScanFilter:
    """The MessageFilter of proxies.filtering for a ScanConfig (see the module docstring)."""

    def __init__(self, config: ScanConfig, scanner: ContentScanner,
                 quarantine: Quarantine | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 timeout_dir: Path | None = None) -> None:
        self.config = config
        self.policy = config.policy
        self.actions = ActionTable(
            spam=parse_action(config.policy.spam), virus=parse_action(config.policy.virus),
            banned=parse_action(config.policy.banned),
            oversize=parse_action(config.oversize_action), failed=parse_action(config.fail_mode),
            spam_reject_score=config.policy.spam_reject_score, scanner=SMTP_SCANNER_ACTIONS)
        self.scanner = scanner
        self._quarantine = quarantine
        self.timeouts = TimeoutMemory(config.timeout_memory, clock,
                                      directory=timeout_dir)

    @property
    def quarantine(self) -> Quarantine:
        if self._quarantine is None:
            self._quarantine = Quarantine(self.config.quarantine.dir,
                                          retention=self.config.quarantine.retention)
        return self._quarantine

    async def check(self, message: FilterInput, content: bytes) -> FilterVerdict:
        started = time.monotonic()
        envelope = ScanEnvelope(message.client_address, message.helo, message.sender,
                                message.recipients, message.received_by)
        result = await self.scanner.scan(content, envelope)
        action, why = self.decide(result, content)
        # The scanners saw the message as it came; whatever is kept or delivered has lost
        # the forged Authentication-Results first.
        authserv_id = self.policy.authserv_id or message.received_by
        cleaned = remove_forged(content, authserv_id)
        delivered = content if cleaned is None else cleaned
        verdict = await self.act(action, why, result, message, delivered)
        if verdict.action in ("pass", "tag"):
            verdict = self._with_auth_results(verdict, result, message, authserv_id,
                                              delivered, cleaned is not None)
        if result.verdict != "clean":
            verdict = dataclasses.replace(verdict, verdict=result.verdict)
        metrics.current.filter_verdict(result.verdict, verdict.action)
        fields: dict[str, Any] = {"verdict": result.verdict, "action": verdict.action,
                  "scanners": ",".join(result.scanners), "sender": message.sender or "<>",
                  "rcpts": ",".join(message.recipients), "client": message.client_address,
                  "size": len(content), "seconds": round(time.monotonic() - started, 3)}
        if result.score is not None:
            fields["score"] = result.score
        if result.scanner_action is not None:
            fields["rspamd_action"] = result.scanner_action
        if result.auth:
            fields["auth"] = " ".join(f"{r.method}={r.result}" for r in result.auth)
        if result.virus:
            fields["virus"] = result.virus
        if why or result.reason:
            fields["reason"] = why or result.reason
        if result.verdict == "failed":
            logs.warning("scan_failed", **fields)
        else:
            logs.event("scan_done", **fields)
        return verdict

    @staticmethod
    def _with_auth_results(verdict: FilterVerdict, result: ScanResult, message: FilterInput,
                           authserv_id: str, delivered: bytes,
                           cleaned: bool) -> FilterVerdict:
        """`verdict` (pass or tag of `delivered`, which is `cleaned` of forged fields or the
        message as it came) with our Authentication-Results field on top when there are
        results to give; its content stays None only when nothing at all changed, so such a
        message goes out byte for byte."""
        content = verdict.content
        if content is None and cleaned:
            content = delivered
        ours = authentication_results(authserv_id, result.auth, sender=message.sender,
                                      helo=message.helo) \
            if valid_authserv_id(authserv_id) else None
        if ours is not None:
            content = ours + (delivered if content is None else content)
        return dataclasses.replace(verdict, content=content)

    # --- deciding ---------------------------------------------------------------------------

    def decide(self, result: ScanResult, content: bytes) -> tuple[Action, str]:
        """The action for a scan result (`proxies.mail.actions`) and, when it is not plain
        policy, why."""
        action = action_for(result, self.actions)
        if _scanner_decided(result, action, self.actions):
            return action, f"rspamd action {result.scanner_action!r}"
        if result.verdict == "spam" and self.actions.over_reject_score(result):
            return action, f"spam score {result.score:g} >= {self.policy.spam_reject_score:g}"
        if action == "tempfail" and result.verdict == "failed" and not result.oversize \
                and result.timed_out:
            digest = hashlib.sha256(content).hexdigest()
            count = self.timeouts.record(digest)
            if count >= self.config.max_timeouts:
                self.timeouts.forget(digest)
                return "quarantine", f"scan timed out {count} times"
        return action, ""

    # --- acting ---------------------------------------------------------------------------

    async def act(self, action: Action, why: str, result: ScanResult, message: FilterInput,
                  content: bytes) -> FilterVerdict:
        reason = why or _describe(result)
        if action == "pass":
            headers = []
            if result.verdict == "failed" or self.policy.add_scan_header:
                headers = [field(SCAN_FIELD, scan_header_value(result))]
            changed = tag(content, headers) if headers else None
            return FilterVerdict("pass", content=changed, reason=reason)
        if action == "tag":
            return FilterVerdict("tag", content=self.tagged(result, content), reason=reason)
        asked = _scanner_decided(result, action, self.actions)
        if action == "reject":
            return FilterVerdict("reject", reply=reject_reply(
                result, result.scanner_message if asked and result.scanner_message else why),
                reason=reason)
        if action == "tempfail":
            return FilterVerdict("tempfail", reply=tempfail_reply(result) if asked
                                 else TEMPFAIL_REPLY, reason=reason)
        if action == "drop":
            return FilterVerdict("drop", reason=reason)
        return await self._quarantine_message(result, why, message, content)

    def tagged(self, result: ScanResult, content: bytes) -> bytes:
        headers = []
        prefix = ""
        if result.verdict == "spam":
            score = result.score or 0.0
            threshold = result.threshold if result.threshold is not None else 0.0
            headers += [
                field("X-Spam-Flag", "YES"),
                field("X-Spam-Score", f"{score:.1f}"),
                field("X-Spam-Status", f"Yes, score={score:.1f} required={threshold:.1f} "
                                       f"tests={','.join(result.rules) or 'none'}"),
            ]
            prefix = self.policy.subject_prefix
        headers.append(field(SCAN_FIELD, scan_header_value(result)))
        return tag(content, headers, remove=OUR_FIELDS, subject_prefix=prefix)

    async def _quarantine_message(self, result: ScanResult, why: str, message: FilterInput,
                                  content: bytes) -> FilterVerdict:
        reason = why or _describe(result)
        try:
            quarantine = self.quarantine
            entry_id = await asyncio.to_thread(
                quarantine.store, sender=message.sender, recipients=message.recipients,
                content=content, result=result, reason=reason, source="smtp",
                client_address=message.client_address, client_port=message.client_port,
                helo=message.helo, original_destination=message.original_destination,
                smtputf8=message.smtputf8, body_8bit=message.body_8bit)
        except OSError as exc:
            logs.error("quarantine_write_failed", error=str(exc), reason=reason)
            return FilterVerdict("tempfail", reply="451 4.3.0 Error: quarantine write error",
                                 reason=reason)
        logs.event("quarantined", id=entry_id, verdict=result.verdict, reason=reason,
                   sender=message.sender or "<>", rcpts=",".join(message.recipients))
        return FilterVerdict("quarantine", reply=f"250 2.0.0 Ok: quarantined as {entry_id}",
                             reason=reason)


def _scanner_decided(result: ScanResult, action: Action, table: ActionTable) -> bool:
    """Whether `action` is what rspamd's own action stands for (not a verdict's)."""
    return result.verdict in ("clean", "spam") and table.scanner_request(result) == action


def tempfail_reply(result: ScanResult) -> str:
    """The 451 for rspamd's greylist or soft reject: RFC 3463 4.7.1 (delivery not authorized
    now), with rspamd's own words when it gave some ("Try again later")."""
    if result.scanner_message:
        return f"451 4.7.1 {result.scanner_message}"
    return GREYLIST_REPLY if result.scanner_action == "greylist" \
        else "451 4.7.1 Try again later"


def _describe(result: ScanResult) -> str:
    if result.verdict == "virus":
        return f"virus {result.virus}"
    if result.verdict == "spam":
        return f"spam score {result.score:g}" if result.score is not None else "spam"
    if result.verdict in ("banned", "failed"):
        return result.reason or result.verdict
    return "clean"


def scan_header_value(result: ScanResult) -> str:
    """X-Mailgate-Scan: what was found and which scanners looked."""
    scanners = f" ({', '.join(result.scanners)})" if result.scanners else ""
    if result.verdict == "failed":
        return f"not scanned: {result.reason or 'scanner failure'}{scanners}"
    if result.verdict == "spam":
        return f"spam score={result.score or 0:.1f} required={result.threshold or 0:.1f}" \
               f"{scanners}"
    if result.verdict == "virus":
        return f"virus {result.virus}{scanners}"
    if result.verdict == "banned":
        return f"banned: {result.reason}{scanners}"
    return f"clean{scanners}"


def reject_reply(result: ScanResult, why: str = "") -> str:
    """The 5xx for a rejected message (RFC 3463 5.7.1: delivery not authorized, message
    refused; 5.3.4: message too big for system)."""
    if result.verdict == "virus":
        return f"554 5.7.1 Virus found: {sanitise(result.virus or 'unknown')[:200]}"
    if result.verdict == "spam":
        return f"554 5.7.1 Message rejected as spam ({sanitise(why)[:200]})" if why \
            else "554 5.7.1 Message rejected as spam"
    if result.oversize:
        return "552 5.3.4 Message too big to be scanned"
    if result.verdict == "banned":
        return f"554 5.7.1 Message rejected: {sanitise(result.reason)[:300]}"
    return "554 5.7.1 Message rejected"


def build_multi_scanner(config: ScanConfig) -> MultiScanner:
    clients: list[ScannerClient] = []
    if config.clamd is not None:
        clients.append(ClamdClient(config.clamd))
    if config.spamd is not None:
        clients.append(SpamdClient(config.spamd))
    if config.rspamd is not None:
        clients.append(RspamdClient(config.rspamd))
    return MultiScanner(clients, ContentRules(config.policy), config.max_size)


class BorderFilter:
    """The filter when nothing is configured to scan: only the forged Authentication-Results
    fields go (RFC 8601 5: a border MTA removes those claiming its authserv-id, whether or
    not it checks anything itself)."""

    def __init__(self, authserv_id: str = "") -> None:
        self.authserv_id = authserv_id

    async def check(self, message: FilterInput, content: bytes) -> FilterVerdict:
        cleaned = remove_forged(content, self.authserv_id or message.received_by)
        if cleaned is None:
            return PASS
        logs.event("forged_auth_results_removed", sender=message.sender or "<>",
                   client=message.client_address)
        return FilterVerdict("pass", content=cleaned, reason="forged Authentication-Results")


def build_filter(config: ScanConfig) -> MessageFilter:
    if not config.enabled:
        return BorderFilter(config.policy.authserv_id)
    quarantine = None
    if config.quarantine.dir.is_dir():
        # The daemon's start is one of the two times old entries are purged (list the other).
        try:
            quarantine = Quarantine(config.quarantine.dir,
                                    retention=config.quarantine.retention)
            removed = quarantine.purge()
            if removed:
                logs.event("quarantine_purged", count=removed, dir=str(config.quarantine.dir))
        except OSError as exc:
            logs.warning("quarantine_purge_failed", error=str(exc))
            quarantine = None
    # Shared by the SMTP worker processes; kept in the quarantine, where timed-out mail ends.
    return ScanFilter(config, build_multi_scanner(config), quarantine,
                      timeout_dir=config.quarantine.dir / ".scan-timeouts")


def build_scanner(config: ScanConfig) -> ContentScanner | None:
    """The configured scanners (and content rules) as one ContentScanner, or None when none
    is configured."""
    if not config.scanners and not config.policy.has_content_rules:
        return None
    return build_multi_scanner(config)
