"""An invisible bridge on any network: bridge mode with neither `addresses` nor
`bridged_networks`, dropped into links of several shapes.

For each network the whole path is real: `netsetup apply` in the gateway, `mailgate run` with
SMTP and POP3 on, a Postfix receiver and a Dovecot in the server host, smtplib and poplib in the
sender. What a user would check: the client is answered by the gateway (its banner for SMTP,
its log line for POP3), the message reaches the server with the sender's own address (spoof
source), POP3 retrieval works, a bypassed source still reaches the real server directly, and
the bridge never holds an address, not even an IPv6 link-local one.

The networks: the sender and the server on 198.51.100.0/24 (and 2001:db8:5::/64); on
203.0.113.0/24; both of those subnets on one link at once; the server behind a router on the
bridged link (the gateway then only ever sees the router's link-layer address for it, which is
where a plain on-link route would have left the proxy asking ARP in vain); and the config that
used to blackhole all mail, `bridged_networks` naming subnets that are not on the link.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netsetup.lab.peers._common import in_netns, wait_until
from netsetup.lab.peers.postfix import Postfix, PostfixInstance
from netsetup.lab.topology import Host, Lab
from tests.lab.smtp_helpers import (
    GATEWAY_HOSTNAME,
    HELO,
    PYTHON,
    ROOT,
    SENDER_DOMAIN,
    message,
    smtp_client,
    split_our_received,
)
from tests.lab.test_pop3_lab import PASSWORD, USER, BoundPOP3, DualStackDovecot

SMTP_LISTEN, POP3_LISTEN = 10025, 10110
BYPASS_HOST = 99

NETWORKS: dict[str, dict[str, Any]] = {
    "198.51.100": {"bridge_subnet": ("198.51.100", "2001:db8:5:")},
    "203.0.113": {"bridge_subnet": ("203.0.113", "2001:db8:5:")},
    "two-subnets": {"bridge_subnet": ("198.51.100", "2001:db8:5:"),
                    "second_subnet": ("203.0.113", "2001:db8:7:")},
    "routed-server": {"bridge_subnet": ("198.51.100", "2001:db8:5:"), "routed_server": True},
    # The old failure: bridged_networks that do not match the link. They only route the box's
    # own traffic now, so the proxies' packets still find their peers.
    "stale-bridged-networks": {"bridge_subnet": ("198.51.100", "2001:db8:5:")},
}
EXTRA_NETWORK_KEYS = {
    "stale-bridged-networks": ['bridged_networks = ["192.0.2.0/24", "2001:db8:1::/64"]'],
}


@dataclass
class Bridged:
    lab: Lab
    dir: Path
    receiver: PostfixInstance
    dovecot: DualStackDovecot
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == name:
                    out.append(entry)
        return out


def bypass_address(lab: Lab, family: int) -> str:
    v4, v6 = lab.bridge_subnet
    return f"{v4}.{BYPASS_HOST}" if family == 4 else f"{v6}:{BYPASS_HOST}"


def config_text(lab: Lab, base: Path, extra: list[str]) -> str:
    bypass = [f"{bypass_address(lab, 4)}/32", f"{bypass_address(lab, 6)}/128"]
    return "\n".join([
        "[network]",
        'mode = "bridge"',
        'bridge = "br0"',
        f"ports = {json.dumps(list(lab.bridge_ports))}",
        # Nothing about the network: no addresses, no bridged_networks.
        'intercept = ["smtp", "pop3"]',
        "spoof_source = true",
        f"bypass_sources = {json.dumps(bypass)}",
        *extra,
        "[smtp]",
        f"listen = {SMTP_LISTEN}",
        f'hostname = "{GATEWAY_HOSTNAME}"',
        f'queue_dir = "{base / "queue"}"',
        'relay_domains = ["example.com"]',
        'retry_min = "1s"', 'retry_max = "2s"', 'queue_scan_interval = "1s"',
        'connect_timeout = "3s"',
        "[pop3]",
        "enabled = true",
        f"listen = {POP3_LISTEN}",
        "[log]",
        'format = "json"',
        "",
    ])


@pytest.fixture(scope="module", params=list(NETWORKS))
def bridged(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridged]:
    base = tmp_path_factory.mktemp(f"anywhere-{request.param}")
    lab = Lab("bridge", make_bridge=False, **NETWORKS[request.param])
    try:
        lab.up()
        for family, prefix in ((4, 24), (6, 64)):
            lab.ip(lab.sender, f"-{family}", "addr", "add",
                   f"{bypass_address(lab, family)}/{prefix}", "dev", "eth0",
                   *(["nodad"] if family == 6 else []))
        receiver = Postfix.receiver(lab, lab.server, ["example.com"], base / "receiver")
        dovecot = DualStackDovecot(lab, lab.server, base / "dovecot", {USER: PASSWORD}, "::",
                                   110, False).start()
        config = base / "mailgate.toml"
        config.write_text(config_text(lab, base, EXTRA_NETWORK_KEYS.get(request.param, [])))
        result = lab.run(lab.gateway, [PYTHON, "-m", "netsetup.cli", "--config", str(config),
                                       "--state-file", str(base / "netsetup.json"), "apply"],
                         check=False, cwd=ROOT, timeout=60)
        assert result.returncode == 0, f"netsetup apply:\n{result.stdout}\n{result.stderr}"
        log_path = base / "mailgate.log"
        with log_path.open("ab") as log:
            process = lab.spawn(lab.gateway, [PYTHON, "-m", "proxies.cli", "run", "--config",
                                              str(config)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        wait_until(lambda: '"event": "ready"' in log_path.read_text(errors="replace"),
                   "mailgate run ready", 20, process, (log_path,))
        yield Bridged(lab, base, receiver, dovecot, log_path)
    finally:
        lab.down()


def sources(lab: Lab, family: int) -> list[str]:
    """The sender's addresses to try: one per subnet on the link."""
    host = lab.sender
    found = [host.ipv4 if family == 4 else host.ipv6,
             host.extra_ipv4 if family == 4 else host.extra_ipv6]
    return [a for a in found if a]


