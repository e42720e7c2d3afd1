"""The accept path alone, side by side in one run: the queue's journal against a file per
message.

    python -m bench.accept [--count 4000] [--sessions 20] [--size 10240]

In this process: the SMTP front end, the policy handler and the queue, on a loopback port,
with nothing delivered (no verification, no scanners); Postfix's smtp-source sends one message
per connection. Each path gets a fresh queue directory. Printed per path: messages accepted
per second and this process's CPU per message (user and system, from getrusage), then the
journal's ratio. What it isolates is the cost of making a message durable before the 250;
`bench.smtp` measures the whole gateway against a Postfix relay.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from proxies.config import load_config
from proxies.queue import Queue
from proxies.run import make_front_end, smtp_listeners
from proxies.scan.filter import build_filter
from proxies.smtp.handler import GatewayHandler


async def _run(workdir: Path, journal: bool, args: argparse.Namespace) -> tuple[float, float,
                                                                                    float]:
    config_path = workdir / "mailgate.toml"
    config_path.write_text(textwrap.dedent(f"""\
        [network]
        mode = "router"
        intercept = ["smtp"]
        ipv6 = false
        [smtp]
        listen = {args.port}
        hostname = "gateway.lab.example"
        relay_domains = ["example.com"]
        queue_dir = "{workdir / 'queue'}"
        max_connections = 1000
        max_connections_per_client = 1000
        workers = 1
        tls = false
        verify_recipients = false
        [log]
        level = "warning"
        """))
    config = load_config(config_path)
    queue = Queue(config.smtp.queue_dir, hostname="gateway.lab.example", use_journal=journal,
                  delivers=False)
    handler = GatewayHandler(config.smtp, queue, build_filter(config.scan), on_queued=None,
                             verifier=None)
    front = make_front_end(config, handler, None)
    await front.start(smtp_listeners(config))
    try:
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        source = await asyncio.create_subprocess_exec(
            "smtp-source", "-s", str(args.sessions), "-m", str(args.count), "-l",
            str(args.size), "-f", "alice@sender.example", "-t", "bob@example.com",
            f"127.0.0.1:{args.port}")
        if await source.wait() != 0:
            raise SystemExit("smtp-source failed")
        after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
    finally:
        await front.stop()
        queue.close()
    user = (after.ru_utime - before.ru_utime) / args.count * 1e6
    system = (after.ru_stime - before.ru_stime) / args.count * 1e6
    return args.count / seconds, user, system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.accept", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=4000, help="messages per path")
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source's sessions")
    parser.add_argument("--size", type=int, default=10240, help="message size in bytes")
    parser.add_argument("--port", type=int, default=12525, help="loopback port to listen on")
    args = parser.parse_args(argv)
    if shutil.which("smtp-source") is None:
        print("bench.accept needs Postfix's smtp-source (make setup installs it)", file=sys.stderr)
        return 1
    results = {}
    for name, journal in (("file per message", False), ("journal", True)):
        workdir = Path(tempfile.mkdtemp(prefix="mailgate-bench-accept-"))
        try:
            rate, user, system = asyncio.run(_run(workdir, journal, args))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        results[name] = (rate, user + system)
        print(f"{name:18} {args.size // 1024} KiB  accepted {rate:6.0f}/s  cpu {user + system:6.0f}"
              f" us/msg (user {user:.0f}, sys {system:.0f})", flush=True)
    (file_rate, file_cpu), (journal_rate, journal_cpu) = results.values()
    print(f"\njournal/file: accepted {journal_rate / file_rate:.2f}x, "
          f"cpu per message {journal_cpu / file_cpu:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
