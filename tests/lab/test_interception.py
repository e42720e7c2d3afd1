"""The foundation's "must show": in router and bridge mode, over IPv4 and IPv6, connections
from the sender to the server's ports 25 and 110 are taken by the relay in the gateway, which
knows where they were going; relayed onward, the server sees the sender's own address with
spoofing on and the gateway's with it off; a bypassed source reaches the server untouched.

The gateway's rules come from `netsetup --config PATH apply`, as on a real box. Setting
MAILGATE_INTERCEPTION_RULES=hand installs the measured recipe of NETFILTER-FACTS.md with the
iptables/ip/nft commands instead, to tell a netsetup fault from a relay fault.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netsetup.lab.topology import Lab
from tests.lab.tcp_probes import JsonLines, event_is

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SMTP_LISTEN, POP3_LISTEN = 10025, 10110
# A second address of the sender, listed in bypass_sources: same host, never intercepted.
BYPASS_HOST = 11

LabFactory = Callable[..., Lab]


@dataclass
class Setup:
    lab: Lab
    relay: JsonLines
    server: JsonLines
    spoof: bool

    def sender_address(self, family: int) -> str:
        address = self.lab.sender.ipv4 if family == 4 else self.lab.sender.ipv6
        assert address is not None
        return address

    def server_address(self, family: int) -> str:
        address = self.lab.server.ipv4 if family == 4 else self.lab.server.ipv6
        assert address is not None
        return address

    def connect(self, targets: list[tuple[str, int]], source: str | None = None
                ) -> list[dict[str, Any]]:
        argv = [PYTHON, "-m", "tests.lab.tcp_probes", "connect"]
        argv += [f"[{host}]:{port}" for host, port in targets]
        if source:
            argv += ["--source", source]
        result = self.lab.run(self.lab.sender, argv, cwd=ROOT, timeout=60)
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


# --- the gateway's rules ------------------------------------------------------------------------


def bypass_address(family: int) -> str:
    # The sender sits on the lab's first subnet in both modes.
    return f"192.0.2.{BYPASS_HOST}" if family == 4 else f"2001:db8:1::{BYPASS_HOST}"


def network_config(lab: Lab, spoof: bool) -> str:
    bypass = [f"{bypass_address(4)}/32", f"{bypass_address(6)}/128"]
    lines = [
        "[network]",
        f'mode = "{lab.mode}"',
        'intercept = ["smtp", "pop3"]',
        "ipv6 = true",
        f"spoof_source = {'true' if spoof else 'false'}",
        f"bypass_sources = {json.dumps(bypass)}",
    ]
    if lab.mode == "bridge":
        lines += ['bridge = "br0"', f"ports = {json.dumps(list(lab.bridge_ports))}"]
        # With spoofing the bridge needs neither an address nor a subnet (an invisible bridge).
        if not spoof:
            # Without spoofing the relay connects from an address of the gateway's.
            lines.append(f"addresses = {json.dumps(list(lab.bridge_management_addresses()))}")
    return "\n".join(lines) + "\n"


# The ports the relay listens on, as the proxies' own sections set them (netsetup reads them
# there); the relay stands in for both proxies, so both count as running.
RELAY_AS_PROXIES = (f"[smtp]\nlisten = {SMTP_LISTEN}\n"
                    f"[pop3]\nenabled = true\nlisten = {POP3_LISTEN}\n")


def apply_with_netsetup(lab: Lab, config: Path, state: Path) -> None:
    # Our own state file: the default one is keyed by the namespace's inode, which a later lab
    # may reuse.
    argv = [PYTHON, "-m", "netsetup.cli", "--config", str(config), "--state-file", str(state),
            "apply"]
    result = lab.run(lab.gateway, argv, check=False, cwd=ROOT, timeout=60)
    assert result.returncode == 0, f"netsetup apply failed:\n{result.stdout}\n{result.stderr}"


def apply_by_hand(lab: Lab, spoof: bool) -> None:
    """The recipe of NETFILTER-FACTS.md, for telling netsetup faults from relay faults."""
    gw = lab.gateway
    bridge = lab.mode == "bridge"
    bypass4, bypass6 = bypass_address(4), bypass_address(6)
    for tool, bypass in (("iptables-legacy", bypass4), ("ip6tables-legacy", bypass6)):
        inbound = ["-i", "br0"] if bridge else []
        for rule in (
            ["-N", "MG_DIVERT"],
            ["-A", "MG_DIVERT", "-j", "MARK", "--set-xmark", "0x1/0x1"],
            ["-A", "MG_DIVERT", "-j", "ACCEPT"],
            ["-A", "PREROUTING", *inbound, "-p", "tcp", "-m", "socket", "--transparent",
             "-j", "MG_DIVERT"],
            ["-A", "PREROUTING", *inbound, "-s", bypass, "-j", "RETURN"],
            ["-A", "PREROUTING", *inbound, "-p", "tcp", "--dport", "25", "-j", "TPROXY",
             "--on-port", str(SMTP_LISTEN), "--tproxy-mark", "0x1/0x1"],
            ["-A", "PREROUTING", *inbound, "-p", "tcp", "--dport", "110", "-j", "TPROXY",
             "--on-port", str(POP3_LISTEN), "--tproxy-mark", "0x1/0x1"],
        ):
            lab.run(gw, [tool, "-t", "mangle", *rule])
    for family in ("-4", "-6"):
        lab.ip(gw, family, "rule", "add", "fwmark", "0x1/0x1", "lookup", "100")
        lab.ip(gw, family, "route", "add", "local", "default", "dev", "lo", "table", "100")
    if not bridge:
        return
    lab.sysctl(gw, "net.bridge.bridge-nf-call-iptables", "0")
    lab.sysctl(gw, "net.bridge.bridge-nf-call-ip6tables", "0")
    if spoof:
        lab.ip(gw, "route", "add", "192.0.2.0/24", "dev", "br0")
        lab.ip(gw, "-6", "route", "add", "2001:db8:1::/64", "dev", "br0")
    else:
        for cidr in lab.bridge_management_addresses():
            lab.ip(gw, "addr", "add", cidr, "dev", "br0", *(["nodad"] if ":" in cidr else []))
    mac = json.loads(lab.ip(gw, "-j", "link", "show", "br0").stdout)[0]["address"]
    client_port, server_ports = lab.bridge_ports[0], lab.bridge_ports[1:]
    to_host = f"ether daddr set {mac} meta pkttype set host"
    rules = [
        f'iifname "{client_port}" ip saddr {bypass4} return',
        f'iifname "{client_port}" ip6 saddr {bypass6} return',
        f'iifname "{client_port}" tcp dport {{ 25, 110 }} {to_host}',
    ]
    if spoof:
        servers = ", ".join(f'"{p}"' for p in server_ports)
        rules += [
            f"iifname {{ {servers} }} ip daddr {bypass4} return",
            f"iifname {{ {servers} }} ip6 daddr {bypass6} return",
            f"iifname {{ {servers} }} tcp sport {{ 25, 110 }} {to_host}",
        ]
    script = ("table bridge mg {\n chain prerouting {\n"
              "  type filter hook prerouting priority dstnat; policy accept;\n"
              + "".join(f"  {rule}\n" for rule in rules) + " }\n}\n")
    lab.run(gw, ["nft", "-f", "-"], input=script)


# --- the lab ------------------------------------------------------------------------------------


@pytest.fixture(params=[
    pytest.param(("router", True), id="router-spoof"),
    pytest.param(("router", False), id="router-nospoof"),
    pytest.param(("bridge", True), id="bridge-spoof"),
    pytest.param(("bridge", False), id="bridge-nospoof"),
])
def setup(request: pytest.FixtureRequest, lab_factory: LabFactory,
          tmp_path: Path) -> Iterator[Setup]:
    mode, spoof = request.param
    by_hand = os.environ.get("MAILGATE_INTERCEPTION_RULES") == "hand"
    # netsetup builds the bridge itself from [network] ports.
    lab = lab_factory(mode, make_bridge=by_hand)
    for family, prefix in ((4, 24), (6, 64)):
        lab.ip(lab.sender, f"-{family}", "addr", "add", f"{bypass_address(family)}/{prefix}",
               "dev", "eth0", *(["nodad"] if family == 6 else []))
    pipe = {"stdout": subprocess.PIPE, "cwd": ROOT}
    server = JsonLines(lab.spawn(lab.server, [PYTHON, "-m", "tests.lab.tcp_probes", "serve",
                                              "--port", "25", "--port", "110"], **pipe))
    relay_argv = [PYTHON, "-m", "proxies.tcprelay", "--port", str(SMTP_LISTEN),
                  "--port", str(POP3_LISTEN), "--json-events"]
    relay = JsonLines(lab.spawn(lab.gateway, relay_argv + ([] if spoof else ["--no-spoof"]),
                                **pipe))
    server.wait_for(lambda e: e["event"] == "listening", what="server listening")
    relay.wait_for(lambda e: e["event"] == "listening", what="relay listening")
    if by_hand:
        apply_by_hand(lab, spoof)
    else:
        config = tmp_path / "mailgate.toml"
        config.write_text(network_config(lab, spoof) + RELAY_AS_PROXIES)
        apply_with_netsetup(lab, config, tmp_path / "netsetup-state.json")
    yield Setup(lab, relay, server, spoof)


def test_interception(setup: Setup) -> None:
    targets, results = [], []
    for family in (4, 6):
        # The sender also holds the bypassed address; name its own one as the source.
        family_targets = [(setup.server_address(family), port) for port in (25, 110)]
        results += setup.connect(family_targets, source=setup.sender_address(family))
        targets += family_targets
    assert [r["ok"] for r in results] == [True] * 4, results
    for (host, port), result in zip(targets, results, strict=True):
        family = 6 if ":" in host else 4
        sender = setup.sender_address(family)
        # The relay took it and knows where it was going.
        intercepted = setup.relay.wait_for(event_is("intercepted", client=result["local"]),
                                           what=f"relay event for {result['local']}")
        assert intercepted["original_destination"] == [host, port]
        assert intercepted["how"] == "tproxy"
        # The server saw the connection at the address the client used.
        assert result["server_local"] == [host, port]
        # ... from the sender itself with spoofing on, from the gateway with it off.
        if setup.spoof:
            assert result["peer"][0] == sender, result
        else:
            assert result["peer"][0] == setup.lab.gateway_address("server", family), result
        assert result["echo"] == "echo me\r\n"
    for result in results:
        setup.relay.wait_for(event_is("closed", client=result["local"], bytes_from_client=9),
                             what=f"relay closing {result['local']}")


def test_bypassed_source_reaches_the_server_directly(setup: Setup) -> None:
    for family in (4, 6):
        source = bypass_address(family)
        targets = [(setup.server_address(family), port) for port in (25, 110)]
        results = setup.connect(targets, source=source)
        for result in results:
            assert result["ok"], result
            assert result["peer"] == [source, result["local"][1]], result
    seen = setup.relay.settle(0.3)
    assert not [e for e in seen if e["event"] != "listening"], seen
