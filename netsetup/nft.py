"""Bridge-family steering through nftables: rendering (pure) and the `nft` glue.

Why the bridge family at all: with bridge-nf-call-iptables a TPROXY rule sees bridged frames
but the frame is still bridged, so nothing is intercepted (measured). What works on this kernel
is rewriting, at bridge prerouting, the destination MAC of an intercepted frame to the bridge's
own MAC *and* setting pkttype to host: the frame then goes up the bridge's IP stack, where the
mangle TPROXY rules on `-i <bridge>` take it. python-iptables cannot write bridge-family rules,
and this kernel has no ebtables broute table, so `nft` it is.

The bridge family here cannot see conntrack or marks, so the replies of the proxy's spoofed
onward connections (tcp *source* port 25 towards the client) are steered by port alone; bypassed
hosts are excluded by address (for those replies a bypassed source is the destination and a
bypassed destination the source).

A second table, in the netdev family, is the bridge's memory of where its peers are. The
proxies' own packets (replies to the clients they take, onward connections spoofed as the
client) are routed to a fixed fake neighbour (netsetup/desired.py, EGRESS_LLADDR), because the
bridge has no address to resolve anything with. At the ports' ingress, every frame of an
intercepted port records its IP source -> Ethernet source (and, for the client's frames, IP
destination -> Ethernet destination: the server or the router in front of it); at the bridge's
egress, a frame addressed to the fake neighbour gets the recorded address instead, before the
bridge looks up its port. So a peer behind a router is reached through that router, exactly as
its own frames came, on whatever subnets share the link. A frame for an address never seen is
dropped: it would otherwise be flooded with a destination nobody owns. Learning must be at
netdev ingress (the bridge prerouting rule below rewrites the destination first) and the
rewrite at the bridge device's egress (the bridge family's output hook runs after the port was
chosen).

Both tables carry a comment with a digest of the text netsetup rendered, so `status` can tell
"this is exactly what we would write" without parsing nft's listing.
"""

from __future__ import annotations

import hashlib
import re
import subprocess

from netsetup.configfile import Network
from netsetup.desired import NftSteering

FAMILY = "bridge"
TABLE = "mailgate"
EGRESS_FAMILY = "netdev"
TABLES = ((FAMILY, TABLE), (EGRESS_FAMILY, TABLE))
# How long a learnt address is kept after its last frame, and how many: a queued message may be
# retried days after the client's connection (the queue's lifetime is 5 days by default).
LEARN_TIMEOUT = "7d"
LEARN_SIZE = 65536
_DIGEST = re.compile(r'comment "netsetup digest ([0-9a-f]+)"')


def render(spec: NftSteering, mac: str) -> str:
    """The whole table as nft input, its digest comment included."""
    body = _render_body(spec, mac)
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    return body.replace("@DIGEST@", digest)


def digest_of(spec: NftSteering, mac: str) -> str:
    match = _DIGEST.search(render(spec, mac))
    assert match is not None
    return match.group(1)


