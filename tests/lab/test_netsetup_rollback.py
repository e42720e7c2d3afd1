"""netsetup rollback when a real kernel operation fails inside a step, with no test hook.

The step that creates the bridge makes two changes: `ip link add br0 type bridge`, then (no
IPv6 address is configured, so the invisible bridge gets no link-local address either) the
write of net.ipv6.conf.br0.addr_gen_mode = 1. Where /proc/sys is read-only, as in a container
or under systemd's ProtectKernelTunables=yes, the kernel refuses that write (EROFS) when the
bridge already exists: the step fails half done. The executor undoes only the steps that
completed, so the failing step must not leave its first half behind.

Two ways to meet it: all of /proc/sys read-only, the bridge sysctls already set by the
administrator (the bridge is the first step), and only /proc/sys/net/ipv6/conf read-only (two
sysctl steps succeed first and are rolled back too). netsetup runs in a private mount namespace
inside the lab's gateway namespace, so the read-only mount is seen by it alone.
"""

from __future__ import annotations

import difflib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.lab.netsetup_probes import REPO, netsetup
from tests.lab.test_netsetup_lifecycle import snapshot, write_config

# Bridge mode, a bridge netsetup creates, no address of its own: BridgeSpec.link_local False.
CONFIG = """[network]
mode = "bridge"
ports = ["eth0", "eth1"]
bridged_networks = ["192.0.2.0/24", "2001:db8:1::/64"]
"""
BRIDGE_SYSCTLS = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")

# Besides the lifecycle snapshot: what the failing step or a careless undo could also leave, the
# per-device IPv6 settings and the fixed neighbour entries netsetup's egress routes bring.
EXTRA_SCRIPT = """
echo '## ipv6 conf'
for dir in /proc/sys/net/ipv6/conf/*; do
    echo "$dir $(cat $dir/addr_gen_mode) $(cat $dir/disable_ipv6)"
done
echo '## neigh'; ip -4 neigh show nud permanent; ip -6 neigh show nud permanent
"""


def full_snapshot(lab: Any) -> str:
    return snapshot(lab) + "\n" + lab.run(lab.gateway, ["sh", "-c", EXTRA_SCRIPT]).stdout


def changes_between(before: str, after: str) -> str:
    return "\n".join(difflib.unified_diff(before.splitlines(), after.splitlines(), "before",
                                           "after", lineterm="", n=0))


def apply_with_read_only(lab: Any, read_only: str, config: Path,
                         state: Path) -> subprocess.CompletedProcess[str]:
    """`netsetup apply` in the gateway, with `read_only` (under /proc/sys) mounted read-only
    in a mount namespace of its own."""
    argv = ["unshare", "--mount", "--propagation", "private",
            "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', read_only,
            sys.executable, "-m", "netsetup.cli", "--config", str(config),
            "--state-file", str(state), "apply"]
    result: subprocess.CompletedProcess[str] = lab.run(lab.gateway, argv, check=False,
                                                       cwd=REPO, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.mark.parametrize(("read_only", "preset", "name"), [
    ("/proc/sys", True, "rbk1"),
    ("/proc/sys/net/ipv6/conf", False, "rbk2"),
], ids=["proc-sys-read-only", "ipv6-conf-read-only"])
def test_bridge_step_failing_half_way_is_rolled_back(lab_factory: Any, tmp_path: Path,
                                                     read_only: str, preset: bool,
                                                     name: str) -> None:
    lab = lab_factory("bridge", make_bridge=False, name=name)
    if preset:  # set at boot (sysctl.d), before the sandbox: nothing for netsetup to change
        for key in BRIDGE_SYSCTLS:
            lab.sysctl(lab.gateway, key, "0")
    config = write_config(tmp_path, "rollback.toml", CONFIG)
    state = tmp_path / "state.json"
    plan = netsetup(lab, config, "plan", state, extra=("--json",))
    assert plan.returncode == 0, plan.stderr
    changes = json.loads(plan.stdout)["changes"]
    [step] = [n for n, c in enumerate(changes, 1)
              if (c["kind"], c["action"]) == ("link", "create")]
    assert step == (1 if preset else 3)  # after the two bridge sysctls when they are to be set
    before = full_snapshot(lab)
    assert "br0" not in before

    result = apply_with_read_only(lab, read_only, config, state)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"step {step}/{len(changes)} (link: create bridge br0" in result.stderr, result.stderr
    assert "Read-only file system" in result.stderr and "addr_gen_mode" in result.stderr
    assert "rolled back" in result.stderr and "rollback incomplete" not in result.stderr
    after = full_snapshot(lab)
    assert after == before, "left behind:\n" + changes_between(before, after)
    assert not state.exists()  # nothing recorded as netsetup's
    # The read-only mount was the failed run's alone: not in the gateway, not on the host.
    assert lab.run(lab.gateway, ["findmnt", "-n", read_only], check=False).returncode == 1
    assert subprocess.run(["findmnt", "-n", read_only], capture_output=True).returncode == 1

    # Nothing half-owned is left to trip over: the same apply, where it may write, works,
    # and its teardown returns exactly to the start.
    applied = netsetup(lab, config, "apply", state)
    assert applied.returncode == 0, applied.stderr
    assert "br0" in lab.ip(lab.gateway, "link").stdout
    down = netsetup(lab, config, "teardown", state)
    assert down.returncode == 0, down.stderr
    after = full_snapshot(lab)
    assert after == before, "teardown left:\n" + changes_between(before, after)


def test_a_foreign_route_in_the_egress_table_fails_the_apply_and_is_left_alone(
        lab_factory: Any, tmp_path: Path) -> None:
    """The kernel answers EEXIST for *any* route to the same destination in the table. Taking
    that for "ours is there" reported success while the egress route was missing (and left
    its neighbour entry behind at teardown)."""
    lab = lab_factory("bridge", make_bridge=False, name="rbk3")
    lab.ip(lab.gateway, "route", "add", "blackhole", "default", "table", "101")
    config = write_config(tmp_path, "conflict.toml", CONFIG)
    state = tmp_path / "state.json"
    before = full_snapshot(lab)
    result = netsetup(lab, config, "apply", state)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert ("table 101 already has another route to 0.0.0.0/0 (not netsetup's)"
            in result.stderr), result.stderr
    assert "every earlier step was rolled back" in result.stderr
    after = full_snapshot(lab)
    assert after == before, "left behind:\n" + changes_between(before, after)
    assert "blackhole default" in lab.ip(lab.gateway, "route", "show", "table", "101").stdout
