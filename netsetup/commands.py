"""netsetup's Python API: what the CLI verbs do, callable from other code (the demo, tests).

    from netsetup.commands import load_config, apply_config, teardown
    config = load_config(Path("mailgate.toml"))   # ConfigError: every problem, file and key
    apply_config(config)                          # ApplyFailed: rolled back, says which step
    ...
    teardown()

Every function works on the network namespace the calling process runs in; the state file
defaults to one per namespace (netsetup/state.py). To set up another namespace (a lab's
gateway) from outside it, run the program there: `run_in_namespace(netns, "apply", config)`.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from netsetup import apply as executor
from netsetup import links
from netsetup import state as statefile
from netsetup.config import NetworkConfig, load_network_config
from netsetup.configfile import ConfigError
from netsetup.desired import Desired, desired_state
from netsetup.observed import observe
from netsetup.plan import Plan, diff
from netsetup.preflight import live_problems
from netsetup.state import State

# Test hook, see netsetup/apply.py: fail on purpose after this many steps.
FAIL_AFTER_ENV = "NETSETUP_FAIL_AFTER_STEP"


def load_config(path: Path) -> NetworkConfig:
    """Read [network] and check it against this system; raises ConfigError, touching nothing.

    The whole file is checked, as `mailgate run` checks it (and `mailgate config check` shows
    it): a config the proxies would refuse at start is refused before the network is changed
    to hand them connections."""
    try:
        from proxies.config import load_config as load_whole_file
    except ImportError:  # netsetup installed without the proxies: [network] is all there is
        config = load_network_config(path)
    else:
        config = load_whole_file(path).network
    problems = live_problems(config, links.read_links(), path)
    if problems:
        raise ConfigError(problems)
    return config


def plan_changes(config: NetworkConfig | None, state_path: Path | None = None) -> Plan:
    """What `apply` would change (config None: what `teardown` would remove). Changes nothing."""
    desired = desired_state(config) if config is not None else Desired()
    state = statefile.load(state_path or statefile.default_state_path())
    return diff(desired, observe(desired, state), state)


def apply_config(config: NetworkConfig, state_path: Path | None = None,
                 fail_after: int | None = None) -> Plan:
    """Make the system match `config`; returns the plan that was carried out.

    Idempotent: a second call finds nothing to change. Raises apply.ApplyFailed after rolling
    back when a step fails.
    """
    return _converge(desired_state(config), state_path, fail_after)


def teardown(state_path: Path | None = None, fail_after: int | None = None) -> Plan:
    """Remove what netsetup installed and put back what it changed; nothing else."""
    return _converge(Desired(), state_path, fail_after)


def run_in_namespace(netns: str, verb: str, config: Path, state_file: Path | None = None,
                     *extra: str) -> subprocess.CompletedProcess[str]:
    """Run `netsetup VERB` as a process inside network namespace `netns` (`ip netns exec`).

    A process, not a call: a namespace is a property of the process, and netsetup must never
    touch the caller's own network. Output is captured; the exit status says how it went
    (see `netsetup --help`).
    """
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "netsetup.cli",
            "--config", str(config)]
    if state_file is not None:
        argv += ["--state-file", str(state_file)]
    return subprocess.run([*argv, verb, *extra], capture_output=True, text=True, timeout=120,
                          check=False)


def fail_after_from_env() -> int | None:
    value = os.environ.get(FAIL_AFTER_ENV, "").strip()
    return int(value) if value.isdigit() else None


def _converge(desired: Desired, state_path: Path | None, fail_after: int | None) -> Plan:
    path = state_path or statefile.default_state_path()
    with _locked(path):
        state = statefile.load(path)
        before = statefile.State.from_json(state.to_json())
        plan = diff(desired, observe(desired, state), state)

        def save(current: State) -> None:
            statefile.save(path, current)

        try:
            executor.execute(plan.changes, state, save, fail_after)
        except executor.ApplyFailed as failure:
            if not failure.rollback_errors:
                save(before)  # exactly as before; else keep the record of what is still ours
            raise
        _forget_unwanted(state, desired)
        save(state)
    return plan


def _forget_unwanted(state: State, desired: Desired) -> None:
    """Drop records of things that are neither wanted nor there any more.

    Whatever was stale and present was removed by a step, which forgot it; what is left is
    what had already vanished (a route that went with its device, say).
    """
    state.addresses = [a for a in state.addresses if a in desired.addresses]
    state.routes = [r for r in state.routes if r.key() in {d.key() for d in desired.routes}]
    state.rules = [r for r in state.rules if r.key() in {d.key() for d in desired.rules}]
    state.sysctls = {k: v for k, v in state.sysctls.items() if k in desired.sysctls}
    bridge = desired.bridge
    if bridge is None or state.bridge is None or state.bridge.name != bridge.name:
        state.bridge = None
        state.ports = {}
    else:
        state.ports = {p: r for p, r in state.ports.items() if p in bridge.ports}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One netsetup at a time per state file (i.e. per namespace by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
