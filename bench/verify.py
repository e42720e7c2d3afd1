"""What recipient verification costs, side by side in one run: verify_recipients off and on.

    python -m bench.verify [--count 2000] [--sessions 20] [--rcpts 1000] [--rounds 4]

In one router-mode lab (sender 192.0.2.10, gateway, server 198.51.100.25), with smtp-sink in
the server and `mailgate run` in the gateway answering what netsetup's TPROXY rules intercept,
once with `[smtp] verify_recipients = false` and once with `true`:
  (1) warm cache: smtp-source in the sender sends --count messages (one per connection,
      --sessions at once) to sink@example.com, which one message sent before has put in the
      verification cache. "delivered/s" counts until smtp-sink has them all (its own message
      counter); "cpu" is what mailgate's processes spent per message. "verification costs X%
      of throughput" is 1 - on/off of delivered/s; the bar is at most 5 %.
  (2) cold cache: an asyncio client in the sender opens --rcpts sessions (EHLO, MAIL, one RCPT,
      QUIT; --rcpt-sessions at once) for recipients never seen before (user-N@example.com, N
      counting over the whole run; smtp-sink takes any), timing from sending RCPT to reading
      its reply. With verification on, each is a probe to the server (EHLO, MAIL FROM:<>,
      RCPT, QUIT) before the reply; the cache is checked to have gained one entry per
      recipient. The same client with the warm recipient, for comparison. p50/p99 in ms of
      both sides and what verification adds.
Each round restarts mailgate per side, and the rounds alternate the order (off, on, on, off,
...) so that a machine getting slower or faster during the run favours neither side. Rates are
averaged over the rounds (the range in brackets: on a busy machine fsync times, and with them
the rates, vary a lot from one round to the next), latencies pooled. Needs root; everything
lives in namespaces removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.smtp import (
    cpu_by_group,
    mailgate_config,
    percentiles,
    queue_files,
    start_mailgate,
    wait_for,
)
from netsetup.commands import run_in_namespace
from netsetup.lab.peers.sink import SmtpSink, smtp_source
from netsetup.lab.topology import Lab

WARM_RCPT = "sink@example.com"  # smtp-source's recipient
SIDES = ("off", "on")

RCPT_CLIENT = r'''
import asyncio, json, sys, time
host = sys.argv[1]
port, count, sessions, first = (int(a) for a in sys.argv[2:6])
fixed = sys.argv[6]
numbers = iter(range(first, first + count))
lat = []
async def reply(r):
    while True:
        line = await r.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line
async def worker():
    for n in numbers:
        rcpt = fixed or f"user-{n}@example.com"
        r, w = await asyncio.open_connection(host, port)
        await reply(r)
        w.write(b"EHLO bench.lab.example\r\n"); await reply(r)
        w.write(b"MAIL FROM:<bench@sender.example>\r\n"); await reply(r)
        t = time.perf_counter()
        w.write(f"RCPT TO:<{rcpt}>\r\n".encode()); line = await reply(r)
        lat.append(time.perf_counter() - t)
        assert line.startswith(b"250"), (rcpt, line)
        w.write(b"QUIT\r\n"); await reply(r); w.close(); await w.wait_closed()
async def main():
    await asyncio.gather(*(worker() for _ in range(sessions)))
asyncio.run(main())
print(json.dumps(lat))
'''

def cache_entries(queue_dir: Path) -> int:
    """Recipients the verification cache holds as accepted by the server."""
    path = queue_dir / "verify.db"
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=5)
    try:
        (count,) = db.execute("SELECT count(*) FROM verify WHERE status = 'ok'").fetchone()
    finally:
        db.close()
    return int(count)


@dataclass
class Side:
    accepted: list[float] = field(default_factory=list)
    delivered: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    cold: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def spread(values: list[float]) -> str:
    return f"({min(values):.0f}-{max(values):.0f})"


class Bench:
    def __init__(self, lab: Lab, sink: SmtpSink, server_ip: str, args: argparse.Namespace
                 ) -> None:
        self.lab = lab
        self.sink = sink
        self.server_ip = server_ip
        self.args = args
        self.next_rcpt = 0  # user-N@example.com: never the same N twice in a run

    def send(self, count: int, sessions: int) -> tuple[float, float, float]:
        """smtp-source -> mailgate -> smtp-sink: accepted/s, delivered/s, cpu us/msg."""
        before = self.sink.counted()
        cpu_before = cpu_by_group(self.lab.gateway.netns)
        run = smtp_source(self.lab, self.lab.sender, self.server_ip, 25, count=count,
                          sessions=sessions, size=self.args.size)
        drained = wait_for(lambda: self.sink.counted() >= before + count, 600)
        cpu_after = cpu_by_group(self.lab.gateway.netns)
        cpu_us = 1e6 * (cpu_after["mailgate"] - cpu_before["mailgate"]) / count
        return run.rate, count / (run.seconds + drained), cpu_us

    def rcpt_latency(self, count: int, fixed: str = "") -> list[float]:
        """RCPT-to-reply times (s) of `count` sessions: fresh recipients unless `fixed`."""
        first = self.next_rcpt
        if not fixed:
            self.next_rcpt += count
        result = self.lab.run(self.lab.sender, [
            sys.executable, "-c", RCPT_CLIENT, self.server_ip, "25", str(count),
            str(self.args.rcpt_sessions), str(first), fixed], timeout=600)
        values: list[float] = json.loads(result.stdout)
        return values

    def side(self, name: str, config: Path, queue_dir: Path, log: Path, into: Side,
             round_: int) -> None:
        args = self.args
        process = start_mailgate(self.lab, config, queue_dir, log)
        try:
            # The warm recipient: in the cache from here on (with verification on).
            self.send(1, 1)
            accepted, delivered, cpu_us = self.send(args.count, args.sessions)
            entries = cache_entries(queue_dir)
            cold = self.rcpt_latency(args.rcpts)
            probed = cache_entries(queue_dir) - entries
            if name == "on" and probed < args.rcpts:
                raise RuntimeError(f"{args.rcpts} new recipients but {probed} new cache "
                                   "entries: not every RCPT was verified")
            warm = self.rcpt_latency(args.rcpts, WARM_RCPT)
        finally:
            stop_mailgate(process, queue_dir)
        into.accepted.append(accepted)
        into.delivered.append(delivered)
        into.cpu_us.append(cpu_us)
        into.cold += cold
        into.warm += warm
        c50, c99 = percentiles(sorted(cold))
        w50, w99 = percentiles(sorted(warm))
        print(f"round {round_}  verify {name:3}  accepted {accepted:6.0f}/s  delivered "
              f"{delivered:6.0f}/s  cpu {cpu_us:5.0f} us/msg  RCPT cold p50 {c50:5.2f} ms "
              f"p99 {c99:5.2f} ms  warm p50 {w50:5.2f} ms p99 {w99:5.2f} ms"
              + (f"  ({probed} probes)" if name == "on" else ""), flush=True)


def stop_mailgate(process: subprocess.Popen[bytes], queue_dir: Path) -> None:
    """SIGTERM `mailgate run` and wait until it has stopped (its pid file goes last)."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
    wait_for(lambda: not (queue_dir / "master.pid").exists(), 10)


