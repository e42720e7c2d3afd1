"""The plan: the difference between the desired state and what is observed, as a list of changes.

`diff()` is pure (desired, observed, state in; changes out), so the unit tests check it with
no kernel at all. Things netsetup installed earlier and the config no longer asks for (the
state file says which) are removed first, layer by layer from the top (steering, then
iptables, rules, routes, addresses, links, sysctls); then what is missing or different is put
in place from the bottom up, so interception is switched on last, once everything under it is
ready. Teardown is the same diff against `Desired()`: only what netsetup owns is stale.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from netsetup import nft
from netsetup.desired import (
    AddressSpec,
    BridgeSpec,
    Desired,
    NftSteering,
    PolicyRuleSpec,
    RouteSpec,
    XtTable,
)
from netsetup.observed import Observed
from netsetup.state import State

# Parameters that may be missing: without br_netfilter no bridged frame reaches iptables,
# which is exactly what setting them to 0 asks for.
ABSENT_IS_FINE = {"net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"}

KINDS = ("sysctl", "link", "address", "route", "rule", "iptables", "nft")
KIND_TITLES = {
    "sysctl": "sysctls",
    "link": "links",
    "address": "addresses",
    "route": "routes",
    "rule": "policy rules",
    "iptables": "iptables (mangle table, legacy xtables)",
    "nft": "nftables (bridge family)",
}


# --- payloads: what the executor (netsetup/apply.py) needs for each kind of change ----------


@dataclass(frozen=True)
class SysctlSet:
    key: str
    value: str
    restore: bool = False  # True: putting back the value from before netsetup


@dataclass(frozen=True)
class BridgeCreate:
    spec: BridgeSpec


@dataclass(frozen=True)
class BridgeDelete:
    name: str


@dataclass(frozen=True)
class BridgeOptions:
    name: str
    forward_delay: int
    stp_state: int
    restore: bool = False


@dataclass(frozen=True)
class PortMaster:
    port: str
    bridge: str  # enslave to it, or (release=True) release from it
    release: bool = False


@dataclass(frozen=True)
class LinkState:
    name: str
    up: bool
    is_bridge: bool
    restore: bool = False  # True: putting a link back down that netsetup brought up


@dataclass(frozen=True)
class Membership:
    """Add or delete an address, route or policy rule."""

    spec: AddressSpec | RouteSpec | PolicyRuleSpec
    add: bool


@dataclass(frozen=True)
class XtReplace:
    family: int
    table: XtTable | None  # None: remove our chains


@dataclass(frozen=True)
class NftReplace:
    steering: NftSteering | None  # None: remove the table


Payload = (SysctlSet | BridgeCreate | BridgeDelete | BridgeOptions | PortMaster | LinkState
           | Membership | XtReplace | NftReplace)


@dataclass(frozen=True)
class Change:
    kind: str  # one of KINDS
    action: str  # verb shown to the user: set, create, delete, add, replace, ...
    subject: str
    reason: str  # "missing", "differs" or "stale" (netsetup's, no longer asked for)
    payload: Payload
    detail: tuple[str, ...] = ()

    def line(self) -> str:
        return f"{self.action} {self.subject}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "action": self.action, "subject": self.subject,
                "reason": self.reason, "detail": list(self.detail)}


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)
    in_place: list[tuple[str, str]] = field(default_factory=list)  # (kind, description)

    @property
    def empty(self) -> bool:
        return not self.changes


# --- the diff ------------------------------------------------------------------------------


def diff(desired: Desired, observed: Observed, state: State) -> Plan:
    plan = Plan()
    _stale(plan, desired, observed, state)
    _sysctls(plan, desired, observed)
    _links(plan, desired, observed)
    _members(plan, "address", desired.addresses, observed.addresses, _identity)
    _members(plan, "route", desired.routes, _surviving_routes(plan, desired, observed),
             RouteSpec.key)
    _members(plan, "rule", desired.rules, observed.rules, PolicyRuleSpec.key)
    _xtables(plan, desired, observed)
    _steering(plan, desired, observed)
    return plan


def _surviving_routes(plan: Plan, desired: Desired, observed: Observed) -> frozenset[RouteSpec]:
    """The observed routes still there once the stale addresses are gone: when a device loses
    its last IPv4 address the kernel flushes every IPv4 route through it (fib_disable_ip), our
    egress route included, so those must be added again in the same apply."""
    deleted = {c.payload.spec for c in plan.changes
               if isinstance(c.payload, Membership) and not c.payload.add
               and isinstance(c.payload.spec, AddressSpec)}
    remaining = (set(observed.addresses) - deleted) | set(desired.addresses)
    emptied = {a.device for a in deleted if a.family == 4} - {
        a.device for a in remaining if a.family == 4}
    return frozenset(r for r in observed.routes if not (r.family == 4 and r.device in emptied))


def _describe(spec: AddressSpec | RouteSpec | PolicyRuleSpec) -> str:
    return spec.describe()


def _stale(plan: Plan, desired: Desired, observed: Observed, state: State) -> None:
    add = plan.changes.append
    if desired.steering is None and observed.nft_listing is not None:
        add(Change("nft", "remove", f"table {nft.FAMILY} {nft.TABLE}", "stale",
                   NftReplace(None)))
    for family in (4, 6):
        if family not in desired.xtables and observed.xtables.get(family) is not None:
            add(Change("iptables", "remove", f"IPv{family} chains MAILGATE, MAILGATE_DIVERT and "
                       "the jump to them", "stale", XtReplace(family, None)))
    _stale_members(plan, "rule", state.rules, desired.rules, observed.rules, PolicyRuleSpec.key)
    _stale_members(plan, "route", state.routes, desired.routes, observed.routes, RouteSpec.key)
    _stale_members(plan, "address", state.addresses, desired.addresses, observed.addresses,
                   _identity)
    record = state.bridge
    bridge_kept = (record is not None and desired.bridge is not None
                   and desired.bridge.name == record.name)
    wanted_ports = set(desired.bridge.ports) if desired.bridge and bridge_kept else set()
    for port, port_record in state.ports.items():
        if port in wanted_ports or port not in observed.links:
            continue
        link = observed.links[port]
        if port_record.enslaved and record and link.master == record.name:
            add(Change("link", "release", f"{port} from {record.name}", "stale",
                       PortMaster(port, record.name, release=True)))
        if port_record.was_down and link.up:
            add(Change("link", "set down", f"{port} (was down before netsetup)", "stale",
                       LinkState(port, up=False, is_bridge=False, restore=True)))
    if record is not None and not bridge_kept and record.name in observed.links:
        if record.created:
            add(Change("link", "delete", f"bridge {record.name} (created by netsetup)", "stale",
                       BridgeDelete(record.name)))
        else:
            if record.previous_options:
                fd = record.previous_options.get("forward_delay", 0)
                stp = record.previous_options.get("stp_state", 0)
                add(Change("link", "restore", f"bridge {record.name} forward_delay {fd} "
                           f"stp_state {stp}", "stale",
                           BridgeOptions(record.name, fd, stp, restore=True)))
            if record.was_down and observed.links[record.name].up:
                add(Change("link", "set down", f"{record.name} (was down before netsetup)",
                           "stale", LinkState(record.name, up=False, is_bridge=True,
                                              restore=True)))
    for key_name, previous in state.sysctls.items():
        if key_name not in desired.sysctls and observed.sysctls.get(key_name) != previous:
            add(Change("sysctl", "restore", f"{key_name} = {previous}", "stale",
                       SysctlSet(key_name, previous, restore=True)))


def _identity(spec: Any) -> Any:
    return spec


def _stale_members(plan: Plan, kind: str, owned: Sequence[Any], wanted: Iterable[Any],
                   present: Iterable[Any], key: Callable[[Any], Any]) -> None:
    """Delete what netsetup added, the config no longer asks for, and is still there."""
    wanted_keys = {key(s) for s in wanted}
    present_keys = {key(s) for s in present}
    for spec in owned:
        if key(spec) not in wanted_keys and key(spec) in present_keys:
            plan.changes.append(Change(kind, "delete", _describe(spec), "stale",
                                       Membership(spec, add=False)))


def _sysctls(plan: Plan, desired: Desired, observed: Observed) -> None:
    for key, value in desired.sysctls.items():
        current = observed.sysctls.get(key)
        if current == value or (current is None and key in ABSENT_IS_FINE):
            plan.in_place.append(("sysctl", f"{key} = {value}"))
            continue
        reason = "missing" if current is None else "differs"
        plan.changes.append(Change("sysctl", "set", f"{key} = {value} (now {current})", reason,
                                   SysctlSet(key, value)))


def _links(plan: Plan, desired: Desired, observed: Observed) -> None:
    spec = desired.bridge
    if spec is None:
        return
    add = plan.changes.append
    bridge = observed.links.get(spec.name)
    if bridge is None:
        add(Change("link", "create", f"bridge {spec.name} (forward_delay {spec.forward_delay}, "
                   f"stp_state {spec.stp_state})", "missing", BridgeCreate(spec)))
    elif (bridge.forward_delay, bridge.stp_state) != (spec.forward_delay, spec.stp_state):
        add(Change("link", "set", f"bridge {spec.name} forward_delay {spec.forward_delay} "
                   f"stp_state {spec.stp_state} (now {bridge.forward_delay}, "
                   f"{bridge.stp_state})", "differs",
                   BridgeOptions(spec.name, spec.forward_delay, spec.stp_state)))
    else:
        plan.in_place.append(("link", f"bridge {spec.name} (forward_delay "
                                      f"{spec.forward_delay}, stp_state {spec.stp_state})"))
    for port in spec.ports:
        link = observed.links.get(port)
        if link is None or link.master != spec.name:
            add(Change("link", "enslave", f"{port} to {spec.name}", "missing",
                       PortMaster(port, spec.name)))
        else:
            plan.in_place.append(("link", f"{port} in {spec.name}"))
        if link is None or not link.up:
            add(Change("link", "set up", port, "differs",
                       LinkState(port, up=True, is_bridge=False)))
    if bridge is None or not bridge.up:
        add(Change("link", "set up", spec.name, "differs",
                   LinkState(spec.name, up=True, is_bridge=True)))
    else:
        plan.in_place.append(("link", f"{spec.name} up"))


def _members(plan: Plan, kind: str, wanted: Iterable[Any], present: Iterable[Any],
             key: Callable[[Any], Any]) -> None:
    present_keys = {key(s) for s in present}
    for spec in wanted:
        if key(spec) in present_keys:
            plan.in_place.append((kind, _describe(spec)))
        else:
            plan.changes.append(Change(kind, "add", _describe(spec), "missing",
                                       Membership(spec, add=True)))


def _xtables(plan: Plan, desired: Desired, observed: Observed) -> None:
    for family, table in sorted(desired.xtables.items()):
        current = observed.xtables.get(family)
        title = f"IPv{family} chains {', '.join(name for name, _ in table.chains)}"
        if current is not None and current.canonical() == table.canonical():
            plan.in_place.append(("iptables", f"{title} ({sum(len(r) for _, r in table.chains)}"
                                              " rules and the jump from PREROUTING)"))
            continue
        action, reason = ("install", "missing") if current is None else ("replace", "differs")
        plan.changes.append(Change("iptables", action, title, reason, XtReplace(family, table),
                                   detail=tuple(table.lines())))


def _steering(plan: Plan, desired: Desired, observed: Observed) -> None:
    spec = desired.steering
    if spec is None:
        return
    bridge = observed.links.get(spec.bridge)
    mac = bridge.mac if bridge is not None else None
    subject = f"table {nft.FAMILY} {nft.TABLE}"
    current = nft.digest_in(observed.nft_listing)
    if mac is not None and current == nft.digest_of(spec, mac):
        plan.in_place.append(("nft", f"{subject} (steering to {spec.bridge} {mac})"))
        return
    text = nft.render(spec, mac or f"<MAC of {spec.bridge}>")
    action, reason = ("install", "missing") if current is None else ("replace", "differs")
    plan.changes.append(Change("nft", action, subject, reason, NftReplace(spec),
                               detail=tuple(text.rstrip("\n").splitlines())))


# --- rendering -----------------------------------------------------------------------------


SHORT_TITLES = {"sysctl": "sysctl", "link": "link", "address": "address", "route": "route",
                "rule": "rule", "iptables": "iptables", "nft": "nft"}


def render(plan: Plan, teardown: bool = False) -> str:
    """Changes grouped by kind, in the order of KINDS; the details indented under each."""
    lines: list[str] = []
    for kind in KINDS:
        changes = [c for c in plan.changes if c.kind == kind]
        if not changes:
            continue
        lines.append(f"{KIND_TITLES[kind]}:")
        for change in changes:
            stale = change.reason == "stale" and change.action != "restore" and not teardown
            note = " (installed by netsetup, no longer in the config)" if stale else ""
            lines.append(f"  {change.line()}{note}")
            lines += [f"      {d}" for d in change.detail]
    return "\n".join(lines)


def render_status(plan: Plan) -> str:
    """One line per item: ok, missing, differs or stale (netsetup's, no longer asked for)."""
    lines = [f"{'ok':8} {SHORT_TITLES[kind]:9} {what}"
             for kind in KINDS for k, what in plan.in_place if k == kind]
    lines += [f"{c.reason:8} {SHORT_TITLES[c.kind]:9} {c.subject}" for c in plan.changes]
    return "\n".join(lines)


def to_json(plan: Plan) -> str:
    return json.dumps({
        "matches": plan.empty,
        "changes": [c.to_json() for c in plan.changes],
        "in_place": [{"kind": k, "what": w} for k, w in plan.in_place],
    }, indent=2)
