"""Where a queued message goes next.

In order (the issue's rule, like Postfix's transport resolution): the destination the client
was trying to reach when its connection was intercepted; else the `transport` entry of the
recipient's domain; else the configured `next_hop`; else the domain's MX hosts (RFC 5321 5.1:
lowest preference first, the domain's own address when it has no MX).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from proxies.config import SmtpConfig


@dataclass(frozen=True)
class NextHop:
    # Addresses to try in order, each (ip, port).
    addresses: tuple[tuple[str, int], ...]
    # Why this hop: "intercepted", "transport", "next_hop", "mx".
    source: str
    # When set, the onward connection leaves with this source address (the client's).
    spoof_source: str | None = None


class NoRoute(Exception):
    """No address for the domain; `permanent` says whether a retry could help. `code` and
    `status` are the reply the recipients get: by default 550 5.1.2 (RFC 3463: bad destination
    system address) when permanent, 451 4.4.3 (directory server failure) when not."""

    def __init__(self, message: str, permanent: bool, code: int | None = None,
                 status: str | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code or (550 if permanent else 451)
        self.status = status or ("5.1.2" if permanent else "4.4.3")


def _same_family(a: str, b: str) -> bool:
    return ipaddress.ip_address(a).version == ipaddress.ip_address(b).version


async def resolve_next_hop(config: SmtpConfig, domain: str,
                           original_destination: tuple[str, int] | None,
                           client_address: str, spoof_source: bool) -> NextHop:
    if original_destination is not None:
        host, _port = original_destination
        spoof = client_address if spoof_source and _same_family(host, client_address) else None
        return NextHop((original_destination,), "intercepted", spoof)
    hop = config.transport_for(domain)
    if hop is not None:
        return NextHop(tuple(await _addresses(*hop)), "transport")
    if config.next_hop is not None:
        return NextHop(tuple(await _addresses(*config.next_hop)), "next_hop")
    return NextHop(tuple(await _mx_addresses(domain)), "mx")


async def _addresses(host: str, port: int) -> list[tuple[str, int]]:
    try:
        ipaddress.ip_address(host)
        return [(host, port)]
    except ValueError:
        pass
    found = await _lookup_host(host)
    if not found:
        raise NoRoute(f"host {host} not found", permanent=False)
    return [(address, port) for address in found]


async def _lookup_host(name: str) -> list[str]:
    resolver = dns.asyncresolver.Resolver()
    out: list[str] = []
    for rdtype in ("AAAA", "A"):
        try:
            answer = await resolver.resolve(name, rdtype, lifetime=10)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException:
            continue
        out += [rr.to_text() for rr in answer]
    return out


async def _mx_addresses(domain: str) -> Sequence[tuple[str, int]]:
    resolver = dns.asyncresolver.Resolver()
    try:
        answer = await resolver.resolve(domain, "MX", lifetime=10)
        exchanges = sorted((rr.preference, rr.exchange.to_text().rstrip(".")) for rr in answer)
    except dns.resolver.NXDOMAIN:
        raise NoRoute(f"domain {domain} does not exist", permanent=True) from None
    except dns.resolver.NoAnswer:
        exchanges = [(0, domain)]  # RFC 5321 5.1: the implicit MX
    except dns.exception.DNSException as exc:
        raise NoRoute(f"MX lookup for {domain} failed: {exc}", permanent=False) from None
    if len(exchanges) == 1 and exchanges[0][1] in ("", "."):
        # RFC 7505 null MX: the domain accepts no mail.
        # RFC 7505 3: 556 with 5.1.10, "recipient address has null MX" (RFC 7505 4.2).
        raise NoRoute(f"domain {domain} accepts no mail (null MX)", permanent=True, code=556,
                      status="5.1.10")
    addresses: list[tuple[str, int]] = []
    for _preference, host in exchanges:
        addresses += [(a, 25) for a in await _lookup_host(host)]
    if not addresses:
        raise NoRoute(f"no address for the MX hosts of {domain}", permanent=False)
    return addresses
