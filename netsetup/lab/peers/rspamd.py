"""A private rspamd in a lab host, offline, in the foreground.

Debian's /etc/rspamd is used as it is (`-c /etc/rspamd/rspamd.conf`); everything of ours goes
in a private LOCAL_CONFDIR, with DBDIR, RUNDIR and LOGDIR beside it (`--var=...`):

- `override.d/worker-*.inc` moves the normal worker, the controller and the proxy to the
  address and ports wanted. It has to be override.d: rspamd.conf sets `bind_socket` itself and
  a local.d file is *merged*, so rspamd would bind the stock ports as well.
- `local.d/<module>.conf` with `enabled = false` for every module that asks the network (DNS
  lists, SPF/DKIM/DMARC lookups, fuzzy servers, redis-backed ones, maps fetched from
  maps.rspamd.com), and `local.d/options.inc` points the resolver at 127.0.0.1: what is left
  can look nothing up outside the lab.
- A test may turn some of them back on against peers of the lab's own: `checks` (SPF, DKIM,
  DMARC) with `nameserver` pointing at a lab DNS server (`netsetup.lab.peers.dns`), and
  `greylist` with a lab Redis (`netsetup.lab.peers.redis`) and a short greylisting delay.
  `actions` sets rspamd's score thresholds (local.d/actions.conf).

The first start on a machine costs about 16 s: rspamd compiles its list of top-level domains
(and its regexp rules) with hyperscan. It caches the result in `hs_cache_dir`, which we point
at CACHE_DIR, kept across runs and shared by every instance; later starts take about 1 s.
Everything else in DBDIR (control socket, history, symbol cache) stays in the private folder.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from netsetup.lab.peers._common import (
    PEER_MOUNT,
    PeerError,
    chown_tree,
    connect,
    peer_command,
    user_ids,
    wait_exit,
    wait_until,
)
from netsetup.lab.topology import Host, Lab

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
USER = "_rspamd"
CACHE_DIR = Path("/var/cache/mailgate-lab/rspamd")
# Modules that resolve names or talk to servers: the rspamd entry of MAIL-PEERS-FACTS.md.
NETWORK_MODULES = ("fuzzy_check", "rbl", "dcc", "phishing", "url_redirector", "asn", "emails",
                   "dmarc", "spf", "dkim", "arc", "greylist", "ratelimit", "replies", "neural",
                   "reputation")
# Modules whose stock config fetches maps from https://maps.rspamd.com, or that look up the
# HELO and host names (hfilter): they would only log failed fetches and lookups here.
REMOTE_MODULES = ("multimap", "whitelist", "mid", "mime_types", "hfilter")
# Network modules a test may turn back on (`checks`); each then asks only the lab's DNS.
CHECK_MODULES = ("spf", "dkim", "dmarc")
# Room for the first start on a machine (the hyperscan compile, about 16 s on 2 cores).
FIRST_START_TIMEOUT = 90.0


@dataclass(frozen=True)
class Greylist:
    """rspamd's greylist module against a lab Redis: `redis` is its `servers` (host:port),
    `timeout` the seconds a new triplet waits before its retry passes (rspamd's default is
    5 minutes; tests want a few seconds)."""

    redis: str
    timeout: float = 3.0


class RspamdInstance:
    def __init__(self, lab: Lab, host: Host, dir: Path, address: str, port: int, *,
                 checks: Sequence[str] = (), nameserver: str = "127.0.0.1",
                 greylist: Greylist | None = None,
                 actions: Mapping[str, float | None] | None = None) -> None:
        unknown = set(checks) - set(CHECK_MODULES)
        if unknown:
            raise PeerError(f"rspamd: checks {sorted(unknown)} unknown (known: "
                            f"{', '.join(CHECK_MODULES)})")
        self.checks = tuple(checks)
        self.nameserver = nameserver
        self.greylist = greylist
        self.actions = dict(actions or {})
        self.lab = lab
        self.host = host
        self.dir = dir
        self.address = (address, port)  # the normal worker: /checkv2
        self.controller = (address, port + 1)
        self.proxy = (address, port - 1)
        self.conf_dir = dir / "conf"
        self.log_path = dir / "log" / "rspamd.log"
        self.out_path = dir / "rspamd.out"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    @property
    def url(self) -> str:
        """The value for `[scan] rspamd` in a mailgate config."""
        host = f"[{self.address[0]}]" if ":" in self.address[0] else self.address[0]
        return f"http://{host}:{self.address[1]}"

    def _write_config(self) -> None:
        # The folder is the root of PEER_MOUNT: the workers (_rspamd) must pass through it.
        self.dir.chmod(0o755)
        for name in ("conf/local.d", "conf/override.d", "db", "run", "log"):
            (self.dir / name).mkdir(parents=True, exist_ok=True)
        uid, gid = user_ids(USER)
        CACHE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        chown_tree(CACHE_DIR, uid, gid)
        override = self.conf_dir / "override.d"
        for worker, (host, port) in (("normal", self.address), ("controller", self.controller),
                                     ("proxy", self.proxy)):
            bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            (override / f"worker-{worker}.inc").write_text(
                f'bind_socket = "{bind}";\ncount = 1;\n')
        local = self.conf_dir / "local.d"
        for stale in local.iterdir():
            stale.unlink()  # a restart with other settings must not keep the old ones
        enabled = set(self.checks) | ({"greylist"} if self.greylist else set())
        for module in NETWORK_MODULES + REMOTE_MODULES:
            if module not in enabled:
                (local / f"{module}.conf").write_text("enabled = false;\n")
        if self.greylist is not None:
            # Redis for this module only: a global redis section would also switch on the
            # Bayes statistics and the history of every other Redis-backed module.
            (local / "greylist.conf").write_text(
                f'servers = "{self.greylist.redis}";\n'
                f"timeout = {self.greylist.timeout:g}s;\nexpire = 1h;\n")
        if self.actions:
            (local / "actions.conf").write_text("".join(
                f"{name} = {'null' if value is None else f'{value:g}'};\n"
                for name, value in self.actions.items()))
        (local / "options.inc").write_text(f"""\
