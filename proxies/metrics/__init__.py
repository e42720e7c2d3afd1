"""Prometheus metrics for `mailgate run`, summed over its processes.

- recorder.py: the hooks the proxies call (`metrics.current.smtp_message(...)`), doing
  nothing while metrics are off, and their prometheus_client version;
- shared.py: how the master and its workers add up into one set of figures (prometheus_client's
  multiprocess mode, and why);
- collectors.py: what is read at scrape time (the queue, the interceptor's stats file);
- exporter.py: the registry the HTTP endpoint serves and `mailgate status` shows, so both
  always say the same;
- config.py: the `[metrics]` section; grafana-dashboard.json: a dashboard to import.

This module itself imports nothing heavy: every hot path imports it, metrics on or off.
"""

from __future__ import annotations

from proxies.metrics.recorder import Recorder, new_reply_counts

__all__ = ["Recorder", "current", "new_reply_counts", "use"]

# What every hook calls; swapped once at start-up when [metrics] listen is set. Callers look
# it up at each call (`metrics.current`), never keep their own reference.
current: Recorder = Recorder()


def use(recorder: Recorder) -> None:
    global current
    current = recorder
