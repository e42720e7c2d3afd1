"""A private redis-server in a lab host, in the foreground, for rspamd's greylisting.

Debian's redis-server is started with every setting on its command line (no config file):
bound to one address and port, no persistence (`save ""`, no append-only file: a lab's
greylist triplets need not outlive it), its working folder and log in the folder the caller
gives. It runs as the `redis` user the package creates (`setpriv`): redis-server itself never
drops root.

Ready when it answers `PING` with `+PONG` (RESP, the Redis protocol: a command is an array of
bulk strings; inline commands such as `PING\\r\\n` are accepted too).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from netsetup.lab.peers._common import (
    PEER_MOUNT,
    PeerError,
    chown_tree,
    connect,
    ensure_port_free,
    peer_command,
    read_reply_line,
    user_ids,
    wait_exit,
    wait_until,
)
from netsetup.lab.topology import Host, Lab

USER = "redis"
START_TIMEOUT = 15.0


class RedisInstance:
    def __init__(self, lab: Lab, host: Host, dir: Path, address: str, port: int) -> None:
        self.lab = lab
        self.host = host
        self.dir = dir
        self.address = (address, port)
        self.log_path = dir / "redis.log"
        self.out_path = dir / "redis.out"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    @property
    def server(self) -> str:
        """The value for rspamd's `servers` (local.d/redis.conf): host:port."""
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self, timeout: float = START_TIMEOUT) -> RedisInstance:
        ensure_port_free(self.lab, self.host, self.address[1], f"redis in {self.host.role}")
        # The folder is PEER_MOUNT for redis-server; the redis user must pass and write it.
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o755)
        uid, gid = user_ids(USER)
        chown_tree(self.dir, uid, gid)
        argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups",
                "redis-server", "--bind", self.address[0], "--port", str(self.address[1]),
                "--daemonize", "no", "--save", "", "--appendonly", "no",
                "--dir", str(PEER_MOUNT), "--logfile", str(PEER_MOUNT / "redis.log"),
                "--protected-mode", "yes"]
        started = time.monotonic()
        with self.out_path.open("ab") as out:
            self.process = self.lab.spawn(self.host, peer_command(self.dir, argv), stdout=out,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(self._pongs, f"redis in {self.host.role}", timeout, self.process,
                   (self.out_path, self.log_path))
        self.startup_seconds = time.monotonic() - started
        return self

    def command(self, *args: str, timeout: float = 5.0) -> bytes:
        """One command from inside the lab host; the first line of the reply (RESP)."""
        request = f"*{len(args)}\r\n".encode() + b"".join(
            b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
        with connect(self.host, self.address[0], self.address[1], timeout) as sock:
            sock.sendall(request)
            reply = read_reply_line(sock)
        if not reply.endswith(b"\r\n"):
            raise PeerError(f"redis: no complete reply to {args[0]}: {reply[:200]!r}")
        return reply[:-2]

    def count(self, pattern: str) -> int:
        """How many keys match `pattern` (KEYS answers an array: its header line counts)."""
        return int(self.command("KEYS", pattern).lstrip(b"*"))

    def _pongs(self) -> bool:
        return self.command("PING", timeout=1.0) == b"+PONG"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: redis-server exits (nothing to save)
            wait_exit(self.process, timeout)
        self.process = None


class Redis:
    @staticmethod
    def start(lab: Lab, host: Host, dir: Path, *, address: str = "127.0.0.1",
              port: int = 6379) -> RedisInstance:
        """redis-server on address:port inside `host`; ready once PING answers."""
        return RedisInstance(lab, host, dir, address, port).start()
