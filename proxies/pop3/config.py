"""The `[pop3]` section (filled in by the POP3 proxy work)."""

from __future__ import annotations

from dataclasses import dataclass

from netsetup.configfile import Section


@dataclass(frozen=True)
class Pop3Config:
    enabled: bool = False
    listen_port: int = 10110


def pop3_from_section(section: Section) -> Pop3Config:
    return Pop3Config(
        enabled=section.boolean("enabled", False),
        listen_port=section.port("listen", 10110),
    )
