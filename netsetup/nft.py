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

The table carries a comment with a digest of the text netsetup rendered, so `status` can tell
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
    ]
    return "\n".join(lines) + "\n"


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
    """The table as `nft list` prints it, or None when it does not exist (or nft does not:
    router mode needs no nft, and without nft there can be no table of ours)."""
    try:
        result = _nft(["list", "table", FAMILY, TABLE])
    except NftError:
        return None
    if result.returncode != 0:
        if "No such file or directory" in result.stderr:
            return None
        raise NftError(f"nft list table {FAMILY} {TABLE}: {result.stderr.strip()}")
    return result.stdout


def digest_in(listing: str | None) -> str | None:
    if listing is None:
        return None
    match = _DIGEST.search(listing)
    return match.group(1) if match else ""


def write_table(text: str | None) -> None:
    """Replace the table with `text` (None: remove it) in one transaction.

    `add` then `delete` makes the delete safe when the table is absent; then the new table is
    created whole. Flushing instead would keep chains and sets an older config had. nft applies
    a file atomically, so the kernel never holds half of it.
    """
    script = f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n" + (text or "")
    result = _nft(["-f", "-"], stdin=script)
    if result.returncode != 0:
        raise NftError(f"nft -f: {result.stderr.strip()}")
