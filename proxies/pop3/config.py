"""The `[pop3]` section: typed, validated, unknown keys rejected (with file and key).

    [pop3]
    enabled = false
    listen = 10110                # where netsetup's TPROXY rule hands port 110 to
    max_connections = 200
    max_connections_per_client = 20
    client_timeout = "10m"        # RFC 1939 3: the autologout timer is at least 10 minutes
    server_timeout = "2m"         # the server's reply (or the next chunk of it)
    connect_timeout = "30s"
    spool_threshold = "8M"        # a message larger than this waits on disk, not in memory
    spool_dir = ""                # "" = the system's temporary folder
    max_scan_size = "25M"         # larger messages are not scanned (oversize_action)
    scan_timeout = "2m"
    keepalive_after = "10s"       # hold the status line this long, then keep the client alive
    keepalive_interval = "10s"
    spam = "tag"                  # "tag" or "pass"
    virus = "replace"             # "replace" (notice + quarantine) or "pass"
    banned = "replace"
    fail_mode = "tempfail"        # scanner failed: "tempfail" (-ERR, left on the server) or "pass"
    oversize_action = "pass"      # "pass" or "tempfail"
    subject_prefix = "[SPAM] "    # only to differ from [policy] subject_prefix (the default)
    scan_top = true               # scan TOP responses too (fetchmail keep mode uses TOP)
    scan_ahead = "off"            # after a scanned RETR n, fetch and scan n+1 early: "top"
                                  # (server unchanged) or "retr" (marks n+1 retrieved)
    tls = "terminate"             # "terminate", "passthrough" or "strip"
    tls_cert = ""                 # with tls_key; "" = a self-signed one made at first start
    tls_key = ""
    cache_ttl = "1h"              # remember verdicts per (server, user, UIDL); 0 = off
    hostname = ""                 # for notices; "" = the [smtp] hostname
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from netsetup.config import PROXY_DEFAULTS, SERVICES
from netsetup.configfile import Section
from proxies.scan.config import PolicyConfig, subject_prefix

__all__ = ["Pop3Config", "pop3_from_section"]

TLS_MODES = ("terminate", "passthrough", "strip")
AHEAD_MODES = ("off", "top", "retr")


@dataclass(frozen=True)
class Pop3Config:
    enabled: bool = PROXY_DEFAULTS["pop3"]
    listen_port: int = SERVICES["pop3"][1]
    max_connections: int = 200
    max_connections_per_client: int = 20
    client_timeout: float = 600.0
    server_timeout: float = 120.0
    connect_timeout: float = 30.0
    spool_threshold: int = 8 * 1024 * 1024
    spool_dir: Path | None = None
    max_scan_size: int = 25 * 1024 * 1024
    scan_timeout: float = 120.0
    keepalive_after: float = 10.0
    keepalive_interval: float = 10.0
    spam_action: str = "tag"
    virus_action: str = "replace"
    banned_action: str = "replace"
    fail_mode: str = "tempfail"
    oversize_action: str = "pass"
    subject_prefix: str = PolicyConfig.subject_prefix
    scan_top: bool = True
    scan_ahead: str = "off"
    tls: str = "terminate"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cache_ttl: float = 3600.0
    hostname: str = ""


def _path_or_none(value: object) -> Path | None:
    if not isinstance(value, str):
        raise ValueError(f"expected a path string, got {value!r}")
    return Path(value) if value else None


def _ahead_mode(value: object) -> str:
    # true and false are what scan_ahead took before it had modes; true meant "retr".
    if isinstance(value, bool):
        return "retr" if value else "off"
    if value not in AHEAD_MODES:
        raise ValueError(f"must be one of {', '.join(map(repr, AHEAD_MODES))}, got {value!r}")
    return str(value)


def pop3_from_section(section: Section, policy_prefix: str | None = None) -> Pop3Config:
    """[pop3]; `policy_prefix` is [policy] subject_prefix, used unless [pop3] sets its own."""
    d = Pop3Config()
    if policy_prefix is None:
        policy_prefix = d.subject_prefix
    config = Pop3Config(
        enabled=section.boolean("enabled", d.enabled),
        listen_port=section.port("listen", d.listen_port),
        max_connections=section.integer("max_connections", d.max_connections, 1, 100_000),
        max_connections_per_client=section.integer(
            "max_connections_per_client", d.max_connections_per_client, 1, 100_000),
        client_timeout=section.duration("client_timeout", d.client_timeout),
        server_timeout=section.duration("server_timeout", d.server_timeout),
        connect_timeout=section.duration("connect_timeout", d.connect_timeout),
        spool_threshold=section.size("spool_threshold", d.spool_threshold),
        spool_dir=section.converted("spool_dir", _path_or_none, d.spool_dir),
        max_scan_size=section.size("max_scan_size", d.max_scan_size),
        scan_timeout=section.duration("scan_timeout", d.scan_timeout),
        keepalive_after=section.duration("keepalive_after", d.keepalive_after),
        keepalive_interval=section.duration("keepalive_interval", d.keepalive_interval),
        spam_action=section.choice("spam", ("tag", "pass"), d.spam_action),
        virus_action=section.choice("virus", ("replace", "pass"), d.virus_action),
        banned_action=section.choice("banned", ("replace", "pass"), d.banned_action),
        fail_mode=section.choice("fail_mode", ("tempfail", "pass"), d.fail_mode),
        oversize_action=section.choice("oversize_action", ("pass", "tempfail"),
                                       d.oversize_action),
        subject_prefix=subject_prefix(section, policy_prefix),
        scan_top=section.boolean("scan_top", d.scan_top),
        scan_ahead=section.converted("scan_ahead", _ahead_mode, d.scan_ahead),
        tls=section.choice("tls", TLS_MODES, d.tls),
        tls_cert=section.converted("tls_cert", _path_or_none, None),
        tls_key=section.converted("tls_key", _path_or_none, None),
        cache_ttl=section.duration("cache_ttl", d.cache_ttl),
        hostname=section.string("hostname", d.hostname),
    )
    section.check("pop3 tls_cert and tls_key go together", "tls_cert",
                  (config.tls_cert is None) == (config.tls_key is None),
                  "tls_cert and tls_key go together")
    for key, value in (("client_timeout", config.client_timeout),
                       ("server_timeout", config.server_timeout),
                       ("connect_timeout", config.connect_timeout),
                       ("scan_timeout", config.scan_timeout),
                       ("keepalive_interval", config.keepalive_interval)):
        if value <= 0:
            section.problem(key, "must be more than 0")
    if config.spool_threshold < 64 * 1024:
        section.problem("spool_threshold", "must be at least 64K")
    return config
