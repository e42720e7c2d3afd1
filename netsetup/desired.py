"""The network state a `[network]` config asks for, as plain data (no kernel access here).

`desired_state(config)` is the whole answer to "what should this box look like"; the plan is
the difference between it and what is observed (netsetup/plan.py). `Desired()` (everything
empty) is what teardown converges to.

Interception recipe (measured on this kernel, see /work/shared/NETFILTER-FACTS.md):
- mangle PREROUTING jumps once to our own chain MAILGATE (only from the bridge in bridge mode);
- in MAILGATE, packets of a socket we already hold transparently (replies to the proxy's
  source-spoofed onward connections) go to MAILGATE_DIVERT, which marks and accepts them, so
  policy routing delivers them locally; then bypassed sources/destinations RETURN; with
  [interceptor] enabled, SYNs go to its NFQUEUE (`interceptor_rules`); then each intercepted
  port is TPROXY'd to its proxy's listen port with the same mark;
- `fwmark mark/mark lookup <table>` with a `local default dev lo` route in that table turns the
  mark into local delivery;
- bridge mode also needs the bridge family to hand the frames to the IP layer (netsetup/nft.py).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from netsetup.config import NetworkConfig
from netsetup.configfile import Network

MAIN_CHAIN = "MAILGATE"
DIVERT_CHAIN = "MAILGATE_DIVERT"
OUR_CHAINS = (MAIN_CHAIN, DIVERT_CHAIN)
MAIN_TABLE = 254  # the kernel's `main` routing table
# Policy rules sit below `from all lookup local` (0) and before `lookup main` (32766); pinned
# so the rule is the same whichever tool or library version adds it.
RULE_PRIORITY = 32000
# The egress rule comes after the TPROXY rule: a packet carrying both bits is one coming in.
EGRESS_RULE_PRIORITY = RULE_PRIORITY + 1
FORWARD_RULE_PRIORITY = RULE_PRIORITY + 2

# Bridge mode, for the proxies' own packets (egress_mark): the egress table routes them via a
# gateway that exists only as a permanent neighbour entry, so the kernel never asks ARP/ND
# (which needs an address of our own on the bridge, and never answers for a peer behind a
# router). Their frames leave with this locally administered destination address, and the
# bridge's egress hook (netsetup/nft.py) puts in the address the peer's own frames came from.
EGRESS_LLADDR = "02:6d:67:00:00:01"
EGRESS_GATEWAYS = {4: "169.254.77.1", 6: "fe80::6d67:1"}

XtParams = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class BridgeSpec:
    name: str
    ports: tuple[str, ...]
    # No listening/learning delay when a port comes up, and no spanning tree: the gateway is an
    # inline wire; STP would block the path for ~30 s after every change.
    forward_delay: int = 0
    stp_state: int = 0
    # An invisible bridge has no IPv6 link-local address either: nothing to answer for, no
    # MLD or router solicitations giving the box away. Kept when an IPv6 address is configured
    # (that host is an ordinary IPv6 node, RFC 4291 2.1).
    link_local: bool = True


@dataclass(frozen=True, order=True)
class AddressSpec:
    device: str
    cidr: str  # '192.0.2.2/24'

    @property
    def family(self) -> int:
        return ipaddress.ip_interface(self.cidr).version

    def describe(self) -> str:
        return f"{self.cidr} dev {self.device}"


@dataclass(frozen=True, order=True)
class RouteSpec:
    family: int
    destination: str  # network text, '0.0.0.0/0' for default
    device: str
    table: int = MAIN_TABLE
    kind: str = "unicast"  # or "local"
    scope: str = "link"  # "host" for local routes
    # A gateway whose link-layer address is fixed (a permanent neighbour entry that comes and
    # goes with the route): the egress routes of bridge mode.
    gateway: str | None = None
    lladdr: str | None = None

    def key(self) -> tuple[int, str, str, int, str, str | None, str | None]:
        # The kernel reports IPv6 routes with scope universe whatever was asked: not compared.
        return (self.family, self.destination, self.device, self.table, self.kind, self.gateway,
                self.lladdr)

    def describe(self) -> str:
        dest = "default" if self.destination in ("0.0.0.0/0", "::/0") else self.destination
        kind = "local " if self.kind == "local" else ""
        via = f" via {self.gateway} ({self.lladdr})" if self.gateway else ""
        table = "" if self.table == MAIN_TABLE else f" table {self.table}"
        scope = "" if self.gateway else f" scope {self.scope}"
        return f"ipv{self.family} {kind}{dest}{via} dev {self.device}{table}{scope}"


@dataclass(frozen=True, order=True)
class PolicyRuleSpec:
    family: int
    fwmark: int
    fwmask: int
    table: int
    priority: int = RULE_PRIORITY
    # Selects by input interface instead (fwmark and fwmask 0).
    iif: str | None = None

    def key(self) -> tuple[int, int, int, int, str | None]:
        # A rule that does the same job at another priority is in place already.
        return (self.family, self.fwmark, self.fwmask, self.table, self.iif)

    def describe(self) -> str:
        selector = (f"iif {self.iif}" if self.iif else
                    f"fwmark {self.fwmark:#x}/{self.fwmask:#x}")
        return f"ipv{self.family} priority {self.priority} {selector} lookup {self.table}"


@dataclass(frozen=True)
class XtRule:
    """One xtables rule in the normalised shape python-iptables reads back.

    `matches` and `target_params` hold what iptc's `get_all_parameters()` returns (option name
    without dashes -> values), so a rule read from the kernel compares equal to the one we asked
    for. Addresses are network text ('198.51.100.0/24') or None for "any".
    """

    chain: str
    target: str
    protocol: str | None = None
    in_interface: str | None = None
    source: str | None = None
    destination: str | None = None
    matches: tuple[tuple[str, XtParams], ...] = ()
    target_params: XtParams = ()

    def canonical(self) -> tuple[object, ...]:
        return (self.chain, self.target, self.protocol, self.in_interface, self.source,
                self.destination, tuple((n, tuple(sorted(p))) for n, p in self.matches),
                tuple(sorted(self.target_params)))

    def text(self) -> str:
        """The rule as `iptables-save` would print it."""
        parts = [f"-A {self.chain}"]
        if self.source:
            parts.append(f"-s {self.source}")
        if self.destination:
            parts.append(f"-d {self.destination}")
        if self.in_interface:
            parts.append(f"-i {self.in_interface}")
        if self.protocol:
            parts.append(f"-p {self.protocol}")
        for name, params in self.matches:
            parts.append(f"-m {name}" + _params_text(params))
        parts.append(f"-j {self.target}" + _params_text(self.target_params))
        return " ".join(parts)


def _params_text(params: XtParams) -> str:
    def one(name: str, values: tuple[str, ...]) -> str:
        if values[:1] == ("!",):  # iptables-save puts the negation before the option
            return f" ! --{name}" + "".join(f" {v}" for v in values[1:])
        return f" --{name}" + "".join(f" {v}" for v in values)

    return "".join(one(name, values) for name, values in params)


@dataclass(frozen=True)
class XtTable:
    """What netsetup owns in one family's mangle table: its chains and the jump(s) to them."""

    family: int
    chains: tuple[tuple[str, tuple[XtRule, ...]], ...]
    jumps: tuple[XtRule, ...]

    def canonical(self) -> tuple[object, ...]:
        return (self.family,
                tuple((name, tuple(r.canonical() for r in rules)) for name, rules in self.chains),
                tuple(r.canonical() for r in self.jumps))

    def lines(self) -> list[str]:
        out = [f":{name}" for name, _ in self.chains]
        out += [rule.text() for rule in self.jumps]
        out += [rule.text() for _, rules in self.chains for rule in rules]
        return out


