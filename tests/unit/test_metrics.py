"""Metrics (proxies/metrics): the [metrics] section; hooks that cost nothing while off; counts
of several processes summed, a dead one's kept; the queue and interceptor figures read at
scrape time; `mailgate status` showing what the endpoint serves; the front end's counts.

Processes that count are real subprocesses (prometheus_client's multiprocess mode is chosen
per process); the test process itself only reads their files, except where a test switches
it on and the `recording` fixture switches it off again.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from interceptor.service import write_stats
from netsetup.configfile import ConfigError
from proxies import metrics
from proxies.config import Config, load_config
from proxies.metrics import exporter, shared
from proxies.metrics.collectors import InterceptorCollector, QueueCollector
from proxies.metrics.config import LOOPBACK, MetricsConfig, parse_listen
from proxies.metrics.recorder import PrometheusRecorder, Recorder
from proxies.metrics.status import metrics_lines, metrics_status
from proxies.queue import queuefile
from proxies.scan.api import ScanResult
from proxies.scan.config import PolicyConfig
from proxies.scan.engine import MultiScanner
from proxies.scan.rules import ContentRules
from tests.unit.scan_messages import with_attachments
from tests.unit.test_smtp_frontend import converse

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, metrics_section: str = 'listen = "127.0.0.1:9100"\n',
                 extra: str = "") -> Config:
    path = tmp_path / "mailgate.toml"
    path.write_text(f'[smtp]\nqueue_dir = "{tmp_path / "queue"}"\n'
                    f"[metrics]\n{metrics_section}{extra}")
    return load_config(path)


def sample_values(config: Config, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted labels: value} of one sample name, as `mailgate status --json` shows it."""
    values = metrics_status(config)["values"].get(name, [])
    return {tuple(sorted(s["labels"].items())): s["value"] for s in values}


@pytest.fixture
def recording() -> Iterator[None]:
    """Leaves this process's metrics off afterwards, whatever the test switched on."""
    try:
        yield
    finally:
        exporter.stop_recording()
        metrics.use(Recorder())


# --- [metrics] ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (9100, (LOOPBACK, 9100)),
    ("9100", (LOOPBACK, 9100)),
    ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:9200", ("0.0.0.0", 9200)),
    ("[::1]:9100", ("::1", 9100)),
    ("[2001:db8::1]:9100", ("2001:db8::1", 9100)),
])
def test_listen_takes_a_port_or_an_address_and_port(value: object,
                                                    expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", [True, 0, 70000, "", "localhost:9100", "::1:9100",
                                   "[::1]", "192.0.2.1:", "192.0.2.1:x", ["9100"]])
def test_listen_refuses_what_is_not_an_ip_and_port(value: object) -> None:
    with pytest.raises(ValueError):
        parse_listen(value)


