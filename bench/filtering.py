"""Content-filtering throughput: messages/s through the gateway with clamd + spamd on, against
the scanners' own rate when one client calls them directly with the same messages.

    python -m bench.filtering [--count 200] [--concurrency 4]

In one router-mode lab: clamd (EICAR-only database) and spamd (Debian's shipped rules) run in
the gateway with `mailgate run` ([scan] clamd + spamd); smtp-sink in the server. Gateway rate:
an SMTP client in the sender sends the messages to the server's port 25 (intercepted),
`concurrency` sessions at once, one message per session, and the clock stops at the last 250.
Direct rate: in the gateway, one asyncio client scans the same messages with mailgate's own
clamd + spamd clients (the same code the filter uses), `concurrency` at a time. The ratio says
how much of the scanners' capacity the gateway path keeps. Needs root; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import smtplib
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SERVER = "198.51.100.25"
SPAMD_PORT = 7783
WORDS = (
    "meeting", "report", "budget", "quarter", "invoice", "project", "schedule", "review", "draft",
    "please", "thanks", "regards", "attached", "update", "team", "customer", "order", "delivery",
    "price", "offer",
)


def messages(count: int, size: int = 6000) -> list[bytes]:
    """`count` distinct, realistic-looking text messages of about `size` bytes (fixed seed)."""
    rng = random.Random(1)
    out = []
    for index in range(count):
        lines: list[str] = []
        while sum(len(line) + 2 for line in lines) < size:
            lines.append(" ".join(rng.choice(WORDS) for _ in range(11)).capitalize() + ".")
        out.append((f"From: Alice <alice@sender.example>\r\nTo: <bob@example.com>\r\n"
                    f"Subject: {rng.choice(WORDS)} {index}\r\n"
                    f"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
                    f"Message-ID: <bench{index}@sender.example>\r\n\r\n"
                    + "\r\n".join(lines) + "\r\n").encode())
    return out


# --- the two clients (run inside lab hosts by the orchestrator below) ------------------------


def send(count: int, concurrency: int) -> dict[str, float]:
    batch = messages(count)

    def one(content: bytes) -> int:
        with smtplib.SMTP(SERVER, 25, local_hostname="sender.lab.example", timeout=120) as smtp:
            smtp.sendmail("alice@sender.example", ["bob@example.com"], content)
        return 1

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        sent = sum(pool.map(one, batch))
    return {"messages": sent, "seconds": time.monotonic() - started}


def direct(count: int, concurrency: int, clamd_socket: str) -> dict[str, float]:
    from proxies.scan.config import ScanConfig, ScannerConfig, SocketAddress
    from proxies.scan.filter import build_multi_scanner

    def scanner(address: SocketAddress) -> ScannerConfig:
        return ScannerConfig(address, timeout=60, max_size=25 << 20, concurrency=concurrency)

    config = ScanConfig(clamd=scanner(SocketAddress(path=Path(clamd_socket))),
                        spamd=scanner(SocketAddress(host="127.0.0.1", port=SPAMD_PORT)))
    batch = messages(count)

    async def run() -> dict[str, float]:
        multi = build_multi_scanner(config)
        slots = asyncio.Semaphore(concurrency)
        verdicts: dict[str, int] = {}

        async def one(content: bytes) -> None:
            async with slots:
                result = await multi.scan(content)
            verdicts[result.verdict] = verdicts.get(result.verdict, 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(one(m) for m in batch))
        seconds = time.monotonic() - started
        multi.close()
        return {"messages": sum(verdicts.values()), "seconds": seconds,
                "failed": verdicts.get("failed", 0)}

    return asyncio.run(run())


# --- the orchestrator ------------------------------------------------------------------------


def bench(count: int, concurrency: int) -> None:
    from netsetup.lab.peers._common import wait_until
    from netsetup.lab.peers.clamd import Clamd
    from netsetup.lab.peers.sink import SmtpSink
    from netsetup.lab.peers.spamd import Spamd
    from netsetup.lab.topology import Lab

    with tempfile.TemporaryDirectory(prefix="mailgate-bench-") as tmp, Lab("router") as lab:
        base = Path(tmp)
        SmtpSink.start(lab, lab.server, base / "sink", port=25)
        clamd = Clamd.start(lab, lab.gateway, base / "clamd", tcp=None)
        Spamd.start(lab, lab.gateway, base / "spamd", port=SPAMD_PORT,
                    children=max(2, concurrency))
        config = base / "mailgate.toml"
        config.write_text(f"""\
