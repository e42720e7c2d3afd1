"""Builds the SMTP filter hook from the config (filled in by the filtering work)."""

from __future__ import annotations

from proxies.filtering import MessageFilter, NoFilter
from proxies.scan.api import ContentScanner
from proxies.scan.config import ScanConfig


def build_filter(config: ScanConfig) -> MessageFilter:
    return NoFilter()


def build_scanner(config: ScanConfig) -> ContentScanner | None:
    """The configured scanners as one ContentScanner, or None when none is configured."""
    return None
