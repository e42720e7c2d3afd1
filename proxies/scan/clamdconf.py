"""What the local clamd's own limits mean for [scan] max_size, read from its clamd.conf.

clamd does not read past MaxFileSize (one file) or MaxScanSize (all a message unpacks to):
what is over them is left unscanned and answered OK, unless AlertExceedsMax is on (then it
is a Heuristics.Limits.Exceeded find). So a message larger than either, but within
[scan] max_size, would pass as clean. StreamMaxLength is milder: a longer stream is answered
ERROR, a scan failure that [scan] fail_mode decides. Neither limit is visible over clamd's
socket; its config file is the one place to learn them, and only when the socket mailgate
uses is the one that file's clamd listens on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from netsetup.configfile import parse_size

__all__ = ["CLAMD_CONF", "ClamdLimits", "limit_warnings", "read_limits"]

CLAMD_CONF = Path("/etc/clamav/clamd.conf")
# clamd's built-in values for what its config file leaves out (clamd.conf(5)).
_DEFAULTS = {"MaxFileSize": 100 << 20, "MaxScanSize": 400 << 20, "StreamMaxLength": 100 << 20}


@dataclass(frozen=True)
class ClamdLimits:
    path: Path  # the clamd.conf they come from
    socket: Path | None  # its LocalSocket
    max_file_size: int  # 0: no limit
    max_scan_size: int
    stream_max_length: int
    alert_exceeds_max: bool


def read_limits(path: Path) -> ClamdLimits | None:
    """The limits in `path`; None if it cannot be read. A value clamd would not take either
    counts as its default (clamd refuses to start with it, so it is not what runs)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key and not key.startswith("#"):
            values[key] = value.strip()

    def size(key: str) -> int:
        try:
            return parse_size(values[key])
        except (KeyError, ValueError):
            return _DEFAULTS[key]

    socket = values.get("LocalSocket")
    return ClamdLimits(
        path, Path(socket) if socket else None, size("MaxFileSize"), size("MaxScanSize"),
        size("StreamMaxLength"),
        values.get("AlertExceedsMax", "no").lower() in ("yes", "true", "1"))


def _same_socket(ours: Path, theirs: Path | None) -> bool:
    # Debian's clamd.conf says /var/run/clamav/clamd.ctl, mailgate's default /run/...: one
    # file where /var/run is a link to /run.
    return theirs is not None and os.path.realpath(ours) == os.path.realpath(theirs)


def limit_warnings(socket: Path, max_size: int, conf: Path | None = None) -> list[str]:
    """What is wrong between [scan] max_size and the limits of the clamd at `socket`, when
    `conf` (default CLAMD_CONF) is that clamd's file: one sentence each, for the log and
    `mailgate config check`."""
    limits = read_limits(CLAMD_CONF if conf is None else conf)
    if limits is None or not _same_socket(socket, limits.socket):
        return []
    warnings = []
    if not limits.alert_exceeds_max:
        for key, limit in (("MaxFileSize", limits.max_file_size),
                           ("MaxScanSize", limits.max_scan_size)):
            if 0 < limit < max_size:
                warnings.append(
                    f"{limits.path}: {key} {_shown(limit)} is below [scan] max_size "
                    f"{_shown(max_size)}: clamd answers OK, unscanned, for what is over it, so "
                    f"such a message would pass as clean; raise {key}, lower max_size, or set "
                    f"AlertExceedsMax yes")
    if 0 < limits.stream_max_length < max_size:
        warnings.append(
            f"{limits.path}: StreamMaxLength {_shown(limits.stream_max_length)} is below "
            f"[scan] max_size {_shown(max_size)}: a message over it is a scan failure "
            f"([scan] fail_mode), not a verdict")
    return warnings


def _shown(size: int) -> str:
    for suffix, unit in (("M", 1 << 20), ("K", 1 << 10)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)
