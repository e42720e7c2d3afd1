"""Interceptor throughput in a throwaway router lab (not a test; needs root).

    .venv/bin/python bench/interceptor.py [--burst 100000] [--paced-rate 10000] [--seconds 2]

1. Burst: the sender fires pre-built SYNs (distinct source ports, valid checksums) from a raw
   socket as fast as it can; the interceptor's counters and the kernel's drop counters say how
   many were decided and how fast.
2. Paced: the same at a fixed rate (default 10,000 new connections/s): every SYN must be
   decided, none dropped.
3. Setup time: connect() to the server from a bypassed source with the interceptor deciding,
   then with it stopped (the kernel passes SYNs itself), then through the proxy: the cost of the
   queue round trip.

SYNs, not whole connections, are the unit: the interceptor only ever sees the SYN, and a whole
connection per SYN would measure the relay instead (about 1,000/s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PYTHON = sys.executable
BYPASSED = "192.0.2.11"


# --- runs in the sender namespace -------------------------------------------------------------


def _syns(source: str, destination: str, count: int, first_port: int = 20000) -> list[bytes]:
    from interceptor.refuse import checksum

    src, dst = socket.inet_aton(source), socket.inet_aton(destination)
    packets = []
    for index in range(count):
        sport = first_port + index % 40000
        segment = struct.pack("!HHIIBBHHH", sport, 25, index, 0, 5 << 4, 0x02, 64240, 0, 0)
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(segment))
        segment = segment[:16] + struct.pack("!H", checksum(pseudo + segment)) + segment[18:]
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), index & 0xFFFF,
                             0x4000, 64, 6, 0, src, dst)
        packets.append(header + segment)
    return packets


def blast(source: str, destination: str, count: int, rate: float) -> dict[str, Any]:
    """Send `count` SYNs, as fast as possible (rate 0) or paced in 1 ms slices."""
    packets = _syns(source, destination, count)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    target = (destination, 0)
    failed = 0
    start = time.perf_counter()
    if rate <= 0:
        for packet in packets:
            try:
                sock.sendto(packet, target)
            except OSError:
                failed += 1
    else:
        per_slice = max(1, int(rate / 1000))
        for offset in range(0, count, per_slice):
            due = start + offset / rate
            while (now := time.perf_counter()) < due:
                if due - now > 0.0005:
                    time.sleep(due - now - 0.0003)
            for packet in packets[offset:offset + per_slice]:
                try:
                    sock.sendto(packet, target)
                except OSError:
                    failed += 1
    elapsed = time.perf_counter() - start
    return {"sent": count - failed, "failed": failed, "seconds": elapsed}


def connect_times(host: str, source: str, count: int) -> dict[str, Any]:
    times = []
    for _ in range(count):
        with socket.socket() as sock:
            sock.settimeout(5)
            sock.bind((source, 0))
            start = time.perf_counter()
            sock.connect((host, 25))
            times.append((time.perf_counter() - start) * 1e6)
            sock.recv(100)  # the greeting: the connection is really up (through any proxy)
    times.sort()
    return {"count": count, "median_us": round(statistics.median(times)),
            "p99_us": round(times[int(len(times) * 0.99) - 1])}


# --- the driver -------------------------------------------------------------------------------


def _queue_drops(lab: Any) -> int:
    text = lab.run(lab.gateway, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    from interceptor.queuestate import parse

    state = parse(text).get(0)
    return 0 if state is None else state.queue_dropped + state.user_dropped


def _decided(stats_file: Path) -> int:
    from interceptor.service import read_stats

    stats = read_stats(stats_file) or {}
    return sum(stats.get("by_reason", {}).values())


def _run_sender(lab: Any, *args: str) -> dict[str, Any]:
    result = lab.run(lab.sender, [PYTHON, str(Path(__file__).resolve()), *args], cwd=ROOT,
                     timeout=300)
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def _measure_burst(lab: Any, stats: Path, count: int, rate: float) -> dict[str, Any]:
    before, drops_before = _decided(stats), _queue_drops(lab)
    sender = lab.spawn(lab.sender, [PYTHON, str(Path(__file__).resolve()), "_blast",
                                    str(lab.sender.ipv4), str(lab.server.ipv4), str(count),
                                    str(rate)], cwd=ROOT, stdout=subprocess.PIPE)
    # Poll the counters (written every 0.1 s) while the sender runs and until they stop moving:
    # the decision rate is what was decided between the first and the last change.
    last, first_change, last_change = before, 0.0, time.monotonic()
    while sender.poll() is None or time.monotonic() - last_change < 0.5:
        time.sleep(0.02)
        now = _decided(stats)
        if now != last:
            if last == before:
                first_change = time.monotonic()
            last, last_change = now, time.monotonic()
    sent = json.loads(sender.stdout.read().decode().strip().splitlines()[-1])
    decided = last - before
    # The first change shows up to one stats interval after the first decision.
    busy = max(last_change - first_change + 0.1, 1e-3)
    return {"sent": sent["sent"], "send_seconds": round(sent["seconds"], 3),
            "send_rate": round(sent["sent"] / sent["seconds"]), "decided": decided,
            "dropped_by_kernel_queue": _queue_drops(lab) - drops_before,
            "decisions_per_second": round(decided / busy), "busy_seconds": round(busy, 2)}


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["_blast"]:
        source, destination, count, rate = args_list[1:5]
        print(json.dumps(blast(source, destination, int(count), float(rate))))
        return 0
    if args_list[:1] == ["_connect"]:
        host, source, count = args_list[1:4]
        print(json.dumps(connect_times(host, source, int(count))))
        return 0
    parser = argparse.ArgumentParser(prog="bench/interceptor.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=100_000)
    parser.add_argument("--paced-rate", type=float, default=10_000)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--connects", type=int, default=300)
    args = parser.parse_args(args_list)

    from netsetup.lab.topology import Lab

    with tempfile.TemporaryDirectory() as tmp, Lab("router") as lab:
        tmp_path = Path(tmp)
        stats = tmp_path / "interceptor.json"
        config = tmp_path / "mailgate.toml"
        config.write_text(f"""[network]
