"""SMTP throughput, side by side in one run: direct, through a Postfix relay, through mailgate.

    python -m bench.smtp [--count 2000] [--sessions 20] [--sizes 10240,102400] [--rounds 5]

In one router-mode lab (sender 192.0.2.10, gateway, server 198.51.100.25):
  (a) smtp-source in the sender -> smtp-sink in the server, the gateway only routing;
  (b) smtp-source -> a Postfix relay on the gateway's own address (fsync before 250, as
      Postfix always does) -> smtp-sink;
  (c) smtp-source -> the server's address, intercepted by netsetup's TPROXY rules and
      answered by `mailgate run` (queue fsync before 250) -> smtp-sink.
smtp-source sends one message per connection. "accepted/s" is how fast the client got its
250s; "delivered/s" counts until the relay's queue is empty again. Latency percentiles come
from a separate asyncio client (one message per connection, same sessions) per path.
Needs root; everything lives in namespaces that are removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from netsetup.commands import run_in_namespace
from netsetup.lab.peers.postfix import Postfix
from netsetup.lab.peers.sink import SmtpSink, smtp_source
from netsetup.lab.topology import Host, Lab


def wait_for(check: object, timeout: float) -> float:
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.05)
    raise TimeoutError("timed out waiting for the queue to drain")


def cpu_by_group(netns: str) -> dict[str, float]:
    """CPU seconds (user + system) so far of the processes in `netns`, by what they are:
    "mailgate" (our processes, master and workers) or "postfix" (the relay's)."""
    import os
    import subprocess

    ticks = os.sysconf("SC_CLK_TCK")
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True,
                          text=True).stdout.split()
    groups: dict[str, float] = {"mailgate": 0.0, "postfix": 0.0, "master": 0.0,
                                "workers": 0.0}
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        group = "mailgate" if b"proxies." in cmdline else "postfix"
        seconds = (int(fields[11]) + int(fields[12])) / ticks
        groups[group] += seconds
        if group == "mailgate":
            groups["workers" if b"proxies.worker" in cmdline else "master"] += seconds
    return groups


def queue_files(queue_dir: Path) -> int:
    return sum(len(list((queue_dir / d).glob("*")))
               for d in ("incoming", "active", "deferred") if (queue_dir / d).exists())


LATENCY_CLIENT = r'''
import asyncio, sys, time, json
host = sys.argv[1]
port, count, sessions, size = (int(a) for a in sys.argv[2:6])
body = b"Subject: latency probe\r\n\r\n" + (b"x" * 76 + b"\r\n") * max(1, size // 78)
lat = []
async def one():
    r, w = await asyncio.open_connection(host, port)
    async def reply():
        while True:
            line = await r.readline()
            if line[3:4] != b"-":
                return line
    await reply()
    w.write(b"EHLO bench.lab.example\r\n"); await reply()
    t = time.monotonic()
    w.write(b"MAIL FROM:<bench@sender.example>\r\n"); await reply()
    w.write(b"RCPT TO:<sink@example.com>\r\n"); await reply()
    w.write(b"DATA\r\n"); await reply()
    w.write(body + b".\r\n"); line = await reply()
    lat.append(time.monotonic() - t)
    assert line.startswith(b"250"), line
    w.write(b"QUIT\r\n"); await reply(); w.close()
async def worker(n):
    for _ in range(n):
        await one()
async def main():
    await asyncio.gather(*(worker(count // sessions) for _ in range(sessions)))
asyncio.run(main())
print(json.dumps(sorted(lat)))
'''


