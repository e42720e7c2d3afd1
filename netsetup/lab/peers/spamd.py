"""A private spamd (SpamAssassin) in a lab host, offline.

The site config folder is private: copies of /etc/spamassassin/*.pre (without them no plugin
loads) and a local.cf that switches off everything that would go to the network (DNS
blocklists, Razor, Pyzor, DCC) and Bayes (no learning state between tests). Debian ships the
rules in /usr/share/spamassassin, so GTUBE scores about 1000 without sa-update.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from netsetup.lab.peers._common import (
    PEER_MOUNT,
    connect,
    peer_command,
    wait_exit,
    wait_until,
)
from netsetup.lab.topology import Host, Lab

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SITE_CONFIG = Path("/etc/spamassassin")
LOCAL_CF = """\
# Offline lab: nothing may reach the network, nothing is learnt between tests.
dns_available no
skip_rbl_checks 1
use_bayes 0
bayes_auto_learn 0
use_razor2 0
use_pyzor 0
use_dcc 0
use_auto_whitelist 0
"""
# Ranges spamd accepts connections from (-A); the lab only uses documentation ranges.
ALLOWED = ("127.0.0.1/32", "::1/128", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",
           "2001:db8::/32")


@dataclass(frozen=True)
class SpamcReply:
    """spamd's answer to CHECK: `Spam: True ; 1000.0 / 5.0`."""

    code: int
    is_spam: bool
    score: float
    threshold: float
    raw: bytes


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        part = sock.recv(65536)
        if not part:
            return data
        data += part


def spamc_check(sock: socket.socket, message: bytes) -> SpamcReply:
    """One SPAMC/1.5 CHECK on a connected socket (spamd closes it after the reply)."""
    sock.sendall(b"CHECK SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(message) + message)
    raw = _recv_all(sock)
    status, _, rest = raw.partition(b"\r\n")
    code = int(status.split()[1])
    is_spam, score, threshold = False, 0.0, 0.0
    for line in rest.split(b"\r\n"):
        if line.startswith(b"Spam:"):
            # "Spam: True ; 1000.0 / 5.0"
            verdict, _, numbers = line[5:].partition(b";")
            is_spam = verdict.strip().lower() in (b"true", b"yes")
            got, _, limit = numbers.partition(b"/")
            score, threshold = float(got), float(limit)
    return SpamcReply(code, is_spam, score, threshold, raw)


def spamc_ping(sock: socket.socket) -> bool:
    sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
    return b" PONG" in _recv_all(sock).split(b"\r\n", 1)[0]


class SpamdInstance:
    def __init__(self, lab: Lab, host: Host, dir: Path, address: str, port: int,
                 children: int, allowed: Sequence[str]) -> None:
        self.lab = lab
        self.host = host
        self.dir = dir
        self.address = (address, port)
        self.children = children
        self.allowed = tuple(allowed)
        self.site_dir = dir / "site"
        self.log_path = dir / "spamd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    def _write_config(self) -> None:
        self.site_dir.mkdir(parents=True, exist_ok=True)
        for pre in SITE_CONFIG.glob("*.pre"):
            shutil.copy(pre, self.site_dir / pre.name)
        (self.site_dir / "local.cf").write_text(LOCAL_CF)

    def start(self, timeout: float = 30.0) -> SpamdInstance:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        argv = ["spamd", "-x", "-u", "nobody", "-i", self.address[0], "-p", str(self.address[1]),
                "-A", ",".join(self.allowed), f"--siteconfigpath={PEER_MOUNT / 'site'}",
                f"--pidfile={PEER_MOUNT / 'spamd.pid'}", "-m", str(self.children),
                "--min-spare=1", "--max-spare=1", "-s", "stderr"]
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = self.lab.spawn(self.host, peer_command(self.dir, argv), stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(self._pongs, f"spamd in {self.host.role}", timeout, self.process,
                   (self.log_path,))
        self.startup_seconds = time.monotonic() - started
        return self

    def _pongs(self) -> bool:
        with self.connection(timeout=5.0) as sock:
            return spamc_ping(sock)

    def connection(self, timeout: float = 30.0) -> socket.socket:
        """A TCP connection to spamd made from inside its lab host."""
        return connect(self.host, self.address[0], self.address[1], timeout)

    def check(self, message: bytes) -> SpamcReply:
        with self.connection() as sock:
            return spamc_check(sock, message)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            children = _children(self.process.pid)
            self.process.terminate()  # spamd's parent stops its children on SIGTERM
            wait_exit(self.process, timeout)
            # The parent exits without waiting for them: wait until they are gone too.
            wait_until(lambda: not any(_alive(pid) for pid in children), "spamd children gone",
                       timeout)
        self.process = None


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    """Running (a zombie left for init to reap counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class Spamd:
    @staticmethod
    def start(lab: Lab, host: Host, dir: Path, *, address: str = "127.0.0.1", port: int = 783,
              children: int = 2, allowed: Sequence[str] = ALLOWED) -> SpamdInstance:
        return SpamdInstance(lab, host, dir, address, port, children, allowed).start()
