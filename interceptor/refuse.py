"""Refusing a connection with `fail = "closed"`: a TCP reset in the server's name.

A dropped SYN leaves the client retrying for a minute or more; a reset tells it at once that
nobody takes the connection here (an SMTP client then tries its next MX or queues the mail).
RFC 9293 3.10.7.1: the answer to a SYN without ACK is <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>,
and a SYN counts as one octet of sequence space.

Sent from a raw socket with our own IP header (IPPROTO_RAW implies IP_HDRINCL, and IPV6_HDRINCL
on IPv6), so the source is the server's address the client asked for; the kernel fills in the
IPv4 header checksum, the TCP checksum is ours.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

from interceptor.packet import ACK, RST, TCP, Syn

_TCP = struct.Struct("!HHIIBBHHH")  # sport, dport, seq, ack, offset, flags, window, sum, urg
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): one's complement of the one's complement sum."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def reset_for(syn: Syn) -> bytes:
    """The whole IP packet that resets the connection `syn` tries to open."""
    source, destination = syn.destination_bytes, syn.source_bytes  # we answer as the server
    ack = (syn.seq + 1) & 0xFFFFFFFF
    segment = _TCP.pack(syn.dport, syn.sport, 0, ack, 5 << 4, RST | ACK, 0, 0, 0)
    if syn.family == 4:
        pseudo = source + destination + struct.pack("!BBH", 0, TCP, len(segment))
    else:
        pseudo = source + destination + struct.pack("!I3xB", len(segment), TCP)
    segment = segment[:16] + struct.pack("!H", checksum(pseudo + segment)) + segment[18:]
    if syn.family == 4:
        # Version/IHL, TOS, total length, id, DF, TTL, protocol, checksum (kernel), addresses.
        header = _IPV4.pack(0x45, 0, 20 + len(segment), 0, 0x4000, 64, TCP, 0, source,
                            destination)
    else:
        header = _IPV6.pack(6 << 28, len(segment), TCP, 64, source, destination)
    return header + segment


class Resetter:
    """Raw sockets for both families, opened once (needs CAP_NET_RAW)."""

    def __init__(self) -> None:
        self._sockets = {4: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
                         6: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)}
        for sock in self._sockets.values():
            sock.setblocking(False)

    def send(self, syn: Syn) -> bool:
        """False when the reset could not be sent (no route, buffer full): the SYN is dropped
        anyway, and the client retries."""
        client = str(ipaddress.ip_address(syn.source_bytes))
        try:
            self._sockets[syn.family].sendto(reset_for(syn), (client, 0))
        except OSError:
            return False
        return True

    def close(self) -> None:
        for sock in self._sockets.values():
            with contextlib.suppress(OSError):
                sock.close()
