"""Carrying out a plan: one step per change, each with its undo; all or nothing.

Every step records in the state what it made netsetup own (a sysctl's previous value, a
created bridge, an added route, ...) and its undo forgets it again. The state file is saved
after every step, so a crash leaves a record teardown can work from. When a step fails, the
steps done so far are undone in reverse order and the state saved as it was before.

Test hook: the environment variable NETSETUP_FAIL_AFTER_STEP=N makes the run fail on purpose
right after step N succeeded (N=0: before the first step), so the lab tests can show that a
failure mid-apply leaves the system as it was. It is read in netsetup/commands.py, never set
by the program itself, and is not meant for anything but tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netsetup import iptables, links, nft, sysctl
from netsetup.desired import AddressSpec, BridgeSpec, PolicyRuleSpec, RouteSpec, XtTable
from netsetup.plan import (
    BridgeCreate,
    BridgeDelete,
    BridgeOptions,
    Change,
    LinkState,
    Membership,
    NftReplace,
    PortMaster,
    SysctlSet,
    XtReplace,
)
from netsetup.state import BridgeRecord, PortRecord, State

SaveState = Callable[[State], None]


class InjectedFailure(Exception):
    """Raised by the NETSETUP_FAIL_AFTER_STEP test hook."""


class ApplyFailed(Exception):
    """A step failed; everything done before it was undone (see `rollback_errors`)."""

    def __init__(self, number: int, total: int, change: Change, error: BaseException,
                 rollback_errors: list[str]) -> None:
        self.number = number
        self.total = total
        self.change = change
        self.error = error
        self.rollback_errors = rollback_errors
        message = f"step {number}/{total} ({change.kind}: {change.line()}) failed: {error}"
        if rollback_errors:
            message += "; rollback incomplete: " + "; ".join(rollback_errors)
        else:
            message += "; every earlier step was rolled back"
        super().__init__(message)


@dataclass
class Step:
    change: Change
    run: Callable[[State], None]
    undo: Callable[[State], None]


def execute(changes: list[Change], state: State, save: SaveState,
            fail_after: int | None = None) -> None:
    """Run every change in order, or none: on a failure undo the done ones and raise."""
    steps = [make_step(change) for change in changes]
    done: list[Step] = []
    total = len(steps)
    for number, step in enumerate(steps, 1):
        try:
            if fail_after is not None and number > fail_after:
                raise InjectedFailure(f"NETSETUP_FAIL_AFTER_STEP={fail_after} (test hook)")
            step.run(state)
        except Exception as exc:
            errors = rollback(done, state, save)
            raise ApplyFailed(number, total, step.change, exc, errors) from exc
        done.append(step)
        save(state)


def rollback(done: list[Step], state: State, save: SaveState) -> list[str]:
    """Undo in reverse order; keep going past a failed undo and report every one."""
    errors = []
    for step in reversed(done):
        try:
            step.undo(state)
        except Exception as exc:
            errors.append(f"undo of '{step.change.line()}': {exc}")
        save(state)
    return errors


# --- one step per kind of change -----------------------------------------------------------


def make_step(change: Change) -> Step:
    payload = change.payload
    if isinstance(payload, SysctlSet):
        return _sysctl_step(change, payload)
    if isinstance(payload, BridgeCreate):
        return _bridge_create_step(change, payload.spec)
    if isinstance(payload, BridgeDelete):
        return _bridge_delete_step(change, payload.name)
    if isinstance(payload, BridgeOptions):
        return _bridge_options_step(change, payload)
    if isinstance(payload, PortMaster):
        return _port_step(change, payload)
    if isinstance(payload, LinkState):
        return _link_state_step(change, payload)
    if isinstance(payload, Membership):
        return _membership_step(change, payload)
    if isinstance(payload, XtReplace):
        return _xtables_step(change, payload)
    return _nft_step(change, payload)


def _sysctl_step(change: Change, payload: SysctlSet) -> Step:
    memo: dict[str, str | None] = {}  # the value and the state's record before this step

    def run(state: State) -> None:
        current = sysctl.read(payload.key)
        memo["value"], memo["record"] = current, state.sysctls.get(payload.key)
        sysctl.write(payload.key, payload.value)
        if payload.restore:
            state.sysctls.pop(payload.key, None)
        elif payload.key not in state.sysctls and current is not None:
            state.sysctls[payload.key] = current

    def undo(state: State) -> None:
        value, record = memo.get("value"), memo.get("record")
        if value is not None:
            sysctl.write(payload.key, value)
        if record is None:
            state.sysctls.pop(payload.key, None)
        else:
            state.sysctls[payload.key] = record

    return Step(change, run, undo)


def _bridge_create_step(change: Change, spec: BridgeSpec) -> Step:
    def run(state: State) -> None:
        links.create_bridge(spec)
        state.bridge = BridgeRecord(spec.name, created=True)

    def undo(state: State) -> None:
        links.delete_link(spec.name)
        state.bridge = None

    return Step(change, run, undo)


def _bridge_delete_step(change: Change, name: str) -> Step:
    before: list[tuple[BridgeSpec, bool, BridgeRecord | None]] = []

    def run(state: State) -> None:
        info = links.read_links().get(name)
        spec = BridgeSpec(name, (), info.forward_delay or 0 if info else 0,
                          info.stp_state or 0 if info else 0)
        before.append((spec, bool(info and info.up), state.bridge))
        links.delete_link(name)
        state.bridge = None

    def undo(state: State) -> None:
        # The ports join again as the undo of their release steps, which ran before this one.
        spec, was_up, record = before[-1]
        links.create_bridge(spec)
        if was_up:
            links.set_up(name, True)
        state.bridge = record

    return Step(change, run, undo)


def _bridge_options_step(change: Change, payload: BridgeOptions) -> Step:
    before: list[tuple[int, int, dict[str, int]]] = []

    def run(state: State) -> None:
        info = links.read_links()[payload.name]
        current = (info.forward_delay or 0, info.stp_state or 0)
        _ensure_bridge_record(state, payload.name)
        assert state.bridge is not None
        before.append((*current, dict(state.bridge.previous_options)))
        links.set_bridge_options(payload.name, payload.forward_delay, payload.stp_state)
        if payload.restore:
            state.bridge.previous_options = {}
        elif not state.bridge.previous_options:
            state.bridge.previous_options = {"forward_delay": current[0],
                                             "stp_state": current[1]}

    def undo(state: State) -> None:
        forward_delay, stp_state, previous_options = before[-1]
        links.set_bridge_options(payload.name, forward_delay, stp_state)
        if state.bridge is not None:
            state.bridge.previous_options = previous_options

    return Step(change, run, undo)


def _port_record(state: State, port: str) -> PortRecord:
    return state.ports.setdefault(port, PortRecord())


def _drop_empty_port(state: State, port: str) -> None:
    record = state.ports.get(port)
    if record is not None and not record.enslaved and not record.was_down:
        del state.ports[port]


def _ensure_bridge_record(state: State, name: str) -> None:
    if state.bridge is None or state.bridge.name != name:
        state.bridge = BridgeRecord(name, created=False)


def _port_step(change: Change, payload: PortMaster) -> Step:
    def attach(state: State) -> None:
        links.set_master(payload.port, payload.bridge)
        _ensure_bridge_record(state, payload.bridge)
        _port_record(state, payload.port).enslaved = True

    def detach(state: State) -> None:
        links.set_master(payload.port, None)
        _port_record(state, payload.port).enslaved = False
        _drop_empty_port(state, payload.port)

    if payload.release:
        return Step(change, detach, attach)
    return Step(change, attach, detach)


def _link_state_step(change: Change, payload: LinkState) -> Step:
    def remember(state: State, was_down: bool) -> None:
        if payload.is_bridge:
            if state.bridge is not None and state.bridge.created:
                return  # a bridge we created is deleted at teardown; its up/down is moot
            _ensure_bridge_record(state, payload.name)
            assert state.bridge is not None
            state.bridge.was_down = was_down
        else:
            _port_record(state, payload.name).was_down = was_down
            _drop_empty_port(state, payload.name)

    def forward(state: State) -> None:
        links.set_up(payload.name, payload.up)
        remember(state, was_down=not payload.restore)

    def backward(state: State) -> None:
        links.set_up(payload.name, not payload.up)
        remember(state, was_down=payload.restore)

    return Step(change, forward, backward)


def _owned(state: State, spec: AddressSpec | RouteSpec | PolicyRuleSpec) -> list[Any]:
    if isinstance(spec, AddressSpec):
        return state.addresses
    if isinstance(spec, RouteSpec):
        return state.routes
    return state.rules


def _add(spec: AddressSpec | RouteSpec | PolicyRuleSpec) -> bool:
    if isinstance(spec, AddressSpec):
        return links.add_address(spec)
    if isinstance(spec, RouteSpec):
        return links.add_route(spec)
    return links.add_rule(spec)


def _delete(spec: AddressSpec | RouteSpec | PolicyRuleSpec) -> None:
    if isinstance(spec, AddressSpec):
        links.delete_address(spec)
    elif isinstance(spec, RouteSpec):
        links.delete_route(spec)
    else:
        links.delete_rule(spec)


def _membership_step(change: Change, payload: Membership) -> Step:
    spec = payload.spec
    added = {"ours": False}

    def put(state: State) -> None:
        # Already there (someone else's): leave it unrecorded, so teardown leaves it too.
        added["ours"] = _add(spec)
        if added["ours"] and spec not in _owned(state, spec):
            _owned(state, spec).append(spec)

    def take(state: State) -> None:
        _delete(spec)
        owned = _owned(state, spec)
        if spec in owned:
            owned.remove(spec)

    def undo_put(state: State) -> None:
        if added["ours"]:
            take(state)

    if payload.add:
        return Step(change, put, undo_put)
    return Step(change, take, put)


def _xtables_step(change: Change, payload: XtReplace) -> Step:
    before: list[XtTable | None] = []

    def run(state: State) -> None:
        before.append(iptables.read_ours(payload.family))
        iptables.write_ours(payload.family, payload.table)

    def undo(state: State) -> None:
        iptables.write_ours(payload.family, before[-1])

    return Step(change, run, undo)


def _nft_step(change: Change, payload: NftReplace) -> Step:
    saved: dict[str, str | None] = {}

    def run(state: State) -> None:
        saved["before"] = nft.read_table()
        text = None
        if payload.steering is not None:
            # Read now, not at plan time: a bridge created or given ports in this run takes its
            # MAC from its ports only as they join.
            bridge = links.read_links().get(payload.steering.bridge)
            if bridge is None or not bridge.mac:
                raise nft.NftError(f"bridge {payload.steering.bridge} has no MAC address")
            text = nft.render(payload.steering, bridge.mac)
        nft.write_table(text)

    def undo(state: State) -> None:
        nft.write_table(saved["before"])

    return Step(change, run, undo)
