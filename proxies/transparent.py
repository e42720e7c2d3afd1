"""Linux glue for transparent proxying: listeners TPROXY can hand connections to, the original
destination of an intercepted connection, and onward connections that may carry the client's
source address.

Everything here is kernel plumbing; the rest of mailgate never sees a raw socket option. The
numbers come from <linux/in.h>, <linux/in6.h> and <linux/netfilter_ipv4.h>; Python names only
some of them.

How the kernel tells us where a connection was going:
- TPROXY (what netsetup installs) does not rewrite the packet, it assigns it to our listener.
  The accepted socket keeps the addresses the client used, so getsockname() *is* the original
  destination.
- REDIRECT and DNAT rewrite the destination; conntrack remembers the original tuple and hands
  it out through SO_ORIGINAL_DST.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, overload

# <linux/in.h>: lets a socket accept connections for, and bind to, addresses that are not ours.
IP_TRANSPARENT = 19
# <linux/in6.h>: the same for IPv6; Python has no constant for it (nor socket.SOL_IPV6, which is
# IPPROTO_IPV6).
IPV6_TRANSPARENT = 75
# <linux/netfilter_ipv4.h> and <linux/netfilter_ipv6/ip6_tables.h>: both are 80, one per level.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
# <linux/in.h>: bind() reserves only the address; connect() picks the port. Without it every
# spoofed onward connection from one client address would need a port unique for that address
# alone (about 28,000 at a time) instead of unique per 4-tuple.
IP_BIND_ADDRESS_NO_PORT = 24

# The mark every transparent socket carries (SO_MARK), netsetup's [network] egress_mark. In
# bridge mode netsetup routes packets with it to the peer's own link-layer address (the bridge
# has no address to resolve one with: netsetup/nft.py); elsewhere no rule looks at it. Replies
# of an accepted connection carry the listener's mark (the kernel copies it to the request and
# child sockets), so marking listeners and spoofed onward sockets marks everything the
# proxies send towards intercepted peers, and nothing else the box sends.
DEFAULT_EGRESS_MARK = 0x4
_egress_mark = DEFAULT_EGRESS_MARK


def set_egress_mark(mark: int) -> None:
    """Once at start-up, from the config: the mark for this process's transparent sockets."""
    global _egress_mark
    _egress_mark = mark


_SOCKADDR_IN = struct.Struct("!2xH4s8x")  # family (host order, skipped), port, address, zero
_SOCKADDR_IN6 = struct.Struct("!2xHI16sI")  # family, port, flowinfo, address, scope id

Address = tuple[str, int]
Family = Literal[4, 6]


class TransparentError(OSError):
    """A transparent socket operation failed; the message says what to do about it.

    An OSError, so callers that already handle socket errors keep working; `errno` is the
    kernel's.
    """


class _SocketLike(Protocol):
    """What we need of a socket: also satisfied by asyncio's TransportSocket."""

    def getsockname(self) -> object: ...

    def getpeername(self) -> object: ...

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...


# --- addresses --------------------------------------------------------------------------------


def family_of(address: str) -> Family:
    """4 or 6; an IPv4-mapped IPv6 address (::ffff:a.b.c.d) counts as IPv4."""
    if ":" not in address:  # the kernel's dotted quad: no need to parse it (once a connection)
        return 4
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return 4
    return 4 if ip.version == 4 else 6


def plain_address(address: str) -> str:
    """A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; callers want a.b.c.d."""
    # The kernel's own spellings first: parsing each accepted connection's addresses was a
    # measurable share of the front end's time per message.
    if ":" not in address:
        return address
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return address


def _pair(sockaddr: object) -> Address:
    # getsockname() gives (host, port) for AF_INET and (host, port, flowinfo, scope_id) for
    # AF_INET6; both start with host and port.
    assert isinstance(sockaddr, tuple) and len(sockaddr) >= 2, sockaddr
    return plain_address(str(sockaddr[0])), int(sockaddr[1])


def parse_sockaddr_in(blob: bytes) -> Address:
    """The 16-byte struct sockaddr_in SO_ORIGINAL_DST returns, as (address, port)."""
    if len(blob) < _SOCKADDR_IN.size:
        raise ValueError(f"sockaddr_in needs {_SOCKADDR_IN.size} bytes, got {len(blob)}")
    port, packed = _SOCKADDR_IN.unpack_from(blob)
    return socket.inet_ntop(socket.AF_INET, packed), port


def parse_sockaddr_in6(blob: bytes) -> Address:
    """The 28-byte struct sockaddr_in6 IP6T_SO_ORIGINAL_DST returns, as (address, port).

    The scope id is dropped: interception only ever sees global or unique-local destinations
    (link-local traffic is not routed, so not TPROXYed either).
    """
    if len(blob) < _SOCKADDR_IN6.size:
        raise ValueError(f"sockaddr_in6 needs {_SOCKADDR_IN6.size} bytes, got {len(blob)}")
    port, _flowinfo, packed, _scope = _SOCKADDR_IN6.unpack_from(blob)
    return socket.inet_ntop(socket.AF_INET6, packed), port


