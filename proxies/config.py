"""The whole config file as typed, frozen data, checked once at load.

`load_config(path)` reads every section and reports every problem together, each with file and
key; nothing else in the program looks at raw TOML.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interceptor.config import InterceptorConfig
from netsetup.config import SERVICES, NetworkConfig, network_from_sections
from netsetup.configfile import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    Network,
    Problem,
    Section,
    parse_hostport,
    read_toml,
)
from proxies.metrics.config import MetricsConfig, metrics_from_section
from proxies.pop3.config import Pop3Config, pop3_from_section
from proxies.scan.config import ScanConfig, scan_from_sections

__all__ = ["DEFAULT_CONFIG_PATH", "Config", "ConfigError", "SmtpConfig", "load_config"]


def _domain(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or " " in value or "@" in value:
        raise ValueError(f"not a domain name: {value!r}")
    # Matching is case-insensitive and ignores a trailing dot (RFC 5321 2.4, RFC 1035 3.1).
    return value.strip().lower().rstrip(".")


@dataclass(frozen=True)
class SmtpConfig:
    listen_port: int = SERVICES["smtp"][1]
    hostname: str = field(default_factory=socket.gethostname)
    relay_domains: tuple[str, ...] = ()
    relay_networks: tuple[Network, ...] = ()
    transport: tuple[tuple[str, tuple[str, int]], ...] = ()
    # Where mail goes when the connection was not intercepted and no transport entry matches;
    # None means the recipient domain's MX.
    next_hop: tuple[str, int] | None = None
    queue_dir: Path = Path("/var/spool/mailgate")
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 1000
    max_connections: int = 200
    max_connections_per_client: int = 50
    # RFC 5321 4.5.3.2.7: a server waits at least 5 minutes for the next command.
    command_timeout: float = 300.0
    # RFC 5321 4.5.3.2.5/6: 3 minutes per data block, 10 minutes for the final dot.
    data_timeout: float = 600.0
    # Postfix's smtpd_min_data_rate (bytes/s): each read of content earns this much more time,
    # never more than data_timeout ahead, so content trickled a byte at a time cannot hold a
    # connection for data_timeout per byte. 0: data_timeout from the last read, as RFC 5321.
    min_data_rate: int = 500
    bare_line_endings: str = "reject"
    tls: bool = True
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Postfix's defaults: minimal_backoff_time, maximal_backoff_time, maximal_queue_lifetime.
    retry_min: float = 300.0
    retry_max: float = 4000.0
    queue_lifetime: float = 5 * 86400.0
    queue_scan_interval: float = 60.0
    connect_timeout: float = 30.0
    delivery_timeout: float = 300.0
    delivery_concurrency: int = 20
    # SMTP acceptor processes: one per core by default (aiosmtpd's parsing is CPU-bound and
    # a single process cannot use a second core).
    workers: int = field(default_factory=lambda: max(1, min(os.cpu_count() or 1, 8)))
    # "mailgate": our sans-I/O core on an asyncio.BufferedProtocol; "aiosmtpd": aiosmtpd's own
    # SMTP class through its public API, the reference the differential tests hold ours against.
    frontend: str = "mailgate"
    # Recipient verification (proxies.smtp.verify; Postfix's reject_unverified_recipient):
    # RCPT for our domains is answered with what the next hop says of the recipient.
    verify_recipients: bool = True
    # The next hop unreachable or 4xx: "tempfail" (450 4.1.1) or "accept" (queue it).
    verify_unreachable: str = "tempfail"
    # Clients in relay_networks (our own users) are verified too.
    verify_relay_networks: bool = False
    # How long results are believed: Postfix's address_verify_positive_refresh_time (7d) and
    # address_verify_negative_refresh_time (3h); results that say nothing of the recipient
    # (unreachable, 4xx) only briefly.
    verify_positive_ttl: float = 7 * 86400.0
    verify_negative_ttl: float = 3 * 3600.0
    verify_tempfail_ttl: float = 60.0
    # A probe's whole conversation; the client waits this long at most for its RCPT reply.
    verify_timeout: float = 20.0
    # Notifications (DSNs) per sender domain per window (proxies.queue.ratelimit); past it
    # the recipients are still bounced, without one. 0: no limit.
    bounce_rate_limit: int = 10
    bounce_rate_window: float = 3600.0

    def transport_for(self, domain: str) -> tuple[str, int] | None:
        domain = domain.lower().rstrip(".")
        for entry, hop in self.transport:
            if domain == entry or (entry.startswith(".") and domain.endswith(entry)):
                return hop
        return None


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    path: Path
    network: NetworkConfig
    smtp: SmtpConfig
    pop3: Pop3Config
    scan: ScanConfig
    log: LogConfig
    interceptor: InterceptorConfig = field(default_factory=InterceptorConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def _smtp_from_section(section: Section) -> SmtpConfig:
    defaults = SmtpConfig()
    transport_table = section.table("transport")
    transport: list[tuple[str, tuple[str, int]]] = []
    for domain, hop in transport_table.items():
        try:
            transport.append((_domain(domain), parse_hostport(hop)))
        except ValueError as exc:
            section.problem(f"transport.{domain}", str(exc))
    next_hop = section.converted("next_hop", parse_hostport, None)
    tls_cert = section.converted("tls_cert", lambda v: Path(str(v)), None)
    tls_key = section.converted("tls_key", lambda v: Path(str(v)), None)
    section.check("smtp tls_cert and tls_key go together", "tls_cert",
                  (tls_cert is None) == (tls_key is None), "tls_cert and tls_key go together")
    config = SmtpConfig(
        listen_port=section.port("listen", defaults.listen_port),
        hostname=section.string("hostname", defaults.hostname),
        relay_domains=section.list_of("relay_domains", _domain),
        relay_networks=section.networks("relay_networks"),
        transport=tuple(transport),
        next_hop=next_hop,
        queue_dir=Path(section.string("queue_dir", str(defaults.queue_dir))),
        max_message_size=section.size("max_message_size", defaults.max_message_size),
        max_recipients=section.integer("max_recipients", defaults.max_recipients, 1),
        max_connections=section.integer("max_connections", defaults.max_connections, 1),
        max_connections_per_client=section.integer(
            "max_connections_per_client", defaults.max_connections_per_client, 1),
        command_timeout=section.duration("command_timeout", defaults.command_timeout),
        data_timeout=section.duration("data_timeout", defaults.data_timeout),
        min_data_rate=section.integer("min_data_rate", defaults.min_data_rate, 0),
        bare_line_endings=section.choice("bare_line_endings", ("reject", "normalise"), "reject"),
        tls=section.boolean("tls", True),
        tls_cert=tls_cert,
        tls_key=tls_key,
        retry_min=section.duration("retry_min", defaults.retry_min),
        retry_max=section.duration("retry_max", defaults.retry_max),
        queue_lifetime=section.duration("queue_lifetime", defaults.queue_lifetime),
        queue_scan_interval=section.duration("queue_scan_interval", defaults.queue_scan_interval),
        connect_timeout=section.duration("connect_timeout", defaults.connect_timeout),
        delivery_timeout=section.duration("delivery_timeout", defaults.delivery_timeout),
        delivery_concurrency=section.integer(
            "delivery_concurrency", defaults.delivery_concurrency, 1, 1000),
        workers=section.integer("workers", defaults.workers, 1, 64),
        frontend=section.choice("frontend", ("mailgate", "aiosmtpd"), "mailgate"),
        verify_recipients=section.boolean("verify_recipients", defaults.verify_recipients),
        verify_unreachable=section.choice("verify_unreachable", ("tempfail", "accept"),
                                          defaults.verify_unreachable),
        verify_relay_networks=section.boolean("verify_relay_networks",
                                              defaults.verify_relay_networks),
        verify_positive_ttl=section.duration("verify_positive_ttl", defaults.verify_positive_ttl),
        verify_negative_ttl=section.duration("verify_negative_ttl", defaults.verify_negative_ttl),
        verify_tempfail_ttl=section.duration("verify_tempfail_ttl", defaults.verify_tempfail_ttl),
        verify_timeout=section.duration("verify_timeout", defaults.verify_timeout),
        bounce_rate_limit=section.integer("bounce_rate_limit", defaults.bounce_rate_limit, 0),
        bounce_rate_window=section.duration("bounce_rate_window", defaults.bounce_rate_window),
    )
    section.check("retry_min is at most retry_max", "retry_min",
                  config.retry_min <= config.retry_max, "must not be larger than retry_max")
    if config.verify_timeout <= 0:
        section.problem("verify_timeout", "must be more than 0")
    if config.bounce_rate_window <= 0:
        section.problem("bounce_rate_window", "must be more than 0")
    if config.max_message_size < 1024:
        section.problem("max_message_size", "must be at least 1024 bytes")
    return config


def _log_from_section(section: Section) -> LogConfig:
    return LogConfig(
        level=section.choice("level", ("debug", "info", "warning", "error"), "info"),
        format=section.choice("format", ("text", "json"), "text"),
    )


def config_from_data(path: Path, data: dict[str, Any]) -> Config:
    config, _, problems = read_sections(path, data)
    if problems:
        raise ConfigError(problems)
    return config


def read_sections(path: Path, data: dict[str, Any]
                  ) -> tuple[Config, dict[str, Section], list[Problem]]:
    """The config (meaningful only when there are no problems), every section as its loader
    read it (keys, defaults, values, cross-checks: see `mailgate config check`), and every
    problem."""
    sections = {
        name: Section(path, name, data.get(name))
        for name in ("network", "smtp", "pop3", "scan", "policy", "quarantine", "log",
                     "interceptor", "metrics")
    }
    network, interceptor = network_from_sections(sections)
    scan = scan_from_sections(sections["scan"], sections["policy"], sections["quarantine"])
    config = Config(
        path=path,
        network=network,
        smtp=_smtp_from_section(sections["smtp"]),
        pop3=pop3_from_section(sections["pop3"], scan.policy.subject_prefix),
        scan=scan,
        log=_log_from_section(sections["log"]),
        interceptor=interceptor,
        metrics=metrics_from_section(sections["metrics"]),
    )
    problems: list[Problem] = []
    for section in sections.values():
        problems += section.finish()
    return config, sections, problems


def load_config(path: Path = DEFAULT_CONFIG_PATH) -> Config:
    return config_from_data(path, read_toml(path))


def load_config_for_tool(path: Path | None) -> Config | None:
    """The config an administration command (`mailgate queue`, `mailgate quarantine`) reads:
    `path` if given, else the default file if it exists, else None (built-in defaults)."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return None
        path = DEFAULT_CONFIG_PATH
    return load_config(path)
