"""proxies.transparent without a kernel that intercepts: sockaddr parsing, classification of
accepted connections, and the errors a user sees when privilege or address family is wrong."""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import errno
import socket
import struct
from typing import Any

import pytest

from proxies import transparent
from proxies.transparent import (
    TransparentError,
    connect_socket,
    connection_info,
    family_of,
    make_listener,
    make_listeners,
    original_destination,
    parse_sockaddr_in,
    parse_sockaddr_in6,
    plain_address,
)


def sockaddr_in(address: str, port: int) -> bytes:
    # As the kernel fills it: sa_family in host byte order, then port and address in network
    # order, then 8 bytes of zero padding.
    return struct.pack("=H", socket.AF_INET) + struct.pack(
        "!H4s8x", port, socket.inet_pton(socket.AF_INET, address))


def sockaddr_in6(address: str, port: int, flowinfo: int = 0, scope: int = 0) -> bytes:
    return struct.pack("=H", socket.AF_INET6) + struct.pack(
        "!HI16sI", port, flowinfo, socket.inet_pton(socket.AF_INET6, address), scope)


class FakeSocket:
    """The few socket calls transparent.py makes, answering as the kernel would."""

    def __init__(self, local: tuple[Any, ...], peer: tuple[Any, ...],
                 original: bytes | OSError | None = None) -> None:
        self.family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        self.local, self.peer, self.original = local, peer, original
        self.asked: list[tuple[int, int, int]] = []

    def getsockname(self) -> tuple[Any, ...]:
        return self.local

    def getpeername(self) -> tuple[Any, ...]:
        return self.peer

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes:
        self.asked.append((level, optname, buflen))
        if isinstance(self.original, OSError):
            raise self.original
        if self.original is None:
            raise OSError(errno.ENOENT, "No such file or directory")
        return self.original


# --- parsing ------------------------------------------------------------------------------------


def test_sockaddr_in_parses_port_and_address() -> None:
    assert parse_sockaddr_in(sockaddr_in("198.51.100.25", 25)) == ("198.51.100.25", 25)
    assert parse_sockaddr_in(sockaddr_in("0.0.0.0", 65535)) == ("0.0.0.0", 65535)


def test_sockaddr_in6_parses_port_and_address_dropping_flowinfo_and_scope() -> None:
    blob = sockaddr_in6("2001:db8:2::25", 110, flowinfo=0x12345, scope=3)
    assert len(blob) == 28
    assert parse_sockaddr_in6(blob) == ("2001:db8:2::25", 110)


@pytest.mark.parametrize("parse", [parse_sockaddr_in, parse_sockaddr_in6])
def test_short_sockaddr_is_refused(parse: Any) -> None:
    with pytest.raises(ValueError, match="needs"):
        parse(b"\x02\x00\x00\x19")


def test_mapped_addresses_are_made_plain() -> None:
    assert plain_address("::ffff:192.0.2.10") == "192.0.2.10"
    assert plain_address("2001:db8::1") == "2001:db8::1"
    assert family_of("::ffff:192.0.2.10") == 4
    assert family_of("2001:db8::1") == 6


# --- classifying an accepted connection -------------------------------------------------------


def test_tproxy_connection_keeps_the_servers_address_as_local() -> None:
    sock = FakeSocket(("198.51.100.25", 25), ("192.0.2.10", 40000))
    info = connection_info(sock, 10025)
    assert info.how == "tproxy" and info.intercepted
    assert info.original_destination == ("198.51.100.25", 25)
    assert info.client == ("192.0.2.10", 40000)
    assert original_destination(sock) == ("198.51.100.25", 25)


def test_redirected_connection_reads_conntrack() -> None:
    sock = FakeSocket(("192.0.2.1", 10025), ("192.0.2.10", 40000),
                      sockaddr_in("198.51.100.25", 25))
    info = connection_info(sock, 10025)
    assert info.how == "nat"
    assert info.original_destination == ("198.51.100.25", 25)
    assert sock.asked == [(socket.SOL_IP, transparent.SO_ORIGINAL_DST, 16)]
    assert original_destination(sock, 10025) == ("198.51.100.25", 25)


def test_redirected_ipv6_connection_asks_at_the_ipv6_level() -> None:
    sock = FakeSocket(("2001:db8:1::1", 10025, 0, 0), ("2001:db8:1::10", 40000, 0, 0),
                      sockaddr_in6("2001:db8:2::25", 25))
    assert original_destination(sock) == ("2001:db8:2::25", 25)
    assert sock.asked == [(socket.IPPROTO_IPV6, transparent.IP6T_SO_ORIGINAL_DST, 28)]
    assert connection_info(sock, 10025).family == 6


def test_dual_stack_socket_asks_at_the_ipv4_level_for_a_mapped_address() -> None:
    # A '::' socket without IPV6_V6ONLY sees IPv4 clients as ::ffff:a.b.c.d, but conntrack
    # tracked the connection as IPv4: only SOL_IP knows it.
    sock = FakeSocket(("::ffff:192.0.2.1", 10025, 0, 0), ("::ffff:192.0.2.10", 40000, 0, 0),
                      sockaddr_in("198.51.100.25", 25))
    info = connection_info(sock, 10025)
    assert info.original_destination == ("198.51.100.25", 25)
    assert info.client == ("192.0.2.10", 40000)
    assert sock.asked[0][0] == socket.SOL_IP


