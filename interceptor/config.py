"""The `[interceptor]` section: which new connections the proxies get, decided per SYN.

    [interceptor]
    enabled = false              # netsetup queues SYNs to the interceptor; `mailgate run` starts it
    queue = 0                    # NFQUEUE number
    mark = 0x2                   # fwmark bit meaning "decided: intercept" (not [network] mark)
    queue_max_len = 8192         # SYNs the kernel holds for us; beyond: passed (fail = "open",
                                 # the queue's fail-open flag) or dropped ("closed")
    services = ["smtp", "pop3"]  # per-port enable; default: every [network] intercept service
    fail = "open"                # proxy not accepting: "open" = pass direct, "closed" = refuse;
                                 # also no interceptor bound: "open" = pass, "closed" = hold
    refuse = "reset"             # how fail = "closed" refuses: "reset" (RST) or "drop"
    bypass_sources = []          # CIDRs never intercepted (as client)
    bypass_destinations = []     # CIDRs never intercepted (as server)
    bypass_pairs = []            # [["192.0.2.0/24", "198.51.100.25/32"], ...] source -> dest
    schedule = []                # ["mon-fri 08:00-18:00", "22:00-06:00"]; empty: always
    health_interval = 0.2        # seconds between proxy health probes
    blackhole_threshold = 3      # intercepted connections that hang (half-open >= 3 s, or
                                 # dropped by the listener) while none completes: unhealthy;
                                 # 0: not checked (interceptor/health.py)
    accept_stall = "3s"          # a connection waiting this long to be accepted: the proxy
                                 # hangs, unhealthy; 0: not checked
    max_connections = {}         # service -> limit; default smtp = [smtp] max_connections
    stats_file = "/run/mailgate/interceptor.json"
    stats_interval = 1.0

Parsed once into frozen data; every problem is reported with file and key (netsetup/configfile).
netsetup reads the same section through `load_network_config` for `enabled`, `queue`, `mark`
and `fail` (whether its NFQUEUE rules pass SYNs while no interceptor is bound).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from netsetup.configfile import Network, Section, parse_network

KNOWN_SERVICES = ("smtp", "pop3")
DEFAULT_STATS_FILE = Path("/run/mailgate/interceptor.json")

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(
    r"^\s*(?:(?P<days>[a-z,\-]+)\s+)?(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$")


@dataclass(frozen=True)
class Window:
    """Interception is on from `start` to `end` (minutes after local midnight) on `days`
    (0 = Monday). `end <= start` runs past midnight: the part after midnight belongs to the
    day the window started on."""

    days: frozenset[int]
    start: int
    end: int

    def covers(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        # Wraps midnight: the evening of a listed day or the morning after one.
        return ((weekday in self.days and minute >= self.start)
                or ((weekday - 1) % 7 in self.days and minute < self.end))


@dataclass(frozen=True)
class InterceptorConfig:
    enabled: bool = False
    queue: int = 0
    mark: int = 0x2
    queue_max_len: int = 8192
    services: tuple[str, ...] | None = None  # None: all of [network] intercept
    fail: str = "open"
    refuse: str = "reset"
    bypass_sources: tuple[Network, ...] = ()
    bypass_destinations: tuple[Network, ...] = ()
    bypass_pairs: tuple[tuple[Network, Network], ...] = ()
    schedule: tuple[Window, ...] = ()
    health_interval: float = 0.2
    blackhole_threshold: int = 3
    accept_stall: float = 3.0
    max_connections: tuple[tuple[str, int], ...] = ()
    stats_file: Path = DEFAULT_STATS_FILE
    stats_interval: float = 1.0


def _minutes(text: str) -> int:
    hours, _, minutes = text.partition(":")
    value = int(hours) * 60 + int(minutes)
    if int(hours) > 24 or int(minutes) > 59 or value > 24 * 60:
        raise ValueError(f"not a time of day: {text!r}")
    return value


def parse_days(text: str) -> frozenset[int]:
    """'mon-fri', 'sat,sun', 'mon,wed-fri' -> weekday numbers (0 = Monday)."""
    days: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise ValueError(f"unknown day in {text!r} (use {', '.join(DAYS)})")
        start, end = DAYS.index(first), DAYS.index(last or first)
        index = start
        while True:
            days.add(index)
            if index == end:
                break
            index = (index + 1) % 7
    return frozenset(days)


def parse_window(value: object) -> Window:
    if not isinstance(value, str):
        raise ValueError(f"expected a window such as 'mon-fri 08:00-18:00', got {value!r}")
    match = _WINDOW.match(value.lower())
    if not match:
        raise ValueError(f"expected a window such as 'mon-fri 08:00-18:00', got {value!r}")
    days = parse_days(match["days"]) if match["days"] else frozenset(range(7))
    start, end = _minutes(match["start"]), _minutes(match["end"])
    if start == end:
        raise ValueError(f"empty window: {value!r}")
    return Window(days, start, end)


def parse_pair(value: object) -> tuple[Network, Network]:
    if not (isinstance(value, list) and len(value) == 2):
        raise ValueError(f"expected [source, destination] CIDRs, got {value!r}")
    source, destination = parse_network(value[0]), parse_network(value[1])
    if source.version != destination.version:
        raise ValueError(f"mixes IPv4 and IPv6: {value!r}")
    return source, destination


def _positive_seconds(section: Section, key: str, default: float, minimum: float) -> float:
    value = section.duration(key, default)
    if value < minimum:
        section.problem(key, f"must be at least {minimum} s, got {value}")
        return default
    return value


def interceptor_from_section(section: Section) -> InterceptorConfig:
    defaults = InterceptorConfig()
    services: tuple[str, ...] | None = None
    if "services" in section.data:
        services = section.string_list("services")
        for name in services:
            if name not in KNOWN_SERVICES:
                section.problem("services", f"unknown service {name!r} (known: smtp, pop3)")
    limits: list[tuple[str, int]] = []
    for name, limit in section.table("max_connections").items():
        if name not in KNOWN_SERVICES:
            section.problem(f"max_connections.{name}", "unknown service (known: smtp, pop3)")
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            section.problem(f"max_connections.{name}", f"expected a count >= 0, got {limit!r}")
        else:
            limits.append((name, limit))
    config = InterceptorConfig(
        enabled=section.boolean("enabled", False),
        queue=section.integer("queue", 0, 0, 65535),
        mark=section.integer("mark", defaults.mark, 1, 0x7FFFFFFF),
        queue_max_len=section.integer("queue_max_len", defaults.queue_max_len, 16, 1 << 20),
        services=services,
        fail=section.choice("fail", ("open", "closed"), "open"),
        refuse=section.choice("refuse", ("reset", "drop"), "reset"),
        bypass_sources=section.networks("bypass_sources"),
        bypass_destinations=section.networks("bypass_destinations"),
        bypass_pairs=section.list_of("bypass_pairs", parse_pair),
        schedule=section.list_of("schedule", parse_window),
        health_interval=_positive_seconds(section, "health_interval",
                                          defaults.health_interval, 0.01),
        blackhole_threshold=section.integer("blackhole_threshold", defaults.blackhole_threshold,
                                            0, 1 << 20),
        accept_stall=section.duration("accept_stall", defaults.accept_stall),  # 0: off
        max_connections=tuple(limits),
        stats_file=Path(section.string("stats_file", str(DEFAULT_STATS_FILE))),
        stats_interval=_positive_seconds(section, "stats_interval", defaults.stats_interval, 0.1),
    )
    if config.mark & (config.mark - 1):
        section.problem("mark", f"must be a single bit (0x2, 0x4, ...), got {config.mark:#x}")
    return config


def check_against_network(section: Section, config: InterceptorConfig, network_mark: int) -> None:
    """Problems only the two sections together show."""
    if config.enabled:
        section.check("the interceptor's mark is not network.mark", "mark",
                      not config.mark & network_mark,
                      f"{config.mark:#x} overlaps [network] mark {network_mark:#x}: the "
                      "decision bit must be separate from the TPROXY bit")


