"""`mailgate run` with [interceptor] enabled: it starts `mailgate intercept`, watches it, starts
it again when it dies, and stops it when it stops itself (interceptor/companion.py).

In a router lab the gateway runs `netsetup apply` (SYNs to NFQUEUE 0, TPROXY only for what the
interceptor marks) and `mailgate run`, alone: the interceptor the test sees is the one the
companion started. The server host answers port 25 itself ("PEER ..."), so a connection the
interceptor did not send to the proxy shows as such. Whether a connection was intercepted is
read from its greeting: the SMTP proxy's banner names the gateway's hostname.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from interceptor.queuestate import QueueState, parse
from interceptor.service import read_stats
from netsetup.lab.peers._common import in_netns, wait_exit, wait_until
from netsetup.lab.topology import Lab
from tests.lab.tcp_probes import JsonLines, event_is

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
HOSTNAME = "gw.lab.example"
QUEUE = 0

LabFactory = Callable[..., Lab]


def config_text(dir: Path) -> str:
    return f"""\
[network]
mode = "router"
ipv6 = false

[interceptor]
enabled = true
queue = {QUEUE}
health_interval = 0.1
stats_interval = 0.1
stats_file = "{dir / "interceptor.json"}"

[smtp]
listen = 10025
hostname = "{HOSTNAME}"
relay_domains = ["example.com"]
queue_dir = "{dir / "queue"}"
tls = false
workers = 1
"""


def log_fields(log: Path, event: str) -> list[dict[str, str]]:
    """The key=value fields of each `event=<event>` line of a logfmt log, oldest first."""
    return [dict((key, value.strip('"')) for key, value in
                 re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line))
            for line in log.read_text().splitlines() if f" event={event} " in f" {line} "]


def queue_bound(lab: Lab) -> QueueState | None:
    """Queue 0 in the gateway's /proc/net/netfilter/nfnetlink_queue: present once bound."""
    text = lab.run(lab.gateway, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    return parse(text).get(QUEUE)


def banner(lab: Lab) -> str:
    """The greeting a client in the sender gets from the server's port 25."""
    server = str(lab.server.ipv4)

    def greet() -> str:
        with smtplib.SMTP(timeout=5, local_hostname="sender.lab.example") as smtp:
            code, text = smtp.connect(server, 25)
            return f"{code} {text.decode()}"

    return in_netns(lab.sender, greet)


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]