mode = "router"
[interceptor]
enabled = true
queue_max_len = 65536
bypass_sources = ["{BYPASSED}/32"]
stats_interval = 0.1
stats_file = "{stats}"
""")
        lab.ip(lab.sender, "addr", "add", f"{BYPASSED}/24", "dev", "eth0")
        lab.run(lab.gateway, [PYTHON, "-m", "netsetup.cli", "--config", str(config),
                              "--state-file", str(tmp_path / "state.json"), "apply"], cwd=ROOT)
        lab.spawn(lab.server, [PYTHON, "-m", "tests.lab.tcp_probes", "serve", "--port", "25"],
                  cwd=ROOT, stdout=subprocess.DEVNULL)
        lab.spawn(lab.gateway, [PYTHON, "-m", "proxies.tcprelay", "--port", "10025",
                                "--port", "10110"], cwd=ROOT, stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)
        interceptor = lab.spawn(lab.gateway, [PYTHON, "-m", "proxies.cli", "intercept",
                                              "--config", str(config)], cwd=ROOT,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not stats.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Let the listeners come up (the relay prints nothing here): wait for health.
        from interceptor.service import read_stats

        while time.monotonic() < deadline:
            data = read_stats(stats) or {}
            if data.get("proxies") and all(p["accepting"] for p in data["proxies"]):
                break
            time.sleep(0.05)
        results: dict[str, Any] = {}
        server = str(lab.server.ipv4)
        _run_sender(lab, "_connect", server, BYPASSED, "50")  # warm up caches and routes
        results["setup_bypassed_with_interceptor"] = _run_sender(
            lab, "_connect", server, BYPASSED, str(args.connects))
        results["setup_intercepted_via_proxy"] = _run_sender(
            lab, "_connect", server, str(lab.sender.ipv4), str(args.connects))
        results["paced"] = _measure_burst(lab, stats, int(args.paced_rate * args.seconds),
                                          args.paced_rate)
        # Above capacity for a while: what is decided per second of sending is the capacity.
        results["saturated_60k"] = _measure_burst(lab, stats, int(60_000 * args.seconds),
                                                  60_000)
        results["burst"] = _measure_burst(lab, stats, args.burst, 0)
        interceptor.terminate()
        interceptor.wait(timeout=10)
        results["setup_without_interceptor"] = _run_sender(
            lab, "_connect", server, BYPASSED, str(args.connects))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