[network]
mode = "router"
intercept = ["smtp"]
ipv6 = false
spoof_source = false
[smtp]
hostname = "gw.lab.example"
relay_domains = ["example.com"]
queue_dir = "{base / 'queue'}"
tls = false
[scan]
clamd = "unix:{clamd.socket_path}"
spamd = "127.0.0.1:{SPAMD_PORT}"
concurrency = {concurrency}
timeout = "60s"
[log]
level = "warning"
""")
        lab.run(lab.gateway, [PYTHON, "-m", "netsetup.cli", "--config", str(config),
                              "--state-file", str(base / "netsetup.json"), "apply"], cwd=ROOT)
        log = base / "mailgate.log"
        with log.open("ab") as out:
            lab.spawn(lab.gateway, [PYTHON, "-m", "proxies.cli", "run", "--config", str(config)],
                      stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        queue_pid = base / "queue" / "master.pid"
        wait_until(queue_pid.exists, "mailgate run", 20)
        # Let spamd's children warm up (the first messages of each child are slower).
        warm = [PYTHON, "-m", "bench.filtering", "direct", "--count", str(2 * concurrency),
                "--concurrency", str(concurrency), "--clamd", str(clamd.socket_path)]
        lab.run(lab.gateway, warm, cwd=ROOT, timeout=600)
        direct_argv = [*warm[:5], str(count), *warm[6:]]
        # Direct before and after the gateway run, so neither side gets the warmer spamd.
        before = json.loads(lab.run(lab.gateway, direct_argv, cwd=ROOT, timeout=600).stdout)
        gateway_run = json.loads(lab.run(
            lab.sender, [PYTHON, "-m", "bench.filtering", "send", "--count", str(count),
                         "--concurrency", str(concurrency)], cwd=ROOT, timeout=1200).stdout)
        after = json.loads(lab.run(lab.gateway, direct_argv, cwd=ROOT, timeout=600).stdout)
    direct_run = {"messages": before["messages"] + after["messages"],
                  "seconds": before["seconds"] + after["seconds"],
                  "failed": before["failed"] + after["failed"]}
    direct_rate = direct_run["messages"] / direct_run["seconds"]
    gateway_rate = gateway_run["messages"] / gateway_run["seconds"]
    print(f"{count} messages of ~6 KB, {concurrency} at a time, clamd + spamd")
    print(f"  scanners called directly (one client): {direct_rate:7.1f} msg/s "
          f"(before {before['messages'] / before['seconds']:.1f}, after "
          f"{after['messages'] / after['seconds']:.1f}; {direct_run['failed']} failed)")
    print(f"  through the gateway (SMTP, scan, queue): {gateway_rate:7.1f} msg/s "
          f"({gateway_run['seconds']:.1f} s)")
    print(f"  ratio gateway / direct: {gateway_rate / direct_rate:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.filtering",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("role", nargs="?", default="bench", choices=("bench", "send", "direct"),
                        help="'bench' (default) runs everything; the others are its helpers")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--clamd", help="clamd's socket (direct)")
    args = parser.parse_args(argv)
    if args.role == "send":
        print(json.dumps(send(args.count, args.concurrency)))
    elif args.role == "direct":
        print(json.dumps(direct(args.count, args.concurrency, args.clamd)))
    else:
        bench(args.count, args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