def _set(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _not_in(selector: str, networks: tuple[Network, ...], family: int) -> str:
    nets = [str(n) for n in networks if n.version == family]
    return f" {selector} != {_set(nets)}" if nets else ""


def _render_body(spec: NftSteering, mac: str) -> str:
    ports = _set([f'"{p}"' for p in spec.ports])
    tcp_ports = _set([str(p) for p in spec.tcp_ports])
    steer = f"ether daddr set {mac} meta pkttype set host"
    rules = []
    if spec.tcp_ports:
        for family in spec.families:
            proto, name = ("ip", "ip") if family == 4 else ("ip6", "ip6")
            rules.append(
                f"iifname {ports} ether type {name}"
                + _not_in(f"{proto} saddr", spec.bypass_sources, family)
                + _not_in(f"{proto} daddr", spec.bypass_destinations, family)
                + f" tcp dport {tcp_ports} {steer} comment \"to intercepted ports\""
            )
            rules.append(
                f"iifname {ports} ether type {name}"
                + _not_in(f"{proto} daddr", spec.bypass_sources, family)
                + _not_in(f"{proto} saddr", spec.bypass_destinations, family)
                + f" tcp sport {tcp_ports} {steer} comment \"replies to spoofed connections\""
            )
    lines = [
        f"table {FAMILY} {TABLE} {{",
        '\tcomment "netsetup digest @DIGEST@"',
        "\tchain prerouting {",
        # dstnat priority: before the bridge decides where the frame goes.
        "\t\ttype filter hook prerouting priority dstnat; policy accept;",
        *[f"\t\t{rule}" for rule in rules],
        "\t}",
        "}",
        *_render_egress(spec),
    ]
    return "\n".join(lines) + "\n"


def _render_egress(spec: NftSteering) -> list[str]:
    ports = _set([f'"{p}"' for p in spec.ports])
    tcp_ports = _set([str(p) for p in spec.tcp_ports])
    maps, learn, resolve = [], [], []
    for family in spec.families:
        name, addr, kind = ("ip", "ip", "ipv4_addr") if family == 4 else ("ip6", "ip6",
                                                                           "ipv6_addr")
        peers = f"peers{family}"
        maps.append(f"\tmap {peers} {{ type {kind} : ether_addr; flags dynamic, timeout; "
                    f"timeout {LEARN_TIMEOUT}; size {LEARN_SIZE}; }}")
        if spec.tcp_ports:
            learn.append(f"\t\tether type {name} tcp dport {tcp_ports} "
                         f"update @{peers} {{ {addr} saddr : ether saddr }} "
                         f"update @{peers} {{ {addr} daddr : ether daddr }}")
            learn.append(f"\t\tether type {name} tcp sport {tcp_ports} "
                         f"update @{peers} {{ {addr} saddr : ether saddr }}")
        resolve.append(f"\t\tether daddr {spec.egress_lladdr} ether type {name} "
                       f"ether daddr set {addr} daddr map @{peers} accept")
    resolve.append(f"\t\tether daddr {spec.egress_lladdr} counter drop "
                   'comment "a peer never seen"')
    return [
        f"table {EGRESS_FAMILY} {TABLE} {{",
        '\tcomment "netsetup digest @DIGEST@"',
        *maps,
        "\tchain learn {",
        f"\t\ttype filter hook ingress devices = {{ {ports.strip('{} ')} }} priority 0; "
        "policy accept;",
        *learn,
        "\t}",
        "\tchain resolve {",
        f'\t\ttype filter hook egress device "{spec.bridge}" priority 0; policy accept;',
        *resolve,
        "\t}",
        "}",
    ]


# --- glue: the nft program -----------------------------------------------------------------


class NftError(Exception):
    pass


def _nft(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True,
                              timeout=30)
    except FileNotFoundError:
        raise NftError("the 'nft' program is not installed (Debian package nftables)") from None


def read_table() -> str | None:
    """Our tables as `nft list` prints them, or None when neither exists (or nft does not:
    router mode needs no nft, and without nft there can be no table of ours)."""
    listings = []
    for family, table in TABLES:
        try:
            # -t: the learnt addresses are state, not configuration.
            result = _nft(["-t", "list", "table", family, table])
        except NftError:
            return None
        if result.returncode != 0:
            if "No such file or directory" in result.stderr:
                continue
            raise NftError(f"nft list table {family} {table}: {result.stderr.strip()}")
        listings.append(result.stdout)
    return "".join(listings) if listings else None


def digest_in(listing: str | None) -> str | None:
    """The digest both tables carry; "" when they differ or one lacks it (so: replace)."""
    if listing is None:
        return None
    found = _DIGEST.findall(listing)
    if len(found) != len(TABLES) or len(set(found)) != 1:
        return ""
    return str(found[0])


def write_table(text: str | None) -> None:
    """Replace the table with `text` (None: remove it) in one transaction.

    `add` then `delete` makes the delete safe when the table is absent; then the new table is
    created whole. Flushing instead would keep chains and sets an older config had. nft applies
    a file atomically, so the kernel never holds half of it.
    """
    script = "".join(f"add table {family} {table}\ndelete table {family} {table}\n"
                     for family, table in TABLES) + (text or "")
    result = _nft(["-f", "-"], stdin=script)
    if result.returncode != 0:
        raise NftError(f"nft -f: {result.stderr.strip()}")
