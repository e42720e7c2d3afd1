"""The `[scan]`, `[policy]` and `[quarantine]` sections (filled in by the filtering work)."""

from __future__ import annotations

from dataclasses import dataclass

from netsetup.configfile import Section


@dataclass(frozen=True)
class ScanConfig:
    pass


def scan_from_sections(scan: Section, policy: Section, quarantine: Section) -> ScanConfig:
    return ScanConfig()