@dataclass(frozen=True)
class NftSteering:
    """Bridge-family rules that hand intercepted frames to the bridge's own IP stack."""

    bridge: str
    ports: tuple[str, ...]
    tcp_ports: tuple[int, ...]
    families: tuple[int, ...]
    bypass_sources: tuple[Network, ...] = ()
    bypass_destinations: tuple[Network, ...] = ()
    # The proxies' frames leave with this destination address; the egress hook replaces it.
    egress_lladdr: str = EGRESS_LLADDR


@dataclass(frozen=True)
class Desired:
    sysctls: dict[str, str] = field(default_factory=dict)
    bridge: BridgeSpec | None = None
    addresses: tuple[AddressSpec, ...] = ()
    routes: tuple[RouteSpec, ...] = ()
    rules: tuple[PolicyRuleSpec, ...] = ()
    xtables: dict[int, XtTable] = field(default_factory=dict)
    steering: NftSteering | None = None


def desired_state(config: NetworkConfig) -> Desired:
    bridge_mode = config.mode == "bridge"
    return Desired(
        sysctls=desired_sysctls(config),
        bridge=BridgeSpec(config.bridge, config.ports,
                          link_local=any(":" in a for a in config.addresses))
        if bridge_mode else None,
        # Normalised as the kernel reports them ('2001:DB8::2/64' reads back as '2001:db8::2/64').
        addresses=tuple(AddressSpec(config.bridge, str(ipaddress.ip_interface(a)))
                        for a in config.addresses) if bridge_mode else (),
        routes=desired_routes(config),
        rules=desired_rules(config),
        xtables={f: mangle_table(config, f) for f in config.families},
        steering=NftSteering(
            bridge=config.bridge,
            ports=config.ports,
            tcp_ports=tuple(item.port for item in config.intercept),
            families=config.families,
            bypass_sources=config.bypass_sources,
            bypass_destinations=config.bypass_destinations,
        ) if bridge_mode else None,
    )


