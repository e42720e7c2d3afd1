"""Content rules: banned names (also double extensions, hidden tricks, inside zips), MIME
types, attachment size and header regexes."""

from __future__ import annotations

import io
import re
import zipfile

import pytest

from proxies.scan.config import HeaderRule, PolicyConfig
from proxies.scan.rules import ContentRules, extensions
from tests.unit.scan_messages import plain, with_attachments, zipped

BANNED = PolicyConfig(banned_extensions=("exe", "scr", "bat"))


@pytest.mark.parametrize(("name", "expected"), [
    ("invoice.pdf.exe", ["pdf", "exe"]),
    ("INVOICE.EXE", ["exe"]),
    ("invoice.exe.", ["exe"]),
    ("invoice.exe  ", ["exe"]),
    ("photo\u202egpj.exe", ["exe"]),
    ("dir/evil.scr", ["scr"]),
    ("README", []),
])
def test_extensions(name: str, expected: list[str]) -> None:
    assert extensions(name) == expected


def test_a_banned_extension_is_found() -> None:
    hit = ContentRules(BANNED).check(with_attachments(("setup.exe", b"MZ", "application/"
                                                       "octet-stream")))
    assert hit is not None and "setup.exe" in hit.reason and hit.action is None
    assert hit.result().verdict == "banned"


def test_a_mime_structure_the_parser_gives_up_on_is_refused_like_a_banned_attachment() -> None:
    """Found by bench.fuzz: the stdlib raised TypeError while parsing a multipart type with
    RFC 2231 continuations numbered and not; an attachment could hide behind it."""
    content = (b"Content-Type: multipart/mixed; boundary*=\"\"; boundary*1=b\r\n\r\n"
               b"--b\r\nContent-Disposition: attachment; filename=setup.exe\r\n\r\nMZ\r\n--b--\r\n")
    hit = ContentRules(BANNED).check(content)
    assert hit is not None and hit.reason == "unparsable MIME structure (TypeError)"
    assert hit.action is None and hit.result().verdict == "banned"


def test_a_double_extension_is_named() -> None:
    hit = ContentRules(BANNED).check(with_attachments(("invoice.pdf.exe", b"MZ",
                                                       "application/pdf")))
    assert hit is not None and "double extension .pdf.exe" in hit.reason


def test_harmless_attachments_pass() -> None:
    message = with_attachments(("invoice.exe.pdf", b"%PDF", "application/pdf"),
                               ("notes.txt", b"hi", "text/plain"))
    assert ContentRules(BANNED).check(message) is None


def test_names_inside_zip_archives_are_checked_two_levels_deep() -> None:
    rules = ContentRules(BANNED)
    inner = zipped(("docs/run.bat", b"echo"))
    assert rules.check(with_attachments(("a.zip", zipped(("ok.txt", b"x")),
                                         "application/zip"))) is None
    hit = rules.check(with_attachments(("a.zip", zipped(("x.scr", b"x")), "application/zip")))
    assert hit is not None and "x.scr" in hit.reason and "inside archive 'a.zip'" in hit.reason
    hit = rules.check(with_attachments(("outer.zip", zipped(("inner.zip", inner)),
                                        "application/octet-stream")))
    assert hit is not None and "run.bat" in hit.reason


def test_a_damaged_zip_is_left_to_the_virus_scanner() -> None:
    assert ContentRules(BANNED).check(with_attachments(("a.zip", b"PK\x03\x04garbage",
                                                        "application/zip"))) is None


def test_a_zip_of_a_later_version_than_python_reads_is_left_to_the_virus_scanner() -> None:
    """zipfile refuses a member that needs version 14.8 to extract (NotImplementedError, once
    a traceback): the archive counts as damaged."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as writer:
        info = zipfile.ZipInfo("run.bat")
        info.extract_version = 148
        writer.writestr(info, b"echo")
    assert ContentRules(BANNED).check(with_attachments(
        ("a.zip", archive.getvalue(), "application/zip"))) is None


def test_banned_mime_types_exact_and_wildcard() -> None:
    message = with_attachments(("tool", b"MZ", "application/x-msdownload"))
    assert ContentRules(PolicyConfig(banned_mime_types=("application/x-msdownload",))
                        ).check(message) is not None
    assert ContentRules(PolicyConfig(banned_mime_types=("application/*",))).check(message)
    assert ContentRules(PolicyConfig(banned_mime_types=("audio/*",))).check(message) is None


def test_max_attachment_size() -> None:
    rules = ContentRules(PolicyConfig(max_attachment_size=1000))
    assert rules.check(with_attachments(("small.bin", b"x" * 1000, "application/x-y"))) is None
    hit = rules.check(with_attachments(("big.bin", b"x" * 1001, "application/x-y")))
    assert hit is not None and "1001 bytes" in hit.reason


def test_header_rules_see_decoded_values_and_carry_their_action() -> None:
    rule = HeaderRule("Subject", re.compile(r"(?i)lottery winner"), "quarantine")
    rules = ContentRules(PolicyConfig(header_rules=(rule,)))
    encoded = plain(subject="=?utf-8?q?Lottery_winner_=E2=9C=93?=")
    hit = rules.check(encoded)
    assert hit is not None and hit.action == "quarantine"
    assert hit.result().action == "quarantine"
    assert rules.check(plain(subject="Minutes")) is None


def test_no_rules_no_parsing() -> None:
    rules = ContentRules(PolicyConfig())
    assert not rules.active
    assert rules.check(b"not even a message") is None
