"""The `[scan]`, `[policy]` and `[quarantine]` sections of the config file.

    [scan]
    # Scanners; leave one out to not use it. A scanner may also be a table that overrides the
    # shared limits below: clamd = { address = "unix:/run/clamav/clamd.ctl", timeout = "60s" }
    clamd = "unix:/run/clamav/clamd.ctl"   # or "tcp:127.0.0.1:3310"      (default: none)
    spamd = "127.0.0.1:783"                # or "unix:/run/spamd.sock"    (default: none)
    rspamd = "http://127.0.0.1:11333"      # rspamd's normal worker     (default: none)
    timeout = "30s"          # per scanner and message, waiting for a free slot included
    max_size = "25M"         # larger messages are not sent to the scanners: oversize_action
    concurrency = 8          # messages in flight per scanner
    fail_mode = "tempfail"   # scanner down/timed out/error: "tempfail" (451 4.7.1) or "pass"
    oversize_action = "pass" # "pass" (with an X-Mailgate-Scan header), "reject", "quarantine"
    max_timeouts = 3         # the same content timing a scanner out this often is quarantined
    timeout_memory = "1d"    # ... counted over this period

    [policy]
    virus = "reject"         # each of virus/banned/spam: "pass", "tag", "reject",
    banned = "reject"        #   "quarantine" or "drop"
    spam = "tag"
    spam_reject_score = 15.0 # optional: a spam score at or above this rejects instead
    subject_prefix = ""      # e.g. "[SPAM] ", put in front of a tagged message's Subject
    banned_extensions = []   # e.g. ["exe", "scr", "pif", "bat", "cmd", "com", "vbs", "js"]
    banned_mime_types = []   # e.g. ["application/x-msdownload"]; "type/*" for a whole type
    max_attachment_size = 0  # e.g. "10M"; 0 = no limit
    header_rules = []        # [{ header = "Subject", regex = "(?i)lottery", action = "reject" }]
    add_scan_header = false  # also add X-Mailgate-Scan to clean mail (else it is untouched)
    authserv_id = ""         # our name in Authentication-Results (RFC 8601); "": [smtp] hostname

    [quarantine]
    dir = "/var/lib/mailgate/quarantine"
    retention = "30d"        # older entries are purged at start and by `quarantine list`

Every problem is reported with file and key, unknown keys included (netsetup.configfile).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from netsetup.configfile import Section, parse_hostport
from proxies.mail.authresults import valid_authserv_id

FailMode = Literal["tempfail", "pass"]
ACTIONS = ("pass", "tag", "reject", "quarantine", "drop")
OVERSIZE_ACTIONS = ("pass", "reject", "quarantine")
HEADER_RULE_ACTIONS = ("tag", "reject", "quarantine", "drop")


@dataclass(frozen=True)
class SocketAddress:
    """A scanner's address: a unix socket path, or a TCP host and port."""

    path: Path | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ScannerConfig:
    address: SocketAddress
    timeout: float
    max_size: int
    concurrency: int


@dataclass(frozen=True)
class HeaderRule:
    header: str
    regex: re.Pattern[str]
    action: str

    @property
    def description(self) -> str:
        return f"{self.header} matches /{self.regex.pattern}/"


@dataclass(frozen=True)
class PolicyConfig:
    virus: str = "reject"
    banned: str = "reject"
    spam: str = "tag"
    spam_reject_score: float | None = None
    # Put in front of a spam-tagged message's Subject, by the SMTP and the POP3 proxy alike
    # ([pop3] subject_prefix overrides it for POP3 only when given). "" = headers only.
    subject_prefix: str = "[SPAM] "
    banned_extensions: tuple[str, ...] = ()
    banned_mime_types: tuple[str, ...] = ()
    max_attachment_size: int = 0
    header_rules: tuple[HeaderRule, ...] = ()
    add_scan_header: bool = False
    # Who we are in Authentication-Results fields (RFC 8601 2.5): ours carry it, and arriving
    # ones that claim it are removed. "" means the [smtp] hostname, which the Received field
    # and the queue's notices use too.
    authserv_id: str = ""

    @property
    def has_content_rules(self) -> bool:
        return bool(self.banned_extensions or self.banned_mime_types
                    or self.max_attachment_size or self.header_rules)


@dataclass(frozen=True)
class QuarantineConfig:
    dir: Path = Path("/var/lib/mailgate/quarantine")
    retention: float = 30 * 86400.0