def desired_sysctls(config: NetworkConfig) -> dict[str, str]:
    if config.mode == "router":
        values = {"net.ipv4.ip_forward": "1"}
        if config.ipv6:
            values["net.ipv6.conf.all.forwarding"] = "1"
        return values
    # With br_netfilter calling iptables for bridged frames, TPROXY sees them but the frame is
    # still bridged (measured): the bridge family steers them instead, so bridged traffic must
    # not also traverse iptables.
    values = {"net.bridge.bridge-nf-call-iptables": "0"}
    if config.ipv6:
        values["net.bridge.bridge-nf-call-ip6tables"] = "0"
    if config.queue_steering is not None:
        # The bridge family hands every port-25/110 frame to the IP stack; a connection the
        # interceptor passes has no local socket there and is routed on (NETFILTER-FACTS.md).
        values["net.ipv4.ip_forward"] = "1"
        if config.ipv6:
            values["net.ipv6.conf.all.forwarding"] = "1"
    return values


def desired_rules(config: NetworkConfig) -> tuple[PolicyRuleSpec, ...]:
    rules = [PolicyRuleSpec(f, config.mark, config.mark, config.route_table)
             for f in config.families]
    if config.mode == "bridge":
        rules += [PolicyRuleSpec(f, config.egress_mark, config.egress_mark, config.egress_table,
                                 EGRESS_RULE_PRIORITY) for f in config.families]
        if config.queue_steering is not None:
            # A connection the interceptor passes was already lifted to layer 3 by the steering
            # and is routed on (desired_sysctls): through the egress table too, so it reaches
            # its peer's link-layer address with no address or subnet of ours either. The box's
            # own addresses are matched earlier, by the local table.
            rules += [PolicyRuleSpec(f, 0, 0, config.egress_table, FORWARD_RULE_PRIORITY,
                                     iif=config.bridge) for f in config.families]
    return tuple(rules)


def desired_routes(config: NetworkConfig) -> tuple[RouteSpec, ...]:
    routes = [
        RouteSpec(family, _default(family), "lo", config.route_table, kind="local",
                  scope="host")
        for family in config.families
    ]
    if config.mode == "bridge":
        # Why not a plain on-link route: ARP and ND for a peer need a source address of ours on
        # the bridge, and a peer behind a router never answers them at all (its frames carry the
        # router's address). With a fixed neighbour the kernel sends at once and the egress hook
        # supplies the link-layer address the peer's own traffic used.
        routes += [RouteSpec(family, _default(family), config.bridge, config.egress_table,
                             gateway=EGRESS_GATEWAYS[family], lladdr=EGRESS_LLADDR)
                   for family in config.families]
        # An address brings its own prefix route; adding the same network again would either
        # clash (IPv4) or sit beside it at another metric (IPv6).
        covered = {ipaddress.ip_interface(a).network for a in config.addresses}
        for network in config.bridged_networks:
            if network not in covered:
                routes.append(RouteSpec(network.version, str(network), config.bridge))
    return tuple(routes)


