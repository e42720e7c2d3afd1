"""netsetup as a real process in a lab gateway: plan, apply (twice), status, converge, teardown,
rollback of a failed apply; router mode, bridge mode adopting a bridge and creating one.

Every comparison is a snapshot of the gateway namespace (both families): legacy iptables, nft,
links, addresses, policy rules, routes and the sysctls netsetup may touch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.lab.netsetup_probes import netsetup

SNAPSHOT_SCRIPT = """
# Reading a legacy table instantiates it (empty, policies ACCEPT) in the namespace, and so does
# loading the TPROXY extension (libxtables probes it): all five exist in every snapshot, so that
# the comparison is about their contents.
for table in raw mangle nat filter security; do
    iptables-legacy -t $table -S >/dev/null; ip6tables-legacy -t $table -S >/dev/null
done
echo '## iptables'; iptables-legacy-save
echo '## ip6tables'; ip6tables-legacy-save
echo '## nft'; nft list ruleset
echo '## link'; ip -d link
echo '## addr'; ip addr
echo '## rule4'; ip -4 rule; echo '## rule6'; ip -6 rule
echo '## route4'; ip -4 route show table all; echo '## route6'; ip -6 route show table all
echo '## sysctl'
for key in net/ipv4/ip_forward net/ipv6/conf/all/forwarding \
           net/bridge/bridge-nf-call-iptables net/bridge/bridge-nf-call-ip6tables; do
    echo "$key $(cat /proc/sys/$key 2>/dev/null)"