@dataclass(frozen=True)
class ScanConfig:
    clamd: ScannerConfig | None = None
    spamd: ScannerConfig | None = None
    rspamd: ScannerConfig | None = None
    timeout: float = 30.0
    max_size: int = 25 * 1024 * 1024
    concurrency: int = 8
    fail_mode: FailMode = "tempfail"
    oversize_action: str = "pass"
    max_timeouts: int = 3
    timeout_memory: float = 86400.0
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    quarantine: QuarantineConfig = field(default_factory=QuarantineConfig)

    @property
    def scanners(self) -> tuple[tuple[str, ScannerConfig], ...]:
        named = (("clamd", self.clamd), ("spamd", self.spamd), ("rspamd", self.rspamd))
        return tuple((name, cfg) for name, cfg in named if cfg is not None)

    @property
    def enabled(self) -> bool:
        """Anything to do at all: a scanner or a content rule (else no filter is built)."""
        return bool(self.scanners) or self.policy.has_content_rules \
            or self.policy.add_scan_header


# --- addresses ----------------------------------------------------------------------------


def parse_socket_address(value: object, default_port: int) -> SocketAddress:
    """`unix:/path`, `/path`, `tcp:host:port` or `host:port` (IP literals or names)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected 'unix:/path' or 'tcp:host:port', got {value!r}")
    text = value.strip()
    if text.startswith("unix:") or text.startswith("/"):
        path = text.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"a unix socket needs an absolute path, got {value!r}")
        return SocketAddress(path=Path(path))
    host, port = parse_hostport(text.removeprefix("tcp:"), default_port)
    return SocketAddress(host=host, port=port)


def parse_http_address(value: object) -> SocketAddress:
    """`http://host:port` (rspamd's normal worker; no TLS, no path)."""
    if not isinstance(value, str) or not value.startswith("http://"):
        raise ValueError(f"expected 'http://host:port', got {value!r}")
    rest = value.removeprefix("http://").rstrip("/")
    if "/" in rest:
        raise ValueError(f"give only http://host:port (the client adds /checkv2), got {value!r}")
    host, port = parse_hostport(rest, 11333)
    return SocketAddress(host=host, port=port)


# --- loading ------------------------------------------------------------------------------


def _scanner(section: Section, key: str, parse: Any, defaults: ScanConfig
             ) -> ScannerConfig | None:
    raw = section.data.get(key)
    if raw is None:
        section.converted(key, lambda v: v, None)  # mark as read
        return None
    if isinstance(raw, dict):
        table = Section(section.path, f"{section.name}.{key}", raw)
        address = table.converted("address", parse, None)
        if "address" not in raw:
            table.problem("address", "is required")
        config = ScannerConfig(
            address=address or SocketAddress(),
            timeout=_positive(table, "timeout", table.duration("timeout", defaults.timeout)),
            max_size=table.size("max_size", defaults.max_size),
            concurrency=table.integer("concurrency", defaults.concurrency, 1, 1000),
        )
        section.problems.extend(table.finish())
        section.converted(key, lambda v: v, None)
        return config if address is not None else None
    address = section.converted(key, parse, None)
    if address is None:
        return None
    return ScannerConfig(address, defaults.timeout, defaults.max_size, defaults.concurrency)


def _positive(section: Section, key: str, value: float) -> float:
    if value <= 0:
        section.problem(key, "must be more than 0")
        return 1.0
    return value


def _extension(value: object) -> str:
    if not isinstance(value, str) or not value.strip(".").strip() or "/" in value:
        raise ValueError(f"expected a file name extension such as 'exe', got {value!r}")
    return value.strip().lstrip(".").lower()


def _mime_type(value: object) -> str:
    if not isinstance(value, str) or value.count("/") != 1 or " " in value.strip():
        raise ValueError(f"expected a MIME type such as 'application/x-msdownload', "
                         f"got {value!r}")
    return value.strip().lower()


def _header_rule(value: object) -> HeaderRule:
    if not isinstance(value, dict):
        raise ValueError('expected a table such as { header = "Subject", regex = "...", '
                         'action = "reject" }')
    unknown = sorted(set(value) - {"header", "regex", "action"})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} (known: header, regex, action)")
    header, regex, action = value.get("header"), value.get("regex"), value.get("action")
    if not isinstance(header, str) or not re.fullmatch(r"[!-9;-~]+", header):
        raise ValueError(f"header: expected a header field name, got {header!r}")
    if not isinstance(regex, str):
        raise ValueError(f"regex: expected a string, got {regex!r}")
    try:
        pattern = re.compile(regex)
    except (re.error, OverflowError, RecursionError) as exc:
        # OverflowError: a repeat count over 2**32 ("a{4294967296}"); RecursionError: groups
        # nested a thousand deep. Both are re.compile's, not ours.
        raise ValueError(f"regex: not a valid regular expression: {exc}") from None
    if action not in HEADER_RULE_ACTIONS:
        raise ValueError(f"action: must be one of {', '.join(map(repr, HEADER_RULE_ACTIONS))}, "
                         f"got {action!r}")
    return HeaderRule(header, pattern, str(action))