def _default(family: int) -> str:
    return "0.0.0.0/0" if family == 4 else "::/0"


def _mark(config: NetworkConfig) -> str:
    return _bit(config.mark)


def _bit(mark: int) -> str:
    return f"{mark:#x}/{mark:#x}"


def mangle_table(config: NetworkConfig, family: int) -> XtTable:
    any_address = "0.0.0.0" if family == 4 else "::"
    jump = XtRule("PREROUTING", MAIN_CHAIN, protocol="tcp",
                  in_interface=config.bridge if config.mode == "bridge" else None)
    divert = (
        XtRule(DIVERT_CHAIN, "MARK", target_params=(("set-xmark", (_mark(config),)),)),
        XtRule(DIVERT_CHAIN, "ACCEPT"),
    )
    main = [
        XtRule(MAIN_CHAIN, DIVERT_CHAIN, protocol="tcp",
               matches=(("socket", (("transparent", ()),)),)),
        # Connections to the box's own addresses are its own business (its sshd, or an MTA of
        # its own): taking them would make the proxy deliver to the box itself, in a loop.
        XtRule(MAIN_CHAIN, "RETURN", matches=(("addrtype", (("dst-type", ("LOCAL",)),)),)),
        *bypass_rules(config, family),
        *interceptor_rules(config, family),
    ]
    decided: tuple[tuple[str, XtParams], ...] = ()
    if config.queue_steering is not None:
        # Only what the interceptor chose: a bypassed connection's later packets (and its SYN
        # when no interceptor is bound) must not reach TPROXY, which would hand them to the
        # listener and reset the connection.
        decided = (("mark", (("mark", (_bit(config.queue_steering.mark),)),)),)
    for item in config.intercept:
        main.append(XtRule(
            MAIN_CHAIN, "TPROXY", protocol="tcp",
            matches=(("tcp", (("dport", (str(item.port),)),)), *decided),
            target_params=(("on-port", (str(item.listen_port),)), ("on-ip", (any_address,)),
                           ("tproxy-mark", (_mark(config),))),
        ))
    return XtTable(family, ((MAIN_CHAIN, tuple(main)), (DIVERT_CHAIN, divert)), (jump,))


def bypass_rules(config: NetworkConfig, family: int) -> list[XtRule]:
    rules = [XtRule(MAIN_CHAIN, "RETURN", source=str(n))
             for n in config.bypass_sources if n.version == family]
    rules += [XtRule(MAIN_CHAIN, "RETURN", destination=str(n))
              for n in config.bypass_destinations if n.version == family]
    return rules


def interceptor_rules(config: NetworkConfig, family: int) -> list[XtRule]:
    """With [interceptor] enabled, new connections to intercepted ports ask the interceptor.

    The measured recipe (NETFILTER-FACTS.md): a SYN to an intercepted port without the decision
    bit goes to the NFQUEUE; the interceptor either sets the bit and answers *repeat*, so the
    packet runs through PREROUTING again and reaches the TPROXY rules (which then require the
    bit), or answers *accept*, which leaves this table at once: the connection is forwarded
    untouched. Only SYNs are queued: established connections never wait for a user-space
    program.

    While no program is bound to the queue (at boot until `mailgate run` has started the
    interceptor, or after it died), what happens follows `[interceptor] fail`: with "open",
    `--queue-bypass` turns the rule into an accept, so mail flows uninspected rather than not
    at all; with "closed" there is no bypass and the kernel drops the SYN, so the connection is
    held: the client retransmits it (after 1 s, 3 s, 7 s...) and the first SYN that finds the
    interceptor bound is decided as usual. Nothing passes uninspected.
    """
    steering = config.queue_steering
    if steering is None:
        return []
    del family  # the same rules for both families
    target: XtParams = (("queue-num", (str(steering.queue),)),)
    if steering.fail_open:
        target += (("queue-bypass", ()),)
    return [
        XtRule(MAIN_CHAIN, "NFQUEUE", protocol="tcp",
               matches=(("tcp", (("dport", (str(item.port),)),
                                 ("tcp-flags", ("FIN,SYN,RST,ACK", "SYN")))),
                        ("mark", (("mark", ("!", _bit(steering.mark))),))),
               target_params=target)
        for item in config.intercept
    ]
