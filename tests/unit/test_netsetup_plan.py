"""The plan is the diff of desired and observed state; the executor does all or nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from netsetup import apply as executor
from netsetup.config import Interception, NetworkConfig
from netsetup.desired import AddressSpec, Desired, PolicyRuleSpec, RouteSpec, desired_state
from netsetup.links import LinkInfo
from netsetup.observed import Observed
from netsetup.plan import Change, Membership, Plan, diff, render, render_status, to_json
from netsetup.state import BridgeRecord, PortRecord, State

ROUTER = NetworkConfig(intercept=(Interception("smtp", 25, 10025),))
BRIDGE = NetworkConfig(mode="bridge", ports=("eth0", "eth1"),
                       intercept=(Interception("smtp", 25, 10025),),
                       addresses=("192.0.2.2/24",))
MAC = "02:00:00:00:00:01"


def lines(plan: Plan) -> list[str]:
    return [f"{c.kind} {c.line()} [{c.reason}]" for c in plan.changes]


def in_place_of(desired: Desired, links: dict[str, LinkInfo] | None = None) -> Observed:
    """An observation in which everything desired is already there."""
    from netsetup import nft

    listing = None
    if desired.steering is not None:
        listing = nft.render(desired.steering, MAC)
    return Observed(
        sysctls=dict(desired.sysctls),
        links=links or {},
        addresses=frozenset(desired.addresses),
        routes=frozenset(desired.routes),
        rules=frozenset(desired.rules),
        xtables=dict(desired.xtables),
        nft_listing=listing,
    )


def bridge_links(master: str | None = "br0") -> dict[str, LinkInfo]:
    return {
        "br0": LinkInfo("br0", "bridge", None, True, MAC, 0, 0),
        "eth0": LinkInfo("eth0", "veth", master, True, "02:00:00:00:00:02"),
        "eth1": LinkInfo("eth1", "veth", master, True, "02:00:00:00:00:03"),
    }


def test_router_from_nothing() -> None:
    desired = desired_state(ROUTER)
    plan = diff(desired, Observed(sysctls={"net.ipv4.ip_forward": "0",
                                           "net.ipv6.conf.all.forwarding": "1"}), State())
    assert lines(plan) == [
        "sysctl set net.ipv4.ip_forward = 1 (now 0) [differs]",
        "route add ipv4 local default dev lo table 100 scope host [missing]",
        "route add ipv6 local default dev lo table 100 scope host [missing]",
        "rule add ipv4 priority 32000 fwmark 0x1/0x1 lookup 100 [missing]",
        "rule add ipv6 priority 32000 fwmark 0x1/0x1 lookup 100 [missing]",
        "iptables install IPv4 chains MAILGATE, MAILGATE_DIVERT [missing]",
        "iptables install IPv6 chains MAILGATE, MAILGATE_DIVERT [missing]",
    ]
    assert ("sysctl", "net.ipv6.conf.all.forwarding = 1") in plan.in_place


def test_nothing_to_do_when_everything_is_in_place() -> None:
    for config, links in ((ROUTER, None), (BRIDGE, bridge_links())):
        desired = desired_state(config)
        plan = diff(desired, in_place_of(desired, links), State())
        assert plan.empty, lines(plan)


def test_a_rule_elsewhere_at_another_priority_counts_as_in_place() -> None:
    desired = desired_state(ROUTER)
    observed = in_place_of(desired)
    moved = frozenset(PolicyRuleSpec(r.family, r.fwmark, r.fwmask, r.table, priority=100)
                      for r in desired.rules)
    plan = diff(desired, Observed(**{**observed.__dict__, "rules": moved}), State())
    assert plan.empty


def test_changed_iptables_content_is_replaced_as_a_whole() -> None:
    old = desired_state(NetworkConfig(intercept=(Interception("smtp", 25, 10025),
                                                 Interception("pop3", 110, 10110))))
    new = desired_state(ROUTER)
    plan = diff(new, in_place_of(old), State())
    assert lines(plan) == [
        "iptables replace IPv4 chains MAILGATE, MAILGATE_DIVERT [differs]",
        "iptables replace IPv6 chains MAILGATE, MAILGATE_DIVERT [differs]",
    ]
    assert "--dport 110" not in "\n".join(plan.changes[0].detail)


def test_bridge_created_and_ports_enslaved() -> None:
    desired = desired_state(BRIDGE)
    links = {name: info for name, info in bridge_links(master=None).items() if name != "br0"}
    observed = Observed(sysctls={"net.bridge.bridge-nf-call-iptables": "1",
                                 "net.bridge.bridge-nf-call-ip6tables": None}, links=links)
    plan = diff(desired, observed, State())
    got = lines(plan)
    assert got[:6] == [
        "sysctl set net.bridge.bridge-nf-call-iptables = 0 (now 1) [differs]",
        # a missing bridge-nf-call parameter (no br_netfilter) already means "not called"
        "link create bridge br0 (forward_delay 0, stp_state 0) [missing]",
        "link enslave eth0 to br0 [missing]",
        "link enslave eth1 to br0 [missing]",
        "link set up br0 [differs]",
        "address add 192.0.2.2/24 dev br0 [missing]",
    ]
    assert got[-1] == "nft install table bridge mailgate [missing]"
    assert "<MAC of br0>" in "\n".join(plan.changes[-1].detail)


def test_stale_things_are_removed_first_and_only_ours() -> None:
    """From bridge mode (bridge created by netsetup) to router mode."""
    old = desired_state(BRIDGE)
    foreign = RouteSpec(4, "203.0.113.0/24", "br0")
    observed = in_place_of(old, bridge_links())
    observed = Observed(**{**observed.__dict__, "routes": observed.routes | {foreign},
                           "sysctls": {**observed.sysctls, "net.ipv4.ip_forward": "0"}})
    state = State(
        sysctls={"net.bridge.bridge-nf-call-iptables": "1",
                 "net.bridge.bridge-nf-call-ip6tables": "1"},
        bridge=BridgeRecord("br0", created=True),
        ports={"eth0": PortRecord(enslaved=True), "eth1": PortRecord(enslaved=True)},
        addresses=[AddressSpec("br0", "192.0.2.2/24")],
        routes=list(old.routes),
        rules=list(old.rules),
    )
    plan = diff(desired_state(ROUTER), observed, state)
    got = lines(plan)
    assert got[:12] == [
        "nft remove table bridge mailgate [stale]",
        "rule delete ipv4 priority 32001 fwmark 0x4/0x4 lookup 101 [stale]",
        "rule delete ipv6 priority 32001 fwmark 0x4/0x4 lookup 101 [stale]",
        "route delete ipv4 default via 169.254.77.1 (02:6d:67:00:00:01) dev br0 table 101 "
        "[stale]",
        "route delete ipv6 default via fe80::6d67:1 (02:6d:67:00:00:01) dev br0 table 101 "
        "[stale]",
        "address delete 192.0.2.2/24 dev br0 [stale]",
        "link release eth0 from br0 [stale]",
        "link release eth1 from br0 [stale]",
        "link delete bridge br0 (created by netsetup) [stale]",
        "sysctl restore net.bridge.bridge-nf-call-iptables = 1 [stale]",
        "sysctl restore net.bridge.bridge-nf-call-ip6tables = 1 [stale]",
        "sysctl set net.ipv4.ip_forward = 1 (now 0) [differs]",
    ]
    assert not any("203.0.113.0/24" in line for line in got)  # not ours: left alone
    # the TPROXY policy rules and local routes are wanted in router mode too: kept
    assert not any(line.startswith(("rule", "route")) and "table 101" not in line
                   and "lookup 101" not in line for line in got)


def test_teardown_of_an_adopted_bridge_keeps_it() -> None:
    old = desired_state(BRIDGE)
    state = State(bridge=BridgeRecord("br0", created=False, was_down=True,
                                      previous_options={"forward_delay": 1500, "stp_state": 1}))
    plan = diff(Desired(), in_place_of(old, bridge_links()), state)
    got = lines(plan)
    assert "link restore bridge br0 forward_delay 1500 stp_state 1 [stale]" in got
    assert "link set down br0 (was down before netsetup) [stale]" in got
    assert not any("release" in line or "delete bridge" in line for line in got)
    # our chains and table are recognised by name, without a record
    assert "iptables remove IPv4 chains MAILGATE, MAILGATE_DIVERT and the jump to them [stale]" \
        in got


def test_rendering_groups_by_kind_and_shows_the_rules() -> None:
    plan = diff(desired_state(ROUTER), Observed(sysctls={"net.ipv4.ip_forward": "0"}), State())
    text = render(plan)
    titles = [line for line in text.splitlines() if not line.startswith(" ")]
    assert titles == ["sysctls:", "routes:", "policy rules:",
                      "iptables (mangle table, legacy xtables):"]
    assert "      -A MAILGATE -p tcp -m tcp --dport 25 -j TPROXY --on-port 10025 --on-ip " \
           "0.0.0.0 --tproxy-mark 0x1/0x1" in text
    status = render_status(plan)
    assert "differs  sysctl    net.ipv4.ip_forward = 1 (now 0)" in status
    assert "missing  route     ipv4 local default dev lo table 100 scope host" in status
    data = json.loads(to_json(plan))
    assert data["matches"] is False and data["changes"][0]["kind"] == "sysctl"


# --- the executor: all or nothing ----------------------------------------------------------


def test_a_failed_step_undoes_the_earlier_ones_in_reverse(monkeypatch: Any) -> None:
    journal: list[str] = []

    def fake_step(change: Change) -> executor.Step:
        name = change.subject

        def run(state: State) -> None:
            if name == "boom":
                raise OSError("refused")
            journal.append(f"do {name}")
            state.sysctls[name] = "x"

        def undo(state: State) -> None:
            journal.append(f"undo {name}")
            state.sysctls.pop(name)

        return executor.Step(change, run, undo)

    monkeypatch.setattr(executor, "make_step", fake_step)
    changes = [Change("route", "add", name, "missing",
                      Membership(RouteSpec(4, "192.0.2.0/24", "br0"), add=True))
               for name in ("a", "b", "boom", "c")]
    state = State()
    saved: list[dict[str, str]] = []
    with pytest.raises(executor.ApplyFailed) as caught:
        executor.execute(changes, state, lambda s: saved.append(dict(s.sysctls)))
    assert journal == ["do a", "do b", "undo b", "undo a"]
    assert state.sysctls == {}
    assert saved[-1] == {}
    assert str(caught.value).startswith("step 3/4 (route: add boom) failed: refused; every "
                                        "earlier step was rolled back")

    journal.clear()
    with pytest.raises(executor.ApplyFailed, match="NETSETUP_FAIL_AFTER_STEP=1"):
        executor.execute(changes, State(), lambda s: None, fail_after=1)
    assert journal == ["do a", "undo a"]