def latency(lab: Lab, host: Host, server: str, port: int, count: int, sessions: int,
            size: int) -> tuple[float, float]:
    import json

    result = lab.run(host, [sys.executable, "-c", LATENCY_CLIENT, server, str(port), str(count),
                            str(sessions), str(size)], timeout=600)
    return percentiles(json.loads(result.stdout))


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds of sorted durations in seconds."""
    p50 = statistics.median(values) * 1000
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))] * 1000
    return p50, p99


def mailgate_config(path: Path, queue_dir: Path, workers: int, log_level: str,
                    smtp_extra: str = "") -> Path:
    """Write the router-mode mailgate.toml the SMTP benchmarks use (interception of port 25,
    relay for example.com, TLS off, limits out of the way); `smtp_extra`: more [smtp] lines."""
    path.write_text(textwrap.dedent(f"""\
        [network]
        mode = "router"
        intercept = ["smtp"]
        ipv6 = false
        [smtp]
        hostname = "gateway.lab.example"
        relay_domains = ["example.com"]
        queue_dir = "{queue_dir}"
        max_connections = 1000
        max_connections_per_client = 1000
        workers = {workers}
        tls = false
        """) + smtp_extra + textwrap.dedent(f"""\
        [log]
        level = "{log_level}"
        """))
    return path


def start_mailgate(lab: Lab, config: Path, queue_dir: Path, log_path: Path
                   ) -> subprocess.Popen[bytes]:
    """`mailgate run` in the gateway (netsetup applied already), once its workers listen."""
    log = log_path.open("w")
    process = lab.spawn(lab.gateway, [sys.executable, "-m", "proxies.cli", "run", "--config",
                                      str(config)], stdout=log, stderr=log)
    log.close()  # the child has its own copy
    wait_for(lambda: (queue_dir / "master.pid").exists(), 30)
    time.sleep(1.0)  # workers bind after the master
    return process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smtp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="messages per run")
    parser.add_argument("--sessions", type=int, default=20, help="parallel sessions")
    parser.add_argument("--sizes", default="10240,102400", help="message sizes in bytes")
    parser.add_argument("--workers", type=int, default=0,
                        help="smtp.workers for mailgate (0: as many as CPUs)")
    parser.add_argument("--log-level", default="warning", help="mailgate's log level")
    parser.add_argument("--only", help="run only this path: direct, postfix, mailgate")
    parser.add_argument("--frontend", choices=("mailgate", "aiosmtpd"), default="mailgate",
                        help="mailgate's [smtp] frontend: ours, or aiosmtpd's SMTP class (the "
                        "reference front end, which is how the gateway accepted mail before)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the paths this many times, alternating, and report the "
                        "median of the rounds' ratios (Postfix's own rate varies by a third "
                        "between runs here, so one round's ratio is a noisy figure)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    sizes = [int(s) for s in args.sizes.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="mailgate-bench-"))
    workdir.chmod(0o755)
    rows: list[tuple[str, int, float, float, float, float, int]] = []
    with Lab("router") as lab:
        server_ip = lab.server.ipv4
        gateway_ip = lab.gateway_address("sender")
        assert server_ip is not None
        # -c: its running message counter, which tells when a relay has delivered them all.
        sink = SmtpSink.start(lab, lab.server, workdir / "sink", backlog=1024,
                              extra_args=["-c"])
        Postfix.relay(lab, lab.gateway, f"[{server_ip}]:25", workdir / "relay",
                      listen=(f"{gateway_ip}:25",), relay_domains=["example.com"],
                      extra={"default_process_limit": "200",
                             "smtpd_client_connection_count_limit": "0",
                             "smtpd_client_connection_rate_limit": "0",
                             "default_destination_concurrency_limit": "20"})
        import os

        workers = args.workers or os.cpu_count() or 1
        queue_dir = workdir / "queue"
        config = mailgate_config(workdir / "mailgate.toml", queue_dir, workers, args.log_level,
                                 f'frontend = "{args.frontend}"\n')
        applied = run_in_namespace(lab.gateway.netns, "apply", config, workdir / "state.json")
        if applied.returncode != 0:
            print(applied.stdout + applied.stderr, file=sys.stderr)
            return 1
        start_mailgate(lab, config, queue_dir, workdir / "mailgate.log")
        # Direct: the interception rules only take port 25, so the sink listens on 2525 too.
        direct_sink = SmtpSink.start(lab, lab.server, workdir / "sink2525", port=2525,
                                     backlog=1024)
        for size, round_no in ((size, r) for size in sizes for r in range(args.rounds)):
            for name, target, port in (("direct", server_ip, 2525),
                                       ("postfix relay", gateway_ip, 25),
                                       ("mailgate", server_ip, 25)):
                if args.only and not name.startswith(args.only):
                    continue
                cpu_before = cpu_by_group(lab.gateway.netns)
                received = sink.counted()
                run = smtp_source(lab, lab.sender, target, port, count=args.count,
                                  sessions=args.sessions, size=size)
                # Until the sink has them all: mailgate delivers most messages straight from
                # its journal, so an empty queue directory proves nothing.
                expected = received + args.count
                drained = 0.0 if name == "direct" else wait_for(
                    lambda expected=expected: sink.counted() >= expected, 600)
                delivered = args.count / (run.seconds + drained)
                cpu_after = cpu_by_group(lab.gateway.netns)
                group = {"postfix relay": "postfix", "mailgate": "mailgate"}.get(name)
                cpu_us = (1e6 * (cpu_after[group] - cpu_before[group]) / args.count
                          if group else 0.0)

                def split(part: str, after: dict[str, float] = cpu_after,
                          before: dict[str, float] = cpu_before) -> float:
                    return 1e6 * (after[part] - before[part]) / args.count
                p50, p99 = latency(lab, lab.sender, target, port, min(400, args.count),
                                   args.sessions, size)
                rows.append((name, size, run.rate, delivered, p50, p99, round_no))
                print(f"{name:14} {size // 1024:4d} KiB  accepted {run.rate:7.0f}/s  "
                      f"delivered {delivered:7.0f}/s  p50 {p50:6.1f} ms  p99 {p99:6.1f} ms"
                      + (f"  cpu {cpu_us:6.0f} us/msg" if group else "")
                      + (f" (master {split('master'):.0f}, workers {split('workers'):.0f})"
                         if group == "mailgate" else ""), flush=True)
        direct_sink.stop()
        sink.stop()
        run_in_namespace(lab.gateway.netns, "teardown", config, workdir / "state.json")
    # Kept when something failed (the logs say why); a run that worked leaves nothing.
    shutil.rmtree(workdir, ignore_errors=True)
    print()
    for size in sizes if not args.only else []:
        accepted, delivered_ratios, direct_ratios = [], [], []
        for round_no in range(args.rounds):
            by_name = {r[0]: r for r in rows if r[1] == size and r[6] == round_no}
            mg, pf, direct = by_name["mailgate"], by_name["postfix relay"], by_name["direct"]
            accepted.append(mg[2] / pf[2])
            delivered_ratios.append(mg[3] / pf[3])
            direct_ratios.append(mg[2] / direct[2])
        label = f"{size // 1024} KiB:" if args.rounds == 1 else \
            f"{size // 1024} KiB, median of {args.rounds} rounds:"
        print(f"{label} mailgate/postfix accepted {statistics.median(accepted):.2f}x, "
              f"delivered {statistics.median(delivered_ratios):.2f}x; mailgate/direct "
              f"accepted {statistics.median(direct_ratios):.2f}x")
        if args.rounds > 1:
            print("    delivered ratio per round: "
                  + ", ".join(f"{r:.2f}" for r in delivered_ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