@pytest.mark.parametrize("original", [None, OSError(errno.ENOPROTOOPT, "no")])
def test_connection_to_the_proxy_itself_is_direct(original: OSError | None) -> None:
    # ENOENT: no conntrack entry; ENOPROTOOPT: no conntrack at all in this kernel.
    sock = FakeSocket(("192.0.2.1", 10025), ("192.0.2.10", 40000), original)
    info = connection_info(sock, 10025)
    assert info.how == "direct" and not info.intercepted
    assert original_destination(sock) == ("192.0.2.1", 10025)
    assert original_destination(sock, 10025) is None
    assert not transparent.is_intercepted(sock, 10025)


def test_conntrack_without_nat_is_direct() -> None:
    # conntrack tracks every connection once loaded; without NAT the "original" destination
    # is simply our own address.
    sock = FakeSocket(("192.0.2.1", 10025), ("192.0.2.10", 40000),
                      sockaddr_in("192.0.2.1", 10025))
    assert connection_info(sock, 10025).how == "direct"


def test_unexpected_getsockopt_error_propagates() -> None:
    sock = FakeSocket(("192.0.2.1", 10025), ("192.0.2.10", 40000), OSError(errno.EBADF, "bad"))
    with pytest.raises(OSError) as caught:
        original_destination(sock)
    assert caught.value.errno == errno.EBADF


# --- privilege and family errors --------------------------------------------------------------


@pytest.fixture
def no_cap_net_admin(monkeypatch: pytest.MonkeyPatch) -> list[socket.socket]:
    """setsockopt fails as it does for a process without CAP_NET_ADMIN."""
    real = socket.socket.setsockopt
    touched: list[socket.socket] = []

    def setsockopt(self: socket.socket, level: int, option: int, value: Any,
                   *rest: Any) -> None:
        touched.append(self)
        if (level, option) in ((socket.SOL_IP, 19), (socket.IPPROTO_IPV6, 75)):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real(self, level, option, value, *rest)

    monkeypatch.setattr(socket.socket, "setsockopt", setsockopt)
    return touched


@pytest.mark.parametrize(("host", "option"), [("0.0.0.0", "IP_TRANSPARENT"),
                                              ("::", "IPV6_TRANSPARENT")])
def test_listener_without_privilege_says_what_to_do(no_cap_net_admin: list[socket.socket],
                                                     host: str, option: str) -> None:
    with pytest.raises(TransparentError) as caught:
        make_listener(host, 0)
    assert caught.value.errno == errno.EPERM
    assert isinstance(caught.value, OSError)
    assert option in str(caught.value) and "CAP_NET_ADMIN" in str(caught.value)
    assert all(sock.fileno() == -1 for sock in no_cap_net_admin), "socket left open"


def test_make_listeners_closes_what_it_made_when_a_family_fails(
        no_cap_net_admin: list[socket.socket]) -> None:
    with pytest.raises(TransparentError):
        make_listeners(0, (4, 6))
    assert all(sock.fileno() == -1 for sock in no_cap_net_admin)


def test_spoofing_without_privilege_says_what_to_do(no_cap_net_admin: list[socket.socket]) -> None:
    with pytest.raises(TransparentError, match="CAP_NET_ADMIN"):
        asyncio.run(connect_socket(("127.0.0.1", 9), source="127.0.0.2", timeout=1))
    assert all(sock.fileno() == -1 for sock in no_cap_net_admin)


@pytest.mark.parametrize(("destination", "source"), [
    (("2001:db8::25", 25), "192.0.2.10"),
    (("198.51.100.25", 25), "2001:db8::10"),
])
def test_spoofing_across_families_is_refused_clearly(destination: tuple[str, int],
                                                     source: str) -> None:
    with pytest.raises(TransparentError, match="family") as caught:
        asyncio.run(connect_socket(destination, source=source, timeout=1))
    assert caught.value.errno == errno.EAFNOSUPPORT


def test_mapped_source_counts_as_ipv4() -> None:
    # Not a family mismatch: the dual-stack spelling of an IPv4 client. Connecting to a closed
    # loopback port then fails the ordinary way.
    async def attempt() -> None:
        await connect_socket(("127.0.0.1", _closed_port()), source="::ffff:127.0.0.1",
                             timeout=2)

    with pytest.raises(ConnectionRefusedError):
        asyncio.run(attempt())


def test_listen_failure_names_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TransparentError, match=rf"\[127.0.0.1\]:{port}"):
            make_listener("127.0.0.1", port, transparent=False)


def test_listeners_per_family_are_separate_and_v6_only() -> None:
    socks = make_listeners(0, (socket.AF_INET, 6), transparent=False)
    try:
        assert [s.family for s in socks] == [socket.AF_INET, socket.AF_INET6]
        assert socks[1].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert all(not s.getblocking() for s in socks)
    finally:
        for sock in socks:
            sock.close()
    with pytest.raises(ValueError, match="family"):
        make_listeners(0, (5,), transparent=False)


def test_connect_timeout_is_a_timeout_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(self: object, sock: socket.socket, address: object) -> None:
        await asyncio.sleep(10)

    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "sock_connect", never)
    with pytest.raises(TimeoutError, match=r"timed out after 0\.05s"):
        asyncio.run(connect_socket(("127.0.0.1", 9), timeout=0.05))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
