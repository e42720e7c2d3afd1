"""The decision for one new connection: intercept it, let it pass, or refuse it.

Sans-I/O: `Policy.decide(syn)` reads only the parsed SYN and two flags other threads keep
current (`schedule_active`, and per proxy port `healthy`); it never looks at a clock, a socket
or a file. The order, first match wins:

1. not a new connection we can read (later fragment, ESP, SYN/ACK...): pass ("unparsable");
2. a port the interceptor does not handle (`services`): pass ("port");
3. outside the schedule: pass ("schedule");
4. bypassed source, destination or pair: pass ("source", "destination", "pair");
5. its proxy not accepting: pass ("health") with `fail = "open"`, else refuse;
6. intercept.

Address lists are held as one set per prefix length, so a lookup costs one shift and one set
probe per distinct prefix length, whatever the length of the list.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from interceptor.config import InterceptorConfig
from interceptor.packet import Syn, is_new_connection
from netsetup.config import NetworkConfig
from netsetup.configfile import Network


class Verdict(enum.Enum):
    INTERCEPT = "intercept"
    PASS = "pass"
    REFUSE = "refuse"


# Why a connection was passed; the counters use these names.
RULE_REASONS = ("port", "schedule", "source", "destination", "pair")
PASS_REASONS = ("unparsable", *RULE_REASONS, "health")


@dataclass(frozen=True)
class Service:
    name: str
    port: int  # destination port the clients use
    listen_port: int  # where its proxy listens
    max_connections: int  # 0: no limit checked


class AddressSet:
    """Networks of one family, looked up by address integer."""

    def __init__(self, networks: Iterable[Network], bits: int) -> None:
        self.bits = bits
        by_length: dict[int, set[int]] = {}
        for network in networks:
            shift = bits - network.prefixlen
            by_length.setdefault(shift, set()).add(int(network.network_address) >> shift)
        # Longest prefixes first: the order does not change the answer, only the typical cost.
        self._levels = tuple(sorted(by_length.items()))

    def __contains__(self, address: int) -> bool:
        # A plain loop: any() over a generator costs a frame per call on the hot path.
        for shift, keys in self._levels:  # noqa: SIM110 (speed, see above)
            if address >> shift in keys:
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self._levels)


class PairSet:
    """(source network, destination network) pairs of one family."""

    def __init__(self, pairs: Iterable[tuple[Network, Network]], bits: int) -> None:
        by_lengths: dict[tuple[int, int], set[tuple[int, int]]] = {}
        for source, destination in pairs:
            shifts = (bits - source.prefixlen, bits - destination.prefixlen)
            by_lengths.setdefault(shifts, set()).add(
                (int(source.network_address) >> shifts[0],
                 int(destination.network_address) >> shifts[1]))
        self._levels = tuple(by_lengths.items())

    def contains(self, source: int, destination: int) -> bool:
        for (source_shift, destination_shift), keys in self._levels:
            if (source >> source_shift, destination >> destination_shift) in keys:
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self._levels)


class Policy:
    def __init__(self, services: Iterable[Service], *, fail_open: bool = True,
                 bypass_sources: Iterable[Network] = (),
                 bypass_destinations: Iterable[Network] = (),
                 bypass_pairs: Iterable[tuple[Network, Network]] = ()) -> None:
        self.services = {item.port: item for item in services}
        self.fail_open = fail_open
        sources, destinations, pairs = (list(bypass_sources), list(bypass_destinations),
                                        list(bypass_pairs))
        # Index 4 and 6: the family number picks the set.
        self._sources = {4: AddressSet((n for n in sources if n.version == 4), 32),
                         6: AddressSet((n for n in sources if n.version == 6), 128)}
        self._destinations = {
            4: AddressSet((n for n in destinations if n.version == 4), 32),
            6: AddressSet((n for n in destinations if n.version == 6), 128)}
        self._pairs = {4: PairSet((p for p in pairs if p[0].version == 4), 32),
                       6: PairSet((p for p in pairs if p[0].version == 6), 128)}
        # Kept current by other threads; plain attribute reads here (atomic under the GIL).
        self.schedule_active = True
        self.healthy: dict[tuple[int, int], bool] = {}

    def decide(self, syn: Syn | None) -> tuple[Verdict, str]:
        """The verdict and its reason: 'intercepted', 'refused' or one of PASS_REASONS."""
        if syn is None or not is_new_connection(syn.flags):
            return Verdict.PASS, "unparsable"
        service = self.services.get(syn.dport)
        if service is None:
            return Verdict.PASS, "port"
        if not self.schedule_active:
            return Verdict.PASS, "schedule"
        family = syn.family
        if syn.source in self._sources[family]:
            return Verdict.PASS, "source"
        if syn.destination in self._destinations[family]:
            return Verdict.PASS, "destination"
        if self._pairs[family].contains(syn.source, syn.destination):
            return Verdict.PASS, "pair"
        if not self.healthy.get((family, service.listen_port), False):
            if self.fail_open:
                return Verdict.PASS, "health"
            return Verdict.REFUSE, "refused"
        return Verdict.INTERCEPT, "intercepted"


def services_for(network: NetworkConfig, interceptor: InterceptorConfig,
                 proxy_limits: Mapping[str, int]) -> list[Service]:
    """The services the interceptor handles: [network] intercept, narrowed by `services`.

    `proxy_limits` are the proxies' own connection limits (e.g. [smtp] max_connections), used
    where [interceptor] max_connections does not name the service.
    """
    enabled = interceptor.services
    limits = {**proxy_limits, **dict(interceptor.max_connections)}
    return [Service(item.service, item.port, item.listen_port, limits.get(item.service, 0))
            for item in network.intercept if enabled is None or item.service in enabled]


def policy_for(network: NetworkConfig, interceptor: InterceptorConfig,
               proxy_limits: Mapping[str, int]) -> Policy:
    return Policy(services_for(network, interceptor, proxy_limits),
                  fail_open=interceptor.fail == "open",
                  bypass_sources=interceptor.bypass_sources,
                  bypass_destinations=interceptor.bypass_destinations,
                  bypass_pairs=interceptor.bypass_pairs)
