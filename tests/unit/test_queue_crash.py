"""Kill an accepting process at random moments: nothing it acknowledged may be lost.

The child prints a queue id only after `accept` returned (when the front end would answer
250); after each SIGKILL, and after recovery, every printed id must be in the queue, complete
and with its content intact, and nothing half-written may be left or taken for a message.
(SIGKILL tests the protocol of renames and end records; the fsyncs against power loss cannot
be tested without pulling a plug.)
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from proxies.queue import DeliveryResult, Queue

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import asyncio, sys
from pathlib import Path
from proxies.queue import Envelope, Queue

def content(n):
    return b"Subject: message %d\r\n\r\n" % n + bytes([65 + n % 26]) * (n % 7 * 20000)

async def main(directory, first):
    queue = Queue(Path(directory), hostname="crash.example", use_journal=True)
    counter = iter(range(first, first + 10**9))

    async def session():
        while True:
            n = next(counter)
            env = Envelope(sender="a@example.com", recipients=("b@example.org",))
            queue_id = await queue.accept(env, content(n))
            sys.stdout.write(f"{queue_id} {n}\n")
            sys.stdout.flush()

    await asyncio.gather(*(session() for _ in range(8)))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def expected_content(n: int) -> bytes:
    return b"Subject: message %d\r\n\r\n" % n + bytes([65 + n % 26]) * (n % 7 * 20000)


def run_and_kill(directory: Path, first: int, delay: float) -> list[tuple[str, int]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(directory), str(first)],
                             stdout=subprocess.PIPE, env=env, cwd=REPO)
    assert child.stdout is not None
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout or []), daemon=True)
    reader.start()
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    reader.join(10)
    acknowledged = []
    for line in lines:
        if line.endswith(b"\n"):  # a torn line was never a complete acknowledgement
            queue_id, n = line.decode().split()
            acknowledged.append((queue_id, int(n)))
    return acknowledged


def test_sigkill_never_loses_an_acknowledged_message(tmp_path: Path) -> None:
    rng = random.Random(os.environ.get("QUEUE_CRASH_SEED", "mailgate"))
    acknowledged: list[tuple[str, int]] = []
    for round_number in range(6):
        # The first 0.5 s include the interpreter's start-up; kill at a random moment after.
        acknowledged += run_and_kill(tmp_path, round_number * 10**6, 0.5 + rng.random() * 0.7)
    assert len(acknowledged) > 20, "the child accepted too little to test anything"

    queue = Queue(tmp_path, hostname="gw.example")
    report = queue.recover()
    assert report.corrupt == 0
    leftovers = [n for n in os.listdir(tmp_path / "incoming") if n.endswith(".tmp")]
    assert leftovers == []
    queued = set(queue.due())
    assert report.queued == len(queued)
    for queue_id, n in acknowledged:
        assert queue_id in queued, f"acknowledged message {queue_id} was lost"
        claimed = queue.claim(queue_id)  # verifies the end record and the checksums
        assert claimed is not None and claimed.content == expected_content(n)
    # Messages committed but killed before printing may be there too; all must be whole.
    for queue_id in queued - {queue_id for queue_id, _ in acknowledged}:
        assert queue.claim(queue_id) is not None
    assert os.listdir(tmp_path / "corrupt") == []


ACCEPTOR = r"""
import asyncio, sys
from pathlib import Path
from proxies.queue import Envelope, Queue

async def main(directory, count):
    queue = Queue(Path(directory), hostname="acceptor.example", use_journal=True)
    env = Envelope(sender="a@example.com", recipients=("b@example.org",))

    async def session(k):
        for i in range(k, count, 5):
            queue_id = await queue.accept(env, b"Subject: %d\r\n\r\nbody\r\n" % i)
            print(queue_id, flush=True)

    await asyncio.gather(*(session(k) for k in range(5)))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_several_acceptor_processes_and_one_scheduler(tmp_path: Path) -> None:
    """Acceptors in other processes (SO_REUSEPORT workers) fill the queue while this
    process recovers, rescans, claims and delivers: every message is delivered exactly once."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    queue = Queue(tmp_path, hostname="gw.example")
    acceptors = [subprocess.Popen([sys.executable, "-c", ACCEPTOR, str(tmp_path), "150"],
                                  stdout=subprocess.PIPE, env=env, cwd=REPO)
                 for _ in range(3)]
    outputs: list[list[bytes]] = [[] for _ in acceptors]
    readers = [threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout or []),
                                daemon=True) for p, out in zip(acceptors, outputs, strict=True)]
    for reader in readers:
        reader.start()
    delivered: list[str] = []
    recovered = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = any(p.poll() is None for p in acceptors)
        if delivered and not recovered:
            # Recovery while others write must leave their unfinished files alone.
            assert queue.recover().removed_partial == 0
            recovered = True
        queue.rescan()
        due = queue.due()
        for queue_id in due:
            claimed = queue.claim(queue_id)
            assert claimed is not None
            outcome = queue.record_attempt(queue_id, DeliveryResult(250, "2.0.0 ok"))
            assert outcome.removed
            delivered.append(queue_id)
        if not running and not due:
            break
        time.sleep(0.01)
    for process in acceptors:
        assert process.wait(10) == 0
    for reader in readers:
        reader.join(10)
    acknowledged = [line.decode().strip() for out in outputs for line in out]
    assert len(acknowledged) == 3 * 150
    assert sorted(delivered) == sorted(acknowledged)  # all of them, each once
    assert queue.list() == []
    assert all(os.listdir(tmp_path / d) == [] for d in ("incoming", "active", "deferred"))
