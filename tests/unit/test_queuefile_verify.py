"""Verification shown per recipient: what handle_RCPT found (live, from the cache, or not
verified and why) goes into the queued envelope, the smtp_accepted log line and `mailgate queue`;
the queue file keeps it in a way older files (and older readers) are not troubled by.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from proxies.filtering import NoFilter
from proxies.queue import DeliveryResult, Envelope, Queue
from proxies.queue.cli import main
from proxies.queue.queuefile import encode_message, parse
from proxies.smtp.handler import ClientInfo, GatewayHandler
from tests.unit.test_smtp_verify import ScriptedServer, make_verifier

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"
CONTENT = b"Subject: x\r\n\r\nbody\r\n"
# A queue file exactly as the version before per-recipient verification wrote it (its
# encode_message and one encode_state after a first attempt): no "verification", no "verdict".
OLD_FILE = (
    b'mailgate-queue 1\nE 644\n{"sender":"alice@sender.example","recipients":["bob@example.com"'
    b',"carol@example.com"],"client_address":"203.0.113.7","client_port":40000,"original_destin'
    b'ation":["198.51.100.25",25],"helo":"client.example","protocol":"ESMTP","smtputf8":false,"b'
    b'ody_8bit":false,"tls":false,"arrival":1700000000.5,"state":{"attempts":0,"next_attempt":17'
    b'00000000.5,"last_attempt":null,"last_error":null,"recipients":[{"address":"bob@example.com'
    b'","status":"pending","code":null,"text":"","remote_mta":null,"connected":true,"expired":fa'
    b'lse},{"address":"carol@example.com","status":"pending","code":null,"text":"","remote_mta":'
    b'null,"connected":true,"expired":false}]}}\nC 31\nSubject: old\r\n\r\nqueued by 0.x\r\n\nX 0'
    b'bd7d4db 0f29876a\nS 402 d4388913\n{"attempts":1,"next_attempt":1700000300.5,"last_attempt":'
    b'1700000000.5,"last_error":"451 4.2.0 full","recipients":[{"address":"bob@example.com","sta'
    b'tus":"delivered","code":250,"text":"2.0.0 Ok","remote_mta":"198.51.100.25","connected":tru'
    b'e,"expired":false},{"address":"carol@example.com","status":"deferred","code":451,"text":"4'
    b'.2.0 full","remote_mta":"198.51.100.25","connected":true,"expired":false}]}\n')
OLD_ID = "60A241825E12000000001"  # made at its arrival, 2023-11-14


def round_trip(envelope: Envelope) -> Envelope:
    return parse(io.BytesIO(b"".join(encode_message(envelope, CONTENT)))).envelope


def test_verification_and_verdict_survive_the_queue_file() -> None:
    envelope = Envelope(sender="a@sender.example", recipients=(ALICE, BOB, CAROL),
                        verification=((ALICE, "live"), (BOB, "cache"), (CAROL, "relay-client")),
                        verdict="spam", arrival=1_700_000_000.0)
    again = round_trip(envelope)
    assert again == envelope
    assert [again.verification_of(r) for r in (ALICE, BOB, CAROL)] == [
        "live", "cache", "relay-client"]
    assert again.verdict == "spam"


def test_crlf_only_is_kept_and_absent_means_unchecked() -> None:
    """Delivery skips the line-ending pass only for content our handler vouched for."""
    vouched = Envelope(sender="a@sender.example", recipients=(ALICE,), crlf_only=True,
                       arrival=1_700_000_000.0)
    assert round_trip(vouched).crlf_only
    assert not round_trip(Envelope(sender="a@sender.example", recipients=(ALICE,),
                                   arrival=1_700_000_000.0)).crlf_only


def test_one_entry_per_recipient_in_rcpt_order() -> None:
    envelope = Envelope(sender="", recipients=(BOB, ALICE, BOB),
                        verification=((ALICE, "cache"), (BOB, "live"), (ALICE, "live"),
                                      ("stranger@example.com", "live")))
    assert envelope.recipients == (BOB, ALICE)
    assert envelope.verification == ((BOB, "live"), (ALICE, "cache"))
    assert envelope.verification_of("stranger@example.com") == ""


def test_an_envelope_without_them_writes_the_old_format() -> None:
    envelope = Envelope(sender="", recipients=(ALICE,), arrival=1.0)
    (_, env_json, *_rest) = encode_message(envelope, CONTENT)
    assert not {"verification", "verdict"} & set(json.loads(env_json))
    assert round_trip(envelope) == envelope


def old_queue(tmp_path: Path) -> Queue:
    queue = Queue(tmp_path, hostname="gw.example.net")
    (tmp_path / "deferred" / OLD_ID).write_bytes(OLD_FILE)
    os.utime(tmp_path / "deferred" / OLD_ID, (1_700_000_300.5, 1_700_000_300.5))
    return queue


def test_a_file_of_the_old_format_loads_lists_and_delivers(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    queue = old_queue(tmp_path)
    (entry,) = queue.list()
    assert entry.queue_id == OLD_ID and entry.sender == "alice@sender.example"
    assert entry.envelope.verification == () and entry.envelope.verdict == ""
    assert [(r.address, str(r.status)) for r in entry.recipients] == [
        (BOB, "delivered"), (CAROL, "deferred")]
    assert main(["queue", "list", "--queue-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{' ' * 53}{CAROL}\n" in out  # nothing to say about its verification
    assert main(["queue", "list", "--json", "--queue-dir", str(tmp_path)]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert [r["verification"] for r in shown["recipients"]] == [None, None]
    assert shown["verdict"] is None
    # And it is delivered as any other.
    claimed = queue.claim(OLD_ID)
    assert claimed is not None and claimed.pending == (CAROL,)
    assert queue.record_attempt(OLD_ID, {CAROL: DeliveryResult(250, "2.0.0 Ok")}).removed


# --- from RCPT to the queue -------------------------------------------------------------------


class Session:
    def __init__(self, client: str) -> None:
        self.mailgate_client = ClientInfo(client, 40000, ("198.51.100.25", 25), "1.1")
        self.host_name = "client.example"
        self.ssl = None
        self.extended_smtp = True


def transaction(handler: GatewayHandler, client: str, rcpts: list[str]) -> tuple[list[str], str]:
    """MAIL, RCPT each, DATA: the RCPT replies and the DATA reply."""
    async def run() -> tuple[list[str], str]:
        session, envelope = Session(client), SmtpEnvelope()
        await handler.handle_MAIL(None, session, envelope,  # type: ignore[arg-type]
                                  "vera@sender.example", [])
        replies = [await handler.handle_RCPT(None, session, envelope,  # type: ignore[arg-type]
                                             rcpt, []) for rcpt in rcpts]
        envelope.original_content = CONTENT
        return replies, await handler.handle_DATA(None, session, envelope)  # type: ignore[arg-type]
    return asyncio.run(run())


def accepted_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [dict(getattr(r, "fields", {})) for r in caplog.records
            if r.getMessage() == "smtp_accepted"]


def test_each_recipient_is_shown_live_cached_or_why_not_verified(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO, logger="mailgate")
    server = ScriptedServer(known=[ALICE, BOB])
    verifier = make_verifier(tmp_path, server)
    queue = Queue(tmp_path / "queue", hostname="gw.example.net")
    handler = GatewayHandler(verifier.config, queue, NoFilter(), verifier=verifier)

    # A stranger's mail: BOB asked now, ALICE too; a repeated RCPT keeps the first answer.
    replies, first = transaction(handler, "203.0.113.7", [ALICE, BOB, ALICE])
    assert first.startswith("250 2.0.0 Ok: queued as"), first
    # The next message: both from the cache, and an unknown recipient refused as before.
    replies, second = transaction(handler, "203.0.113.7", [BOB, "nobody@example.com", ALICE])
    assert replies[1].startswith("550 5.1.1") and second.startswith("250 "), replies
    # Our own user (relay_networks): not verified, also for mail that leaves.
    _, third = transaction(handler, "192.0.2.10", [ALICE, "friend@elsewhere.example"])
    assert server.calls == [ALICE, BOB, "nobody@example.com"]

    by_id = {e.queue_id: e for e in queue.list()}
    shown = [[(r, by_id[qid].envelope.verification_of(r)) for r in by_id[qid].envelope.recipients]
             for qid in (first[-21:], second[-21:], third[-21:])]
    assert shown == [
        [(ALICE, "live"), (BOB, "live")],
        [(BOB, "cache"), (ALICE, "cache")],
        [(ALICE, "relay-client"), ("friend@elsewhere.example", "outbound")]]
    # The accept line says it per recipient, in the order of rcpts= (which lists a repeated
    # RCPT as the client gave it).
    assert [(e["rcpts"], e["verify"]) for e in accepted_lines(caplog)] == [
        (f"{ALICE},{BOB},{ALICE}", "live,live,live"), (f"{BOB},{ALICE}", "cache,cache"),
        (f"{ALICE},friend@elsewhere.example", "relay-client,outbound")]

    # `mailgate queue list` and `show`, as an administrator reads them.
    assert main(["queue", "list", "--queue-dir", str(queue.directory)]) == 0
    out = capsys.readouterr().out
    assert f"{ALICE}  [verified live]" in out and f"{BOB}  [verified from cache]" in out
    assert f"{ALICE}  [not verified: client in smtp.relay_networks]" in out
    assert "friend@elsewhere.example  [not verified: not one of our domains]" in out
    assert main(["queue", "show", second[-21:], "--no-content",
                 "--queue-dir", str(queue.directory)]) == 0
    out = capsys.readouterr().out
    assert f"  <{BOB}> pending  [verified from cache]\n" in out
    assert main(["queue", "list", "--json", "--queue-dir", str(queue.directory)]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [[r["verification"] for r in e["recipients"]] for e in entries] == [
        ["live", "live"], ["cache", "cache"], ["relay-client", "outbound"]]


def test_verification_off_and_an_unreachable_server_accepted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailgate")
    queue = Queue(tmp_path / "queue", hostname="gw.example.net")
    off = make_verifier(tmp_path, ScriptedServer(known=[])).config
    _, reply = transaction(GatewayHandler(off, queue, NoFilter(), verifier=None),
                           "203.0.113.7", [ALICE])
    assert reply.startswith("250 ")

    down = ScriptedServer(known=[])
    down.gate.clear()  # never answers: a tempfail at verify_timeout
    (tmp_path / "down").mkdir()
    verifier = make_verifier(tmp_path / "down", down, verify_timeout=0.05,
                             verify_unreachable="accept")
    _, reply = transaction(GatewayHandler(verifier.config, queue, NoFilter(), verifier=verifier),
                           "203.0.113.7", [CAROL])
    assert reply.startswith("250 ")
    assert [e["verify"] for e in accepted_lines(caplog)] == ["off", "unreachable"]
    assert [[e.envelope.verification_of(r) for r in e.envelope.recipients]
            for e in queue.list()] == [["off"], ["unreachable"]]


def test_show_names_a_spam_verdict_that_will_not_be_bounced(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue = Queue(tmp_path, hostname="gw.example.net")
    envelope = Envelope(sender="forged@sender.example", recipients=(ALICE,), verdict="spam",
                        verification=((ALICE, "cache"),))
    queue_id = asyncio.run(queue.accept(envelope, CONTENT))
    assert main(["queue", "show", queue_id, "--no-content", "--queue-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "scan verdict: spam (never bounced to the sender)\n" in out
    assert f"  <{ALICE}> pending  [verified from cache]\n" in out