def server_addresses(lab: Lab, family: int) -> list[str]:
    host: Host = lab.server
    found = [host.ipv4 if family == 4 else host.ipv6,
             host.extra_ipv4 if family == 4 else host.extra_ipv6]
    return [a for a in found if a]


def pairs(lab: Lab, family: int) -> list[tuple[str, str]]:
    """(source, server) in the same subnet: the second subnet talks within itself."""
    return list(zip(sources(lab, family), server_addresses(lab, family), strict=True))


def test_the_bridge_holds_no_address(bridged: Bridged) -> None:
    out = bridged.lab.ip(bridged.lab.gateway, "-j", "addr", "show", "dev", "br0").stdout
    assert json.loads(out)[0]["addr_info"] == []


@pytest.mark.parametrize("family", [4, 6])
def test_smtp_is_intercepted_and_delivered(bridged: Bridged, family: int) -> None:
    lab = bridged.lab
    for source, server in pairs(lab, family):
        before = len(bridged.receiver.deliveries())
        client = smtp_client(lab.sender, server, source=source)
        try:
            client.ehlo(HELO)
            # The gateway answers, not the server behind it.
            assert GATEWAY_HOSTNAME.encode() in (client.ehlo_resp or b""), client.ehlo_resp
            subject = f"anywhere {source}"
            refused = client.sendmail(f"carol@{SENDER_DOMAIN}", ["alice@example.com"],
                                      message(subject))
            assert refused == {}
        finally:
            client.quit()
        delivery = bridged.receiver.wait_for_messages(before + 1, timeout=20)[before]
        ours, rest = split_our_received(delivery.content)
        assert f"by {GATEWAY_HOSTNAME} (mailgate)".encode() in ours
        assert f"Subject: {subject}".encode() in rest
        # spoof_source: the server saw the sender's own address through the invisible bridge
        assert delivery.client_address == source


def banner(lab: Lab, server: str, source: str) -> bytes:
    """The first line a client from `source` reads on port 25 of `server` (the source named:
    the sender also holds the bypassed address, which IPv6 source selection may pick)."""

    def read() -> bytes:
        sock = socket.create_connection((server, 25), timeout=10, source_address=(source, 0))
        try:
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = sock.recv(512)
                if not chunk:
                    break
                data += chunk
            return data
        finally:
            sock.close()

    return in_netns(lab.sender, read)


@pytest.mark.parametrize("family", [4, 6])
def test_the_gateway_greets_the_client(bridged: Bridged, family: int) -> None:
    lab = bridged.lab
    for source, server in pairs(lab, family):
        greeting = banner(lab, server, source)
        assert greeting.startswith(f"220 {GATEWAY_HOSTNAME}".encode()), greeting


@pytest.mark.parametrize("family", [4, 6])
def test_pop3_is_intercepted(bridged: Bridged, family: int) -> None:
    lab = bridged.lab
    content = message("pop3 anywhere")
    bridged.dovecot.deliver(USER, content)
    for source, server in pairs(lab, family):
        connects = len(bridged.events("pop3_connect"))

        def session(server: str = server, source: str = source) -> bytes:
            pop = BoundPOP3(server, 110, timeout=20, source=(source, 0))
            try:
                pop.user(USER)
                pop.pass_(PASSWORD)
                count, _size = pop.stat()
                _status, lines, _octets = pop.retr(count)
                return b"".join(line + b"\r\n" for line in lines)
            finally:
                pop.quit()

        retrieved = in_netns(lab.sender, session)
        assert retrieved == content
        wait_until(lambda c=connects: len(bridged.events("pop3_connect")) > c,
                   "the gateway's pop3_connect line", 5)
        event = bridged.events("pop3_connect")[-1]
        assert event["client"].startswith(f"[{source}]:")
        assert event["spoof"] is True


@pytest.mark.parametrize("family", [4, 6])
def test_a_bypassed_source_is_purely_bridged(bridged: Bridged, family: int) -> None:
    lab = bridged.lab
    server = server_addresses(lab, family)[0]
    greeting = banner(lab, server, bypass_address(lab, family))
    # The real server's own banner: Postfix, not mailgate.
    assert greeting.startswith(b"220 mx.example.com"), greeting


def test_teardown_removes_it_all(bridged: Bridged) -> None:
    """Last in the module for each network: the egress routing goes with teardown."""
    lab = bridged.lab
    config = bridged.dir / "mailgate.toml"
    state = bridged.dir / "netsetup.json"
    result = lab.run(lab.gateway, [PYTHON, "-m", "netsetup.cli", "--config", str(config),
                                   "--state-file", str(state), "teardown"],
                     check=False, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lab.run(lab.gateway, ["nft", "list", "ruleset"]).stdout.strip() == ""
    assert "PERMANENT" not in lab.ip(lab.gateway, "neigh", "show", "nud", "permanent").stdout
    rules = lab.ip(lab.gateway, "rule", "show").stdout + lab.ip(lab.gateway, "-6", "rule",
                                                                 "show").stdout
    assert "fwmark" not in rules
