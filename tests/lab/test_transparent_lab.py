"""proxies.transparent against the real kernel: SO_ORIGINAL_DST under REDIRECT (IPv4 with
iptables, IPv6 with ip6tables), connections addressed to the proxy itself, and the listener
variants TPROXY accepts. Router-mode lab; the rules are installed by hand here because these
tests are about the socket layer, not about netsetup."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from netsetup.lab.topology import Lab
from tests.lab.tcp_probes import JsonLines, event_is
from tests.lab.test_interception import apply_by_hand

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
LabFactory = Callable[..., Lab]


def connect(lab: Lab, *targets: str) -> list[dict[str, Any]]:
    result = lab.run(lab.sender, [PYTHON, "-m", "tests.lab.tcp_probes", "connect", *targets,
                                  "--timeout", "3"], cwd=ROOT, timeout=60)
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def spawn_json(lab: Lab, host: Any, argv: list[str]) -> JsonLines:
    lines = JsonLines(lab.spawn(host, [PYTHON, "-m", *argv], stdout=subprocess.PIPE, cwd=ROOT))
    lines.wait_for(lambda e: e["event"] == "listening", what=f"{argv[0]} listening")
    return lines


def test_redirect_original_destination_v4_and_v6(lab_factory: LabFactory) -> None:
    lab = lab_factory("router")
    gw = lab.gateway
    server = spawn_json(lab, lab.server, ["tests.lab.tcp_probes", "serve", "--port", "25"])
    # REDIRECT hands the connection to a plain (non-transparent) socket of the gateway's own;
    # replies to a spoofed onward connection would bypass it, so no spoofing here.
    relay = spawn_json(lab, gw, ["proxies.tcprelay", "--port", "10025", "--no-transparent",
                                 "--no-spoof", "--json-events"])
    for tool in ("iptables", "ip6tables"):
        lab.run(gw, [tool, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", "25",
                     "-j", "REDIRECT", "--to-ports", "10025"])
    results = connect(lab, "198.51.100.25:25", "[2001:db8:2::25]:25")
    assert [r["ok"] for r in results] == [True, True], results
    for result, (server_addr, gw_addr) in zip(results, [("198.51.100.25", "198.51.100.1"),
                                                        ("2001:db8:2::25", "2001:db8:2::1")],
                                              strict=True):
        event = relay.wait_for(event_is("intercepted", client=result["local"]))
        assert event["how"] == "nat"
        assert event["original_destination"] == [server_addr, 25]
        assert result["server_local"] == [server_addr, 25]
        assert result["peer"][0] == gw_addr
        assert result["echo"] == "echo me\r\n"
    server.settle(0)


def test_connection_to_the_proxy_port_itself_is_direct(lab_factory: LabFactory) -> None:
    lab = lab_factory("router")
    probe = spawn_json(lab, lab.gateway, ["tests.lab.tcp_probes", "classify", "--port", "10025"])
    for tool in ("iptables", "ip6tables"):  # conntrack and NAT loaded, as on a real gateway
        lab.run(lab.gateway, [tool, "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport",
                              "25", "-j", "REDIRECT", "--to-ports", "10025"])
    results = connect(lab, "192.0.2.1:10025", "[2001:db8:1::1]:10025")
    assert [r["ok"] for r in results] == [True, True], results
    for result, local in zip(results, (["192.0.2.1", 10025], ["2001:db8:1::1", 10025]),
                             strict=True):
        event = probe.wait_for(event_is("connection", client=result["local"]))
        assert event["how"] == "direct" and not event["intercepted"]
        assert event["original_destination"] == local


@pytest.mark.parametrize("dual_stack", [False, True], ids=["per-family", "dual-stack"])
def test_tproxy_listener_variants(lab_factory: LabFactory, dual_stack: bool) -> None:
    """Per-family sockets and one dual-stack '::' socket both take what TPROXY hands over;
    the dual-stack one sees IPv4 as ::ffff:a.b.c.d, which connection_info makes plain."""
    lab = lab_factory("router")
    apply_by_hand(lab, spoof=True)
    argv = ["tests.lab.tcp_probes", "classify", "--port", "10025"]
    probe = spawn_json(lab, lab.gateway, argv + (["--dual-stack"] if dual_stack else []))
    results = connect(lab, "198.51.100.25:25", "[2001:db8:2::25]:25")
    for result, (destination, client) in zip(
            results, [("198.51.100.25", "192.0.2.10"), ("2001:db8:2::25", "2001:db8:1::10")],
            strict=True):
        assert result["greeting"].startswith(f"PEER {client} "), result
        event = probe.wait_for(event_is("connection", client=result["local"]))
        assert event["how"] == "tproxy"
        assert event["original_destination"] == [destination, 25]


def test_tproxy_without_transparent_listener_fails_closed(lab_factory: LabFactory) -> None:
    lab = lab_factory("router")
    apply_by_hand(lab, spoof=True)
    # The server listens: a connection that slipped past TPROXY would reach it and succeed.
    spawn_json(lab, lab.server, ["tests.lab.tcp_probes", "serve", "--port", "25"])
    argv = ["tests.lab.tcp_probes", "classify", "--port", "10025", "--no-transparent"]
    probe = spawn_json(lab, lab.gateway, argv)
    result = lab.run(lab.sender, [PYTHON, "-m", "tests.lab.tcp_probes", "connect",
                                  "198.51.100.25:25", "--timeout", "0.5"], cwd=ROOT)
    assert not json.loads(result.stdout)["ok"]
    assert [e for e in probe.settle(0) if e["event"] == "connection"] == []
