"""The mail parts SMTP and POP3 share (proxies/mail): header splitting, tagging, the verdict ->
action table, connection limits, durable writes. How each protocol uses them is tested from
its side too: test_scan_filter.py (SMTP), test_pop3_parts.py and test_pop3_proxy.py (POP3)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from proxies.mail.actions import Action, ActionTable, action_for
from proxies.mail.durable import fsync_directory, fsync_file, write_new_file
from proxies.mail.headers import field_name, message_header, parse_header, split_message
from proxies.mail.limits import ConnectionGate
from proxies.mail.tagging import OUR_FIELDS, field, tag, tag_header
from proxies.scan.api import ScanResult

# --- headers ---------------------------------------------------------------------------------


def test_header_parsing_edge_cases() -> None:
    assert parse_header(b"A: b\r\n", complete=False) is None
    header = parse_header(b"A: b\r\n", complete=True)
    assert header is not None and header.data == b"A: b\r\n"
    header = parse_header(b"\r\nbody", complete=True)
    assert header is not None and header.data == b"" and header.body_start == 2
    header = parse_header(b"Subject: a\n folded\nX: y\n\nbody", complete=True)
    assert header is not None and header.eol == b"\n"
    assert header.first("subject") == b"a folded"


def test_fields_keep_their_folds_and_lines_that_are_no_field() -> None:
    fields, rest = split_message(b"A: 1\r\n 2\r\nB: 3\r\n\r\nbody")
    assert fields == [b"A: 1\r\n 2\r\n", b"B: 3\r\n"] and rest == b"\r\nbody"
    header = message_header(b"From : a@b\r\nnot a field\r\n\r\n")
    assert [name for name, _raw in header.fields] == ["from", ""]
    assert (field_name(b"X-Spam-Flag: NO"), field_name(b"X-Spam-Flag : NO"),
            field_name(b" folded"), field_name(b"no colon")) == ("x-spam-flag", "x-spam-flag",
                                                                 None, None)


# --- tagging ---------------------------------------------------------------------------------


def test_tagging_keeps_everything_else() -> None:
    body_only = b"\r\nno headers\r\n"
    assert tag(body_only, [b"X-A: 1\r\n"]) == b"X-A: 1\r\n" + body_only
    headers_only = b"Subject: x\r\nFrom: a@b"
    assert tag(headers_only, [], subject_prefix="[S] ") == b"Subject: [S] x\r\nFrom: a@b\r\n"
    no_subject = b"From: a@b\r\n\r\nbody"
    assert tag(no_subject, [], subject_prefix="[S] ") == \
        b"From: a@b\r\nSubject: [S]\r\n\r\nbody"
    already = b"Subject: [S] x\r\n\r\n"
    assert tag(already, [], subject_prefix="[S] ") == already
    spaced = b"Subject:\tx\r\n\r\n"
    assert tag(spaced, [], subject_prefix="[S] ") == b"Subject:\t[S] x\r\n\r\n"


def test_tagging_removes_copies_of_what_it_adds_and_of_what_it_is_told() -> None:
    content = (b"X-Spam-Flag: NO\r\nFrom: a@b\r\nx-spam-flag: NO\r\nX-Spam-Status: No,\r\n"
               b"\tscore=-1\r\nX-Other: kept\r\n\r\nX-Spam-Flag: NO in the body\r\n")
    flag = field("X-Spam-Flag", "YES")
    assert tag(content, [flag]) == (b"X-Spam-Flag: YES\r\nFrom: a@b\r\nX-Spam-Status: No,\r\n"
                                    b"\tscore=-1\r\nX-Other: kept\r\n\r\n"
                                    b"X-Spam-Flag: NO in the body\r\n")
    assert tag(content, [flag], remove=OUR_FIELDS) == (
        b"X-Spam-Flag: YES\r\nFrom: a@b\r\nX-Other: kept\r\n\r\nX-Spam-Flag: NO in the body\r\n")


def test_tagging_at_the_end_leaves_what_was_sent_alone() -> None:
    header = message_header(b"Received: x\r\nX-Spam-Flag: early\r\nSubject: s\r\n"
                            b"X-Spam-Flag: NO\r\n\r\nbody")
    sent = len(b"Received: x\r\nX-Spam-Flag: early\r\n")
    tagged = tag_header(header, [b"X-Spam-Flag: YES\r\n"], subject_prefix="[S] ", place="end",
                        protected=sent)
    assert tagged == (b"Received: x\r\nX-Spam-Flag: early\r\nSubject: [S] s\r\n"
                      b"X-Spam-Flag: YES\r\n")
    subject_sent = tag_header(header, [], subject_prefix="[S] ", place="end", protected=sent + 1)
    assert b"Subject: s\r\n" in subject_sent  # too late to change it
    with pytest.raises(ValueError):
        tag_header(header, [], protected=1)  # on top, the sent bytes would not stay first


def test_fields_fold_and_take_the_message_line_end() -> None:
    rules = ",".join(f"RULE_{n}" for n in range(20))
    long = field("X-Spam-Status", "Yes, score=9.0 tests=" + rules)
    lines = long.split(b"\r\n")
    assert lines[-1] == b"" and all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert field("X-A", "one\r\ntwo", b"\n") == b"X-A: one  two\n"


# --- verdict -> action -------------------------------------------------------------------------

TABLE = ActionTable(spam="tag", virus="reject", banned="quarantine", oversize="pass",
                    failed="tempfail", spam_reject_score=15.0)


@pytest.mark.parametrize(("result", "action"), [
    (ScanResult("clean"), "pass"),
    (ScanResult("spam", score=5.0), "tag"),
    (ScanResult("spam"), "tag"),
    (ScanResult("spam", score=15.0), "reject"),
    (ScanResult("virus", virus="V"), "reject"),
    (ScanResult("banned"), "quarantine"),
    (ScanResult("banned", action="drop"), "drop"),
    (ScanResult("failed"), "tempfail"),
    (ScanResult("failed", timed_out=True), "tempfail"),
    (ScanResult("failed", oversize=True), "pass"),
    (None, "pass"),
])
def test_the_verdict_action_table(result: ScanResult | None, action: Action) -> None:
    assert action_for(result, TABLE) == action


# --- connection limits ---------------------------------------------------------------------------


def test_connection_gate_counts_per_client_and_in_total() -> None:
    gate = ConnectionGate(total=3, per_client=2)
    assert gate.admit("192.0.2.1") and gate.admit("192.0.2.1")
    assert not gate.admit("192.0.2.1")  # its own limit
    assert gate.admit("192.0.2.2")
    assert not gate.admit("192.0.2.3")  # the total
    gate.release("192.0.2.2")
    assert gate.admit("192.0.2.3")
    gate.release("192.0.2.3")
    assert "192.0.2.3" not in gate.by_client and gate.count == 2


# --- durable writes ------------------------------------------------------------------------------


def test_write_new_file_writes_once_and_privately(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    write_new_file(path, b"x" * 100_000)
    assert path.read_bytes() == b"x" * 100_000
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_new_file(path, b"other")
    assert path.read_bytes() == b"x" * 100_000  # never clobbered
    fsync_file(path)
    fsync_directory(tmp_path)
    with pytest.raises(NotADirectoryError):
        fsync_directory(path)


def test_a_failed_write_leaves_no_partial_file(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        write_new_file(tmp_path / "m.eml", b"data")
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
