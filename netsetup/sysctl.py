"""Kernel parameters through /proc/sys (per network namespace for the ones netsetup sets)."""

from __future__ import annotations

from pathlib import Path

PROC_SYS = Path("/proc/sys")


def _path(key: str) -> Path:
    return PROC_SYS / key.replace(".", "/")


def read(key: str) -> str | None:
    """The current value, or None when the parameter does not exist on this kernel."""
    try:
        return _path(key).read_text().strip()
    except FileNotFoundError:
        return None


def write(key: str, value: str) -> None:
    _path(key).write_text(value + "\n")
