"""Keeping the hot path's flags current: proxy health and the schedule, off the hot path.

A proxy counts as accepting on one address family when a socket listens on its port in that
family, the accept queue of at least one such listener has room, and the connections it holds
are below its limit (if one is set). The probe asks the kernel (interceptor/sockdiag.py) and
never connects to the proxy.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from interceptor import sockdiag
from interceptor.config import Window
from interceptor.policy import Service

FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


@dataclass(frozen=True)
class ProxyState:
    service: str
    family: int
    listen_port: int
    listening: bool
    backlog_full: bool
    connections: int
    limit: int

    @property
    def accepting(self) -> bool:
        return self.listening and not self.backlog_full and (
            self.limit == 0 or self.connections < self.limit)

    def reason(self) -> str:
        if not self.listening:
            return "not listening"
        if self.backlog_full:
            return "accept queue full"
        if not self.accepting:
            return f"at its connection limit ({self.connections}/{self.limit})"
        return "accepting"


Probe = Callable[[int, int], list[sockdiag.SocketInfo]]
Counter = Callable[[int, int], int]


def probe_proxies(services: Iterable[Service], families: Iterable[int],
                  listeners: Probe = sockdiag.listeners,
                  connections: Counter = sockdiag.connection_count) -> list[ProxyState]:
    states = []
    families = tuple(families)
    for service in services:
        held = 0
        if service.max_connections:
            # The proxy's limit is across both families.
            held = sum(connections(FAMILIES[f], service.port) for f in families)
        for family in families:
            found = listeners(FAMILIES[family], service.listen_port)
            states.append(ProxyState(
                service.name, family, service.listen_port, listening=bool(found),
                backlog_full=bool(found) and all(s.rqueue >= max(s.wqueue, 1) for s in found),
                connections=held, limit=service.max_connections))
    return states


def schedule_active(schedule: Iterable[Window], now: time.struct_time) -> bool:
    windows = tuple(schedule)
    minute = now.tm_hour * 60 + now.tm_min
    return not windows or any(w.covers(now.tm_wday, minute) for w in windows)


class Monitor:
    """A thread that calls `tick()` every `interval` seconds until `stop()`."""

    def __init__(self, interval: float, tick: Callable[[], None], name: str) -> None:
        self.interval = interval
        self._tick = tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
