"""Connections counted in one process: in total and per client address.

The SMTP front end answers a refused connection with `421 4.7.0` (RFC 5321 3.8), the POP3 proxy
with `-ERR [SYS/TEMP]` (RFC 3206); what is counted, and when a slot is given back, is the same.
Postfix's smtpd_client_connection_count_limit is the model. With several SMTP workers the
master's shared counts are the one owner instead (`proxies.process.ConnectionSlots`).
"""

from __future__ import annotations

from collections import Counter

__all__ = ["ConnectionGate"]


class ConnectionGate:
    """`admit` a connection if both limits allow it; `release` it when it ends."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.by_client: Counter[str] = Counter()
        self.count = 0

    def admit(self, client: str) -> bool:
        if self.count >= self.total or self.by_client[client] >= self.per_client:
            return False
        self.count += 1
        self.by_client[client] += 1
        return True

    def release(self, client: str) -> None:
        self.count -= 1
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]  # an address seen once must not stay in memory