def test_metrics_are_off_by_default_and_the_section_refuses_unknown_keys(
        tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text("[smtp]\n")
    config = load_config(path)
    assert config.metrics == MetricsConfig() and not config.metrics.enabled
    path.write_text('[metrics]\nlisen = 9100\nlisten = "name:1"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    keys = {problem.key for problem in caught.value.problems}
    assert keys == {"metrics.lisen", "metrics.listen"}


def test_the_shared_directory_is_beside_the_queue_unless_given(tmp_path: Path) -> None:
    config = write_config(tmp_path, "listen = 9100\n")
    assert config.metrics.listen == (LOOPBACK, 9100)
    assert exporter.shared_dir(config) == tmp_path / "queue-metrics"
    config = write_config(tmp_path, f'listen = 9100\ndir = "{tmp_path / "m"}"\n')
    assert exporter.shared_dir(config) == tmp_path / "m"


# --- off: nothing ----------------------------------------------------------------------------


def test_with_metrics_off_the_hot_paths_never_import_prometheus_client() -> None:
    probe = ("import sys; import proxies.run, proxies.smtp.frontend, proxies.pop3.session; "
             "from proxies import metrics; "
             "assert not metrics.current.enabled; "
             "metrics.current.smtp_message('accepted', 'queued'); "
             "metrics.current.scan('clamd', 'clean', 0.1); "
             "print('prometheus_client' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "False"


def test_status_says_off_when_off(tmp_path: Path) -> None:
    config = write_config(tmp_path, "")
    assert metrics_status(config) == {"enabled": False}
    assert metrics_lines({"enabled": False}) == ["metrics: off ([metrics] listen not set)"]


# --- many processes, one set of figures ------------------------------------------------------

COUNTING = textwrap.dedent("""\
    import os, sys
    from pathlib import Path
    from proxies.metrics import shared
    from proxies.metrics.recorder import PrometheusRecorder
    shared.join(Path(sys.argv[1]))
    recorder = PrometheusRecorder()
    for _ in range(int(sys.argv[2])):
        recorder.smtp_message("accepted", "queued")
    recorder.smtp_replies([0, 0, 3, 1, 0, 1])
    recorder.scan("clamd", "clean", 0.02)
    print(os.getpid())
    """)


def count_in_a_process(directory: Path, messages: int) -> int:
    result = subprocess.run([sys.executable, "-c", COUNTING, str(directory), str(messages)],
                            capture_output=True, text=True, cwd=ROOT, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    return int(result.stdout)


def test_counts_of_several_processes_add_up_and_a_dead_ones_stay(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    directory = exporter.shared_dir(config)
    shared.prepare(directory)
    try:
        first = count_in_a_process(directory, 3)
        count_in_a_process(directory, 4)
    finally:
        shared.leave()
    accepted = (("reason", "queued"), ("result", "accepted"))
    assert sample_values(config, "mailgate_smtp_messages_total")[accepted] == 7
    assert sample_values(config, "mailgate_smtp_replies_total") == {
        (("class", "2xx"),): 6, (("class", "3xx"),): 2, (("class", "4xx"),): 0,
        (("class", "5xx"),): 2}
    assert sample_values(config, "mailgate_scan_duration_seconds_count") == {
        (("scanner", "clamd"),): 2}
    buckets = sample_values(config, "mailgate_scan_duration_seconds_bucket")
    assert buckets[(("le", "0.01"), ("scanner", "clamd"))] == 0
    assert buckets[(("le", "0.025"), ("scanner", "clamd"))] == 2
    # Both processes have exited; the master says so for the first: its counts stay in the
    # totals (they must never go down), only its live-only files would go.
    shared.process_dead(directory, first)
    assert sample_values(config, "mailgate_smtp_messages_total")[accepted] == 7


def test_a_master_starts_from_zero(tmp_path: Path, recording: None) -> None:
    config = write_config(tmp_path)
    directory = exporter.shared_dir(config)
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"left by the last run")
    (directory / "stray").mkdir()
    exporter.start_master(config)
    assert metrics.current.enabled
    assert sorted(p.name for p in directory.iterdir()) == [f"counter_{os.getpid()}.db"]
    assert os.environ[shared.ENVIRONMENT] == str(directory)
    metrics.current.smtp_connection("accepted")
    metrics.current.deliveries(2, 1, 0)
    metrics.current.worker_restart("smtp")
    assert sample_values(config, "mailgate_smtp_connections_total") == {
        (("result", "accepted"),): 1, (("result", "refused"),): 0}
    assert sample_values(config, "mailgate_deliveries_total") == {
        (("outcome", "bounced"),): 0, (("outcome", "deferred"),): 1,
        (("outcome", "delivered"),): 2}
    assert sample_values(config, "mailgate_worker_restarts_total") == {
        (("worker", "smtp"),): 1}
    exporter.stop_recording()
    assert not metrics.current.enabled and shared.ENVIRONMENT not in os.environ


def test_every_hook_of_the_prometheus_recorder_counts(tmp_path: Path) -> None:
    recorder = PrometheusRecorder()  # process-local values: nothing shared here
    recorder.smtp_connection("refused")
    recorder.smtp_replies([0, 0, 1, 0, 2, 0])
    recorder.smtp_message("rejected", "loop")
    recorder.smtp_recipient_refused("relay_denied")
    recorder.filter_verdict("virus", "reject")
    recorder.deliveries(0, 0, 3)
    recorder.scan("spamd", "spam", 0.3)
    recorder.pop3_retrieval("tag", "spam")
    recorder.pop3_scan_ahead("used")
    recorder.worker_restart("smtp")
    recorder.bounce_notification("rate_limited")
    get = recorder.registry.get_sample_value
    assert get("mailgate_smtp_connections_total", {"result": "refused"}) == 1
    assert get("mailgate_smtp_replies_total", {"class": "4xx"}) == 2
    assert get("mailgate_smtp_messages_total", {"result": "rejected", "reason": "loop"}) == 1
    assert get("mailgate_smtp_recipients_refused_total", {"reason": "relay_denied"}) == 1
    assert get("mailgate_smtp_filter_verdicts_total",
               {"verdict": "virus", "action": "reject"}) == 1
    assert get("mailgate_deliveries_total", {"outcome": "bounced"}) == 3
    assert get("mailgate_scan_verdicts_total", {"scanner": "spamd", "verdict": "spam"}) == 1
    assert get("mailgate_scan_duration_seconds_sum", {"scanner": "spamd"}) == pytest.approx(0.3)
    assert get("mailgate_pop3_retrievals_total", {"outcome": "tag", "verdict": "spam"}) == 1
    assert get("mailgate_pop3_scan_ahead_total", {"result": "used"}) == 1
    assert get("mailgate_worker_restarts_total", {"worker": "smtp"}) == 1
    assert get("mailgate_bounce_notifications_total", {"result": "rate_limited"}) == 1
    assert get("mailgate_bounce_notifications_total", {"result": "sent"}) == 0


# --- read at scrape time -----------------------------------------------------------------------


def queue_id_at(when: float) -> str:
    return f"{int(when * 1e6):013X}00000000"


def test_the_queue_by_state_and_its_oldest_message(tmp_path: Path) -> None:
    queue_dir = tmp_path / "queue"
    now = 1_700_000_000.0
    files = {"incoming": [now - 5, now - 1], "deferred": [now - 300], "hold": [now - 900],
             "corrupt": [now - 9999]}
    for state, times in files.items():
        (queue_dir / state).mkdir(parents=True)
        for when in times:
            (queue_dir / state / queue_id_at(when)).write_bytes(b"")
    (queue_dir / "incoming" / f"{queue_id_at(now)}.123.tmp").write_bytes(b"")  # not accepted
    assert queuefile.is_queue_id(queue_id_at(now))
    length, oldest = QueueCollector(queue_dir, clock=lambda: now).collect()
    assert {s.labels["state"]: s.value for s in length.samples} == {
        "incoming": 2, "active": 0, "deferred": 1, "hold": 1, "corrupt": 1}
    assert oldest.samples[0].value == pytest.approx(900)
    (_, empty) = QueueCollector(tmp_path / "none", clock=lambda: now).collect()
    assert empty.samples[0].value == 0


def stats(**overrides: Any) -> dict[str, Any]:
    snapshot: dict[str, Any] = {
        "pid": 1, "updated": 1000.0,
        "by_reason": {"intercepted": 7, "refused": 1, "unparsable": 0, "port": 2,
                      "health": 3},
        "proxies": [{"service": "smtp", "family": 4, "accepting": True},
                    {"service": "smtp", "family": 6, "accepting": False}]}
    snapshot.update(overrides)
    return snapshot


def test_the_interceptors_decisions_from_its_stats_file(tmp_path: Path) -> None:
    path = tmp_path / "interceptor.json"
    write_stats(path, stats())
    decisions, healthy, age = InterceptorCollector(path, clock=lambda: 1002.5).collect()
    assert decisions.name == "mailgate_interceptor_decisions"
    assert {(s.labels["decision"], s.labels["reason"]): s.value
            for s in decisions.samples} == {
        ("intercepted", "policy"): 7, ("refused", "health"): 1, ("passed", "unparsable"): 0,
        ("passed", "port"): 2, ("passed", "health"): 3}
    assert [(s.labels["family"], s.value) for s in healthy.samples] == [("4", 1.0), ("6", 0.0)]
    assert age.samples[0].value == pytest.approx(2.5)
    # Stopped, or never ran: no figures rather than stale ones.
    write_stats(path, stats(stopped=1001.0))
    assert list(InterceptorCollector(path).collect()) == []
    assert list(InterceptorCollector(tmp_path / "none.json").collect()) == []


# --- status and the endpoint say the same --------------------------------------------------------


def parse_exposition(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_status_shows_what_the_endpoint_serves(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra='[interceptor]\nenabled = true\n'
                          f'stats_file = "{tmp_path / "stats.json"}"\n')
    write_stats(config.interceptor.stats_file, stats(updated=time.time()))
    directory = exporter.shared_dir(config)
    shared.prepare(directory)
    try:
        count_in_a_process(directory, 2)
    finally:
        shared.leave()
    (tmp_path / "queue" / "deferred").mkdir(parents=True)
    (tmp_path / "queue" / "deferred" / queue_id_at(time.time() - 60)).write_bytes(b"")
    config = replace(config, metrics=replace(config.metrics,
                                             listen=("127.0.0.1", free_port())))
    endpoint = exporter.Exporter(config)
    endpoint.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{config.metrics.listen[1]}/metrics",
                                    timeout=5) as response:
            served = parse_exposition(response.read().decode())
    finally:
        asyncio.run(endpoint.stop())
    status = metrics_status(config)
    json.dumps(status)  # what --json prints
    shown = {(name, tuple(sorted(s["labels"].items()))): s["value"]
             for name, samples in status["values"].items() for s in samples}
    # The age of the oldest message moves with the clock; everything else is equal.
    age = "mailgate_queue_oldest_message_age_seconds"
    stats_age = "mailgate_interceptor_stats_age_seconds"
    assert shown[(age, ())] == pytest.approx(served.pop((age, ())), abs=2)
    assert shown.pop((stats_age, ())) == pytest.approx(served.pop((stats_age, ())), abs=2)
    del shown[(age, ())]
    assert shown == served
    assert shown[("mailgate_smtp_messages_total",
                  (("reason", "queued"), ("result", "accepted")))] == 2
    assert shown[("mailgate_queue_messages", (("state", "deferred"),))] == 1
    assert shown[("mailgate_interceptor_decisions_total",
                  (("decision", "intercepted"), ("reason", "policy")))] == 7
    lines = metrics_lines(status)
    assert lines[0].startswith(f"metrics: http://127.0.0.1:{config.metrics.listen[1]}/metrics")
    assert '  mailgate_smtp_messages_total{reason="queued",result="accepted"} 2' in lines
    assert not any("_bucket" in line for line in lines)


# --- the hooks in the SMTP front end ------------------------------------------------------------


class Calls(Recorder):
    """A recorder that keeps the calls it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def smtp_connection(self, result: str) -> None:
        self.calls.append(("connection", (result,)))

    def smtp_replies(self, counts: Any) -> None:
        self.calls.append(("replies", tuple(counts)))

    def smtp_message(self, result: str, reason: str) -> None:
        self.calls.append(("message", (result, reason)))

    def scan(self, scanner: str, verdict: str, seconds: float) -> None:
        self.calls.append(("scan", (scanner, verdict, seconds >= 0.05)))


def test_the_front_end_counts_per_connection_and_per_message(recording: None) -> None:
    calls = Calls()
    metrics.use(calls)

    async def run() -> None:
        talk = await converse()
        await talk.say(b"EHLO client.example\r\nMAIL FROM:<a@s.example>\r\n"
                       b"RCPT TO:<b@example.com>\r\nRCPT TO:<c@foreign.example>\r\nDATA\r\n")
        await talk.say(b"a\0b\r\n.\r\n")  # refused by the core: 550 5.6.0
        await talk.say(b"QUIT\r\n")
        # Replies are told once, when the connection ends.
        assert [name for name, _ in calls.calls] == ["connection", "message"]
        talk.connection.connection_lost(None)

    asyncio.run(run())
    # 220, EHLO 250, MAIL 250, RCPT 250, 554, 354, 550, 221.
    assert calls.calls == [("connection", ("accepted",)), ("message", ("rejected", "nul")),
                           ("replies", (0, 0, 5, 1, 0, 2))]


# --- the Grafana dashboard ----------------------------------------------------------------------


def test_the_dashboard_names_only_metrics_we_export(tmp_path: Path) -> None:
    import re

    dashboard = json.loads((ROOT / "proxies/metrics/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {re.sub(r"_(total|bucket|sum|count)$", "", name)
            for expr in exprs for name in re.findall(r"mailgate_\w+", expr)}
    exported = {family.name for family in PrometheusRecorder().registry.collect()}
    path = tmp_path / "stats.json"
    write_stats(path, stats())
    for collector in (QueueCollector(tmp_path), InterceptorCollector(path)):
        exported |= {family.name for family in collector.collect()}
    assert used <= exported, used - exported
    # Every family but the stats file's age has a panel.
    assert exported - used == {"mailgate_interceptor_stats_age_seconds"}
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"


class SlowScanner:
    def __init__(self, name: str, verdict: Any, seconds: float) -> None:
        self.name, self.verdict, self.seconds = name, verdict, seconds

    async def scan(self, content: bytes) -> ScanResult:
        await asyncio.sleep(self.seconds)
        return ScanResult(self.verdict, scanners=(self.name,))

    def close(self) -> None:
        pass


def test_each_scanner_is_timed_on_its_own(recording: None) -> None:
    calls = Calls()
    metrics.use(calls)
    banned = PolicyConfig(banned_extensions=("exe",))
    scanner = MultiScanner([SlowScanner("clamd", "clean", 0.0),
                            SlowScanner("spamd", "spam", 0.06)], ContentRules(banned), 1 << 20)
    result = asyncio.run(scanner.scan(b"Subject: hi\r\n\r\nhello\r\n"))
    assert result.verdict == "spam"
    assert calls.calls == [("scan", ("rules", "clean", False)), ("scan", ("clamd", "clean", False)),
                           ("scan", ("spamd", "spam", True))]
    calls.calls.clear()
    result = asyncio.run(scanner.scan(with_attachments(("setup.exe", b"MZ",
                                                        "application/octet-stream"))))
    assert result.verdict == "banned"
    assert calls.calls == [("scan", ("rules", "banned", False))]  # no scanner asked
