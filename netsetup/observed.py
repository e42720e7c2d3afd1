"""What is in place now: one read of every part of the system netsetup may change."""

from __future__ import annotations

from dataclasses import dataclass, field

from netsetup import iptables, links, nft, sysctl
from netsetup.desired import (
    MAIN_TABLE,
    AddressSpec,
    Desired,
    PolicyRuleSpec,
    RouteSpec,
    XtTable,
)
from netsetup.links import LinkInfo
from netsetup.state import State


@dataclass(frozen=True)
class Observed:
    sysctls: dict[str, str | None] = field(default_factory=dict)
    links: dict[str, LinkInfo] = field(default_factory=dict)
    addresses: frozenset[AddressSpec] = frozenset()
    routes: frozenset[RouteSpec] = frozenset()
    rules: frozenset[PolicyRuleSpec] = frozenset()
    xtables: dict[int, XtTable | None] = field(default_factory=dict)
    nft_listing: str | None = None


def observe(desired: Desired, state: State) -> Observed:
    keys = set(desired.sysctls) | set(state.sysctls)
    tables = {MAIN_TABLE} | {r.table for r in desired.routes} | {r.table for r in state.routes}
    return Observed(
        sysctls={key: sysctl.read(key) for key in sorted(keys)},
        links=links.read_links(),
        addresses=frozenset(links.read_addresses()),
        routes=frozenset(links.read_routes(tables)),
        rules=frozenset(links.read_rules()),
        # Both families always: a family the config no longer wants may still hold our chains.
        xtables={family: iptables.read_ours(family) for family in (4, 6)},
        nft_listing=nft.read_table(),
    )
