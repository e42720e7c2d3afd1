"""After `netsetup apply`, connections through the gateway really reach a transparent listener.

Per mode, IPv4 and IPv6, ports 25 and 110: the sender connects to the *server's* address; a
listener in the gateway (IP_TRANSPARENT, on the proxy listen ports) accepts it, and the
accepted socket's local address is the server's address and port (what TPROXY promises). The
listener then connects on to the server from the sender's address, as the spoofing proxy does:
the server sees the sender, and its replies find their way back to the gateway (the socket
divert rule, and in bridge mode the tcp sport steering). A second sender address listed in
bypass_sources reaches the server's own listener directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from netsetup.commands import run_in_namespace
from tests.lab.netsetup_probes import connect_from, start_listener

BYPASSED = {4: "192.0.2.99", 6: "2001:db8:1::99"}

CONFIGS = {
    "router": """[network]
mode = "router"
bypass_sources = ["192.0.2.99/32", "2001:db8:1::99/128"]
[pop3]
enabled = true  # intercepting port 110 needs the POP3 proxy (the probe listener stands in)
""",
    # No address and no subnet on the bridge: an invisible bridge.
    "bridge": """[network]
mode = "bridge"
ports = ["eth0", "eth1"]
bypass_sources = ["192.0.2.99/32", "2001:db8:1::99/128"]
[pop3]
enabled = true
""",
}


@pytest.mark.parametrize("mode", ["router", "bridge"])
def test_intercepted_connections_reach_the_transparent_listener(lab_factory: Any, tmp_path: Path,
                                                                mode: str) -> None:
    lab = lab_factory(mode)
    sender, server = lab.sender, lab.server
    lab.ip(sender, "addr", "add", f"{BYPASSED[4]}/24", "dev", "eth0")
    lab.ip(sender, "-6", "addr", "add", f"{BYPASSED[6]}/64", "dev", "eth0", "nodad")
    config = tmp_path / "mailgate.toml"
    config.write_text(CONFIGS[mode])
    # Through the Python API other code (the demo) uses to set up a lab's gateway.
    result = run_in_namespace(lab.gateway.netns, "apply", config, tmp_path / "state.json")
    assert result.returncode == 0, result.stderr

    start_listener(lab, lab.gateway, "gateway", [10025, 10110], transparent=True, relay=True)
    start_listener(lab, server, "server", [25, 110], transparent=False)

    for family, address, source in ((4, server.ipv4, sender.ipv4),
                                     (6, server.ipv6, sender.ipv6)):
        for port in (25, 110):
            # Sources explicit: IPv6 source selection may prefer the newer, bypassed address.
            answer = connect_from(lab, sender, address, port, source=source)
            assert answer == (f"gateway {address} {port} from {source} relayed "
                              f"server {address} {port} from {source}"), (family, port, answer)
        bypassed = BYPASSED[family]
        direct = connect_from(lab, sender, address, 25, source=bypassed)
        assert direct == f"server {address} 25 from {bypassed}", (family, direct)
