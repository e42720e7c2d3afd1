"""[network] validation: every problem reported with file and key, before anything is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from netsetup.config import load_network_config
from netsetup.configfile import ConfigError
from netsetup.links import LinkInfo
from netsetup.preflight import live_problems


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "mailgate.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_network_config(path)
    return [str(p).replace(f"{path}: ", "") for p in caught.value.problems]


def test_defaults_are_a_router_intercepting_what_runs(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text("[network]\n")
    config = load_network_config(path)
    assert config.mode == "router"
    # The POP3 proxy is off unless [pop3] enabled = true, so port 110 is left alone.
    assert [(i.service, i.port, i.listen_port) for i in config.intercept] == [("smtp", 25, 10025)]
    assert config.families == (4, 6)
    path.write_text("[pop3]\nenabled = true\n")
    assert [(i.service, i.port, i.listen_port) for i in load_network_config(path).intercept] == [
        ("smtp", 25, 10025), ("pop3", 110, 10110)]


def test_netsetup_steers_to_the_port_each_proxy_listens_on(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text('[smtp]\nlisten = 2525\nhostname = "read by mailgate, not netsetup"\n'
                    '[pop3]\nenabled = true\nlisten = 1110\n')
    assert [(i.service, i.listen_port) for i in load_network_config(path).intercept] == [
        ("smtp", 2525), ("pop3", 1110)]


def test_intercepting_a_service_needs_its_proxy(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[network]\nintercept = ["smtp", "pop3"]\n')
    assert len(problems) == 1
    assert problems[0].startswith("network.intercept: names 'pop3' but pop3.enabled is false: "
                                  "its connections would go to port 10110, where nothing listens")
    problems = problems_of(tmp_path, '[network]\nintercept = ["pop3"]\n'
                                     '[pop3]\nenabled = false\n')
    assert len(problems) == 1 and "pop3.enabled is false" in problems[0]


def test_the_old_network_listen_table_is_refused_with_where_it_went(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[network]\nlisten = { smtp = 2525 }\n')
    assert problems == ["network.listen: has moved: each proxy's port is set once, in its own "
                        "section ([smtp] listen, [pop3] listen), and netsetup reads it from there"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """[network]
mode = "brigde"
ipv6 = "yes"
bypass_sources = ["192.0.2.0/24", "198.51.100.300/32"]
bypas_destinations = []
[smtp]
listen = 0
""")
    assert "network.mode: must be one of 'router', 'bridge', got 'brigde'" in problems
    assert "network.ipv6: expected true or false, got str" in problems
    assert "network.bypass_sources[1]: not an IP network: '198.51.100.300/32'" in problems
    assert "network.bypas_destinations: unknown key" in problems
    assert "smtp.listen: must be at least 1, got 0" in problems


def test_bridge_mode_needs_two_ports_and_spoofing_or_an_address(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[network]\nmode = "bridge"\nports = ["eth0"]\n'
                                     'spoof_source = false\n')
    assert "network.ports: bridge mode needs at least two member interfaces" in problems
    assert any(p.startswith("network.spoof_source: false needs 'addresses'") for p in problems)


def test_an_invisible_bridge_needs_no_subnet(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text('[network]\nmode = "bridge"\nports = ["eth0", "eth1"]\n')
    config = load_network_config(path)
    assert config.addresses == () and config.bridged_networks == ()
    assert (config.egress_mark, config.egress_table) == (0x4, 101)


def test_egress_mark_and_table_must_not_clash(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[network]\nmode = "bridge"\nports = ["eth0", "eth1"]\n'
                                     'egress_mark = 0x3\negress_table = 100\n')
    assert any(p.startswith("network.egress_mark: shares bits with mark (0x1)") for p in problems)
    assert "network.egress_table: is route_table: the two need tables of their own" in problems


def test_bridge_ports_must_be_distinct_and_not_the_bridge(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[network]\nmode = "bridge"\nports = ["eth0", "eth0", "br0"]\n'
                                     'bridged_networks = ["192.0.2.0/24"]\n')
    assert "network.ports: names an interface twice" in problems
    assert "network.ports: holds the bridge itself ('br0')" in problems


def test_bridge_keys_are_refused_in_router_mode(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[network]\nports = ["eth0", "eth1"]\nbridge = "br1"\n'
                                     'addresses = ["192.0.2.2/24"]\n'
                                     'bridged_networks = ["192.0.2.0/24"]\n')
    for key in ("ports", "bridge", "addresses", "bridged_networks"):
        assert f'network.{key}: only used in bridge mode (mode = "bridge")' in problems


def test_ipv6_networks_need_ipv6(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[network]\nipv6 = false\n'
                                     'bypass_destinations = ["2001:db8::/32"]\n')
    assert problems == ["network.bypass_destinations: holds an IPv6 network but ipv6 = false"]


def test_services_and_listen_ports_must_not_repeat(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[network]\nintercept = ["smtp", "smtp", "imap"]\n')
    assert "network.intercept: names a service twice" in problems
    assert "network.intercept: unknown service 'imap' (known: smtp, pop3)" in problems
    problems = problems_of(tmp_path, '[smtp]\nlisten = 9000\n[pop3]\nenabled = true\n'
                                     'listen = 9000\n')
    assert problems == ["pop3.listen: is smtp.listen too (9000): the two proxies need ports of "
                        "their own"]


def test_interfaces_are_checked_against_the_live_system(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text('[network]\nmode = "bridge"\nports = ["eth0", "eth1", "eth2"]\n'
                    'bridged_networks = ["192.0.2.0/24"]\n')
    config = load_network_config(path)
    links = {
        "lo": LinkInfo("lo", None, None, True, None),
        "eth0": LinkInfo("eth0", "veth", None, True, "02:00:00:00:00:01"),
        "eth1": LinkInfo("eth1", "veth", "br9", True, "02:00:00:00:00:02"),
        "br0": LinkInfo("br0", "dummy", None, True, "02:00:00:00:00:03"),
    }
    problems = [f"{p.key}: {p.message}" for p in live_problems(config, links, path)]
    assert problems == [
        "network.bridge: br0 exists on this system but is a dummy device, not a bridge",
        "network.ports: eth1 already belongs to br9; release it first (ip link set eth1 nomaster)",
        "network.ports: no interface named 'eth2' on this system (there are: br0, eth0, eth1)",
    ]
