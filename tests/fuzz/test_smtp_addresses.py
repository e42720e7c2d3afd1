"""Fuzzing envelope address parsing and relay control (proxies.smtp.addresses).

What must hold for any path text: `parse_path` returns an `Address` or raises its documented
`AddressSyntaxError` (a RemoteProtocolError carrying 501 5.1.3), never anything else (the
IDNA codec's own UnicodeError included); what it accepts is normalised (lowercase ASCII
domain within 253 octets) and reads back the same from its normalised form;
`normalise_domain` is idempotent; `RelayPolicy` gives every text from every client a verdict
whose reply is one line, and from outside accepts only our domains without routing.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxies.smtp.addresses import (
    MAX_PATH_LENGTH,
    Address,
    AddressSyntaxError,
    RelayPolicy,
    normalise_domain,
    parse_path,
)
from tests.fuzz import inputs
from tests.fuzz.harness import EXAMPLES, bounded, check_smtp_reply, corpus, fuzz_settings

TARGET = "smtp_addresses"
# For the campaign (bench/fuzz.py): the sources whose arcs it traces, and its mutation tokens.
COVERS = ("proxies/smtp/addresses.py", "encodings/idna.py", "encodings/punycode.py")
TOKENS = (b"xn--", b"@", b"<", b">", b'"', b"\\", b"[IPv6:", b"[", b"]", b"%", b"!", b":",
          b"\xef\xbc\xa0", b"\xc3\x9f", b"\xe3\x80\x82", b".")
POLICY = RelayPolicy(["ours.example", ".sub.example", "xn--bcher-kva.example"],
                     ["192.0.2.0/24", "2001:db8::/32"])
OUTSIDE, INSIDE = "203.0.113.9", "192.0.2.7"
CLIENTS = (OUTSIDE, INSIDE, "::ffff:192.0.2.7", "2001:db8::1%eth0", "not an ip", "")
# What the server core refuses to put in a reply (C0 controls, DEL). RFC 6531 UTF8-non-ascii
# admits C1 controls (U+0085 NEL among them) and U+2028 in a local part, and a verdict echoes
# the address, so those can reach a reply: whether they should is an open question, not
# checked here.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DOMAIN = re.compile(r"[a-z0-9.-]{1,253}|\[[0-9.]+\]|\[IPv6:[0-9a-f:.]+\]")


def check_address(address: Address, text: str) -> None:
    assert address.raw == text
    if address.is_null:
        return
    assert address.local_part
    assert address.domain == "" or _DOMAIN.fullmatch(address.domain), address.domain
    assert address.literal is None or address.domain.startswith("[")
    # The normalised form (what is sent on) means the same mailbox.
    normal = address.normalised
    try:
        again = parse_path(normal)
    except AddressSyntaxError:
        # Quoting or A-labels can make the normalised form longer than a path may be.
        assert len(normal.encode("utf-8")) > MAX_PATH_LENGTH - 2, normal
        return
    assert (again.local_part, again.domain, again.literal) == \
        (address.local_part, address.domain, address.literal), normal


def check_path(text: str) -> None:
    for null_ok in (False, True):
        try:
            address = parse_path(text, null_ok=null_ok)
        except AddressSyntaxError as exc:
            assert exc.reply is not None
            check_smtp_reply(exc.reply.wire().encode() + b"\r\n")
            continue
        check_address(address, text)


def check_domain(text: str) -> None:
    try:
        domain = normalise_domain(text)
    except AddressSyntaxError:
        return
    assert normalise_domain(domain) == domain


def check_policy(text: str) -> None:
    for client in CLIENTS:
        verdict = POLICY.check_recipient(text, client)
        assert verdict.code in (250, 501, 504, 554)
        assert _CONTROL.search(verdict.reply) is None, verdict.reply
        if verdict.accepted and client == OUTSIDE:
            assert verdict.address is not None
            assert POLICY.is_our_domain(verdict.address.domain)
            assert not verdict.address.has_routing and not verdict.address.route
    sender = POLICY.check_sender(text)
    assert sender.code in (250, 501) and _CONTROL.search(sender.reply) is None


def run(data: bytes) -> None:
    """The harness: `data` as the text of a path (as the server core decodes it, and with
    what it never lets through, lone surrogates, for callers that decode less strictly)."""
    EXAMPLES[TARGET] += 1
    for text in {data.decode("utf-8", "replace"), data.decode("utf-8", "surrogateescape")}:
        check_path(text)
        check_domain(text)
        check_domain(text.rpartition("@")[2])
        check_policy(text)


@fuzz_settings(300)
@given(inputs.paths())
@example("<a@xn--a>")                       # once UnicodeError out of the IDNA codec
@example("<a@xn--\u00df>")                  # ToASCII gives "xn--ss", which does not decode
@example("<a@xn--999999999999a>")
def test_any_path(text: str) -> None:
    run(text.encode("utf-8", "surrogatepass"))


@fuzz_settings(200)
@given(st.text(max_size=80) | st.sampled_from(inputs.DOMAINS))
def test_any_text(text: str) -> None:
    run(text.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("data", corpus(TARGET))
def test_corpus(data: bytes) -> None:
    with bounded():
        run(data)
