"""The `[network]` section: how the box sits in the path and what it intercepts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netsetup.configfile import ConfigError, Network, Section, read_toml

if TYPE_CHECKING:
    from interceptor.config import InterceptorConfig

# Service name -> (destination port it intercepts, default local port of its proxy).
SERVICES = {"smtp": (25, 10025), "pop3": (110, 10110)}

_IFNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")


def _ifname(value: object) -> str:
    if not isinstance(value, str) or not _IFNAME.match(value):
        raise ValueError(f"not an interface name (1-15 letters, digits, '_.@-'): {value!r}")
    return value


def _interface_address(value: object) -> str:
    """An address with prefix length, as it is put on an interface: '192.0.2.2/24'."""
    import ipaddress

    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"expected an address with prefix, such as '192.0.2.2/24', got {value!r}")
    try:
        ipaddress.ip_interface(value)
    except ValueError:
        raise ValueError(f"not an interface address: {value!r}") from None
    return value


@dataclass(frozen=True)
class Interception:
    service: str
    port: int  # the destination port of the traffic taken
    listen_port: int  # where the proxy listens for what TPROXY hands it


@dataclass(frozen=True)
class QueueSteering:
    """`[interceptor] enabled`: SYNs to intercepted ports go to an NFQUEUE program first; it
    sets `mark` on those it wants intercepted (only they reach TPROXY) and passes the rest.

    `fail_open` is `[interceptor] fail = "open"`: while no program is bound to the queue (at
    boot before `mailgate run` starts it, or after it died) the kernel passes those SYNs
    uninspected (`--queue-bypass`); with fail = "closed" it drops them, so the connections
    are held (clients retransmit their SYN) until the interceptor is there to decide."""

    queue: int = 0
    mark: int = 0x2
    fail_open: bool = True


@dataclass(frozen=True)
class NetworkConfig:
    mode: str = "router"
    bridge: str = "br0"
    ports: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    intercept: tuple[Interception, ...] = field(default_factory=tuple)
    ipv6: bool = True
    spoof_source: bool = True
    bypass_sources: tuple[Network, ...] = ()
    bypass_destinations: tuple[Network, ...] = ()
    # Bridge mode, optional: subnets on the bridged segment the box's *own* traffic (a
    # management address's neighbours, a configured next hop) reaches `dev <bridge>`. The
    # proxies' packets towards intercepted peers never need them (see `egress_mark`).
    bridged_networks: tuple[Network, ...] = ()
    # fwmark bit TPROXY sets and the policy rule looks for; the table that routes it to `lo`.
    mark: int = 0x1
    route_table: int = 100
    # Bridge mode: the mark the proxies put on their transparent sockets (SO_MARK) and the table
    # it selects, which sends those packets out of the bridge towards the link-layer address the
    # intercepted peer itself used (netsetup/nft.py: learnt from its frames). So the bridge
    # needs no address and no subnet: it answers every client and reaches every server, on-link
    # or behind a router, on any network it is plugged into.
    egress_mark: int = 0x4
    egress_table: int = 101
    # Set from [interceptor] (see `with_interceptor`); None: every SYN to a port is intercepted.
    queue_steering: QueueSteering | None = None

    @property
    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.ipv6 else (4,)

    def listen_port(self, service: str) -> int | None:
        for item in self.intercept:
            if item.service == service:
                return item.listen_port
        return None


def network_from_section(section: Section) -> NetworkConfig:
    mode = section.choice("mode", ("router", "bridge"), "router")
    bridge = section.converted("bridge", _ifname, "br0")
    ports = section.list_of("ports", _ifname)
    addresses = section.list_of("addresses", _interface_address)
    services = section.string_list("intercept", ("smtp", "pop3"))
    listen = section.table("listen")
    intercept = []
    for service in services:
        if service not in SERVICES:
            section.problem("intercept", f"unknown service {service!r} (known: smtp, pop3)")
            continue
        dport, default_listen = SERVICES[service]
        port = listen.get(service, default_listen)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            section.problem(f"listen.{service}", f"expected a port number, got {port!r}")
            port = default_listen
        intercept.append(Interception(service, dport, port))
    for key in listen:
        if key not in SERVICES:
            section.problem(f"listen.{key}", "unknown service (known: smtp, pop3)")
    config = NetworkConfig(
        mode=mode,
        bridge=bridge,
        ports=ports,
        addresses=addresses,
        intercept=tuple(intercept),
        ipv6=section.boolean("ipv6", True),
        spoof_source=section.boolean("spoof_source", True),
        bypass_sources=section.networks("bypass_sources"),
        bypass_destinations=section.networks("bypass_destinations"),
        bridged_networks=section.networks("bridged_networks"),
        mark=section.integer("mark", 0x1, 1, 0x7FFFFFFF),
        route_table=section.integer("route_table", 100, 1, 0xFFFFFFF0),
        egress_mark=section.integer("egress_mark", 0x4, 1, 0x7FFFFFFF),
        egress_table=section.integer("egress_table", 101, 1, 0xFFFFFFF0),
    )
    _check_combinations(section, config)
    return config


def _check_combinations(section: Section, config: NetworkConfig) -> None:
    """Problems no single key shows: keys that contradict the mode or each other."""
    given = section.data
    if config.mode == "bridge":
        if len(config.ports) < 2:
            section.problem("ports", "bridge mode needs at least two member interfaces")
        if len(set(config.ports)) != len(config.ports):
            section.problem("ports", "names an interface twice")
        if config.bridge in config.ports:
            section.problem("ports", f"holds the bridge itself ({config.bridge!r})")
        if not config.spoof_source and not config.addresses:
            section.problem("spoof_source",
                            "false needs 'addresses': without spoofing the proxy connects onward "
                            "from an address of its own on the bridge")
    else:
        for key in ("ports", "bridge", "addresses", "bridged_networks", "egress_mark",
                    "egress_table"):
            if key in given:
                section.problem(key, 'only used in bridge mode (mode = "bridge")')
    if config.egress_mark & config.mark:
        section.problem("egress_mark", f"shares bits with mark ({config.mark:#x}): the proxies' "
                                       "own packets would be delivered locally")
    if config.egress_table == config.route_table:
        section.problem("egress_table", "is route_table: the two need tables of their own")
    services = [item.service for item in config.intercept]
    if len(set(services)) != len(services):
        section.problem("intercept", "names a service twice")
    listen_ports = [item.listen_port for item in config.intercept]
    if len(set(listen_ports)) != len(listen_ports):
        section.problem("listen", "two services share one listen port")
    if not config.ipv6:
        v6_keys = (("bypass_sources", config.bypass_sources),
                   ("bypass_destinations", config.bypass_destinations),
                   ("bridged_networks", config.bridged_networks))
        for key, nets in v6_keys:
            if any(n.version == 6 for n in nets):
                section.problem(key, "holds an IPv6 network but ipv6 = false")
        if any(":" in address for address in config.addresses):
            section.problem("addresses", "holds an IPv6 address but ipv6 = false")


def with_interceptor(config: NetworkConfig,
                     section: Section) -> tuple[NetworkConfig, InterceptorConfig]:
    """`config` plus the NFQUEUE steering [interceptor] asks for, and that section parsed (the
    whole section is checked: a typo there is reported by netsetup as well as by mailgate)."""
    from interceptor.config import check_against_network, interceptor_from_section

    interceptor = interceptor_from_section(section)
    check_against_network(section, interceptor, config.mark)
    if interceptor.enabled:
        config = replace(config, queue_steering=QueueSteering(
            interceptor.queue, interceptor.mark, fail_open=interceptor.fail == "open"))
    return config, interceptor


def load_network_config(path: Path) -> NetworkConfig:
    """Read and check [network] and [interceptor]; other sections are left to their loaders."""
    data: dict[str, Any] = read_toml(path)
    section = Section(path, "network", data.get("network"))
    interceptor = Section(path, "interceptor", data.get("interceptor"))
    config, _ = with_interceptor(network_from_section(section), interceptor)
    problems = section.finish() + interceptor.finish()
    if problems:
        raise ConfigError(problems)
    return config
