"""Figures read at scrape time rather than counted: the queue's length by state and the age of
its oldest message, and the interceptor's decisions.

Both are read from what their owner already keeps on disk, so nothing on the hot path pays
for them and they are right whoever changed them (the delivery agent, `mailgate queue`, a
worker): the queue's directories (a queue id begins with the time it was made, in hex
microseconds, so the oldest message is the smallest name and no file is opened), and the
interceptor's stats file (`[interceptor] stats_file`, rewritten every `stats_interval` by
`mailgate intercept`, a process of its own whose NFQUEUE loop is better left without
prometheus_client; interceptor/service.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxies.queue import journal, queuefile
from proxies.queue.store import QUEUE_DIRS


class QueueCollector(Collector):
    """mailgate_queue_messages{state} and mailgate_queue_oldest_message_age_seconds."""

    def __init__(self, queue_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.queue_dir = queue_dir
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        length = GaugeMetricFamily(
            "mailgate_queue_messages", "Messages in the queue, by state (its directory: "
            "incoming, active, deferred, hold, corrupt)", labels=["state"])
        oldest: str | None = None
        for state in QUEUE_DIRS:
            count = 0
            try:
                with os.scandir(self.queue_dir / state) as entries:
                    for entry in entries:
                        # Not the .tmp files of messages being written: not accepted yet.
                        if queuefile.is_queue_id(entry.name):
                            count += 1
                            if state != "corrupt" and (oldest is None or entry.name < oldest):
                                oldest = entry.name
            except FileNotFoundError:
                pass
            if state == "incoming":  # and those still in the journal, before their first try
                for record in journal.waiting_records(self.queue_dir / journal.JOURNAL_DIR,
                                                      check=False):
                    count += 1
                    if oldest is None or record.queue_id < oldest:
                        oldest = record.queue_id
            length.add_metric([state], count)
        yield length
        age = 0.0 if oldest is None else max(0.0, self.clock() - queuefile.id_time(oldest))
        yield GaugeMetricFamily(
            "mailgate_queue_oldest_message_age_seconds", "Age of the oldest message waiting "
            "in the queue (0 when it is empty); corrupt files are not counted", value=age)


# interceptor/policy.py's reasons, by the decision they stand for.
_DECISIONS = {"intercepted": ("intercepted", "policy"), "refused": ("refused", "health")}


class InterceptorCollector(Collector):
    """mailgate_interceptor_decisions_total{decision,reason}, per proxy
    mailgate_interceptor_proxy_healthy, and how old the stats file is."""

    def __init__(self, stats_file: Path, clock: Callable[[], float] = time.time) -> None:
        self.stats_file = stats_file
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        from interceptor.service import read_stats

        stats = read_stats(self.stats_file)
        if not stats or "stopped" in stats:
            return  # not running: no figures rather than stale ones
        decisions = CounterMetricFamily(
            "mailgate_interceptor_decisions", "New connections decided by the interceptor "
            "(decision intercepted, passed or refused, and why), since it started",
            labels=["decision", "reason"])
        by_reason: dict[str, Any] = stats.get("by_reason") or {}
        for reason, count in sorted(by_reason.items()):
            decision, label = _DECISIONS.get(reason, ("passed", reason))
            if isinstance(count, int | float):
                decisions.add_metric([decision, label], count)
        yield decisions
        healthy = GaugeMetricFamily(
            "mailgate_interceptor_proxy_healthy", "1 if the interceptor hands new connections "
            "to this proxy, 0 if it passes or refuses them (see mailgate status for why)",
            labels=["service", "family"])
        for proxy in stats.get("proxies") or []:
            healthy.add_metric([str(proxy.get("service")), str(proxy.get("family"))],
                               1.0 if proxy.get("accepting") else 0.0)
        yield healthy
        updated = stats.get("updated")
        if isinstance(updated, int | float):
            yield GaugeMetricFamily(
                "mailgate_interceptor_stats_age_seconds", "How long ago the interceptor last "
                "wrote its figures", value=max(0.0, self.clock() - updated))
