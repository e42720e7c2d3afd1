"""The desired state computed from [network]: plain data, no kernel."""

from __future__ import annotations

import ipaddress

from netsetup import nft
from netsetup.config import Interception, NetworkConfig
from netsetup.desired import Desired, RouteSpec, desired_state

SMTP = Interception("smtp", 25, 10025)
POP3 = Interception("pop3", 110, 10110)


def nets(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def rules_text(desired: Desired, family: int) -> list[str]:
    return desired.xtables[family].lines()


def test_router_mode_both_families() -> None:
    desired = desired_state(NetworkConfig(intercept=(SMTP, POP3),
                                          bypass_sources=nets("192.0.2.99/32", "2001:db8::/32"),
                                          bypass_destinations=nets("198.51.100.0/24")))
    assert desired.sysctls == {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
    assert desired.bridge is None and desired.steering is None and not desired.addresses
    assert [r.describe() for r in desired.rules] == [
        "ipv4 priority 32000 fwmark 0x1/0x1 lookup 100",
        "ipv6 priority 32000 fwmark 0x1/0x1 lookup 100"]
    assert desired.routes == (RouteSpec(4, "0.0.0.0/0", "lo", 100, "local", "host"),
                              RouteSpec(6, "::/0", "lo", 100, "local", "host"))
    assert rules_text(desired, 4) == [
        ":MAILGATE",
        ":MAILGATE_DIVERT",
        "-A PREROUTING -p tcp -j MAILGATE",
        # socket divert first, then the bypasses, then one TPROXY per service
        "-A MAILGATE -p tcp -m socket --transparent -j MAILGATE_DIVERT",
        "-A MAILGATE -m addrtype --dst-type LOCAL -j RETURN",
        "-A MAILGATE -s 192.0.2.99/32 -j RETURN",
        "-A MAILGATE -d 198.51.100.0/24 -j RETURN",
        "-A MAILGATE -p tcp -m tcp --dport 25 -j TPROXY --on-port 10025 --on-ip 0.0.0.0 "
        "--tproxy-mark 0x1/0x1",
        "-A MAILGATE -p tcp -m tcp --dport 110 -j TPROXY --on-port 10110 --on-ip 0.0.0.0 "
        "--tproxy-mark 0x1/0x1",
        "-A MAILGATE_DIVERT -j MARK --set-xmark 0x1/0x1",
        "-A MAILGATE_DIVERT -j ACCEPT",
    ]
    six = rules_text(desired, 6)
    assert "-A MAILGATE -s 2001:db8::/32 -j RETURN" in six
    assert not any("198.51.100.0/24" in line for line in six)
    assert any("--on-ip :: " in line for line in six)


def test_ipv4_only_and_custom_mark_and_table() -> None:
    desired = desired_state(NetworkConfig(intercept=(SMTP,), ipv6=False, mark=0x100,
                                          route_table=200))
    assert set(desired.xtables) == {4}
    assert desired.sysctls == {"net.ipv4.ip_forward": "1"}
    assert [r.describe() for r in desired.rules] == [
        "ipv4 priority 32000 fwmark 0x100/0x100 lookup 200"]
    assert desired.routes == (RouteSpec(4, "0.0.0.0/0", "lo", 200, "local", "host"),)
    assert "--tproxy-mark 0x100/0x100" in rules_text(desired, 4)[-3]


def test_bridge_mode() -> None:
    config = NetworkConfig(mode="bridge", ports=("eth0", "eth1"), intercept=(SMTP, POP3),
                           addresses=("192.0.2.2/24", "2001:DB8:1::2/64"),
                           bridged_networks=nets("192.0.2.0/24", "198.18.0.0/15"),
                           bypass_sources=nets("192.0.2.99/32"))
    desired = desired_state(config)
    assert desired.bridge is not None and desired.bridge.ports == ("eth0", "eth1")
    assert (desired.bridge.forward_delay, desired.bridge.stp_state) == (0, 0)
    assert desired.sysctls == {"net.bridge.bridge-nf-call-iptables": "0",
                               "net.bridge.bridge-nf-call-ip6tables": "0"}
    assert [a.describe() for a in desired.addresses] == ["192.0.2.2/24 dev br0",
                                                         "2001:db8:1::2/64 dev br0"]
    # 192.0.2.0/24 comes with the address; only the other bridged network gets a route
    assert [r.describe() for r in desired.routes if r.device == "br0"] == [
        "ipv4 default via 169.254.77.1 (02:6d:67:00:00:01) dev br0 table 101",
        "ipv6 default via fe80::6d67:1 (02:6d:67:00:00:01) dev br0 table 101",
        "ipv4 198.18.0.0/15 dev br0 scope link"]
    assert [r.describe() for r in desired.rules][2:] == [
        "ipv4 priority 32001 fwmark 0x4/0x4 lookup 101",
        "ipv6 priority 32001 fwmark 0x4/0x4 lookup 101"]
    # an IPv6 address is configured: the bridge keeps its link-local address
    assert desired.bridge.link_local
    assert rules_text(desired, 4)[2] == "-A PREROUTING -i br0 -p tcp -j MAILGATE"


def test_an_invisible_bridge() -> None:
    """No address, no subnet: the proxies' packets leave through the egress table."""
    config = NetworkConfig(mode="bridge", ports=("eth0", "eth1"), intercept=(SMTP, POP3))
    desired = desired_state(config)
    assert desired.addresses == ()
    assert desired.bridge is not None and not desired.bridge.link_local
    assert [r.describe() for r in desired.routes if r.table == 101] == [
        "ipv4 default via 169.254.77.1 (02:6d:67:00:00:01) dev br0 table 101",
        "ipv6 default via fe80::6d67:1 (02:6d:67:00:00:01) dev br0 table 101"]
    assert desired.steering is not None
    text = nft.render(desired.steering, "02:00:00:00:00:09")
    egress = text[text.index("table netdev mailgate {"):]
    assert 'type filter hook ingress devices = { "eth0", "eth1" } priority 0;' in egress
    assert ("ether type ip tcp dport { 25, 110 } update @peers4 { ip saddr : ether saddr } "
            "update @peers4 { ip daddr : ether daddr }") in egress
    assert "ether type ip6 tcp sport { 25, 110 } update @peers6 { ip6 saddr : ether saddr }" \
        in egress
    assert 'type filter hook egress device "br0" priority 0;' in egress
    assert ("ether daddr 02:6d:67:00:00:01 ether type ip ether daddr set ip daddr map @peers4 "
            "accept") in egress
    assert egress.rstrip().endswith('counter drop comment "a peer never seen"\n\t}\n}')
    # both tables carry the digest; one of them alone reads as "differs"
    assert nft.digest_in(text) == nft.digest_of(desired.steering, "02:00:00:00:00:09")
    assert nft.digest_in(text[:text.index("table netdev")]) == ""


def test_bridge_steering_rules() -> None:
    config = NetworkConfig(mode="bridge", ports=("eth0", "eth1"), intercept=(SMTP, POP3),
                           bridged_networks=nets("192.0.2.0/24"),
                           bypass_sources=nets("192.0.2.99/32", "2001:db8:1::99/128"),
                           bypass_destinations=nets("192.0.2.26/32"))
    steering = desired_state(config).steering
    assert steering is not None
    text = nft.render(steering, "02:00:00:00:00:01")
    assert text.startswith("table bridge mailgate {\n")
    assert "type filter hook prerouting priority dstnat; policy accept;" in text
    steer = "ether daddr set 02:00:00:00:00:01 meta pkttype set host"
    # towards the intercepted ports: bypassed sources and destinations excluded as such
    assert ('iifname { "eth0", "eth1" } ether type ip ip saddr != 192.0.2.99/32 '
            f"ip daddr != 192.0.2.26/32 tcp dport {{ 25, 110 }} {steer}") in text
    # the replies of spoofed connections: the same lists with the roles swapped
    assert ('iifname { "eth0", "eth1" } ether type ip ip daddr != 192.0.2.99/32 '
            f"ip saddr != 192.0.2.26/32 tcp sport {{ 25, 110 }} {steer}") in text
    assert ('ether type ip6 ip6 saddr != 2001:db8:1::99/128 tcp dport { 25, 110 } '
            f"{steer}") in text
    assert nft.digest_in(text) == nft.digest_of(steering, "02:00:00:00:00:01")
    assert nft.digest_of(steering, "02:00:00:00:00:02") != nft.digest_of(steering,
                                                                          "02:00:00:00:00:01")


def test_teardown_wants_nothing() -> None:
    empty = Desired()
    assert not (empty.sysctls or empty.bridge or empty.routes or empty.rules or empty.xtables
                or empty.steering)
