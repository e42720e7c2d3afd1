"""What the kernel does with a SYN when our NFQUEUE is full: the queue's fail-open flag.

netfilterqueue 1.1.0 binds the queue, sets the copy mode and asks for `max_len` (ignoring
the answer), but has no call for the queue's flags. Without NFQA_CFG_F_FAIL_OPEN the kernel
*drops* every packet that finds the queue full (`queue_dropped` in
/proc/net/netfilter/nfnetlink_queue), so a burst of SYNs blocks legitimate mail. With it, such
a packet is accepted as if no queue were there (nfnetlink_queue.c, `__nfqnl_enqueue_packet`:
`nfqnl_reinject(entry, NF_ACCEPT)`, not counted), and so is one the socket buffer cannot take
(not counted in `user_dropped` either). Accepting continues at the next hook, so the packet
skips the TPROXY rule after NFQUEUE and goes to its server uninspected: fail open.

The kernel takes a queue's config only from the netlink port id that bound it
(`nfqnl_recv_config`: EPERM otherwise), so the message goes out on netfilterqueue's own
socket: a dup of its fd is the same socket with the same port id. We ask for an ack (the only
way to know it worked) and read it ourselves before netfilterqueue's receive loop starts. The
queue is live from the moment it was bound, so SYNs may sit on the socket ahead of the ack;
we must not swallow them (a packet read and never given a verdict stays in the queue until
unbind). Each one gets the verdict NF_REPEAT: the kernel runs it through the same hook again,
the NFQUEUE rule queues it anew, and it arrives *after* the ack, for the interceptor to decide
like any other SYN. Nothing here decides anything.

The same message also carries NFQA_CFG_QUEUE_MAXLEN, so the ack confirms that the queue
length we configured is the one in force.

Messages are built and parsed by pure functions (unit-tested as bytes); `apply()` is the only
part with a socket. Numbers are from linux/netfilter/nfnetlink_queue.h and linux/netlink.h.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

# linux/netfilter/nfnetlink.h, linux/netfilter/nfnetlink_queue.h
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1  # struct nfqnl_msg_packet_hdr: be32 packet_id, be16 hw_protocol, u8 hook
NFQA_VERDICT_HDR = 2  # struct nfqnl_msg_verdict_hdr: be32 verdict, be32 id
NFQA_CFG_QUEUE_MAXLEN = 3  # be32
NFQA_CFG_MASK = 4  # be32: which flags this message changes
NFQA_CFG_FLAGS = 5  # be32: their new values
NFQA_CFG_F_FAIL_OPEN = 1 << 0
# linux/netlink.h, linux/netfilter.h
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NF_REPEAT = 4
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

PACKET_TYPE = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET
VERDICT_TYPE = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT
CONFIG_TYPE = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG
CONFIG_SEQ = 0x6D67_0001  # ours ("mg"); libnfnetlink's own requests are over by then

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, port id: host byte order
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (the queue number, big-endian)
_NLATTR = struct.Struct("=HH")  # length (header included), type
_BE32 = struct.Struct("!I")
RECV_BYTES = 65536


@dataclass(frozen=True)
class Ack:
    """The kernel's answer to one of our requests: `error` 0, or the errno it failed with."""

    request_type: int
    seq: int
    error: int


@dataclass(frozen=True)
class Queued:
    """A packet the queue handed us (only its id matters here)."""

    packet_id: int


def _align(length: int) -> int:
    return (length + 3) & ~3


def _attribute(kind: int, payload: bytes) -> bytes:
    header = _NLATTR.pack(_NLATTR.size + len(payload), kind)
    return (header + payload).ljust(_align(_NLATTR.size + len(payload)), b"\0")


def _message(kind: int, flags: int, seq: int, queue: int, attributes: bytes) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, queue) + attributes
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def config_message(queue: int, *, max_len: int, fail_open: bool,
                   seq: int = CONFIG_SEQ) -> bytes:
    """Set the queue's length and its fail-open flag (on or off: the mask names the flag
    either way, other flags are left alone), and ask for an ack."""
    attributes = (_attribute(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(max_len))
                  + _attribute(NFQA_CFG_MASK, _BE32.pack(NFQA_CFG_F_FAIL_OPEN))
                  + _attribute(NFQA_CFG_FLAGS,
                               _BE32.pack(NFQA_CFG_F_FAIL_OPEN if fail_open else 0)))
    return _message(CONFIG_TYPE, NLM_F_REQUEST | NLM_F_ACK, seq, queue, attributes)


def verdict_message(queue: int, packet_id: int, verdict: int = NF_REPEAT) -> bytes:
    """A verdict without an ack (the kernel still answers if it fails)."""
    header = _BE32.pack(verdict) + _BE32.pack(packet_id)
    return _message(VERDICT_TYPE, NLM_F_REQUEST, 0, queue,
                    _attribute(NFQA_VERDICT_HDR, header))


def _attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size or offset + length > len(data):
            return
        yield kind & NLA_TYPE_MASK, data[offset + _NLATTR.size:offset + length]
        offset += _align(length)


def parse(datagram: bytes) -> Iterator[Ack | Queued]:
    """The acks and queued packets in one datagram from the socket; anything else is skipped."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(datagram):
        length, kind, _flags, _seq, _port = _NLMSGHDR.unpack_from(datagram, offset)
        if length < _NLMSGHDR.size or offset + length > len(datagram):
            return
        payload = datagram[offset + _NLMSGHDR.size:offset + length]
        if kind == NLMSG_ERROR and len(payload) >= 4 + _NLMSGHDR.size:
            # struct nlmsgerr: int error (0 or -errno), then the header of our request.
            (error,) = struct.unpack_from("=i", payload)
            _len, request_type, _rflags, request_seq, _rport = _NLMSGHDR.unpack_from(payload, 4)
            yield Ack(request_type, request_seq, -error)
        elif kind == PACKET_TYPE:
            for attribute, value in _attributes(payload[_NFGENMSG.size:]):
                if attribute == NFQA_PACKET_HDR and len(value) >= 4:
                    yield Queued(_BE32.unpack_from(value)[0])
                    break
        offset += _align(length)


def apply(fd: int, queue: int, *, max_len: int, fail_open: bool,
          timeout: float = 2.0) -> int:
    """Configure the queue bound on netlink socket `fd` (netfilterqueue's `get_fd()`) and wait
    for the kernel's ack. Returns how many queued packets were put back (see the module's
    docstring); raises OSError when the kernel refuses, TimeoutError when no ack comes.

    Call it after `bind()` and before `run()`, from the thread that will run the queue.
    """
    # A dup shares the socket, not just its number; closing it leaves netfilterqueue's fd
    # open. We never change the socket's blocking mode (O_NONBLOCK belongs to the open file,
    # which netfilterqueue's blocking recv shares): waits are poll() and MSG_DONTWAIT.
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.send(config_message(queue, max_len=max_len, fail_open=fail_open))
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        deadline = time.monotonic() + timeout
        requeued = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError(f"no answer from the kernel within {timeout} s")
            try:
                datagram = sock.recv(RECV_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped messages for us; go on
                    continue
                raise
            for message in parse(datagram):
                if isinstance(message, Queued):
                    sock.send(verdict_message(queue, message.packet_id, NF_REPEAT))
                    requeued += 1
                elif message.request_type == CONFIG_TYPE and message.seq == CONFIG_SEQ:
                    if message.error:
                        raise OSError(message.error, os.strerror(message.error))
                    return requeued
