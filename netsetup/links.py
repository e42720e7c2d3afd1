"""Links, bridge membership, addresses, routes and policy rules through pyroute2 (netlink).

Kernel glue only: every function takes and returns netsetup's plain specs. The calling process
is expected to run inside the network namespace it configures (`ip netns exec`), so IPRoute()
talks to that namespace. Idempotency follows pyroute2's own habit: try, and compare the
NetlinkError's errno (EEXIST on add, ENOENT/ESRCH/... on delete).
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netsetup.desired import AddressSpec, BridgeSpec, PolicyRuleSpec, RouteSpec

_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 6}
_GONE = {errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL}
_RT_TYPES = {1: "unicast", 2: "local"}
_SCOPES = {0: "universe", 253: "link", 254: "host"}
RTPROT_KERNEL = 2
IFF_UP = 0x1
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 0x4


class LinkError(Exception):
    pass


@dataclass(frozen=True)
class LinkInfo:
    name: str
    kind: str | None  # "bridge", "veth", ... None for plain devices such as lo
    master: str | None
    up: bool
    mac: str | None
    forward_delay: int | None = None  # bridges only, in the kernel's unit (centiseconds)
    stp_state: int | None = None


@contextmanager
def _ipr() -> Iterator[IPRoute]:
    with IPRoute() as ipr:
        yield ipr


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise LinkError(f"no interface named {name!r}")
    return int(found[0])


def _names(ipr: IPRoute) -> dict[int, str]:
    return {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}


# --- reading -------------------------------------------------------------------------------


def read_links() -> dict[str, LinkInfo]:
    out: dict[str, LinkInfo] = {}
    with _ipr() as ipr:
        links = list(ipr.get_links())
        names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in links}
        for link in links:
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
            master = link.get_attr("IFLA_MASTER")
            name = names[int(link["index"])]
            out[name] = LinkInfo(
                name=name,
                kind=kind,
                master=names.get(int(master)) if master else None,
                up=bool(link["flags"] & IFF_UP),
                mac=link.get_attr("IFLA_ADDRESS"),
                forward_delay=data.get_attr("IFLA_BR_FORWARD_DELAY")
                if kind == "bridge" and data is not None else None,
                stp_state=data.get_attr("IFLA_BR_STP_STATE")
                if kind == "bridge" and data is not None else None,
            )
    return out


def read_addresses() -> set[AddressSpec]:
    with _ipr() as ipr:
        names = _names(ipr)
        return {
            AddressSpec(names.get(int(a["index"]), "?"),
                        f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in ipr.get_addr()
        }


def read_routes(tables: Iterable[int]) -> set[RouteSpec]:
    """Unicast and local routes in `tables`, except those the kernel adds for addresses."""
    wanted = set(tables)
    out: set[RouteSpec] = set()
    with _ipr() as ipr:
        names = _names(ipr)
        fixed = _permanent_neighbours(ipr)
        for af, family in _FAMILY.items():
            for route in ipr.route("dump", family=af):
                table = route.get_attr("RTA_TABLE") or route["table"]
                oif = route.get_attr("RTA_OIF")
                if table not in wanted or oif is None or route["type"] not in _RT_TYPES:
                    continue
                # Prefix routes the kernel made for an address come and go with the address:
                # they neither stand in for a route the config asks for nor are ever ours.
                if route["proto"] == RTPROT_KERNEL:
                    continue
                dst = route.get_attr("RTA_DST") or ("0.0.0.0" if family == 4 else "::")
                gateway = route.get_attr("RTA_GATEWAY")
                device = names.get(int(oif), "?")
                out.add(RouteSpec(family, f"{dst}/{route['dst_len']}", device,
                                  int(table), _RT_TYPES[route["type"]],
                                  _SCOPES.get(route["scope"], str(route["scope"])),
                                  gateway=gateway,
                                  lladdr=fixed.get((int(oif), gateway)) if gateway else None))
    return out


def _permanent_neighbours(ipr: IPRoute) -> dict[tuple[int, str], str]:
    """(interface index, address) -> link-layer address of every permanent neighbour entry."""
    out: dict[tuple[int, str], str] = {}
    for af in _FAMILY:
        for entry in ipr.get_neighbours(family=af):
            lladdr = entry.get_attr("NDA_LLADDR")
            if entry["state"] & NUD_PERMANENT and lladdr:
                out[(int(entry["ifindex"]), str(entry.get_attr("NDA_DST")))] = str(lladdr)
    return out


def read_rules() -> set[PolicyRuleSpec]:
    """Policy rules that select by fwmark or by input interface (the kinds netsetup adds)."""
    out: set[PolicyRuleSpec] = set()
    with _ipr() as ipr:
        for af, family in _FAMILY.items():
            for rule in ipr.get_rules(family=af):
                mark = rule.get_attr("FRA_FWMARK")
                iif = rule.get_attr("FRA_IIFNAME")
                if mark is None and iif is None:
                    continue
                mask = rule.get_attr("FRA_FWMASK")
                table = int(rule.get_attr("FRA_TABLE") or rule["table"])
                priority = int(rule.get_attr("FRA_PRIORITY") or 0)
                if mark is None:
                    out.add(PolicyRuleSpec(family, 0, 0, table, priority, iif=str(iif)))
                    continue
                out.add(PolicyRuleSpec(family, int(mark),
                                       0xFFFFFFFF if mask is None else int(mask),
                                       table, priority, iif=str(iif) if iif else None))
    return out


# --- changing ------------------------------------------------------------------------------


def create_bridge(spec: BridgeSpec) -> None:
    with _ipr() as ipr:
        ipr.link("add", ifname=spec.name, kind="bridge", br_forward_delay=spec.forward_delay,
                 br_stp_state=spec.stp_state)
    if not spec.link_local:
        # Before the link comes up, so the kernel never generates the address (mode 1: none).
        path = Path("/proc/sys/net/ipv6/conf", spec.name, "addr_gen_mode")
        try:
            with contextlib.suppress(FileNotFoundError):  # IPv6 disabled in this namespace
                path.write_text("1\n")
        except OSError:
            # E.g. EROFS (/proc/sys read-only: a container, ProtectKernelTunables=yes). The
            # executor undoes only completed steps: this one must not leave its bridge behind.
            delete_link(spec.name)
            raise


def delete_link(name: str) -> None:
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])


def set_bridge_options(name: str, forward_delay: int, stp_state: int) -> None:
    with _ipr() as ipr:
        ipr.link("set", index=_index(ipr, name), kind="bridge", br_forward_delay=forward_delay,
                 br_stp_state=stp_state)


def set_master(port: str, bridge: str | None) -> None:
    """Enslave `port` to `bridge`, or release it from any master (None)."""
    with _ipr() as ipr:
        master = _index(ipr, bridge) if bridge else 0
        ipr.link("set", index=_index(ipr, port), master=master)


def set_up(name: str, up: bool) -> None:
    with _ipr() as ipr:
        ipr.link("set", index=_index(ipr, name), state="up" if up else "down")


def add_address(spec: AddressSpec) -> bool:
    """True when added, False when it was there already."""
    address, _, prefix = spec.cidr.partition("/")
    with _ipr() as ipr:
        try:
            ipr.addr("add", index=_index(ipr, spec.device), address=address,
                     prefixlen=int(prefix))
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise
    return True


def delete_address(spec: AddressSpec) -> None:
    address, _, prefix = spec.cidr.partition("/")
    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=spec.device)
        if not found:
            return  # gone with its device
        try:
            ipr.addr("del", index=found[0], address=address, prefixlen=int(prefix))
        except NetlinkError as exc:
            if exc.code not in _GONE:
                raise


def _route_args(ipr: IPRoute, spec: RouteSpec) -> dict[str, object]:
    args: dict[str, object] = {"family": _AF[spec.family], "dst": spec.destination,
                               "oif": _index(ipr, spec.device), "table": spec.table,
                               "type": spec.kind, "scope": spec.scope}
    if spec.gateway:
        args["gateway"] = spec.gateway
        if spec.family == 4:
            # No subnet of ours contains the gateway: the kernel must take it as on the link.
            args["flags"] = RTNH_F_ONLINK
        del args["scope"]
    return args


def _set_neighbour(ipr: IPRoute, spec: RouteSpec, add: bool) -> None:
    if not (spec.gateway and spec.lladdr):
        return
    try:
        ipr.neigh("replace" if add else "del", dst=spec.gateway, lladdr=spec.lladdr,
                  ifindex=_index(ipr, spec.device), state=NUD_PERMANENT, family=_AF[spec.family])
    except NetlinkError as exc:
        if add or exc.code not in _GONE:
            raise


class RouteConflict(Exception):
    """The table already holds another route to the same destination (not ours)."""


def add_route(spec: RouteSpec) -> bool:
    """Add `spec` (and the permanent neighbour entry its gateway needs); False when exactly
    this route was there already. Either both are added or, on failure, neither."""
    with _ipr() as ipr:
        try:
            # A `local` route must say scope host explicitly: pyroute2 otherwise sends scope
            # universe and the kernel answers EINVAL (measured).
            ipr.route("add", **_route_args(ipr, spec))
            added = True
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
            # EEXIST only says the table has *a* route to this destination and metric; taking
            # a different one (a blackhole, another device) for ours would report success
            # while nothing routes as configured.
            present = {route.key()[:-1] for route in read_routes([spec.table])}
            if spec.key()[:-1] not in present:  # [:-1]: the neighbour entry is set below
                raise RouteConflict(
                    f"table {spec.table} already has another route to {spec.destination} "
                    "(not netsetup's): remove it, or set another table in [network] "
                    "(route_table, egress_table)") from None
            added = False
        try:
            _set_neighbour(ipr, spec, add=True)
        except NetlinkError:
            if added:
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", **_route_args(ipr, spec))
            raise
    return added


def delete_route(spec: RouteSpec) -> None:
    with _ipr() as ipr:
        if not ipr.link_lookup(ifname=spec.device):
            return
        try:
            ipr.route("del", **_route_args(ipr, spec))
        except NetlinkError as exc:
            if exc.code not in _GONE:
                raise
        _set_neighbour(ipr, spec, add=False)


def _rule_args(spec: PolicyRuleSpec) -> dict[str, object]:
    if spec.iif:
        return {"family": _AF[spec.family], "iifname": spec.iif, "table": spec.table,
                "priority": spec.priority}
    return {"family": _AF[spec.family], "fwmark": spec.fwmark, "fwmask": spec.fwmask,
            "table": spec.table, "priority": spec.priority}


def add_rule(spec: PolicyRuleSpec) -> bool:
    with _ipr() as ipr:
        try:
            ipr.rule("add", **_rule_args(spec))
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise
    return True


def delete_rule(spec: PolicyRuleSpec) -> None:
    with _ipr() as ipr:
        try:
            ipr.rule("del", **_rule_args(spec))
        except NetlinkError as exc:
            if exc.code not in _GONE:
                raise
