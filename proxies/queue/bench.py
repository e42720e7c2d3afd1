"""Accept throughput of the queue: `python -m proxies.queue.bench [--dir DIR]`.

Measures messages per second made durable (file fsync + directory fsync) by `Queue.accept`,
one at a time and with N concurrent sessions sharing group commits. Not a test: numbers
depend on the disk. The queue is made in a fresh temporary directory under --dir.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from proxies.queue.model import Envelope, QueueError
from proxies.queue.store import Queue


async def _run(queue: Queue, total: int, concurrency: int, content: bytes,
               naive: bool) -> float:
    envelope = Envelope(sender="alice@example.com", recipients=("bob@example.org",),
                        client_address="192.0.2.10", client_port=40000,
                        original_destination=("198.51.100.25", 25), helo="client.example",
                        protocol="ESMTP")
    per_session = total // concurrency

    async def session() -> None:
        for _ in range(per_session):
            if naive:  # no group commit: every message pays its own directory fsync
                await asyncio.to_thread(queue._store_now, envelope, content)
            else:
                await queue.accept(envelope, content)

    start = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(concurrency)))
    return per_session * concurrency / (time.perf_counter() - start)


def _count_batches(queue: Queue) -> list[int]:
    """Record the size of each group commit (messages per directory fsync)."""
    batches: list[int] = []
    commit = queue._commit_batch

    def counting(items: list[tuple[str, Path, bool]]) -> list[QueueError | None]:
        batches.append(len(items))
        return commit(items)

    queue._commit_batch = counting  # type: ignore[method-assign]
    return batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxies.queue.bench",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="make the test queue under this directory (default: %(default)s)")
    parser.add_argument("-n", "--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=10 * 1024, help="bytes per message")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--threads", type=int, default=16, help="writer threads")
    parser.add_argument("--naive", action="store_true",
                        help="for comparison: one directory fsync per message, no group commit")
    args = parser.parse_args(argv)
    content = b"Subject: bench\r\n\r\n" + b"x" * max(0, args.size - 18)
    for concurrency in args.concurrency:
        root = Path(tempfile.mkdtemp(prefix="mailgate-bench-", dir=args.dir))
        try:
            queue = Queue(root, hostname="bench.example", write_threads=args.threads)
            batches = _count_batches(queue)
            rate = asyncio.run(_run(queue, args.messages, concurrency, content, args.naive))
            queue.close()
        finally:
            shutil.rmtree(root, ignore_errors=True)
        per_fsync = f"{sum(batches) / len(batches):.1f}" if batches else "1"
        print(f"{concurrency:3d} concurrent: {rate:8.0f} messages/s, {per_fsync} messages per "
              f"directory fsync ({args.size // 1024} KiB, {args.messages} messages, "
              f"{'naive, ' if args.naive else ''}{args.dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
