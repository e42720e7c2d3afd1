"""Reading the IP and TCP headers of a queued SYN straight from its bytes (the hot path).

NFQUEUE hands us the packet from the IP header on (no link layer), IPv4 or IPv6 on the same
queue. Only what a decision needs is read: addresses, ports, flags and the sequence number (for
a reset). Building a scapy packet costs ~200 us per SYN (NETFILTER-FACTS.md); this costs about
1 us, so scapy is left to tracing and tests.

Anything this parser cannot read as the start of a TCP segment (a later fragment, ESP, a
truncated header) gives None, and the caller lets the packet pass: a packet we do not
understand is never intercepted and never dropped.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

TCP = 6
# RFC 8200 4.1 and the IANA registry: IPv6 extension headers that may come before TCP.
HOP_BY_HOP, ROUTING, FRAGMENT, DESTINATION_OPTIONS, AUTHENTICATION = 0, 43, 44, 60, 51
MOBILITY, HIP, SHIM6 = 135, 139, 140
_GENERIC_EXTENSIONS = frozenset({HOP_BY_HOP, ROUTING, DESTINATION_OPTIONS, MOBILITY, HIP, SHIM6})
# More than a handful of extension headers before TCP is no legitimate SYN.
MAX_EXTENSIONS = 8

# RFC 9293 3.1: flags in the 14th byte of the TCP header.
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

_TCP_HEAD = struct.Struct("!HHIIBB")  # sport, dport, seq, ack, data offset, flags
_U16 = struct.Struct("!H")


class Syn(NamedTuple):
    family: int  # 4 or 6
    source: int  # address as an integer, for prefix matching
    destination: int
    sport: int
    dport: int
    seq: int
    flags: int
    source_bytes: bytes
    destination_bytes: bytes

    def describe(self) -> str:
        src = ipaddress.ip_address(self.source_bytes)
        dst = ipaddress.ip_address(self.destination_bytes)
        if self.family == 6:
            return f"[{src}]:{self.sport} -> [{dst}]:{self.dport}"
        return f"{src}:{self.sport} -> {dst}:{self.dport}"


def parse_syn(data: bytes) -> Syn | None:
    """The connection a packet opens, or None when it is not a readable TCP segment.

    `flags` is returned as found; whether it is a SYN is the caller's decision.
    """
    if not data:
        return None
    version = data[0] >> 4
    if version == 4:
        header_length = (data[0] & 0x0F) * 4
        if header_length < 20 or len(data) < header_length + 20 or data[9] != TCP:
            return None
        # A non-first fragment carries no TCP header (RFC 791 3.1, fragment offset).
        if _U16.unpack_from(data, 6)[0] & 0x1FFF:
            return None
        source_bytes, destination_bytes = data[12:16], data[16:20]
        offset = header_length
    elif version == 6:
        if len(data) < 40:
            return None
        offset = _tcp_offset_v6(data)
        if offset < 0 or len(data) < offset + 20:
            return None
        source_bytes, destination_bytes = data[8:24], data[24:40]
    else:
        return None
    sport, dport, seq, _ack, _data_offset, flags = _TCP_HEAD.unpack_from(data, offset)
    return Syn(version, int.from_bytes(source_bytes, "big"),
               int.from_bytes(destination_bytes, "big"), sport, dport, seq, flags,
               source_bytes, destination_bytes)


def _tcp_offset_v6(data: bytes) -> int:
    """Where the TCP header starts after the fixed header and any extension headers, or -1."""
    next_header = data[6]
    offset = 40
    for _ in range(MAX_EXTENSIONS + 1):
        if next_header == TCP:
            return offset
        if len(data) < offset + 8:
            return -1
        if next_header in _GENERIC_EXTENSIONS:
            # RFC 8200 4.3-4.6: length in 8-octet units, not counting the first 8.
            length = (data[offset + 1] + 1) * 8
        elif next_header == FRAGMENT:
            # RFC 8200 4.5: only the first fragment (offset 0) holds the TCP header.
            if _U16.unpack_from(data, offset + 2)[0] & 0xFFF8:
                return -1
            length = 8
        elif next_header == AUTHENTICATION:
            # RFC 4302 2.2: length in 4-octet units, minus 2.
            length = (data[offset + 1] + 2) * 4
        else:  # ESP (encrypted), No Next Header, or another protocol
            return -1
        next_header = data[offset]
        offset += length
    return -1


def is_new_connection(flags: int) -> bool:
    """A SYN that opens a connection: SYN without ACK (and without RST or FIN)."""
    return flags & (SYN | ACK | RST | FIN) == SYN