# --- privilege --------------------------------------------------------------------------------


def _set_transparent(sock: socket.socket, family: Family, purpose: str) -> None:
    level, option, name = (
        (socket.SOL_IP, IP_TRANSPARENT, "IP_TRANSPARENT")
        if family == 4
        else (socket.IPPROTO_IPV6, IPV6_TRANSPARENT, "IPV6_TRANSPARENT")
    )
    try:
        sock.setsockopt(level, option, 1)
        if _egress_mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, _egress_mark)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            # The kernel checks CAP_NET_ADMIN or CAP_NET_RAW in the socket's network namespace.
            raise TransparentError(
                exc.errno,
                f"{name} and SO_MARK ({purpose}) need CAP_NET_ADMIN: run as root or grant the "
                "capability (e.g. AmbientCapabilities=CAP_NET_ADMIN in the systemd unit)",
            ) from exc
        raise TransparentError(exc.errno, f"cannot set {name} ({purpose}): {exc.strerror}") from exc


# --- listening --------------------------------------------------------------------------------


def make_listener(host: str, port: int, *, transparent: bool = True, reuse_port: bool = False,
                  backlog: int = 1024, v6only: bool = True) -> socket.socket:
    """A listening TCP socket, non-blocking, for asyncio (loop.create_server(sock=...)).

    `transparent`: TPROXY assigns connections for foreign addresses only to a socket with
    IP_TRANSPARENT set; without it the rule matches and the client's SYN goes nowhere (TPROXY
    fails closed).
    `reuse_port`: several worker processes share the port and the kernel spreads the
    connections TPROXY hands over between them.
    `v6only`: measured on this kernel, a dual-stack '::' socket (v6only=False) does receive the
    connections an IPv4 TPROXY rule hands over (IPV6_TRANSPARENT and IP_TRANSPARENT set the same
    socket flag), but reports their addresses as ::ffff:a.b.c.d, and conntrack knows them only
    at the IPv4 level. `connection_info` copes with both; `make_listeners` still makes one
    socket per family so each family's addresses stay plain and either can be turned off.
    """
    family = family_of(host) if host else 4
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it every small reply waits for a delayed ACK (40 ms per round trip).
    sock = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    try:
        # A restarted proxy must rebind at once, while its old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        if transparent:
            _set_transparent(sock, family, "listening for intercepted connections")
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise TransparentError(
                exc.errno, f"cannot listen on [{host}]:{port}: {exc.strerror}") from exc
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def make_listeners(port: int, families: Iterable[int] = (4, 6), *, transparent: bool = True,
                   reuse_port: bool = False, backlog: int = 1024) -> list[socket.socket]:
    """One wildcard listener per family on `port` (0.0.0.0 and ::), as TPROXY rules expect.

    `families`: 4 and 6, or socket.AF_INET and socket.AF_INET6. If a later family fails, the
    sockets already made are closed before the error propagates.
    """
    sockets: list[socket.socket] = []
    try:
        for family in families:
            if family in (4, socket.AF_INET):
                host = "0.0.0.0"
            elif family in (6, socket.AF_INET6):
                host = "::"
            else:
                raise ValueError(f"address family must be 4 or 6 (or AF_INET, AF_INET6), "
                                 f"not {family!r}")
            sockets.append(make_listener(host, port, transparent=transparent,
                                         reuse_port=reuse_port, backlog=backlog))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# --- the accepted connection ------------------------------------------------------------------


def _nat_original_destination(sock: _SocketLike, local_host: str | None = None) -> Address | None:
    """SO_ORIGINAL_DST, or None when conntrack has no entry (ENOENT: no NAT module, or the
    connection was never tracked) or the option does not apply to the socket."""
    if local_host is None:
        local_host = str(_pair(sock.getsockname())[0])
    try:
        # The level follows the address, not the socket: a dual-stack socket's IPv4 connection
        # is tracked as IPv4 and the IPv6 level fails for it.
        if family_of(local_host) == 4:
            return parse_sockaddr_in(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST,
                                                     _SOCKADDR_IN.size))
        return parse_sockaddr_in6(sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST,
                                                  _SOCKADDR_IN6.size))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOPROTOOPT, errno.EINVAL, errno.ENOTCONN):
            return None
        raise


@overload
def original_destination(sock: _SocketLike) -> Address: ...


@overload
def original_destination(sock: _SocketLike, listen_port: int) -> Address | None: ...


def original_destination(sock: _SocketLike, listen_port: int | None = None) -> Address | None:
    """Where the client meant to connect.

    Under REDIRECT or DNAT conntrack remembers it (SO_ORIGINAL_DST); under TPROXY, or with no
    NAT at all, the socket's own address is the answer. With conntrack but no NAT,
    SO_ORIGINAL_DST equals getsockname(), so asking it first is always right.

    With `listen_port`, None for a connection addressed to the proxy itself (see
    `connection_info`): it has no original destination to go on to.
    """
    if listen_port is not None:
        return connection_info(sock, listen_port).onward
    return _nat_original_destination(sock) or _pair(sock.getsockname())


