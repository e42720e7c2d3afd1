"""Authentication-Results (RFC 8601): the field we write, and forged ones removed byte for byte."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxies.filtering import FilterInput
from proxies.mail.authresults import (
    authentication_results,
    authserv_id_of,
    remove_forged,
    valid_authserv_id,
)
from proxies.mail.headers import split_message
from proxies.scan.api import AuthResult
from proxies.scan.filter import BorderFilter
from tests.unit.scan_messages import plain

OURS = "gw.lab.example"
MESSAGE = plain(subject="hello", body="Authentication-Results: gw.lab.example; spf=pass\r\n")
INPUT = FilterInput("alice@sender.example", ("bob@example.com",), "192.0.2.10",
                    "mail.sender.example", received_by=OURS)


@pytest.mark.parametrize(("raw", "claimed"), [
    (b"Authentication-Results: gw.lab.example; spf=pass\r\n", "gw.lab.example"),
    (b"Authentication-Results: gw.lab.example;spf=pass\r\n", "gw.lab.example"),
    (b"Authentication-Results:gw.lab.example 1; none\r\n", "gw.lab.example"),
    (b"Authentication-Results:\r\n\tgw.lab.example;\r\n\tspf=pass\r\n", "gw.lab.example"),
    (b"Authentication-Results: (a comment (nested \\) too)) GW.Lab.Example; none\r\n",
     "GW.Lab.Example"),
    (b'Authentication-Results: "gw.lab\\.example"; none\r\n', "gw.lab.example"),
    (b"Authentication-Results: ; spf=pass\r\n", None),
    (b"Authentication-Results: (never closed gw.lab.example; none\r\n", None),
    (b'Authentication-Results: "never closed; none\r\n', None),
    (b"Authentication-Results:\r\n", None),
])
def test_the_claimed_authserv_id(raw: bytes, claimed: str | None) -> None:
    assert authserv_id_of(raw) == claimed


@pytest.mark.parametrize("forged", [
    b"Authentication-Results: gw.lab.example; spf=pass smtp.mailfrom=ceo@example.com\r\n",
    b"authentication-results: GW.LAB.EXAMPLE; dkim=pass\r\n",
    b"AUTHENTICATION-RESULTS : gw.lab.example.; dmarc=pass\r\n",
    b"Authentication-Results:\r\n  gw.lab.example;\r\n\tspf=pass\r\n"
    b"\tsmtp.mailfrom=x@y.example\r\n",
    b"Authentication-Results: (ours, honest) \"gw.lab.example\" 1; none\r\n",
])
def test_a_field_claiming_our_id_is_removed_with_its_continuation_lines(forged: bytes) -> None:
    theirs = b"Authentication-Results: mx.sender.example; spf=pass\r\n"
    content = theirs + forged + MESSAGE
    assert remove_forged(content, OURS) == theirs + MESSAGE
    assert remove_forged(content, "Gw.Lab.Example.") == theirs + MESSAGE


def test_fields_of_others_and_the_body_are_left_alone() -> None:
    others = (b"Authentication-Results: mx.sender.example; spf=pass\r\n"
              b"Authentication-Results: gw.lab.example.evil; spf=pass\r\n"
              b"X-Authentication-Results: gw.lab.example; spf=pass\r\n"
              b"ARC-Authentication-Results: i=1; gw.lab.example; spf=pass\r\n")
    # None: nothing to remove, so the caller keeps the very bytes it had.
    assert remove_forged(others + MESSAGE, OURS) is None
    assert remove_forged(MESSAGE, OURS) is None  # ours in the body is just text


@given(st.lists(st.sampled_from([
    b"Authentication-Results: gw.lab.example; spf=pass\r\n",
    b"Authentication-Results: mx.other.example; spf=fail\r\n",
    b"Received: from a\r\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\r\n",
    b"X-Note: authentication-results: gw.lab.example\r\n",
]), max_size=6))
def test_removal_takes_exactly_the_claiming_fields(fields: list[bytes]) -> None:
    content = b"".join(fields) + MESSAGE
    kept = [f for f in fields if not f.startswith(b"Authentication-Results: gw.")]
    cleaned = remove_forged(content, OURS)
    assert (content if cleaned is None else cleaned) == b"".join(kept) + MESSAGE
    assert (cleaned is None) == (kept == fields)


def test_our_field_one_result_a_line() -> None:
    results = (AuthResult("spf", "pass"), AuthResult("dkim", "pass", "sender.example", "s1"),
               AuthResult("dmarc", "pass", "sender.example"))
    field = authentication_results(OURS, results, sender="alice@sender.example",
                                   helo="mail.sender.example")
    assert field == (b"Authentication-Results: gw.lab.example;\r\n"
                     b"\tspf=pass smtp.mailfrom=alice@sender.example;\r\n"
                     b"\tdkim=pass header.d=sender.example header.s=s1;\r\n"
                     b"\tdmarc=pass header.from=sender.example\r\n")
    # It reads back as one field that claims our id, so a second pass would remove it.
    fields, _ = split_message(field + MESSAGE)
    assert fields[0] == field and authserv_id_of(fields[0]) == OURS


def test_spf_names_the_identity_it_checked() -> None:
    nothing = (AuthResult("spf", "none"), AuthResult("dkim", "none"),
               AuthResult("dmarc", "none"))
    bounce = authentication_results(OURS, nothing, sender="", helo="mail.sender.example")
    assert bounce == (b"Authentication-Results: gw.lab.example;\r\n"
                      b"\tspf=none smtp.helo=mail.sender.example;\r\n\tdkim=none;\r\n"
                      b"\tdmarc=none\r\n")
    spf = (AuthResult("spf", "fail"),)
    quoted = authentication_results(OURS, spf, sender='"a b"@sender.example', helo="x")
    assert quoted == b"Authentication-Results: gw.lab.example;\r\n\tspf=fail " \
                     b"smtp.mailfrom=sender.example\r\n"
    literal = authentication_results(OURS, spf, sender="", helo="[192.0.2.10]")
    assert literal == b"Authentication-Results: gw.lab.example;\r\n\tspf=fail\r\n"


def test_no_results_no_field() -> None:
    assert authentication_results(OURS, (), sender="a@b.example", helo="b.example") is None


@pytest.mark.parametrize(("name", "ok"), [("gw.lab.example", True), ("mx-1_a", True),
                                          ("", False), ("a b", False), ("a;b", False),
                                          ('"q"', False), ("été.example", False)])
def test_authserv_ids_the_config_takes(name: str, ok: bool) -> None:
    assert valid_authserv_id(name) is ok


def test_without_scanners_forged_fields_still_go() -> None:
    forged = b"Authentication-Results: GW.lab.example; dmarc=pass\r\n"
    theirs = b"Authentication-Results: mx.sender.example; spf=pass\r\n"
    verdict = asyncio.run(BorderFilter().check(INPUT, forged + theirs + MESSAGE))
    assert (verdict.action, verdict.content) == ("pass", theirs + MESSAGE)
    # Nothing forged: the message goes out as it came (no copy).
    untouched = asyncio.run(BorderFilter().check(INPUT, theirs + MESSAGE))
    assert (untouched.action, untouched.content) == ("pass", None)
    # [policy] authserv_id, when set, is the name that counts.
    named = asyncio.run(BorderFilter("filter.lab.example").check(INPUT, forged + MESSAGE))
    assert named.content is None


@given(st.binary(max_size=300), st.sampled_from([OURS, "GW.lab.example.", "x"]))
def test_any_header_bytes_are_read_without_error_and_cleaning_twice_changes_nothing(
        noise: bytes, authserv_id: str) -> None:
    content = b"Authentication-Results:" + noise + b"\r\n" + MESSAGE
    cleaned = remove_forged(content, authserv_id)
    once = content if cleaned is None else cleaned
    assert remove_forged(once, authserv_id) is None
    assert once.endswith(MESSAGE[MESSAGE.index(b"\r\n\r\n"):])
