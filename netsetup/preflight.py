"""Checks of the config against the live system, made before anything is touched.

The config file alone cannot say whether `eth3` exists here, or whether `br0` is a bridge or
some other device: these problems are reported like config problems (file, key, message).
"""

from __future__ import annotations

from pathlib import Path

from netsetup.config import NetworkConfig
from netsetup.configfile import Problem
from netsetup.links import LinkInfo


def live_problems(config: NetworkConfig, links: dict[str, LinkInfo],
                  path: Path | str) -> list[Problem]:
    problems: list[Problem] = []
    if config.mode != "bridge":
        return problems

    def problem(key: str, message: str) -> None:
        problems.append(Problem(str(path), f"network.{key}", message))

    bridge = links.get(config.bridge)
    if bridge is not None and bridge.kind != "bridge":
        problem("bridge", f"{config.bridge} exists on this system but is a "
                          f"{bridge.kind or 'plain'} device, not a bridge")
    for port in config.ports:
        link = links.get(port)
        if link is None:
            known = ", ".join(sorted(n for n in links if n != "lo")) or "none"
            problem("ports", f"no interface named {port!r} on this system (there are: {known})")
        elif link.kind == "bridge":
            problem("ports", f"{port} is a bridge itself; name the interfaces to bridge")
        elif link.master is not None and link.master != config.bridge:
            problem("ports", f"{port} already belongs to {link.master}; release it first "
                             f"(ip link set {port} nomaster)")
    return problems