# Only the lab's own DNS server (when a test runs one) or the gateway's loopback, where
# nothing answers: nothing is looked up outside the lab.
dns {{
  nameserver = ["{self.nameserver}"];
  timeout = 0.5s;
  retransmits = 1;
}}
hs_cache_dir = "{CACHE_DIR}/";
""")
        # Written as root; the workers run as _rspamd and write their state here.
        for name in ("db", "run", "log"):
            chown_tree(self.dir / name, uid, gid)

    def start(self, timeout: float = FIRST_START_TIMEOUT) -> RspamdInstance:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        argv = ["rspamd", "-f", "-u", USER, "-g", USER, "-c", "/etc/rspamd/rspamd.conf",
                f"--var=LOCAL_CONFDIR={PEER_MOUNT / 'conf'}", f"--var=DBDIR={PEER_MOUNT / 'db'}",
                f"--var=RUNDIR={PEER_MOUNT / 'run'}", f"--var=LOGDIR={PEER_MOUNT / 'log'}"]
        started = time.monotonic()
        with self.out_path.open("ab") as out:
            self.process = self.lab.spawn(self.host, peer_command(self.dir, argv), stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(self._pongs, f"rspamd in {self.host.role}", timeout, self.process,
                   (self.out_path, self.log_path))
        self.startup_seconds = time.monotonic() - started
        return self

    def _pongs(self) -> bool:
        """Ready when the normal worker and the controller both answer GET /ping."""
        return all(self.get("/ping", worker, timeout=2.0)[0] == 200
                   for worker in (self.address, self.controller))

    def get(self, path: str, worker: tuple[str, int] | None = None,
            timeout: float = 10.0) -> tuple[int, bytes]:
        """One HTTP/1.0 GET from inside the lab host; (status, body)."""
        return self._http(b"GET %s HTTP/1.0\r\n\r\n" % path.encode(), worker or self.address,
                          timeout)

    def checkv2(self, message: bytes, timeout: float = 10.0,
                headers: Sequence[tuple[str, str]] = ()) -> tuple[int, bytes]:
        """POST /checkv2 to the normal worker, with the envelope in `headers` (("IP",
        "192.0.2.10"), ("From", ...), ...); (status, JSON body)."""
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers).encode()
        request = b"POST /checkv2 HTTP/1.0\r\n%sContent-Length: %d\r\n\r\n" % (
            extra, len(message))
        return self._http(request + message, self.address, timeout)

    def _http(self, request: bytes, worker: tuple[str, int],
              timeout: float) -> tuple[int, bytes]:
        with connect(self.host, worker[0], worker[1], timeout) as sock:
            sock.sendall(request)
            reply = _recv_all(sock)
        head, _, body = reply.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or not status[1].isdigit():
            raise PeerError(f"rspamd: not an HTTP reply: {reply[:200]!r}")
        return int(status[1]), body

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()  # the main process stops its workers and waits for them
            wait_exit(self.process, timeout)
        self.process = None


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        part = sock.recv(65536)
        if not part:
            return data
        data += part


class Rspamd:
    @staticmethod
    def start(lab: Lab, host: Host, dir: Path, *, address: str = "127.0.0.1",
              port: int = 11333, checks: Sequence[str] = (), nameserver: str = "127.0.0.1",
              greylist: Greylist | None = None,
              actions: Mapping[str, float | None] | None = None) -> RspamdInstance:
        """The normal worker on address:port, the controller on port + 1 and the proxy on
        port - 1 (rspamd's own layout: 11333, 11334, 11332). Ready once /ping answers.

        `checks`: some of CHECK_MODULES on, resolving with the DNS server at `nameserver`;
        `greylist`: the greylist module on, with its Redis; `actions`: score thresholds
        ("greylist", "add_header", "reject"...; None removes one)."""
        return RspamdInstance(lab, host, dir, address, port, checks=checks,
                              nameserver=nameserver, greylist=greylist,
                              actions=actions).start()
