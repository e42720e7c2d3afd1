"""A private Prometheus (Debian's `prometheus`) in a lab host, offline, in the foreground.

It scrapes the targets it is given (address literals: nothing is looked up, and the lab has
no way out anyway) every `interval`, keeps its time-series database in the folder it is given
and owns (made at start, removed at stop), and answers the HTTP API on loopback inside its
host. Debian's own /etc/prometheus is not read; nothing of the host's Prometheus (if any) is
touched. It runs as root, as the other peers' masters do: the folder is the caller's temporary
one, which only root may pass (see _common.PEER_MOUNT for peers that drop root).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from netsetup.lab.peers._common import PeerError, connect, wait_exit, wait_until
from netsetup.lab.topology import Host, Lab

BINARY = "prometheus"


class PrometheusInstance:
    def __init__(self, lab: Lab, host: Host, dir: Path, address: str, port: int,
                 targets: Sequence[str], interval: float) -> None:
        self.lab = lab
        self.host = host
        self.dir = dir
        self.address = (address, port)
        self.targets = tuple(targets)
        self.interval = interval
        self.config_path = dir / "prometheus.yml"
        self.data_dir = dir / "data"
        self.log_path = dir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    def _write_config(self) -> None:
        # JSON is YAML: no YAML writer needed. One job, static targets, the scrape timeout
        # no longer than the interval (Prometheus refuses a config where it is).
        interval = f"{int(self.interval * 1000)}ms"
        config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval,
                       "evaluation_interval": interval},
            "scrape_configs": [{"job_name": "mailgate",
                                "static_configs": [{"targets": list(self.targets)}]}],
        }
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")

    def start(self, timeout: float = 30.0) -> PrometheusInstance:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        host, port = self.address
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        argv = [BINARY, f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.data_dir}", f"--web.listen-address={listen}",
                "--storage.tsdb.retention.time=1h", "--log.level=info"]
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = self.lab.spawn(self.host, argv, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(self._ready, f"prometheus in {self.host.role}", timeout, self.process,
                   (self.log_path,))
        self.startup_seconds = time.monotonic() - started
        return self

    def _ready(self) -> bool:
        return self.get("/-/ready", timeout=2.0)[0] == 200

    # --- the HTTP API ---------------------------------------------------------------------

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        """One HTTP/1.0 GET from inside the lab host; (status, body)."""
        with connect(self.host, self.address[0], self.address[1], timeout) as sock:
            sock.sendall(b"GET %s HTTP/1.0\r\n\r\n" % path.encode())
            reply = _recv_all(sock)
        head, _, body = reply.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or not status[1].isdigit():
            raise PeerError(f"prometheus: not an HTTP reply: {reply[:200]!r}")
        return int(status[1]), body

    def api(self, path: str, **params: str) -> Any:
        """`data` of a successful /api/v1 answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        code, body = self.get(f"/api/v1/{path}{query}")
        answer = json.loads(body)
        if code != 200 or answer.get("status") != "success":
            raise PeerError(f"prometheus: /api/v1/{path}{query}: {code} {body[:300]!r}")
        return answer["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {labels}, "value": [time, "text"]}]."""
        data = self.api("query", query=expression)
        if data["resultType"] != "vector":
            raise PeerError(f"prometheus: {expression!r} is not a vector: {data}")
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expression: str) -> float | None:
        """The one value of an instant query (None when the vector is empty)."""
        result = self.query(expression)
        if not result:
            return None
        if len(result) > 1:
            raise PeerError(f"prometheus: {expression!r} has {len(result)} series")
        return float(result[0]["value"][1])

    def target_health(self) -> list[dict[str, Any]]:
        """The active targets as Prometheus sees them (health, lastError, lastScrape)."""
        targets: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return targets

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it and remove its folder, database and all."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                wait_exit(self.process, timeout)
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        part = sock.recv(65536)
        if not part:
            return data
        data += part


class Prometheus:
    @staticmethod
    def start(lab: Lab, host: Host, dir: Path, targets: Sequence[str], *,
              address: str = "127.0.0.1", port: int = 9090,
              interval: float = 1.0) -> PrometheusInstance:
        """Prometheus in `host` on address:port, scraping `targets` ("ip:port") every
        `interval` seconds. `dir` is its own: removed by stop(). Ready once /-/ready says so."""
        if shutil.which(BINARY) is None:
            raise PeerError("prometheus is not installed (Debian's package `prometheus`; "
                            "scripts/setup-host.sh installs it)")
        instance = PrometheusInstance(lab, host, dir, address, port, targets, interval)
        try:
            return instance.start()
        except BaseException:
            instance.stop()
            raise
