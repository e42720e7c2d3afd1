"""A full NFQUEUE: with fail = "open" new connections pass; with fail = "closed" they are held.

The interceptor binds a tiny queue (`queue_max_len = 16`) and is then stopped (SIGSTOP): it is
still bound, so the kernel keeps queueing SYNs, but nobody reads them. A flood of raw SYNs from
the sender (scapy, no retransmissions: the counts are exact) fills the queue. What happens to
the rest, and to a real client that arrives then, is the queue's fail-open flag
(interceptor/nfqconfig.py), read back from /proc/net/netfilter/nfnetlink_queue in the gateway:
- fail = "open": the flag is set; packets beyond the 16 are accepted and not counted
  (`queue_dropped` stays 0), and the client reaches the server directly, at once;
- fail = "closed": no flag; each one beyond the 16 is dropped and counted, and so is the
  client's SYN: it is held (times out) rather than passed uninspected.
Either way exactly 16 wait, which shows that `queue_max_len` is the length in force.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from interceptor.queuestate import QueueState, parse
from netsetup.lab.topology import Lab
from tests.lab.test_interceptor import PYTHON, ROOT, Gateway, make_gateway

LabFactory = Callable[..., Lab]
QUEUE_MAX_LEN = 16  # the smallest the config allows
FLOOD = 200
# The 16 flood SYNs decided after SIGCONT are intercepted and never complete, on a gateway
# where nothing completed while the interceptor was stopped: the blackhole check would rightly
# call that a broken path (README, the trade-off of that check). Not what is tested here.
EXTRA = (f"queue_max_len = {QUEUE_MAX_LEN}", "blackhole_threshold = 0")

FLOOD_SCRIPT = """
import sys
from scapy.all import IP, TCP, send
source, server, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
send([IP(src=source, dst=server) / TCP(sport=20000 + i, dport=25, flags="S", seq=i)
      for i in range(count)], verbose=0)
"""


def queue_state(gw: Gateway) -> QueueState:
    text = gw.lab.run(gw.lab.gateway, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    return parse(text)[0]


def wait_queue(gw: Gateway, match: Callable[[QueueState], bool], what: str,
               timeout: float = 5.0) -> QueueState:
    deadline = time.monotonic() + timeout
    while True:
        state = queue_state(gw)
        if match(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s: {state}")
        time.sleep(0.05)


@pytest.fixture
def stopped() -> Iterator[list[Gateway]]:
    """Gateways whose interceptor a test stopped: continued at the end, pass or fail (the lab
    fixture then kills everything)."""
    gateways: list[Gateway] = []
    yield gateways
    for gw in gateways:
        if gw.interceptor is not None and gw.interceptor.poll() is None:
            gw.interceptor.send_signal(signal.SIGCONT)


def signal_interceptor(gw: Gateway, signum: int) -> None:
    assert gw.interceptor is not None
    gw.interceptor.send_signal(signum)


def flood_a_stopped_interceptor(gw: Gateway, stopped: list[Gateway]) -> QueueState:
    """Stop the interceptor, then flood its queue; the queue's counters before the flood."""
    before = queue_state(gw)
    assert before.waiting == 0, before
    stopped.append(gw)
    signal_interceptor(gw, signal.SIGSTOP)
    sender, server = gw.lab.sender, gw.lab.server
    gw.lab.run(sender, [PYTHON, "-c", FLOOD_SCRIPT, str(sender.ipv4), str(server.ipv4),
                        str(FLOOD)], cwd=ROOT, timeout=30)
    return before


def test_a_full_queue_passes_new_connections_with_fail_open(
        lab_factory: LabFactory, tmp_path: Path, stopped: list[Gateway]) -> None:
    gw = make_gateway(lab_factory("router", name="qfull"), tmp_path, extra=EXTRA)
    log = tmp_path / "interceptor.log"
    gw.start_relay()
    gw.start_interceptor(log)
    assert gw.intercepted(gw.connect(4))
    ready = [line for line in log.read_text().splitlines() if "event=interceptor_ready" in line]
    assert len(ready) == 1 and "queue_full=pass" in ready[0], log.read_text()
    assert "interceptor_queue_config_failed" not in log.read_text()

    before = flood_a_stopped_interceptor(gw, stopped)
    full = wait_queue(gw, lambda s: s.waiting == QUEUE_MAX_LEN, "queue full")
    # A real client, while the queue is full and nobody reads it: straight to the server.
    # (Without the flag each SYN it sends is dropped for as long as the queue stays full.)
    for family in (4, 6):
        answer = gw.connect(family, timeout=2.5)
        assert answer["ok"] and answer["greeting"].startswith("PEER "), answer
        assert answer["peer"][0] == str(gw.lab.sender.ipv4 if family == 4
                                         else gw.lab.sender.ipv6), answer
    after = queue_state(gw)
    # Accepted beyond the limit, and not counted as dropped.
    assert after.queue_dropped == before.queue_dropped, (before, after)
    assert after.user_dropped == before.user_dropped, (before, after)
    assert after.waiting == full.waiting == QUEUE_MAX_LEN, after
    # Only the first 16 got a packet id: the rest never entered the queue.
    assert after.last_id - before.last_id == QUEUE_MAX_LEN, (before, after)
    # Woken, it decides what waited, and intercepts again.
    signal_interceptor(gw, signal.SIGCONT)
    wait_queue(gw, lambda s: s.waiting == 0, "queue drained")
    gw.until(4, want_intercepted=True, what="intercepted after SIGCONT")


