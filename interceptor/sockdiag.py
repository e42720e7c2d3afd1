"""Which TCP sockets exist on a port, asked of the kernel with sock_diag (what `ss` uses).

Kernel glue for the health probe: no connection is made to the proxy (a probe connection would
show in its logs and count against its limits), and the kernel filters by state and port, so the
answer costs the same with ten or ten thousand other sockets around (unlike reading all of
/proc/net/tcp). Layouts from <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h>.

For a listening socket the kernel reports the accept queue in `rqueue` (connections waiting
for accept()) and its limit (the listen backlog) in `wqueue`.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
from typing import NamedTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_EQ = 11  # source (local) port equals op[1].no

# include/net/tcp_states.h
TCP_ESTABLISHED, TCP_SYN_RECV, TCP_CLOSE_WAIT, TCP_LISTEN = 1, 3, 8, 10

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
_NLATTR = struct.Struct("=HH")  # length, type
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (48 bytes).
_REQUEST = struct.Struct("=BBBxI48x")
# inet_diag_msg: family, state, timer, retrans, sockid (sport, dport big-endian, 40 bytes of
# addresses, interface, cookie), expires, rqueue, wqueue, uid, inode.
_MESSAGE = struct.Struct("=BBBB")
_SOCKID_PORTS = struct.Struct("!HH")
_QUEUES = struct.Struct("=III")  # expires, rqueue, wqueue
_MESSAGE_LENGTH = 72
_sequence = itertools.count(1)


class SocketInfo(NamedTuple):
    state: int
    local_port: int
    rqueue: int
    wqueue: int


def _bytecode_local_port(port: int) -> bytes:
    # Two 4-byte ops: S_EQ (yes: jump 8 = past the end, accept; no: jump 12 = beyond, reject)
    # and the port it compares with (host byte order, as the kernel reads it).
    return struct.pack("=BBH", INET_DIAG_BC_S_EQ, 8, 12) + struct.pack("=BBH", 0, 0, port)


def sockets_on_port(family: int, port: int, states: int) -> list[SocketInfo]:
    """TCP sockets of `family` (socket.AF_INET/AF_INET6) with local `port` in `states`
    (a bit mask, 1 << TCP_LISTEN ...), in the caller's network namespace."""
    bytecode = _bytecode_local_port(port)
    attribute = _NLATTR.pack(_NLATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, states) + attribute
    sequence = next(_sequence) & 0xFFFFFFFF
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                            NLM_F_REQUEST | NLM_F_DUMP, sequence, 0)
    found: list[SocketInfo] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as sock:
        sock.sendall(header + body)
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    return found
                payload = offset + _NLMSGHDR.size
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, payload)[0]
                    if code:
                        raise OSError(code, f"sock_diag: {errno.errorcode.get(code, code)}")
                    return found
                if kind == SOCK_DIAG_BY_FAMILY and length >= _NLMSGHDR.size + _MESSAGE_LENGTH:
                    _family, state, _timer, _retrans = _MESSAGE.unpack_from(data, payload)
                    sport, _dport = _SOCKID_PORTS.unpack_from(data, payload + 4)
                    _expires, rqueue, wqueue = _QUEUES.unpack_from(data, payload + 52)
                    found.append(SocketInfo(state, sport, rqueue, wqueue))
                offset += (length + 3) & ~3


def listeners(family: int, port: int) -> list[SocketInfo]:
    return sockets_on_port(family, port, 1 << TCP_LISTEN)


def connection_count(family: int, port: int) -> int:
    """Connections held on local `port`: for a TPROXY'd service that is the service's own port
    (25), since accepted sockets keep the address and port the client used."""
    return len(sockets_on_port(family, port,
                               (1 << TCP_ESTABLISHED) | (1 << TCP_CLOSE_WAIT)))
