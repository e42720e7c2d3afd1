"""Starts and stops the POP3 proxy inside `mailgate run` (filled in by the POP3 proxy work)."""

from __future__ import annotations

from typing import Protocol

from proxies.config import Config
from proxies.scan.api import ContentScanner


class RunningService(Protocol):
    async def stop(self) -> None: ...


async def start_pop3(config: Config, scanner: ContentScanner | None) -> RunningService:
    raise NotImplementedError("the POP3 proxy is not written yet")
