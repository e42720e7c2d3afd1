"""Tiny socket programs for the netsetup lab tests, and the helpers that drive them.

Run inside a lab host:

    python -m tests.lab.netsetup_probes listen --tag gateway --transparent --port 10025 --port 10110
        Listens on every given port, IPv4 and IPv6, prints "ready" once all are listening, then
        answers every connection with one line "<tag> <local address> <local port> from <peer>"
        (from getsockname(): for a TPROXY'd connection that is the original destination).
        With --relay it first connects onward to that original destination *from the client's
        address* (as a spoofing proxy does) and appends " relayed <the line it got there>".
    python -m tests.lab.netsetup_probes connect HOST PORT [--source ADDRESS]
        Connects (optionally from ADDRESS), prints the line it is sent, exits 0; 1 on failure.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# Linux values; Python has no constant for either (and no socket.SOL_IPV6).
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
DEFAULT_EGRESS_MARK = 0x4  # [network] egress_mark


def _transparent(sock: socket.socket) -> None:
    """Let the socket use (accept for, or connect from) addresses that are not the host's."""
    level, option = ((socket.SOL_IP, IP_TRANSPARENT) if sock.family == socket.AF_INET
                     else (socket.IPPROTO_IPV6, IPV6_TRANSPARENT))
    sock.setsockopt(level, option, 1)
    # As the proxies do (proxies/transparent.py): in bridge mode this mark routes what the
    # socket sends to the peer's own link-layer address.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, DEFAULT_EGRESS_MARK)


def _read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def _relay(client_address: str, destination: tuple[str, int]) -> str:
    family = socket.AF_INET6 if ":" in client_address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as onward:
        onward.settimeout(5)
        _transparent(onward)
        onward.bind((client_address, 0))
        onward.connect(destination)
        return _read_line(onward)


def listen(tag: str, ports: list[int], transparent: bool, relay: bool) -> int:
    selector = selectors.DefaultSelector()
    for port in ports:
        for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if transparent:
                _transparent(sock)  # accept what TPROXY hands over for others' addresses
            sock.bind((address, port))
            sock.listen(64)
            selector.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            listener: socket.socket = key.fileobj  # type: ignore[assignment]
            conn, peer = listener.accept()
            with conn:
                local = conn.getsockname()
                line = f"{tag} {local[0]} {local[1]} from {peer[0]}"
                if relay:
                    try:
                        line += " relayed " + _relay(peer[0], (local[0], local[1]))
                    except OSError as exc:
                        line += f" relay failed: {exc}"
                conn.sendall(f"{line}\n".encode())


def connect(host: str, port: int, source: str | None, timeout: float) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            if source:
                sock.bind((source, 0))
            sock.connect((host, port))
            line = _read_line(sock)
    except OSError as exc:
        print(f"connect {host} {port}: {exc}", file=sys.stderr)
        return 1
    print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netsetup_probes")
    verbs = parser.add_subparsers(dest="verb", required=True)
    lis = verbs.add_parser("listen")
    lis.add_argument("--tag", required=True)
    lis.add_argument("--port", type=int, action="append", required=True)
    lis.add_argument("--transparent", action="store_true")
    lis.add_argument("--relay", action="store_true")
    con = verbs.add_parser("connect")
    con.add_argument("host")
    con.add_argument("port", type=int)
    con.add_argument("--source")
    con.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.verb == "listen":
        return listen(args.tag, args.port, args.transparent, args.relay)
    return connect(args.host, args.port, args.source, args.timeout)


# --- helpers for the tests -----------------------------------------------------------------


def probe_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.lab.netsetup_probes", *args]


def start_listener(lab: Any, host: Any, tag: str, ports: list[int], transparent: bool,
                   relay: bool = False, timeout: float = 10.0) -> subprocess.Popen[bytes]:
    """Spawn a listener in `host` (killed by lab.down()) and wait until it says ready."""
    argv = probe_command("listen", "--tag", tag, *[a for p in ports for a in ("--port", str(p))])
    if transparent:
        argv.append("--transparent")
    if relay:
        argv.append("--relay")
    process: subprocess.Popen[bytes] = lab.spawn(host, argv, stdout=subprocess.PIPE, cwd=REPO)
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=max(0.0, deadline - time.monotonic())):
            line = process.stdout.readline()
            if line.strip() == b"ready":
                return process
            if not line:
                break
    raise AssertionError(f"listener {tag} in {host.netns} did not become ready "
                         f"(exit status {process.poll()})")


def connect_from(lab: Any, host: Any, address: str, port: int,
                 source: str | None = None) -> str:
    """The line the listener at address:port answers to a connection from `host`."""
    argv = probe_command("connect", address, str(port))
    if source:
        argv += ["--source", source]
    result = lab.run(host, argv, check=False, cwd=REPO, timeout=30)
    assert result.returncode == 0, f"connect to {address} port {port} failed: {result.stderr}"
    return str(result.stdout.strip())


def netsetup(lab: Any, config: Path, verb: str, state_file: Path,
             env: dict[str, str] | None = None, extra: tuple[str, ...] = ()
             ) -> subprocess.CompletedProcess[str]:
    """Run the real netsetup program as a process in the lab's gateway namespace."""
    import os

    argv = [sys.executable, "-m", "netsetup.cli", "--config", str(config), "--state-file",
            str(state_file), verb, *extra]
    full_env = {**os.environ, **(env or {})}
    result: subprocess.CompletedProcess[str] = lab.run(lab.gateway, argv, check=False, cwd=REPO,
                                                       env=full_env, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    return result


if __name__ == "__main__":
    sys.exit(main())