def netlink_portids(pid: int) -> set[int]:
    """Port ids of the netlink sockets process `pid` holds: its socket inodes (/proc/PID/fd)
    looked up in its namespace's /proc/PID/net/netlink (columns ... Pid ... Inode)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:["):-1]))
    rows = [line.split() for line in
            Path(f"/proc/{pid}/net/netlink").read_text().splitlines()[1:]]
    return {int(row[2]) for row in rows if int(row[-1]) in inodes}


def gateway_pids(lab: Lab) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", lab.gateway.netns], capture_output=True,
                         text=True, check=False).stdout
    return [int(pid) for pid in out.split()]


def gateway_lab(lab_factory: LabFactory, tmp_path: Path, prefix: str) -> Lab:
    """A router lab with the config written and netsetup applied in its gateway."""
    lab = lab_factory("router", name=f"{prefix}{secrets.token_hex(2)}")
    config = tmp_path / "mailgate.toml"
    config.write_text(config_text(tmp_path))
    result = lab.run(lab.gateway, [PYTHON, "-m", "netsetup.cli", "--config", str(config),
                                   "--state-file", str(tmp_path / "netsetup.json"), "apply"],
                     check=False, cwd=ROOT, timeout=60)
    assert result.returncode == 0, f"netsetup apply:\n{result.stdout}\n{result.stderr}"
    return lab


def start_mailgate(lab: Lab, tmp_path: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return lab.spawn(lab.gateway, [PYTHON, "-m", "proxies.cli", "run", "--config",
                                       str(tmp_path / "mailgate.toml")], stdout=out,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)


def test_mailgate_run_starts_restarts_and_stops_the_interceptor(lab_factory: LabFactory,
                                                                tmp_path: Path) -> None:
    lab = gateway_lab(lab_factory, tmp_path, "cmp")
    server = JsonLines(lab.spawn(lab.server, [PYTHON, "-m", "tests.lab.tcp_probes", "serve",
                                              "--port", "25"], stdout=subprocess.PIPE,
                                 cwd=ROOT))
    server.wait_for(event_is("listening"), what="server listening")
    assert queue_bound(lab) is None  # nothing else here binds the queue
    stats_file = tmp_path / "interceptor.json"

    log = tmp_path / "mailgate.log"
    mailgate = start_mailgate(lab, tmp_path, log)
    try:
        # Started: the companion names its child, the child says it is ready, the kernel
        # shows the queue bound (to the child's netlink socket), the companion sees that.
        wait_until(lambda: bool(log_fields(log, "interceptor_bound")), "interceptor bound", 20,
                   mailgate, (log,))
        (started,) = log_fields(log, "interceptor_started")
        first = int(started["pid"])
        assert parent_of(first) == mailgate.pid
        assert "intercept" in Path(f"/proc/{first}/cmdline").read_text()
        assert len(log_fields(log, "interceptor_ready")) == 1
        bound = queue_bound(lab)
        assert bound is not None and bound.portid in netlink_portids(first), bound
        assert banner(lab).startswith(f"220 {HOSTNAME} "), "not intercepted"
        wait_until(lambda: (s := read_stats(stats_file)) is not None and s["pid"] == first
                   and s["counters"]["intercepted"] >= 1, "the interception counted", 5)

        # kill -9: the companion logs the exit and that nobody has the queue, and starts a new
        # interceptor, bound in a few seconds: the exit seen within a watch interval (1 s),
        # the first backoff (1 s), the child's start, the interval that sees it bound.
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: len(log_fields(log, "interceptor_bound")) == 2,
                   "interceptor bound again", 10, mailgate, (log,))
        took = time.monotonic() - killed
        assert took < 6, took
        (exited,) = log_fields(log, "interceptor_exited")
        assert exited["level"] == "warning" and exited["status"] == "-9", exited
        assert exited["restart_in"] == "1.0", exited
        (gone,) = log_fields(log, "interceptor_gone")
        assert gone["level"] == "warning" and gone["queue"] == str(QUEUE), gone
        second = int(log_fields(log, "interceptor_started")[1]["pid"])
        assert len(log_fields(log, "interceptor_ready")) == 2
        assert second != first and parent_of(second) == mailgate.pid
        assert not Path(f"/proc/{first}").exists()  # reaped, no zombie left
        bound = queue_bound(lab)
        assert bound is not None and bound.portid in netlink_portids(second), bound
        # Mail goes through the proxy again, decided by the new interceptor.
        assert banner(lab).startswith(f"220 {HOSTNAME} "), "not intercepted after restart"
        assert [c["client"] for c in log_fields(log, "smtp_connect")] == [lab.sender.ipv4] * 2
        wait_until(lambda: (s := read_stats(stats_file)) is not None and s["pid"] == second
                   and s["counters"]["intercepted"] >= 1, "the new interceptor counted", 5)

        # SIGTERM to `mailgate run`: it stops the interceptor too, and leaves nothing.
        mailgate.send_signal(signal.SIGTERM)
        assert mailgate.wait(timeout=15) == 0, log.read_text()[-3000:]
        assert log_fields(log, "interceptor_stopped"), log.read_text()[-3000:]
        assert gateway_pids(lab) == []
        assert not Path(f"/proc/{second}").exists()
        assert queue_bound(lab) is None
    finally:
        if mailgate.poll() is None:
            mailgate.terminate()
            wait_exit(mailgate, 15)


def test_the_interceptor_ends_with_mailgate_run_even_on_sigkill(lab_factory: LabFactory,
                                                                tmp_path: Path) -> None:
    """A `mailgate run` killed with SIGKILL cannot stop its child; the child asks the kernel
    to be told (PR_SET_PDEATHSIG), so it does not stay bound, deciding for proxies that are
    gone (with fail = "open" the kernel then passes new connections, as with no interceptor)."""
    lab = gateway_lab(lab_factory, tmp_path, "cmk")
    log = tmp_path / "mailgate.log"
    mailgate = start_mailgate(lab, tmp_path, log)
    try:
        wait_until(lambda: bool(log_fields(log, "interceptor_bound")), "interceptor bound", 20,
                   mailgate, (log,))
        child = int(log_fields(log, "interceptor_started")[0]["pid"])
        mailgate.kill()
        mailgate.wait(timeout=5)
        wait_until(lambda: not Path(f"/proc/{child}").exists() and queue_bound(lab) is None,
                   "the interceptor gone and the queue unbound", 10)
    finally:
        if mailgate.poll() is None:
            mailgate.kill()
            wait_exit(mailgate, 15)