def subject_prefix(section: Section, default: str) -> str:
    """`subject_prefix` of [policy] or [pop3]: one line of ASCII, since it goes into a header
    as it is (RFC 5322 2.2; an encoded word would need the rest of the Subject decoded)."""
    value = section.string("subject_prefix", default)
    if "\r" in value or "\n" in value:
        section.problem("subject_prefix", "must be one line")
        return default
    if not value.isascii():
        section.problem("subject_prefix", "must be ASCII (it goes into a header unencoded)")
        return default
    return value


def _authserv_id(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    if value and not valid_authserv_id(value):
        raise ValueError(f"must be a name such as 'mail-gw.example.net' (letters, digits and "
                         f"'.-_' ..., no spaces, ';' or quotes), got {value!r}")
    return value


def _policy(section: Section) -> PolicyConfig:
    defaults = PolicyConfig()
    reject_score = section.typed("spam_reject_score", (int, float), None)
    return PolicyConfig(
        virus=section.choice("virus", ACTIONS, defaults.virus),
        banned=section.choice("banned", ACTIONS, defaults.banned),
        spam=section.choice("spam", ACTIONS, defaults.spam),
        spam_reject_score=None if reject_score is None else float(reject_score),
        subject_prefix=subject_prefix(section, defaults.subject_prefix),
        banned_extensions=section.list_of("banned_extensions", _extension),
        banned_mime_types=section.list_of("banned_mime_types", _mime_type),
        max_attachment_size=section.size("max_attachment_size", 0),
        header_rules=section.list_of("header_rules", _header_rule),
        add_scan_header=section.boolean("add_scan_header", False),
        authserv_id=section.converted("authserv_id", _authserv_id, defaults.authserv_id),
    )


def _quarantine(section: Section) -> QuarantineConfig:
    defaults = QuarantineConfig()
    directory = section.string("dir", str(defaults.dir))
    if not directory.startswith("/"):
        section.problem("dir", f"must be an absolute path, got {directory!r}")
    return QuarantineConfig(dir=Path(directory),
                            retention=section.duration("retention", defaults.retention))


def scan_from_sections(scan: Section, policy: Section, quarantine: Section) -> ScanConfig:
    defaults = ScanConfig()
    shared = ScanConfig(
        timeout=_positive(scan, "timeout", scan.duration("timeout", defaults.timeout)),
        max_size=scan.size("max_size", defaults.max_size),
        concurrency=scan.integer("concurrency", defaults.concurrency, 1, 1000),
    )
    clamd = _scanner(scan, "clamd", lambda v: parse_socket_address(v, 3310), shared)
    spamd = _scanner(scan, "spamd", lambda v: parse_socket_address(v, 783), shared)
    rspamd = _scanner(scan, "rspamd", parse_http_address, shared)
    fail_mode = scan.choice("fail_mode", ("tempfail", "pass"), defaults.fail_mode)
    return ScanConfig(
        clamd=clamd,
        spamd=spamd,
        rspamd=rspamd,
        timeout=shared.timeout,
        max_size=shared.max_size,
        concurrency=shared.concurrency,
        fail_mode="pass" if fail_mode == "pass" else "tempfail",
        oversize_action=scan.choice("oversize_action", OVERSIZE_ACTIONS,
                                    defaults.oversize_action),
        max_timeouts=scan.integer("max_timeouts", defaults.max_timeouts, 1, 1000),
        timeout_memory=scan.duration("timeout_memory", defaults.timeout_memory),
        policy=_policy(policy),
        quarantine=_quarantine(quarantine),
    )


__all__ = [
    "ACTIONS",
    "HeaderRule",
    "PolicyConfig",
    "QuarantineConfig",
    "ScanConfig",
    "ScannerConfig",
    "SocketAddress",
    "parse_http_address",
    "parse_socket_address",
    "scan_from_sections",
    "subject_prefix",
]