def report(sides: dict[str, Side], args: argparse.Namespace) -> None:
    off, on = sides["off"], sides["on"]
    print()
    print(f"Warm cache: {args.count} messages of {args.size // 1024} KiB per round, "
          f"{args.sessions} sessions, {args.rounds} round(s), mean")
    for name, side in (("false", off), ("true", on)):
        print(f"  verify_recipients = {name:5}  accepted {mean(side.accepted):4.0f}/s "
              f"{spread(side.accepted)}  delivered {mean(side.delivered):4.0f}/s "
              f"{spread(side.delivered)}  cpu {mean(side.cpu_us):5.0f} us/msg "
              f"{spread(side.cpu_us)}")
    cost = 100 * (1 - mean(on.delivered) / mean(off.delivered))
    accepted_cost = 100 * (1 - mean(on.accepted) / mean(off.accepted))
    print(f"  verification costs {cost:.1f}% of throughput (delivered/s; bar: at most 5%); "
          f"accepted/s {accepted_cost:.1f}%, cpu {mean(on.cpu_us) - mean(off.cpu_us):+.0f} "
          "us/msg")
    print()
    print(f"RCPT latency, ms: {args.rcpts} sessions per round and side, {args.rcpt_sessions} "
          "at a time; p50 / p99")
    print(f"  {'':16}  {'off':>15}  {'on':>15}  {'added':>15}")
    for label, attr in (("cold recipient", "cold"), ("warm recipient", "warm")):
        o50, o99 = percentiles(sorted(getattr(off, attr)))
        n50, n99 = percentiles(sorted(getattr(on, attr)))
        print(f"  {label:16}  {o50:6.2f} / {o99:6.2f}  {n50:6.2f} / {n99:6.2f}  "
              f"{n50 - o50:+6.2f} / {n99 - o99:+6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000,
                        help="messages per round and side (warm cache throughput)")
    parser.add_argument("--sessions", type=int, default=20,
                        help="parallel smtp-source sessions")
    parser.add_argument("--size", type=int, default=10240, help="message size in bytes")
    parser.add_argument("--rcpts", type=int, default=1000,
                        help="RCPT sessions per round and side, cold and warm each")
    parser.add_argument("--rcpt-sessions", type=int, default=1,
                        help="parallel sessions of the RCPT latency client")
    parser.add_argument("--rounds", type=int, default=4,
                        help="rounds; odd ones run off then on, even ones on then off")
    parser.add_argument("--workers", type=int, default=0,
                        help="smtp.workers for mailgate (0: as many as CPUs)")
    parser.add_argument("--log-level", default="warning", help="mailgate's log level")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="mailgate-bench-verify-"))
    workdir.chmod(0o755)
    workers = args.workers or os.cpu_count() or 1
    configs = {name: mailgate_config(
        workdir / f"mailgate-{name}.toml", workdir / f"queue-{name}", workers, args.log_level,
        f"verify_recipients = {'true' if name == 'on' else 'false'}\n") for name in SIDES}
    sides = {name: Side() for name in SIDES}
    ok = False
    with Lab("router") as lab:
        server_ip = lab.server.ipv4
        assert server_ip is not None
        # -c: its running message counter in its log, which tells when all are delivered.
        sink = SmtpSink.start(lab, lab.server, workdir / "sink", backlog=1024,
                              extra_args=["-c"])
        # The [network] sections are the same: one apply for both.
        applied = run_in_namespace(lab.gateway.netns, "apply", configs["off"],
                                   workdir / "state.json")
        if applied.returncode != 0:
            print(applied.stdout + applied.stderr, file=sys.stderr)
            return 1
        try:
            bench = Bench(lab, sink, server_ip, args)
            for round_ in range(1, args.rounds + 1):
                for name in SIDES if round_ % 2 else SIDES[::-1]:
                    bench.side(name, configs[name], workdir / f"queue-{name}",
                               workdir / f"mailgate-{name}-{round_}.log", sides[name], round_)
            for name in SIDES:
                left = queue_files(workdir / f"queue-{name}")
                if left:
                    print(f"verify {name}: {left} message(s) left in the queue", file=sys.stderr)
            ok = True
        finally:
            sink.stop()
            run_in_namespace(lab.gateway.netns, "teardown", configs["off"],
                             workdir / "state.json")
            if not ok:
                print(f"logs kept in {workdir}", file=sys.stderr)
    report(sides, args)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
