"""Plumbing shared by the peer helpers: sockets inside a lab host, polling, log tails, paths.

Every peer is a real program started inside a lab namespace. The test process itself stays in
the host's namespace; to check that a peer is ready (or to talk to it from a test) we open a
socket *inside* the peer's namespace from a short-lived thread that has joined it with
setns(2). A socket belongs to the namespace it was created in for its whole life, so the
thread can end at once and the socket is then used from any thread. Only that thread ever
changes namespace, never the test process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from netsetup.lab.topology import Host, Lab

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")
POLL_INTERVAL = 0.02

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


class PeerError(Exception):
    """A peer did not start, did not become ready, or failed a request."""


def log_tail(path: Path | None, lines: int = 25) -> str:
    """The last lines of a log file, for error messages ('' if there is none)."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def failure(message: str, *logs: Path | None) -> PeerError:
    """A PeerError whose message ends with the tail of each log that has something in it."""
    parts = [message]
    for log in logs:
        tail = log_tail(log)
        if tail:
            parts.append(f"--- last lines of {log} ---\n{tail}")
    return PeerError("\n".join(parts))


def in_netns(host: Host | str, func: Callable[[], T]) -> T:
    """Run `func()` in a thread that has joined the network namespace of `host`; return its
    result (or raise its exception). Use it for whole client exchanges (poplib, smtplib)."""
    netns = host if isinstance(host, str) else host.netns
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_RUN_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["result"] = func()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def connect(host: Host | str, address: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection made from inside `host` to address:port (IP literals only)."""

    def make() -> socket.socket:
        sock = socket.socket(family_of(address), socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except BaseException:
            sock.close()
            raise
        return sock

    return in_netns(host, make)


def udp_socket(host: Host | str, address: str, timeout: float = 2.0) -> socket.socket:
    """An unconnected UDP socket inside `host`, of the family `address` needs."""
    sock = in_netns(host, lambda: socket.socket(family_of(address), socket.SOCK_DGRAM))
    sock.settimeout(timeout)
    return sock


def wait_until(check: Callable[[], bool], what: str, timeout: float,
               process: subprocess.Popen[bytes] | None = None,
               logs: tuple[Path | None, ...] = ()) -> float:
    """Poll `check` until it returns True; return the seconds it took.

    Fails at once, with the logs' tails, if `process` (the peer) exits meanwhile: a peer that
    dies on a config error should not cost the whole timeout.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        with contextlib.suppress(OSError):
            if check():
                return time.monotonic() - start
        if process is not None and process.poll() is not None:
            raise failure(f"{what}: the program exited with status {process.returncode}", *logs)
        if time.monotonic() > deadline:
            raise failure(f"{what}: not ready after {timeout:.1f} s", *logs)
        time.sleep(POLL_INTERVAL)


def port_open(host: Host | str, address: str, port: int) -> bool:
    """True once something accepts TCP connections on address:port inside `host`."""
    try:
        connect(host, address, port, timeout=1.0).close()
    except OSError:
        return False
    return True


def listening_ports(lab: Lab, host: Host) -> set[int]:
    """TCP ports something listens on inside `host` (any address)."""
    out = lab.run(host, ["ss", "-Hltn"], check=False).stdout
    ports = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3].rpartition(":")[2].isdigit():
            ports.add(int(fields[3].rpartition(":")[2]))
    return ports


def ensure_port_free(lab: Lab, host: Host, port: int, what: str) -> None:
    """Refuse to start a second listener on a port.

    Postfix (and smtp-sink, built on the same library) set SO_REUSEPORT on Linux: a second
    instance binds the same port without an error, and the kernel then spreads connections
    over both. Tests would talk to whichever it picks, so a clash must fail loudly here.
    """
    if port in listening_ports(lab, host):
        raise PeerError(f"{what}: port {port} already has a listener in {host.role} "
                        f"({host.netns}); stop it first")


def wait_exit(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Wait for a spawned peer to exit; kill it if it will not."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait(timeout=5)


def user_ids(name: str) -> tuple[int, int]:
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


# Where a peer sees its own folder. The daemons drop root for their real work (Postfix's
# master takes its lock as "postfix", the virtual agent writes as the mailbox user, Dovecot's
# auth and mail processes, spamd's children), and a path they open must be passable for
# that user all the way from /. The folder a test gives (pytest's tmp_path) sits under
# /tmp/pytest-of-root, which pytest resets to 0700 whenever a session starts, even while
# another session's peers are running. So each peer command gets its folder bind-mounted
# here, a path under /run that every user can pass, and its config names paths below it.
# `ip netns exec` already runs every command in a mount namespace of its own (slave to the
# host's), so the mount is seen by that command and its children only and goes away with
# them: nothing to clean up, and peers side by side each see their own folder here.
PEER_MOUNT = Path("/run/mailgate-peer")
_BIND_THEN_EXEC = 'mount --bind -- "$1" "$2" || exit 97; shift 2; exec "$@"'


def peer_command(dir: Path, argv: Sequence[str]) -> list[str]:
    """`argv` to run in a lab host with `dir` mounted at PEER_MOUNT (see above)."""
    PEER_MOUNT.mkdir(mode=0o755, parents=True, exist_ok=True)
    return ["sh", "-c", _BIND_THEN_EXEC, "sh", str(dir.resolve()), str(PEER_MOUNT), *argv]


def chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid)


def read_reply_line(sock: socket.socket, limit: int = 4096) -> bytes:
    """One CRLF-ended line from a socket (a banner or a short reply)."""
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data
