"""The hot-path header parser against packets scapy builds, and the reset it answers with."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH, ESP

from interceptor.packet import is_new_connection, parse_syn
from interceptor.refuse import reset_for

ODD_OPTIONS = [("MSS", 1460), ("NOP", None), ("WScale", 14), ("SAckOK", b""),
               ("Timestamp", (1, 0)), ("NOP", None), ("NOP", None), ("EOL", None)]


def syn4(flags: str = "S", **tcp: object) -> bytes:
    return bytes(IP(src="192.0.2.10", dst="198.51.100.25") /
                 TCP(sport=40000, dport=25, flags=flags, seq=1234, **tcp))  # type: ignore[arg-type]


@pytest.mark.parametrize("options", [[], ODD_OPTIONS, [("NOP", None)] * 40,
                                     [(254, b"\x12\x34\x56")]])
def test_ipv4_syn_with_any_options(options: list[object]) -> None:
    syn = parse_syn(syn4(options=options))
    assert syn is not None
    assert (syn.family, syn.sport, syn.dport, syn.seq) == (4, 40000, 25, 1234)
    assert syn.source == int(ipaddress.ip_address("192.0.2.10"))
    assert syn.destination == int(ipaddress.ip_address("198.51.100.25"))
    assert is_new_connection(syn.flags)
    assert syn.describe() == "192.0.2.10:40000 -> 198.51.100.25:25"


def test_ipv4_with_ip_options() -> None:
    data = bytes(IP(src="192.0.2.10", dst="198.51.100.25", options=b"\x94\x04\x00\x00") /
                 TCP(dport=110, flags="S"))
    syn = parse_syn(data)
    assert syn is not None and syn.dport == 110


@pytest.mark.parametrize("flags", ["SA", "A", "R", "SR", "F", "SF"])
def test_not_a_new_connection(flags: str) -> None:
    syn = parse_syn(syn4(flags))
    assert syn is not None and not is_new_connection(syn.flags)


@pytest.mark.parametrize("extensions", [
    [],
    [IPv6ExtHdrHopByHop()],
    [IPv6ExtHdrDestOpt()],
    [IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(addresses=["2001:db8:2::25"]),
     IPv6ExtHdrDestOpt()],
    [IPv6ExtHdrFragment(offset=0, m=0, id=7)],
    [AH(nh=6, payloadlen=4, spi=1, seq=1, icv=b"\0" * 12)]  # scapy fills neither,
])
def test_ipv6_syn_through_extension_headers(extensions: list[object]) -> None:
    packet = IPv6(src="2001:db8:1::10", dst="2001:db8:2::25")
    for header in extensions:
        packet = packet / header  # type: ignore[operator]
    data = bytes(packet / TCP(sport=5555, dport=25, flags="S", seq=99, options=ODD_OPTIONS))
    syn = parse_syn(data)
    assert syn is not None, packet.summary()
    assert (syn.family, syn.sport, syn.dport, syn.seq) == (6, 5555, 25, 99)
    assert syn.source == int(ipaddress.ip_address("2001:db8:1::10"))
    assert syn.describe() == "[2001:db8:1::10]:5555 -> [2001:db8:2::25]:25"


@pytest.mark.parametrize("data", [
    b"",
    b"\x45" + b"\0" * 10,  # truncated
    bytes(IP(dst="198.51.100.25", frag=100, proto=6) / (b"x" * 40)),  # a later fragment
    bytes(IP(dst="198.51.100.25", proto=0) / (b"\0" * 40)),  # not TCP (proto 0)
    bytes(IPv6(dst="2001:db8:2::25") / IPv6ExtHdrFragment(offset=8) / TCP(flags="S")),
    bytes(IPv6(dst="2001:db8:2::25") / ESP(spi=1, data=b"\0" * 32)),
    bytes(IPv6(dst="2001:db8:2::25", nh=59)),  # no next header
    bytes(IPv6(dst="2001:db8:2::25") / TCP(flags="S"))[:50],  # truncated TCP
    b"\x70" + b"\0" * 60,  # version 7
])
def test_unreadable_packets_give_none(data: bytes) -> None:
    assert parse_syn(data) is None


@pytest.mark.parametrize("data", [
    syn4(options=ODD_OPTIONS),
    bytes(IPv6(src="2001:db8:1::10", dst="2001:db8:2::25") / IPv6ExtHdrDestOpt() /
          TCP(sport=5555, dport=110, flags="S", seq=0xFFFFFFFF)),
])
def test_reset_answers_as_the_server_with_valid_checksums(data: bytes) -> None:
    syn = parse_syn(data)
    assert syn is not None
    raw = reset_for(syn)
    packet = IP(raw) if syn.family == 4 else IPv6(raw)
    tcp = packet[TCP]
    assert (packet.src, packet.dst) == (str(ipaddress.ip_address(syn.destination_bytes)),
                                        str(ipaddress.ip_address(syn.source_bytes)))
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (syn.dport, syn.sport, 0,
                                                       (syn.seq + 1) & 0xFFFFFFFF)
    assert tcp.flags == "RA"
    # scapy recomputes the checksum when the field is cleared: ours must equal it.
    ours = tcp.chksum
    rebuilt = IP(raw) if syn.family == 4 else IPv6(raw)
    del rebuilt[TCP].chksum
    rebuilt = IP(bytes(rebuilt)) if syn.family == 4 else IPv6(bytes(rebuilt))
    assert rebuilt[TCP].chksum == ours
