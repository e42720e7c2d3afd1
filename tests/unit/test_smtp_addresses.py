"""Envelope address parsing and relay control: the tricks open-relay testers use."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxies.smtp.addresses import (
    Address,
    AddressSyntaxError,
    RelayPolicy,
    normalise_domain,
    parse_path,
)

OUTSIDE = "203.0.113.5"
INSIDE = "10.1.2.3"

POLICY = RelayPolicy(
    relay_domains=["ours.example", ".sub.example", "bücher.example", "Trailing.Example."],
    relay_networks=[ipaddress.ip_network("10.0.0.0/8"), "2001:db8:1::/48"],
    transport_domains=["transport.example"],
)

OK = "250 2.1.5 Ok"
SYNTAX = "501 5.1.3 Bad recipient address syntax"


def denied(rcpt: str) -> str:
    return f"554 5.7.1 <{rcpt}>: Relay access denied"


def no_route(rcpt: str) -> str:
    return f"554 5.7.1 <{rcpt}>: Source routes are not accepted"


# (recipient as aiosmtpd passes it, reply from outside, reply from a relay network)
RELAY_TABLE = [
    # Plain cases.
    ("user@ours.example", OK, OK),
    ("<user@ours.example>", OK, OK),
    ("User.Name+tag@OURS.EXAMPLE", OK, OK),
    ("user@transport.example", OK, OK),
    ("user@trailing.example", OK, OK),
    ("user@foreign.example", denied("user@foreign.example"), OK),
    ("user@ours.example.foreign.example", denied("user@ours.example.foreign.example"), OK),
    ("user@evilours.example", denied("user@evilours.example"), OK),
    # ".sub.example" means subdomains only.
    ("user@a.sub.example", OK, OK),
    ("user@a.b.sub.example", OK, OK),
    ("user@sub.example", denied("user@sub.example"), OK),
    # Sender-specified routing to our domain (Postfix: RESOLVE_FLAG_ROUTED).
    ("user%foreign.example@ours.example", denied("user%foreign.example@ours.example"), OK),
    ("foreign.example!user@ours.example", denied("foreign.example!user@ours.example"), OK),
    ('"user@foreign.example"@ours.example', denied('"user@foreign.example"@ours.example'), OK),
    ('"user\\@foreign.example"@ours.example', denied('"user\\@foreign.example"@ours.example'), OK),
    ('"user%foreign"@ours.example', denied('"user%foreign"@ours.example'), OK),
    # Unicode look-alikes of routing characters (NFKC folds them to @ and %).
    ("user\uff20foreign.example@ours.example",
     denied("user\uff20foreign.example@ours.example"), OK),
    ("user\ufe6aforeign.example@ours.example",
     denied("user\ufe6aforeign.example@ours.example"), OK),
    # Source routes: refused from everyone.
    ("@ours.example:user@foreign.example", no_route("@ours.example:user@foreign.example"),
     no_route("@ours.example:user@foreign.example")),
    ("<@ours.example,@relay.example:user@ours.example>",
     no_route("@ours.example,@relay.example:user@ours.example"),
     no_route("@ours.example,@relay.example:user@ours.example")),
    # Address literals are nobody's domain.
    ("user@[198.51.100.1]", denied("user@[198.51.100.1]"), OK),
    ("user@[IPv6:2001:db8::1]", denied("user@[IPv6:2001:db8::1]"), OK),
    ("user@[IPv6:2001:DB8:0::1]", denied("user@[IPv6:2001:DB8:0::1]"), OK),
    # Syntax errors, from anyone.
    ("user@ours.example.", SYNTAX, SYNTAX),
    ("user@ours..example", SYNTAX, SYNTAX),
    ("user@.ours.example", SYNTAX, SYNTAX),
    ("@ours.example", SYNTAX, SYNTAX),
    ('""@ours.example', SYNTAX, SYNTAX),
    ("user", SYNTAX, SYNTAX),
    ("user@", SYNTAX, SYNTAX),
    ("", SYNTAX, SYNTAX),
    ("<>", SYNTAX, SYNTAX),
    ("<user@ours.example", SYNTAX, SYNTAX),
    ("user@ours.example>", SYNTAX, SYNTAX),
    ("<<user@ours.example>>", SYNTAX, SYNTAX),
    ("user@foreign.example@ours.example", SYNTAX, SYNTAX),
    ("user name@ours.example", SYNTAX, SYNTAX),
    (".user@ours.example", SYNTAX, SYNTAX),
    ("user.@ours.example", SYNTAX, SYNTAX),
    ("us..er@ours.example", SYNTAX, SYNTAX),
    ('"unterminated@ours.example', SYNTAX, SYNTAX),
    ('"a"b@ours.example', SYNTAX, SYNTAX),
    ("user@ours.example\r\nRCPT TO:<x@foreign.example>", SYNTAX, SYNTAX),
    ("user@ours.example\x00", SYNTAX, SYNTAX),
    ('"a\x01b"@ours.example', SYNTAX, SYNTAX),
    ("user@-ours.example", SYNTAX, SYNTAX),
    ("user@ours-.example", SYNTAX, SYNTAX),
    ("user@ours_x.example", SYNTAX, SYNTAX),
    ("user@" + "a" * 64 + ".example", SYNTAX, SYNTAX),
    ("user@[198.51.100.256]", SYNTAX, SYNTAX),
    ("user@[010.0.0.1]", SYNTAX, SYNTAX),
    ("user@[tag:anything]", SYNTAX, SYNTAX),
    ("user@[IPv6:fe80::1%eth0]", SYNTAX, SYNTAX),
    ("@ours.example:", SYNTAX, SYNTAX),
    ("@ours.example;user@ours.example", SYNTAX, SYNTAX),
    ("ours.example:user@ours.example", SYNTAX, SYNTAX),
    ("u" * 300 + "@ours.example", SYNTAX, SYNTAX),
    # A bare Postmaster is valid, but whose? (Postfix: reject_non_fqdn_recipient.)
    ("Postmaster", "504 5.5.2 <Postmaster>: Recipient address rejected: "
     "need fully-qualified address", "504 5.5.2 <Postmaster>: Recipient address rejected: "
     "need fully-qualified address"),
    # IDN: canonical U-labels and A-labels match; anything that only matches after mapping is
    # refused, and homoglyphs are simply other domains.
    ("user@bücher.example", OK, OK),
    ("user@BÜCHER.example", OK, OK),
    ("user@xn--bcher-kva.example", OK, OK),
    ("user@XN--BCHER-KVA.example", OK, OK),
    ("user@bu\u0308cher.example", SYNTAX, SYNTAX),           # not NFC
    ("user@our\u200bs.example", SYNTAX, SYNTAX),             # zero-width space
    ("user@\uff4f\uff55\uff52\uff53.example", SYNTAX, SYNTAX),  # fullwidth "ours"
    ("user@ours\uff0eexample", SYNTAX, SYNTAX),              # fullwidth full stop
    ("user@ours\u3002example", SYNTAX, SYNTAX),              # ideographic full stop
    ("user@xn--zz-.example", SYNTAX, SYNTAX),
    ("user@\u043eurs.example", denied("user@\u043eurs.example"), OK),  # Cyrillic o
    ("us\u00e9r@ours.example", OK, OK),                      # RFC 6531 local part
]


@pytest.mark.parametrize(("rcpt", "from_outside", "from_inside"), RELAY_TABLE)
def test_relay_table(rcpt: str, from_outside: str, from_inside: str) -> None:
    assert POLICY.check_recipient(rcpt, OUTSIDE).reply == from_outside
    assert POLICY.check_recipient(rcpt, INSIDE).reply == from_inside


@pytest.mark.parametrize("client", [
    "10.0.0.1", "10.255.255.255", "::ffff:10.9.9.9", "2001:db8:1::25", "2001:db8:1:ffff::1",
])
def test_relay_networks(client: str) -> None:
    assert POLICY.is_relay_client(client)
    assert POLICY.check_recipient("user@foreign.example", client).accepted


@pytest.mark.parametrize("client", [
    "11.0.0.1", "::ffff:11.0.0.1", "2001:db8:2::1", "::1", "", "not an ip", "10.0.0.1/8",
])
def test_outside_clients(client: str) -> None:
    assert not POLICY.is_relay_client(client)
    assert not POLICY.check_recipient("user@foreign.example", client).accepted


def test_accepted_address_is_what_to_route_on() -> None:
    """What the policy accepted for our domain is the domain delivery must use: the parsed,
    normalised address, never a re-parse of the raw string."""
    for rcpt, from_outside, _inside in RELAY_TABLE:
        verdict = POLICY.check_recipient(rcpt, OUTSIDE)
        if from_outside != OK:
            assert not verdict.accepted
            continue
        assert verdict.accepted and verdict.address is not None
        address = verdict.address
        assert POLICY.is_our_domain(address.domain)
        assert not address.has_routing and not address.route
        normalised = parse_path(address.normalised)
        assert normalised.domain == address.domain
        assert normalised.local_part == address.local_part
        # A naive router (rpartition on "@") agrees on the domain.
        assert address.normalised.rpartition("@")[2] == address.domain


def test_parse_path_fields() -> None:
    address = parse_path('<@a.example,@B.example:"user@x"@OURS.example>')
    assert address == Address(raw='<@a.example,@B.example:"user@x"@OURS.example>',
                              local_part="user@x", domain="ours.example", quoted=True,
                              route=("a.example", "b.example"))
    assert address.has_routing
    assert address.normalised == '"user@x"@ours.example'
    literal = parse_path("u@[IPv6:2001:DB8::0:1]")
    assert literal.domain == "[IPv6:2001:db8::1]"
    assert literal.literal == ipaddress.ip_address("2001:db8::1")
    assert parse_path('"a\\"b"@x.example').local_part == 'a"b'
    assert parse_path('"a\\"b"@x.example').normalised == '"a\\"b"@x.example'
    assert parse_path('"plain"@x.example').normalised == "plain@x.example"


def test_null_path_only_when_asked() -> None:
    assert parse_path("<>", null_ok=True).is_null
    assert parse_path("", null_ok=True).is_null
    with pytest.raises(AddressSyntaxError) as info:
        parse_path("<>")
    assert info.value.reply is not None and info.value.reply.code == 501


def test_check_sender() -> None:
    assert POLICY.check_sender("<>").accepted
    assert POLICY.check_sender("anyone@anywhere.example").accepted
    assert POLICY.check_sender("bad address").reply == "501 5.1.7 Bad sender address syntax"
    assert not POLICY.check_sender("@a.example:x@b.example").accepted


def test_domain_normalisation() -> None:
    assert normalise_domain("Bücher.Example") == "xn--bcher-kva.example"
    with pytest.raises(AddressSyntaxError):
        normalise_domain("stra\u00dfe.example")   # IDNA 2003 would silently make it "strasse"
    with pytest.raises(ValueError, match="not a domain"):
        RelayPolicy(["bad domain"], [])


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.sampled_from([OUTSIDE, INSIDE]))
def test_arbitrary_text_gets_a_verdict(rcpt: str, client: str) -> None:
    verdict = POLICY.check_recipient(rcpt, client)
    assert verdict.code in (250, 501, 504, 554)
    assert "\r" not in verdict.reply and "\n" not in verdict.reply
    if verdict.accepted and client == OUTSIDE:
        assert verdict.address is not None and POLICY.is_our_domain(verdict.address.domain)
        assert not verdict.address.has_routing


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"[a-z0-9%!@\".\\]{1,12}", fullmatch=True),
       st.sampled_from(["ours.example", "foreign.example", "a.sub.example", "[192.0.2.1]"]))
def test_relay_tricks_never_accepted_from_outside(local: str, domain: str) -> None:
    verdict = POLICY.check_recipient(f"{local}@{domain}", OUTSIDE)
    if verdict.accepted:
        assert verdict.address is not None
        assert domain in ("ours.example", "a.sub.example")
        assert not set("%!@").intersection(verdict.address.local_part)
