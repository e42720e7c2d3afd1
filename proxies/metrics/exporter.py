"""The figures one `mailgate run` serves on `[metrics] listen`, and how it starts counting.

`build_registry(config)` is the one list of what is exported: the processes' shared counts
(proxies.metrics.shared), the queue and the interceptor (proxies.metrics.collectors). The
master's HTTP endpoint serves it and `mailgate status` collects it, so the two never differ
by more than what happened between two reads.

The endpoint is prometheus_client's own WSGI server in a daemon thread of the master: a scrape
reads a few small files and the queue's directory listings, which would stall the event loop
(and every session on it) if it ran there; the thread sleeps in accept() between scrapes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxies import metrics
from proxies.metrics import shared
from proxies.metrics.recorder import PrometheusRecorder, Recorder

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from proxies.config import Config


def shared_dir(config: Config) -> Path:
    """Where every process of one `mailgate run` keeps its counts: `[metrics] dir`, else
    beside the queue directory, unique per instance as two cannot share a queue directory."""
    queue_dir = config.smtp.queue_dir
    return config.metrics.dir or queue_dir.with_name(queue_dir.name + "-metrics")


def build_registry(config: Config) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from proxies.metrics.collectors import InterceptorCollector, QueueCollector

    registry = CollectorRegistry(auto_describe=False)
    directory = shared_dir(config)
    if directory.is_dir():  # not before the first start
        MultiProcessCollector(registry, path=str(directory))
    registry.register(QueueCollector(config.smtp.queue_dir))
    if config.interceptor.enabled:
        registry.register(InterceptorCollector(config.interceptor.stats_file))
    return registry


class Exporter:
    """GET /metrics on `[metrics] listen`, in a thread of the master."""

    def __init__(self, config: Config) -> None:
        assert config.metrics.listen is not None
        self.config = config
        self.address = config.metrics.listen
        self._server: Any = None

    def start(self) -> None:
        """Raises OSError when the address cannot be bound (taken, not ours)."""
        from prometheus_client import start_http_server

        host, port = self.address
        self._server, _thread = start_http_server(port, host, build_registry(self.config))

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            # shutdown() waits for the serving loop's next poll (up to 0.5 s): not on the loop.
            await asyncio.to_thread(server.shutdown)
            server.server_close()


def start_master(config: Config) -> None:
    """The master, before any worker exists: a fresh shared directory, and counting."""
    if not config.metrics.enabled:
        return
    shared.prepare(shared_dir(config))
    metrics.use(PrometheusRecorder())


def start_worker(config: Config) -> None:
    """A worker: count into the directory its master prepared."""
    if not config.metrics.enabled:
        return
    shared.join(shared_dir(config))
    metrics.use(PrometheusRecorder())


def worker_gone(config: Config, pid: int) -> None:
    if config.metrics.enabled:
        shared.process_dead(shared_dir(config), pid)


def stop_recording() -> None:
    """Hooks do nothing again (the end of `serve`; tests)."""
    if metrics.current.enabled:
        metrics.use(Recorder())
        shared.leave()
