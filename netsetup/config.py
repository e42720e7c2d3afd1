"""The `[network]` section: how the box sits in the path and what it intercepts."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netsetup.configfile import ConfigError, Network, Section, read_toml

if TYPE_CHECKING:
    from interceptor.config import InterceptorConfig

# Service name -> (destination port it intercepts, default local port of its proxy). The port a
# proxy listens on is set in one place, its own section ([smtp] listen, [pop3] listen): netsetup
# steers intercepted connections there and `mailgate run` listens there, so the two cannot differ.
SERVICES = {"smtp": (25, 10025), "pop3": (110, 10110)}
# Whether each proxy runs when its section says nothing ([pop3] enabled; SMTP always runs).
PROXY_DEFAULTS = {"smtp": True, "pop3": False}

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


@dataclass(frozen=True)
class Proxy:
    """What [network] needs to know of one proxy's own section."""

    enabled: bool
    listen_port: int


def proxies_from_sections(smtp: Section, pop3: Section) -> dict[str, Proxy]:
    """Each proxy's listen port and whether it runs, read from its own section (the same keys,
    and the same Section objects, the proxies' loaders read)."""
    proxies = {"smtp": Proxy(True, smtp.port("listen", SERVICES["smtp"][1]))}
    proxies["pop3"] = Proxy(pop3.boolean("enabled", PROXY_DEFAULTS["pop3"]),
                            pop3.port("listen", SERVICES["pop3"][1]))
    if proxies["pop3"].enabled:
        pop3.check("the proxies listen on ports of their own", "listen",
                   proxies["smtp"].listen_port != proxies["pop3"].listen_port,
                   f"is smtp.listen too ({proxies['pop3'].listen_port}): the two proxies need "
                   "ports of their own")
    return proxies


def network_from_section(section: Section,
                         proxies: Mapping[str, Proxy] | None = None) -> NetworkConfig:
    """[network], given the proxies it hands connections to (default: each proxy's defaults)."""
    if proxies is None:
        proxies = {name: Proxy(PROXY_DEFAULTS[name], port)
                   for name, (_, port) in SERVICES.items()}
    mode = section.choice("mode", ("router", "bridge"), "router")
    bridge = section.converted("bridge", _ifname, "br0")
    ports = section.list_of("ports", _ifname)
    addresses = section.list_of("addresses", _interface_address)
    # Not given: every service whose proxy runs. Given: each named service's proxy must run,
    # or its connections would be taken towards a port nobody listens on.
    running = tuple(name for name in SERVICES if proxies[name].enabled)
    services = section.string_list("intercept", running)
    if "listen" in section.data:
        section.table("listen")
        section.problem("listen", "has moved: each proxy's port is set once, in its own section "
                        "([smtp] listen, [pop3] listen), and netsetup reads it from there")
    intercept = []
    for service in services:
        if service not in SERVICES:
            section.problem("intercept", f"unknown service {service!r} (known: smtp, pop3)")
            continue
        if not section.check(
                f"intercepted {service} has its proxy running", "intercept",
                proxies[service].enabled,
                f"names {service!r} but {service}.enabled is false: its connections would go "
                f"to port {proxies[service].listen_port}, where nothing listens (set "
                f"[{service}] enabled = true, or drop {service!r} from intercept)"):
            continue
        intercept.append(Interception(service, SERVICES[service][0], proxies[service].listen_port))
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
    check = section.check
    if config.mode == "bridge":
        check("a bridge has two ports or more", "ports", len(config.ports) >= 2,
              "bridge mode needs at least two member interfaces")
        check("bridge ports are distinct", "ports", len(set(config.ports)) == len(config.ports),
              "names an interface twice")
        check("the bridge is not one of its ports", "ports", config.bridge not in config.ports,
              f"holds the bridge itself ({config.bridge!r})")
        check("without spoofing, the bridge has an address to connect from", "spoof_source",
              config.spoof_source or bool(config.addresses),
              "false needs 'addresses': without spoofing the proxy connects onward "
              "from an address of its own on the bridge")
    else:
        for key in ("ports", "bridge", "addresses", "bridged_networks", "egress_mark",
                    "egress_table"):
            section.unused[key] = "bridge mode only"
            check(f"router mode sets no {key}", key, not section.given(key),
                  'only used in bridge mode (mode = "bridge")')
    check("egress_mark and mark are separate bits", "egress_mark",
          not config.egress_mark & config.mark,
          f"shares bits with mark ({config.mark:#x}): the proxies' own packets would be "
          "delivered locally")
    check("egress_table and route_table differ", "egress_table",
          config.egress_table != config.route_table,
          "is route_table: the two need tables of their own")
    services = [item.service for item in config.intercept]
    check("each service is intercepted once", "intercept", len(set(services)) == len(services),
          "names a service twice")
    if not config.ipv6:
        v6_keys = (("bypass_sources", config.bypass_sources),
                   ("bypass_destinations", config.bypass_destinations),
                   ("bridged_networks", config.bridged_networks))
        for key, nets in v6_keys:
            check(f"ipv6 = false: {key} holds no IPv6 network", key,
                  not any(n.version == 6 for n in nets), "holds an IPv6 network but ipv6 = false")
        check("ipv6 = false: addresses holds no IPv6 address", "addresses",
              not any(":" in address for address in config.addresses),
              "holds an IPv6 address but ipv6 = false")


def with_interceptor(config: NetworkConfig,
                     section: Section) -> tuple[NetworkConfig, InterceptorConfig]:
    """`config` plus the NFQUEUE steering [interceptor] asks for, and that section parsed (the
    whole section is checked: a typo there is reported by netsetup as well as by mailgate)."""
    from interceptor.config import check_against_network, interceptor_from_section

    interceptor = interceptor_from_section(section)
    check_against_network(section, interceptor, config.mark)
    intercepted = {item.service for item in config.intercept}
    for name in interceptor.services or ():
        if name in SERVICES:
            section.check(f"the interceptor's {name} is intercepted", "services",
                          name in intercepted,
                          f"names {name!r}, which network.intercept does not intercept: the "
                          "interceptor only ever sees intercepted services")
    if interceptor.enabled:
        config = replace(config, queue_steering=QueueSteering(
            interceptor.queue, interceptor.mark, fail_open=interceptor.fail == "open"))
    return config, interceptor


def network_from_sections(
        sections: Mapping[str, Section]) -> tuple[NetworkConfig, InterceptorConfig]:
    """[network] and [interceptor], checked against the proxies' own sections: the one place
    netsetup (`load_network_config`) and `mailgate run` (proxies/config.py) both go through."""
    proxies = proxies_from_sections(sections["smtp"], sections["pop3"])
    return with_interceptor(network_from_section(sections["network"], proxies),
                            sections["interceptor"])


def load_network_config(path: Path) -> NetworkConfig:
    """Read and check [network] and [interceptor], and the keys of [smtp] and [pop3] they
    depend on; the rest of those sections is left to the proxies' loaders."""
    data: dict[str, Any] = read_toml(path)
    sections = {name: Section(path, name, data.get(name))
                for name in ("network", "interceptor", "smtp", "pop3")}
    config, _ = network_from_sections(sections)
    problems = (sections["network"].finish() + sections["interceptor"].finish()
                + sections["smtp"].problems + sections["pop3"].problems)
    if problems:
        raise ConfigError(problems)
    return config
