"""Is a program bound to our NFQUEUE? Read from /proc/net/netfilter/nfnetlink_queue.

The file is per network namespace and lists one line per *bound* queue (nfnetlink_queue's
seq_show): queue number, port id of the listener, packets waiting, copy mode, copy range,
packets dropped because the queue was full, packets dropped because the listener could not take
them (socket buffer), last packet id, and 1. No line: nobody is bound, and `--queue-bypass`
passes every SYN uninspected. Reading it costs a few microseconds, so watchers can poll it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_FILE = Path("/proc/net/netfilter/nfnetlink_queue")


@dataclass(frozen=True)
class QueueState:
    queue: int
    portid: int
    waiting: int
    queue_dropped: int
    user_dropped: int
    last_id: int


def parse(text: str) -> dict[int, QueueState]:
    states = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8 or not all(f.isdigit() for f in fields[:8]):
            continue
        number, portid, waiting, _mode, _range, queue_dropped, user_dropped, last_id = (
            int(f) for f in fields[:8])
        states[number] = QueueState(number, portid, waiting, queue_dropped, user_dropped,
                                    last_id)
    return states


def read(path: Path = PROC_FILE) -> dict[int, QueueState]:
    """Bound queues by number; empty when none is bound or the kernel lacks NFQUEUE."""
    try:
        return parse(path.read_text())
    except OSError:
        return {}