def test_a_full_queue_holds_new_connections_with_fail_closed(
        lab_factory: LabFactory, tmp_path: Path, stopped: list[Gateway]) -> None:
    gw = make_gateway(lab_factory("router", name="qfullc"), tmp_path, fail="closed",
                      extra=EXTRA)
    log = tmp_path / "interceptor.log"
    gw.start_relay()
    gw.start_interceptor(log)
    assert gw.intercepted(gw.connect(4))
    assert "queue_full=drop" in log.read_text(), log.read_text()

    before = flood_a_stopped_interceptor(gw, stopped)
    flooded = wait_queue(gw, lambda s: s.queue_dropped - before.queue_dropped
                         >= FLOOD - QUEUE_MAX_LEN, "flood dropped")
    # Without the flag, what did not fit was dropped, one by one.
    assert flooded.queue_dropped - before.queue_dropped == FLOOD - QUEUE_MAX_LEN, flooded
    assert flooded.waiting == QUEUE_MAX_LEN, flooded
    # And a real client is held, not passed: its SYNs are dropped too (counted).
    answer = gw.connect(4, timeout=2)
    assert not answer["ok"] and "timed out" in answer["error"], answer
    assert queue_state(gw).queue_dropped > flooded.queue_dropped
    signal_interceptor(gw, signal.SIGCONT)
    wait_queue(gw, lambda s: s.waiting == 0, "queue drained")
    gw.until(4, want_intercepted=True, what="intercepted after SIGCONT")


REQUEUE_SCRIPT = """
import json, socket, sys
from netfilterqueue import NetfilterQueue
from interceptor import nfqconfig, queuestate
queue_num, count = int(sys.argv[1]), int(sys.argv[2])
seen = []
def handle(packet):
    seen.append(packet.get_payload()[20:22].hex())  # the TCP source port, to tell them apart
    packet.accept()
queue = NetfilterQueue()
queue.bind(queue_num, handle, max_len=64, range=256)
clients = []
for _ in range(count):  # each connect sends its SYN at once, into the queue
    client = socket.socket()
    client.setblocking(False)
    client.connect_ex(("127.0.0.1", 9))
    clients.append(client)
before = queuestate.read()[queue_num]
requeued = nfqconfig.apply(queue.get_fd(), queue_num, max_len=64, fail_open=True)
after = queuestate.read()[queue_num]
queue.run(block=False)  # netfilterqueue's own loop decides them now
print(json.dumps({"requeued": requeued, "before": [before.waiting, before.last_id],
                  "after": [after.waiting, after.last_id], "seen": len(seen),
                  "distinct": len(set(seen)), "left": queuestate.read()[queue_num].waiting}))
"""


def test_syns_queued_before_the_config_is_confirmed_are_put_back(
        lab_factory: LabFactory) -> None:
    """The queue is live from `bind()`: SYNs that come before the kernel's ack are handed back
    (NF_REPEAT, queued anew) for the interceptor to decide, never swallowed."""
    lab = lab_factory("router", name="qfullr")
    lab.run(lab.gateway, ["iptables-legacy", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp",
                          "--syn", "--dport", "9", "-j", "NFQUEUE", "--queue-num", "7"])
    result = lab.run(lab.gateway, [PYTHON, "-c", REQUEUE_SCRIPT, "7", "3"], cwd=ROOT,
                     timeout=30)
    outcome = json.loads(result.stdout)
    assert outcome["before"] == [3, 3], outcome  # three waiting, ids 1-3
    assert outcome["requeued"] == 3, outcome
    assert outcome["after"] == [3, 6], outcome  # still three waiting, queued anew as 4-6
    assert outcome["seen"] == outcome["distinct"] == 3 and outcome["left"] == 0, outcome
