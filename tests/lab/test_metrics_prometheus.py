"""Metrics through a real Prometheus (router mode, smtp.workers = 2, smtp-sink as the server).

`mailgate run` serves [metrics] on loopback in the gateway's namespace; Debian's Prometheus
runs in the same namespace (offline, a database of its own in the test's folder, removed at
the end) and scrapes it every second while mail flows through the gateway. Half-way one
worker is killed with SIGKILL: the master starts another, and the totals go on from where
they were (the dead worker's counts stay in them), which Prometheus would otherwise record
as a counter reset. At the end every counter Prometheus holds, asked through its HTTP API,
equals what `mailgate status --json` says.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netsetup.lab.peers._common import wait_until
from netsetup.lab.peers.prometheus import Prometheus, PrometheusInstance
from netsetup.lab.peers.sink import SmtpSink
from netsetup.lab.topology import Lab
from tests.lab.smtp_helpers import (
    PYTHON,
    ROOT,
    SENDER_DOMAIN,
    Gateway,
    message,
    server_address,
    smtp_client,
)

WORKERS = 2
METRICS = "127.0.0.1:9100"
MESSAGES = 12
KILL_AFTER = 6
ACCEPTED = 'mailgate_smtp_messages_total{result="accepted"}'


@dataclass
class Env:
    lab: Lab
    gateway: Gateway
    sink: SmtpSink
    prometheus: PrometheusInstance


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    lab = Lab("router", name="mtr" + secrets.token_hex(2))
    prometheus = None
    try:
        lab.up()
        gateway = Gateway(lab, tmp_path / "gateway")
        gateway.write_config(workers=WORKERS)
        with gateway.config_path.open("a") as config:
            config.write(f'[metrics]\nlisten = "{METRICS}"\n')
        gateway.apply_network()
        sink = SmtpSink.start(lab, lab.server, tmp_path / "sink", dump=True)
        gateway.start()
        prometheus = Prometheus.start(lab, lab.gateway, tmp_path / "prometheus", [METRICS])
        yield Env(lab, gateway, sink, prometheus)
    finally:
        if prometheus is not None:
            prometheus.stop()  # its database goes with it, whatever happened
        lab.down()  # mailgate, smtp-sink and anything left of Prometheus are killed


def live_workers(gateway: Gateway) -> list[int]:
    started = [int(e["pid"]) for e in gateway.events("worker_started")]
    exited = {int(e["pid"]) for e in gateway.events("worker_exited")}
    return [pid for pid in started if pid not in exited and os.path.exists(f"/proc/{pid}")]


def status(env: Env, *json_flag: str) -> subprocess.CompletedProcess[str]:
    return env.lab.run(env.lab.gateway, [PYTHON, "-m", "proxies.cli", "status", *json_flag,
                                         "--config", str(env.gateway.config_path)],
                       check=False, cwd=ROOT, timeout=60)


def status_metrics(env: Env) -> dict[str, Any]:
    result = status(env, "--json")
    assert result.returncode == 0, result.stderr
    metrics: dict[str, Any] = json.loads(result.stdout)["metrics"]
    return metrics


def selector(name: str, labels: dict[str, str]) -> str:
    matchers = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return f"{name}{{{matchers}}}"


def compare_counters(env: Env) -> tuple[list[str], list[str]]:
    """(every counter sample `mailgate status --json` shows, those that Prometheus's last
    scrape has with another value or not at all)."""
    compared, differ = [], []
    for name, samples in status_metrics(env)["values"].items():
        if not name.endswith("_total"):
            continue
        for sample in samples:
            expression = selector(name, sample["labels"])
            scraped = env.prometheus.value(expression)
            compared.append(f"{expression} {sample['value']:g}")
            if scraped != sample["value"]:
                differ.append(f"{expression}: status {sample['value']}, prometheus {scraped}")
    return compared, differ


def send(env: Env, number: int) -> str:
    """One message over a connection of its own (so none is open when a worker is killed)."""
    with smtp_client(env.lab.sender, server_address(env.lab)) as client:
        client.ehlo()
        client.mail(f"metrics@{SENDER_DOMAIN}")
        code, _ = client.rcpt("alice@example.com")
        assert code == 250
        code, text = client.data(message(f"metrics {number}"))
        assert code == 250, (code, text)
        return text.decode()


def test_prometheus_scrapes_the_sum_over_workers_and_status_agrees(env: Env) -> None:
    lab, gateway, prometheus = env.lab, env.gateway, env.prometheus
    wait_until(lambda: prometheus.value('up{job="mailgate"}') == 1.0,
               "Prometheus scraping the gateway", 20, prometheus.process,
               (prometheus.log_path, gateway.log_path))
    # A recipient refused by relay control: a 5xx reply and a refusal by reason.
    with smtp_client(lab.sender, server_address(lab)) as client:
        client.ehlo()
        client.mail(f"metrics@{SENDER_DOMAIN}")
        code, _ = client.rcpt("someone@elsewhere.example")
        assert code == 554
    first_workers = live_workers(gateway)
    assert len(first_workers) == WORKERS
    started = time.monotonic()
    for number in range(MESSAGES):
        if number == KILL_AFTER:
            os.kill(first_workers[0], signal.SIGKILL)
            gateway.wait_event("worker_ready", count=WORKERS + 1)
        send(env, number)
        time.sleep(0.3)  # mail flows for a few scrapes
    print(f"{MESSAGES} messages sent in {time.monotonic() - started:.1f} s, "
          f"worker {first_workers[0]} killed after {KILL_AFTER}")
    env.sink.wait_for_messages(MESSAGES, timeout=30)
    gateway.wait_queue_empty()

    # Prometheus's view, through its HTTP API: the sum over every process, the dead included.
    wait_until(lambda: prometheus.value(f"sum({ACCEPTED})") == MESSAGES,
               f"Prometheus seeing {MESSAGES} accepted", 20, prometheus.process,
               (prometheus.log_path,))
    wait_until(lambda: prometheus.value('mailgate_deliveries_total{outcome="delivered"}')
               == MESSAGES, "Prometheus seeing the deliveries", 20)
    assert prometheus.value('mailgate_worker_restarts_total{worker="smtp"}') == 1
    assert prometheus.value(
        'mailgate_smtp_recipients_refused_total{reason="relay_denied"}') == 1
    assert prometheus.value('sum(mailgate_queue_messages)') == 0
    # It scraped while the mail flowed, and the kill did not look like a reset.
    window = f"[{int(time.monotonic() - started) + 30}s]"
    changes = prometheus.value(f"changes({ACCEPTED}{window})")
    assert changes is not None and changes >= 2, changes
    assert prometheus.value(f"resets({ACCEPTED}{window})") == 0
    healthy = prometheus.target_health()
    assert [t["health"] for t in healthy] == ["up"], healthy
    # The Grafana dashboard's queries are ones this Prometheus takes (query() raises on an
    # error), and its message panel shows the mail.
    dashboard = json.loads((ROOT / "proxies/metrics/grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            result = prometheus.query(target["expr"].replace("$__rate_interval", "10s"))
            if "mailgate_smtp_messages_total" in target["expr"]:
                assert result, target["expr"]

    # `mailgate status --json` shows the same figures (its last scrape is at most a second old
    # and nothing moves any more: equal once that scrape has happened).
    wait_until(lambda: not compare_counters(env)[1], "status and Prometheus agreeing", 10)
    compared, differ = compare_counters(env)
    print("equal in status and Prometheus:\n  " + "\n  ".join(compared))
    assert not differ, differ
    assert len(compared) >= 10
    shown = status_metrics(env)
    assert shown["listen"] == METRICS
    accepted = [s["value"] for s in shown["values"]["mailgate_smtp_messages_total"]
                if s["labels"]["result"] == "accepted"]
    assert accepted == [MESSAGES]
    text = status(env)
    assert text.returncode == 0, text.stderr
    print(text.stdout)
    assert (f'mailgate_smtp_messages_total{{reason="queued",result="accepted"}} {MESSAGES}'
            in text.stdout), text.stdout
    assert "Traceback" not in gateway.log()


def test_no_metrics_no_listener(tmp_path: Path) -> None:
    """Off by default: nothing listens for scrapes, and status says it is off."""
    with Lab("router", name="mtr" + secrets.token_hex(2)) as lab:
        gateway = Gateway(lab, tmp_path / "gateway")
        gateway.write_config(workers=1)
        gateway.apply_network()
        gateway.start()
        ports = lab.run(lab.gateway, ["ss", "-Hltn"]).stdout
        assert ":9100 " not in ports
        result = lab.run(lab.gateway, [PYTHON, "-m", "proxies.cli", "status", "--json",
                                       "--config", str(gateway.config_path)],
                         check=False, cwd=ROOT, timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["metrics"] == {"enabled": False}
        assert not gateway.queue_dir.with_name("queue-metrics").exists()
