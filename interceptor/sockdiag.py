"""Which TCP sockets exist on a port, asked of the kernel with sock_diag (what `ss` uses).

Kernel glue for the health probe: no connection is made to the proxy (a probe connection would
show in its logs and count against its limits), and the kernel filters by state and port, so the
answer costs the same with ten or ten thousand other sockets around (unlike reading all of
/proc/net/tcp). Layouts from <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h>.

For a listening socket the kernel reports the accept queue in `rqueue` (connections waiting
for accept()) and its limit (the listen backlog) in `wqueue`. Under TPROXY the connections a
proxy gets keep the address and port the client asked for, so its half-open connections (request
sockets, reported as SYN_RECV) and its established ones sit on the *service's* port (25), not
on the listener's (10025). Two fields tell how far along such a connection is:

- `retrans`: for a request socket, how often the SYN-ACK was sent again (its timer fires after
  1 s, then doubling, and a retransmitted SYN from the client resends it at once), so a value of
  2 means the handshake has waited for the client's ACK for a second or more, twice;
- `inode`: 0 while no process holds the socket, i.e. a completed connection still in the accept
  queue (sock_i_ino() of a socket without a `struct socket`).

`passive_opens()` reads the kernel's count of completed passive handshakes (RFC 4022
tcpPassiveOpens; Linux counts a connection when the handshake's last ACK creates the child
socket, tcp_create_openreq_child), for the whole network namespace and both families.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
from pathlib import Path
from typing import NamedTuple

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_BC_S_EQ = 11  # source (local) port equals op[1].no
# Extension asked for with bit (type - 1) of idiag_ext: the socket's sk_meminfo array, whose
# SK_MEMINFO_DROPS (<linux/sock_diag.h>) counts, on a listener, the SYNs and completed
# handshakes it had to drop (tcp_listendrop(): no route for the SYN-ACK, accept queue full...).
INET_DIAG_SKMEMINFO = 7
SK_MEMINFO_DROPS = 8

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
_COOKIE = struct.Struct("=II")  # low and high 32 bits (sock_diag_save_cookie)
_QUEUES = struct.Struct("=III")  # expires, rqueue, wqueue
_INODE = struct.Struct("=I")
_MESSAGE_LENGTH = 72
_sequence = itertools.count(1)
SNMP_FILE = Path("/proc/net/snmp")


class SocketInfo(NamedTuple):
    state: int
    local_port: int
    rqueue: int
    wqueue: int
    retrans: int = 0
    inode: int = 0  # 0: no process holds it (still in an accept queue, or a request socket)
    cookie: int = 0  # the kernel's id for the socket, the same for its whole life
    local: str = ""  # addresses as text
    remote: str = ""
    remote_port: int = 0
    drops: int = 0  # listeners only (see INET_DIAG_SKMEMINFO)

    def describe(self) -> str:
        """'192.0.2.10:41000 -> 198.51.100.25:25', for logs."""
        def one(address: str, port: int) -> str:
            return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"

        return f"{one(self.remote, self.remote_port)} -> {one(self.local, self.local_port)}"


def _bytecode_local_port(port: int) -> bytes:
    # Two 4-byte ops: S_EQ (yes: jump 8 = past the end, accept; no: jump 12 = beyond, reject)
    # and the port it compares with (host byte order, as the kernel reads it).
    return struct.pack("=BBH", INET_DIAG_BC_S_EQ, 8, 12) + struct.pack("=BBH", 0, 0, port)


def sockets_on_port(family: int, port: int, states: int,
                    meminfo: bool = False) -> list[SocketInfo]:
    """TCP sockets of `family` (socket.AF_INET/AF_INET6) with local `port` in `states`
    (a bit mask, 1 << TCP_LISTEN ...), in the caller's network namespace; `meminfo` also asks
    for each socket's drop counter."""
    bytecode = _bytecode_local_port(port)
    attribute = _NLATTR.pack(_NLATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    ext = 1 << (INET_DIAG_SKMEMINFO - 1) if meminfo else 0
    body = _REQUEST.pack(family, socket.IPPROTO_TCP, ext, states) + attribute
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
                    info = _socket_info(data, payload)
                    if meminfo:
                        drops = _meminfo_drops(data, payload + _MESSAGE_LENGTH,
                                               offset + length)
                        info = info._replace(drops=drops)
                    found.append(info)
                offset += (length + 3) & ~3


def _meminfo_drops(data: bytes, at: int, end: int) -> int:
    """SK_MEMINFO_DROPS from the attributes after an inet_diag_msg (0 when absent)."""
    while at + _NLATTR.size <= end:
        length, kind = _NLATTR.unpack_from(data, at)
        if length < _NLATTR.size:
            break
        if kind == INET_DIAG_SKMEMINFO and length >= _NLATTR.size + 4 * (SK_MEMINFO_DROPS + 1):
            return int(struct.unpack_from("=I", data, at + _NLATTR.size + 4 * SK_MEMINFO_DROPS)[0])
        at += (length + 3) & ~3
    return 0


def _socket_info(data: bytes, at: int) -> SocketInfo:
    family, state, _timer, retrans = _MESSAGE.unpack_from(data, at)
    sport, dport = _SOCKID_PORTS.unpack_from(data, at + 4)
    size = 4 if family == socket.AF_INET else 16
    local = socket.inet_ntop(family, data[at + 8:at + 8 + size])
    remote = socket.inet_ntop(family, data[at + 24:at + 24 + size])
    low, high = _COOKIE.unpack_from(data, at + 44)
    _expires, rqueue, wqueue = _QUEUES.unpack_from(data, at + 52)
    (inode,) = _INODE.unpack_from(data, at + 68)
    return SocketInfo(state, sport, rqueue, wqueue, retrans, inode, high << 32 | low, local,
                      remote, dport)


def listeners(family: int, port: int) -> list[SocketInfo]:
    """Listening sockets on `port`, each with its accept queue and its drop counter."""
    return sockets_on_port(family, port, 1 << TCP_LISTEN, meminfo=True)


def connections(family: int, port: int) -> list[SocketInfo]:
    """Connections held on local `port`: for a TPROXY'd service that is the service's own port
    (25), since its sockets keep the address and port the client used. Those not yet accepted
    are among them (`inode` 0)."""
    return sockets_on_port(family, port, (1 << TCP_ESTABLISHED) | (1 << TCP_CLOSE_WAIT))


def connection_count(family: int, port: int) -> int:
    return len(connections(family, port))


def half_open(family: int, port: int) -> list[SocketInfo]:
    """Request sockets on local `port`: SYN received, SYN-ACK sent, the client's ACK not yet."""
    return sockets_on_port(family, port, 1 << TCP_SYN_RECV)


def passive_opens(path: Path = SNMP_FILE) -> int | None:
    """The namespace's `Tcp: PassiveOpens` counter; None when the file cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return parse_passive_opens(text)


def parse_passive_opens(text: str) -> int | None:
    # Two lines per protocol: the field names, then the values.
    rows = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
    if len(rows) < 2 or "PassiveOpens" not in rows[0]:
        return None
    try:
        return int(rows[1][rows[0].index("PassiveOpens")])
    except (IndexError, ValueError):
        return None