done
"""


def snapshot(lab: Any) -> str:
    out = lab.run(lab.gateway, ["sh", "-c", SNAPSHOT_SCRIPT]).stdout
    out = "\n".join(line for line in out.splitlines() if not line.startswith("# "))
    out = re.sub(r"\[\d+:\d+\]", "[0:0]", out)  # chain counters move with any traffic
    return re.sub(r"(_timer)\s+[\d.]+", r"\1 -", out)  # bridge timers tick


def write_config(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


ROUTER = """[network]
mode = "router"
bypass_sources = ["192.0.2.99/32", "2001:db8:1::99/128"]
[pop3]
enabled = true  # so both services are intercepted by default
"""
ROUTER_CHANGED = """[network]
mode = "router"
intercept = ["smtp"]
bypass_destinations = ["198.51.100.0/24"]
"""
BRIDGE_ADOPT = """[network]
mode = "bridge"
ports = ["eth0", "eth1"]
bridged_networks = ["192.0.2.0/24", "2001:db8:1::/64"]
bypass_sources = ["192.0.2.99/32"]
[pop3]
enabled = true  # so both services are intercepted by default
"""
BRIDGE_ADOPT_CHANGED = """[network]
mode = "bridge"
ports = ["eth0", "eth1"]
intercept = ["pop3"]
bridged_networks = ["192.0.2.0/24", "2001:db8:1::/64"]
bypass_destinations = ["192.0.2.26/32", "2001:db8:1::26/128"]
[pop3]
enabled = true
"""
BRIDGE_CREATE = """[network]
mode = "bridge"
ports = ["eth0", "eth1"]
addresses = ["192.0.2.2/24", "2001:db8:1::2/64"]
bridged_networks = ["192.0.2.0/24", "198.18.0.0/15"]
[pop3]
enabled = true  # so both services are intercepted by default
"""


def change_count(lab: Any, config: Path, state: Path) -> int:
    result = netsetup(lab, config, "plan", state, extra=("--json",))
    assert result.returncode == 0, result.stderr
    return len(json.loads(result.stdout)["changes"])


def check_lifecycle(lab: Any, tmp_path: Path, first: str, second: str,
                    expect_applied: list[str], expect_changed: list[str],
                    absent_changed: list[str]) -> None:
    config = write_config(tmp_path, "first.toml", first)
    changed = write_config(tmp_path, "second.toml", second)
    state = tmp_path / "state.json"
    before = snapshot(lab)

    assert netsetup(lab, config, "status", state).returncode == 1  # nothing applied yet
    plan = netsetup(lab, config, "plan", state)
    assert plan.returncode == 0 and "change(s) to match" in plan.stdout, plan.stderr
    assert snapshot(lab) == before, "plan changed something"

    result = netsetup(lab, config, "apply", state)
    assert result.returncode == 0, result.stderr
    applied = snapshot(lab)
    for text in expect_applied:
        assert text in applied, text
    assert netsetup(lab, config, "status", state).returncode == 0

    again = netsetup(lab, config, "apply", state)
    assert again.returncode == 0 and "nothing to change" in again.stdout, again.stdout
    assert snapshot(lab) == applied, "a second apply changed something"

    # Converge to a changed config, and back: back must be exactly the first state.
    assert netsetup(lab, changed, "apply", state).returncode == 0
    assert netsetup(lab, changed, "status", state).returncode == 0
    assert netsetup(lab, config, "status", state).returncode == 1
    converged = snapshot(lab)
    for text in expect_changed:
        assert text in converged, text
    for text in absent_changed:
        assert text not in converged, text
    assert netsetup(lab, config, "apply", state).returncode == 0
    assert snapshot(lab) == applied, "converging back did not give the first state"

    down = netsetup(lab, config, "teardown", state)
    assert down.returncode == 0, down.stderr
    assert snapshot(lab) == before, "teardown left something behind"
    assert not state.exists()
    assert netsetup(lab, config, "status", state).returncode == 1
    assert "nothing to remove" in netsetup(lab, config, "teardown", state).stdout


def check_rollback(lab: Any, tmp_path: Path, text: str, fail_points: list[int] | None = None,
                   base: str | None = None) -> None:
    """Fail on purpose after step N (test hook): the namespace must be as before the apply."""
    config = write_config(tmp_path, "rollback.toml", text)
    state = tmp_path / "rollback-state.json"
    if base is not None:
        assert netsetup(lab, write_config(tmp_path, "base.toml", base), "apply",
                        state).returncode == 0
    before = snapshot(lab)
    state_before = state.read_text() if state.exists() else None
    total = change_count(lab, config, state)
    points = fail_points if fail_points is not None else list(range(total))
    for fail_after in points:
        result = netsetup(lab, config, "apply", state,
                          env={"NETSETUP_FAIL_AFTER_STEP": str(fail_after)})
        assert result.returncode == 1, result.stdout
        assert f"step {fail_after + 1}/{total}" in result.stderr, result.stderr
        assert "rolled back" in result.stderr, result.stderr
        assert snapshot(lab) == before, f"not rolled back after step {fail_after}"
        assert (state.read_text() if state.exists() else None) == state_before


def test_bad_config_is_rejected_before_anything_is_touched(lab_factory: Any,
                                                           tmp_path: Path) -> None:
    lab = lab_factory("router")
    state = tmp_path / "state.json"
    before = snapshot(lab)
    bad = write_config(tmp_path, "bad.toml", '[network]\nmode = "router"\n'
                       'bypas_sources = ["192.0.2.0/24"]\n'
                       'bypass_destinations = ["192.0.2.300/32"]\n')
    for verb in ("plan", "apply", "status"):
        result = netsetup(lab, bad, verb, state)
        assert result.returncode == 2, (verb, result.stdout, result.stderr)
        assert f"netsetup: {bad}: network.bypas_sources: unknown key" in result.stderr
        assert f"netsetup: {bad}: network.bypass_destinations[0]: not an IP network" \
            in result.stderr
    missing = write_config(tmp_path, "missing.toml", '[network]\nmode = "bridge"\n'
                           'ports = ["eth0", "eth7"]\nbridged_networks = ["192.0.2.0/24"]\n')
    result = netsetup(lab, missing, "apply", state)
    assert result.returncode == 2
    assert f"netsetup: {missing}: network.ports: no interface named 'eth7'" in result.stderr
    assert snapshot(lab) == before
    assert not state.exists()


def test_router_apply_converge_teardown(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory("router")
    check_lifecycle(
        lab, tmp_path, ROUTER, ROUTER_CHANGED,
        expect_applied=[
            "-A PREROUTING -p tcp -j MAILGATE",
            "-A MAILGATE -s 192.0.2.99/32 -j RETURN",
            "-A MAILGATE -s 2001:db8:1::99/128 -j RETURN",
            "--dport 110 -j TPROXY --on-port 10110 --on-ip :: --tproxy-mark 0x1/0x1",
            "32000:\tfrom all fwmark 0x1/0x1 lookup 100",
            "local default dev lo table 100 proto static scope host",
        ],
        expect_changed=["-A MAILGATE -d 198.51.100.0/24 -j RETURN"],
        absent_changed=["--dport 110", "192.0.2.99/32"],
    )


def test_router_failed_apply_rolls_back(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory("router")
    check_rollback(lab, tmp_path, ROUTER, fail_points=[0, 1, 3, 5])  # from nothing applied
    # and a failing convergence from an applied config leaves that config in place
    check_rollback(lab, tmp_path, ROUTER_CHANGED, base=ROUTER, fail_points=[1])


def test_bridge_adopting_the_bridge(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory("bridge")
    check_lifecycle(
        lab, tmp_path, BRIDGE_ADOPT, BRIDGE_ADOPT_CHANGED,
        expect_applied=[
            "-A PREROUTING -i br0 -p tcp -j MAILGATE",
            "table bridge mailgate",
            # nft prints a /32 as a bare address
            "ip saddr != 192.0.2.99 tcp dport { 25, 110 }",
            "ip daddr != 192.0.2.99 tcp sport { 25, 110 }",
            "meta pkttype set host",
            "192.0.2.0/24 dev br0 proto static scope link",
            "net/bridge/bridge-nf-call-iptables 0",
        ],
        expect_changed=["ip daddr != 192.0.2.26 tcp dport 110",
                        "ip6 saddr != 2001:db8:1::26 tcp sport 110"],
        absent_changed=["--dport 25 ", "192.0.2.99"],
    )


def test_bridge_created_by_netsetup(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory("bridge", make_bridge=False)
    check_lifecycle(
        lab, tmp_path, BRIDGE_CREATE, BRIDGE_ADOPT,
        expect_applied=[
            "br0: <BROADCAST,MULTICAST,UP,LOWER_UP>",
            "forward_delay 0 ",
            "stp_state 0 ",
            "master br0",
            "inet 192.0.2.2/24 scope global br0",
            "inet6 2001:db8:1::2/64 scope global",
            "198.18.0.0/15 dev br0 proto static scope link",
            "table bridge mailgate",
        ],
        # the second config names no addresses: they go, the bridge and its ports stay
        expect_changed=["192.0.2.0/24 dev br0 proto static scope link", "master br0"],
        absent_changed=["192.0.2.2/24", "198.18.0.0/15"],
    )
    assert "br0" not in lab.ip(lab.gateway, "link").stdout


@pytest.mark.parametrize("make_bridge", [True, False], ids=["adopted", "created"])
def test_bridge_failed_apply_rolls_back(lab_factory: Any, tmp_path: Path,
                                        make_bridge: bool) -> None:
    lab = lab_factory("bridge", make_bridge=make_bridge)
    text = BRIDGE_ADOPT if make_bridge else BRIDGE_CREATE
    total = change_count(lab, write_config(tmp_path, "count.toml", text), tmp_path / "none.json")
    # The first step, one after the bridge and its ports, the middle and the last.
    check_rollback(lab, tmp_path, text, sorted({0, 4, total // 2, total - 1}))