How = Literal["tproxy", "nat", "direct"]


@dataclass(frozen=True)
class ConnectionInfo:
    """The addresses of an accepted connection, IPv4-mapped addresses made plain.

    `how`: "tproxy" (handed over by a TPROXY rule: the local address is the server's),
    "nat" (REDIRECT/DNAT: conntrack knew the original destination), or "direct" (the client
    connected to the proxy's own port: there is no original destination to relay to, and an
    SMTP proxy must route by its transport map or MX instead).
    """

    client: Address
    local: Address
    original_destination: Address
    how: How

    @property
    def intercepted(self) -> bool:
        return self.how != "direct"

    @property
    def family(self) -> Family:
        return family_of(self.client[0])

    @property
    def onward(self) -> Address | None:
        """Where to relay to: the original destination, None for a connection addressed to
        the proxy itself."""
        return self.original_destination if self.intercepted else None


def connection_info(sock: _SocketLike, listen_port: int, sockname: object = None,
                    peername: object = None) -> ConnectionInfo:
    """Classify an accepted connection.

    A connection reaches `listen_port` only by TPROXY, NAT or being addressed to it, so a local
    port other than `listen_port` means TPROXY (which keeps the client's destination port).
    That is why the proxy must listen on a port other than the one it intercepts: with TPROXY
    --on-port 25 an intercepted connection and one addressed to us would look the same.
    """
    # `sockname`, `peername`: what the caller knows already (see `accepted`).
    local = _pair(sockname if sockname is not None else sock.getsockname())
    client = _pair(peername if peername is not None else sock.getpeername())
    if local[1] != listen_port:
        return ConnectionInfo(client, local, local, "tproxy")
    nat = _nat_original_destination(sock, local[0])
    if nat is not None and nat != local:
        return ConnectionInfo(client, local, nat, "nat")
    return ConnectionInfo(client, local, local, "direct")


class _TransportLike(Protocol):
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


def accepted(transport: _TransportLike, listen_port: int) -> ConnectionInfo:
    """`connection_info` of an asyncio transport's connection, from the addresses the
    transport has asked the kernel for already (two system calls fewer per connection)."""
    return connection_info(transport.get_extra_info("socket"), listen_port,
                           transport.get_extra_info("sockname"),
                           transport.get_extra_info("peername"))


def is_intercepted(sock: _SocketLike, listen_port: int) -> bool:
    return connection_info(sock, listen_port).intercepted


# --- onward connections -----------------------------------------------------------------------


async def connect_socket(destination: Address, *, source: str | None = None,
                         timeout: float = 30.0, local_port: int = 0) -> socket.socket:
    """A connected non-blocking TCP socket to `destination`.

    `source`: the address to connect from. When it is not one of ours (the client's, to spoof
    it), IP_TRANSPARENT lets us bind it; the server's replies come back to us only because
    netsetup's `-m socket --transparent` rule diverts them to local delivery. None: the kernel
    picks our address for the route.
    """
    host, port = plain_address(destination[0]), destination[1]
    family = family_of(host)
    if source is not None:
        source = plain_address(source)
        if family_of(source) != family:
            raise TransparentError(
                errno.EAFNOSUPPORT,
                f"cannot connect from IPv{family_of(source)} address {source} to IPv{family} "
                f"destination [{host}]:{port}: a spoofed source must be of the destination's "
                "family (turn spoofing off for this connection, or give a source of that family)",
            )
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it every small reply waits for a delayed ACK (40 ms per round trip).
    sock = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    try:
        sock.setblocking(False)
        if source is not None:
            _set_transparent(sock, family, "connecting from the client's address")
            if local_port == 0:
                with contextlib.suppress(OSError):  # an optimisation; older kernels lack it
                    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            try:
                sock.bind((source, local_port))
            except OSError as exc:
                raise TransparentError(
                    exc.errno, f"cannot bind onward connection to [{source}]:{local_port}: "
                    f"{exc.strerror}") from exc
        elif local_port:
            sock.bind(("0.0.0.0" if family == 4 else "::", local_port))
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        except TimeoutError:
            raise TimeoutError(
                errno.ETIMEDOUT, f"connecting to [{host}]:{port} timed out after {timeout:g}s"
            ) from None
    except BaseException:
        sock.close()
        raise
    return sock


async def open_onward(destination: Address, *, source: str | None = None,
                      timeout: float = 30.0, local_port: int = 0,
                      limit: int = 2**16) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`connect_socket`, as asyncio streams."""
    sock = await connect_socket(destination, source=source, timeout=timeout,
                                local_port=local_port)
    try:
        return await asyncio.open_connection(sock=sock, limit=limit)
    except BaseException:
        sock.close()
        raise
