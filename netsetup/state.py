"""What netsetup installed, remembered between `apply` and `teardown` in a small JSON file.

Only what cannot be recognised on the system itself is kept: the previous value of every
sysctl netsetup changed, whether the bridge was created (or only adopted), which ports it
enslaved or brought up, and the addresses, routes and policy rules it added (one that was
there before is not ours and is left alone). Our iptables chains and nft table are recognised
by name and need no record.

The default path is keyed by the network namespace, because the same machine runs netsetup in
several namespaces (each lab's gateway) at once. The key is the namespace's cookie
(SO_NETNS_COOKIE), which the kernel never reuses while it runs; an inode number can come back
for a new namespace and would make it inherit a dead one's state.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from netsetup.desired import AddressSpec, PolicyRuleSpec, RouteSpec

STATE_DIR = Path("/run/mailgate")
VERSION = 1


SO_NETNS_COOKIE = 71  # linux/socket.h, Linux >= 5.14; Python's socket module lacks it


def default_state_path() -> Path:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            cookie = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8),
                                    sys.byteorder)
        key = f"cookie{cookie}"
    except OSError:  # older kernels: the inode, unique while the namespace lives
        key = str(os.stat("/proc/self/ns/net").st_ino)
    return STATE_DIR / f"netsetup-{key}.json"


@dataclass
class BridgeRecord:
    name: str
    created: bool  # True: netsetup made it and deletes it at teardown
    was_down: bool = False
    # Bridge options netsetup changed on an adopted bridge: option -> previous value.
    previous_options: dict[str, int] = field(default_factory=dict)


@dataclass
class PortRecord:
    enslaved: bool = False
    was_down: bool = False


@dataclass
class State:
    sysctls: dict[str, str] = field(default_factory=dict)  # key -> value before netsetup
    bridge: BridgeRecord | None = None
    ports: dict[str, PortRecord] = field(default_factory=dict)
    addresses: list[AddressSpec] = field(default_factory=list)
    routes: list[RouteSpec] = field(default_factory=list)
    rules: list[PolicyRuleSpec] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.sysctls or self.bridge or self.ports or self.addresses or self.routes
                    or self.rules)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        bridge = data.get("bridge")
        return cls(
            sysctls={str(k): str(v) for k, v in data.get("sysctls", {}).items()},
            bridge=BridgeRecord(**bridge) if bridge else None,
            ports={name: PortRecord(**rec) for name, rec in data.get("ports", {}).items()},
            addresses=[AddressSpec(**a) for a in data.get("addresses", [])],
            routes=[RouteSpec(**r) for r in data.get("routes", [])],
            rules=[PolicyRuleSpec(**r) for r in data.get("rules", [])],
        )


class StateFileError(Exception):
    pass


def load(path: Path) -> State:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return State()
    except (OSError, ValueError) as exc:
        raise StateFileError(f"{path}: cannot read the state file: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise StateFileError(f"{path}: not a netsetup state file of version {VERSION}")
    try:
        return State.from_json(data)
    except (TypeError, ValueError, AttributeError) as exc:
        raise StateFileError(f"{path}: damaged state file: {exc}") from None


def save(path: Path, state: State) -> None:
    """Write atomically (temp file, fsync, rename); an empty state removes the file."""
    if state.is_empty():
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as handle:
        json.dump(state.to_json(), handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
