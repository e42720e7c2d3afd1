"""Recipient verification without sockets: the probe core as bytes in and out, the result
cache (one sqlite file, as the workers share it), the decision, and the verifier's coalescing
and timeout with a prober that runs the real probe core over scripted server bytes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import Envelope

from proxies.config import SmtpConfig
from proxies.filtering import NoFilter
from proxies.queue import Queue
from proxies.smtp.addresses import parse_path
from proxies.smtp.events import NEED_DATA, StartTls
from proxies.smtp.handler import ClientInfo, GatewayHandler
from proxies.smtp.probe import ProbeDone, ProbeSession
from proxies.smtp.verify import (
    CacheEntry,
    RecipientVerifier,
    VerifyCache,
    decide,
    hop_key,
    ttl_for,
)

SERVER = ("198.51.100.25", 25)
CLIENT = "203.0.113.7"
ALICE = "alice@example.com"
NOBODY = "nobody@example.com"

GREETING = b"220 mx.example.com ESMTP\r\n"
EHLO_PIPELINING = b"250-mx.example.com\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_PLAIN = b"250-mx.example.com\r\n250 8BITMIME\r\n"
UNKNOWN = b"550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown\r\n"


def run_probe(server: Sequence[bytes], recipient: str = ALICE, *, tls: bool = False
              ) -> tuple[list[bytes], ProbeDone]:
    """Feed the server's replies one by one; return what the probe wrote before each, and
    its result."""
    session = ProbeSession("gw.example.net", recipient, tls=tls)
    written: list[bytes] = []
    replies = list(server)
    while True:
        event = session.next_event()
        written.append(session.data_to_send())
        if isinstance(event, ProbeDone):
            return written, event
        if isinstance(event, StartTls):
            session.tls_established()
            continue
        assert event is NEED_DATA
        session.receive_data(replies.pop(0) if replies else b"")


# --- the probe core -----------------------------------------------------------------------


def test_pipelined_probe_sends_mail_and_rcpt_together_then_quits() -> None:
    written, done = run_probe([GREETING, EHLO_PIPELINING, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"])
    assert written == [b"", b"EHLO gw.example.net\r\n",
                       b"MAIL FROM:<>\r\nRCPT TO:<alice@example.com>\r\n", b"QUIT\r\n"]
    assert (done.status, done.stage, done.reply.code) == ("ok", "rcpt", 250)


def test_without_pipelining_rcpt_waits_for_the_mail_reply() -> None:
    written, done = run_probe([GREETING, EHLO_PLAIN, b"250 2.1.0 Ok\r\n", UNKNOWN],
                              recipient=NOBODY)
    assert written[2:] == [b"MAIL FROM:<>\r\n", b"RCPT TO:<nobody@example.com>\r\n",
                           b"QUIT\r\n"]
    assert (done.status, done.reply.enhanced) == ("refused", "5.1.1")
    assert "User unknown" in done.reply.text


@pytest.mark.parametrize(("replies", "status", "stage"), [
    ([GREETING, EHLO_PLAIN, b"250 Ok\r\n", b"450 4.2.0 Greylisted\r\n"], "tempfail", "rcpt"),
    ([GREETING, EHLO_PLAIN, b"451 4.3.0 Try later\r\n"], "tempfail", "mail"),
    # The null sender refused: nothing learnt about the recipient (the server's policy).
    ([GREETING, EHLO_PLAIN, b"550 5.7.1 No bounces here\r\n"], "unverifiable", "mail"),
    ([b"554 5.3.2 Not now\r\n"], "tempfail", "greeting"),
    ([GREETING, b"421 4.3.2 Shutting down\r\n"], "tempfail", "ehlo"),
    ([GREETING, EHLO_PLAIN], "tempfail", "mail"),                  # closed mid-session
    ([b"HTTP/1.1 400 Bad Request\r\n"], "tempfail", "greeting"),   # not SMTP at all
])
def test_what_replies_mean(replies: list[bytes], status: str, stage: str) -> None:
    _written, done = run_probe(replies)
    assert (done.status, done.stage) == (status, stage)


def test_ehlo_refused_falls_back_to_helo() -> None:
    written, done = run_probe([GREETING, b"502 5.5.2 No EHLO\r\n", b"250 mx\r\n",
                               b"250 Ok\r\n", b"250 Ok\r\n"])
    assert written[2] == b"HELO gw.example.net\r\n"
    assert done.status == "ok"


def test_starttls_when_offered_and_wanted_then_ehlo_again() -> None:
    offered = b"250-mx.example.com\r\n250 STARTTLS\r\n"
    written, done = run_probe([GREETING, offered, b"220 Go ahead\r\n", EHLO_PLAIN,
                               b"250 Ok\r\n", b"250 Ok\r\n"], tls=True)
    written = [w for w in written if w]
    assert written[1:3] == [b"STARTTLS\r\n", b"EHLO gw.example.net\r\n"]
    assert done.status == "ok"


def test_plain_text_after_the_220_to_starttls_is_an_injection() -> None:
    """RFC 3207 5: no TLS handshake with a server that sent more than its 220, and (if the
    driver upgraded anyway) nothing from before TLS taken as a reply."""
    offered = b"250-mx.example.com\r\n250 STARTTLS\r\n"
    session = ProbeSession("gw.example.net", ALICE, tls=True)
    for data in (GREETING, offered, b"220 Go\r\n250 injected\r\n"):
        assert session.next_event() is NEED_DATA
        session.receive_data(data)
    done = session.next_event()
    assert isinstance(done, ProbeDone), done
    assert (done.status, done.stage) == ("tempfail", "starttls")
    assert session.data_to_send() == b""  # not even QUIT, to a server that broke the rules
    late = ProbeSession("gw.example.net", ALICE, tls=True)
    for data in (GREETING, offered, b"220 Go\r\n"):
        late.next_event()
        late.receive_data(data)
    assert isinstance(late.next_event(), StartTls)
    late.receive_data(b"250 injected\r\n")
    late.tls_established()
    done = late.next_event()
    assert isinstance(done, ProbeDone) and done.status == "tempfail", done


def test_a_non_ascii_recipient_needs_smtputf8() -> None:
    _written, done = run_probe([GREETING, EHLO_PLAIN], recipient="jösé@example.com")
    assert (done.status, done.stage) == ("unverifiable", "policy")
    written, done = run_probe([GREETING, b"250-mx\r\n250 SMTPUTF8\r\n", b"250 Ok\r\n",
                               b"250 Ok\r\n"], recipient="jösé@example.com")
    assert written[2] == b"MAIL FROM:<> SMTPUTF8\r\n"
    assert done.status == "ok"


# --- the cache ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_cache_entries_expire_after_their_ttl(tmp_path: Path) -> None:
    clock = Clock()
    cache = VerifyCache(tmp_path / "verify.db", clock=clock)
    cache.put("hop", ALICE, "ok", "host said 250", ttl=10)
    entry = cache.get("hop", ALICE)
    assert entry is not None and entry.status == "ok"
    assert cache.get("other-hop", ALICE) is None  # per next hop
    clock.now += 10
    assert cache.get("hop", ALICE) is None
    cache.put("hop", ALICE, "tempfail", "x", ttl=0)  # ttl 0: not recorded
    assert len(cache) == 1  # the expired entry, until a prune
    cache.prune()
    assert len(cache) == 0


def test_cache_is_shared_between_processes_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "verify.db"
    worker1, worker2 = VerifyCache(path), VerifyCache(path)
    worker1.put("hop", NOBODY, "refused", "550 5.1.1 unknown", ttl=3600)
    entry = worker2.get("hop", NOBODY)
    assert entry is not None and (entry.status, entry.detail) == ("refused", "550 5.1.1 unknown")
    worker1.close()
    worker2.close()
    again = VerifyCache(path)
    assert again.get("hop", NOBODY) is not None
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"  # readers never wait for the writer


def test_a_warm_recipient_is_answered_from_memory_for_a_minute(tmp_path: Path) -> None:
    """Each process reads the shared file once per recipient a minute, not at every RCPT;
    another process's newer answer shows within that minute, never later."""
    clock = Clock()
    path = tmp_path / "verify.db"
    worker1, worker2 = VerifyCache(path, clock=clock), VerifyCache(path, clock=clock)
    worker1.put("hop", ALICE, "ok", "250", ttl=3600)
    assert worker2.get("hop", ALICE).status == "ok"  # type: ignore[union-attr]
    worker1.put("hop", ALICE, "refused", "550 5.1.1 gone", ttl=3600)
    assert worker1.get("hop", ALICE).status == "refused"  # type: ignore[union-attr]
    assert worker2.get("hop", ALICE).status == "ok"  # type: ignore[union-attr]
    clock.now += 61
    assert worker2.get("hop", ALICE).status == "refused"  # type: ignore[union-attr]


def test_a_tempfail_never_replaces_a_fresh_answer(tmp_path: Path) -> None:
    clock = Clock()
    cache = VerifyCache(tmp_path / "verify.db", clock=clock)
    cache.put("hop", ALICE, "ok", "250", ttl=100)
    cache.put("hop", ALICE, "tempfail", "connect: refused", ttl=60)
    entry = cache.get("hop", ALICE)
    assert entry is not None and entry.status == "ok"
    cache.put("hop", ALICE, "refused", "550", ttl=100)  # a definite answer does
    entry = cache.get("hop", ALICE)
    assert entry is not None and entry.status == "refused"
    clock.now += 100
    cache.put("hop", ALICE, "tempfail", "connect: refused", ttl=60)  # once expired, it may
    entry = cache.get("hop", ALICE)
    assert entry is not None and entry.status == "tempfail"


def test_cache_size_is_bounded_oldest_checked_go_first(tmp_path: Path) -> None:
    clock = Clock()
    cache = VerifyCache(tmp_path / "verify.db", max_entries=10, clock=clock)
    for index in range(12):
        clock.now += 1
        cache.put("hop", f"user{index}@example.com", "refused", "550", ttl=1000)
    cache.prune()
    assert len(cache) == 9
    assert cache.get("hop", "user0@example.com") is None
    assert cache.get("hop", "user11@example.com") is not None


# --- the decision ---------------------------------------------------------------------------


def entry(status: Any, detail: str = "host 198.51.100.25 said: 550 5.1.1 User unknown"
          ) -> CacheEntry:
    return CacheEntry(status, detail, 0.0, 1.0)


def test_decisions() -> None:
    config = SmtpConfig()
    refused = decide(config, NOBODY, entry("refused"), cached=False)
    assert not refused.accepted
    assert refused.reply == ("550 5.1.1 <nobody@example.com>: Recipient address rejected: "
                             "undeliverable address: host 198.51.100.25 said: 550 5.1.1 "
                             "User unknown")
    tempfail = decide(config, ALICE, entry("tempfail", "connect to x: refused"), cached=True)
    assert not tempfail.accepted and tempfail.reply.startswith("450 4.1.1 <alice@example.com>")
    assert decide(config, ALICE, entry("ok"), cached=False).accepted
    assert decide(config, ALICE, entry("unverifiable"), cached=False).accepted
    accepting = SmtpConfig(verify_unreachable="accept")
    assert decide(accepting, ALICE, entry("tempfail"), cached=False).accepted
    assert not decide(accepting, NOBODY, entry("refused"), cached=False).accepted


def test_server_text_is_made_safe_for_the_client() -> None:
    hostile = "host x said: 550 " + "\u00e9\x07" + "y" * 600
    reply = decide(SmtpConfig(), NOBODY, entry("refused", hostile), cached=False).reply
    assert reply.isascii() and reply.isprintable() and len(reply) <= 450


def test_ttls_and_hop_keys() -> None:
    config = SmtpConfig(transport=(("example.org", ("10.0.0.25", 2525)),),
                        next_hop=("smarthost.example.net", 25))
    assert ttl_for(config, "ok") == 7 * 86400 and ttl_for(config, "refused") == 3 * 3600
    assert ttl_for(config, "tempfail") == ttl_for(config, "unverifiable") == 60
    assert hop_key(config, "example.com", SERVER) == "198.51.100.25:25"
    assert hop_key(config, "example.com", ("2001:db8::25", 25)) == "[2001:db8::25]:25"
    assert hop_key(config, "example.org", None) == "10.0.0.25:2525"
    assert hop_key(config, "example.net", None) == "smarthost.example.net:25"
    assert hop_key(SmtpConfig(), "example.net", None) == "mx:example.net"


# --- the verifier ---------------------------------------------------------------------------


class ScriptedServer:
    """A prober that runs the real probe core against scripted replies per recipient; `gate`
    holds every probe until the test lets it go (the only fake: timing)."""

    def __init__(self, known: Sequence[str]) -> None:
        self.known = set(known)
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, rcpt: str, original_destination: tuple[str, int] | None,
                       client_address: str) -> ProbeDone:
        self.calls.append(rcpt)
        await self.gate.wait()
        answer = b"250 2.1.5 Ok\r\n" if rcpt in self.known else UNKNOWN
        return run_probe([GREETING, EHLO_PIPELINING, b"250 2.1.0 Ok\r\n" + answer], rcpt)[1]


def make_verifier(tmp_path: Path, prober: Any, **settings: Any) -> RecipientVerifier:
    config = SmtpConfig(relay_domains=("example.com",), queue_dir=tmp_path,
                        relay_networks=(ipaddress.ip_network("192.0.2.0/24"),), **settings)
    return RecipientVerifier(config, VerifyCache(tmp_path / "verify.db"), spoof_source=True,
                             tls_context=None, prober=prober)


def test_concurrent_rcpts_for_one_recipient_cause_one_probe(tmp_path: Path) -> None:
    server = ScriptedServer(known=[ALICE])
    verifier = make_verifier(tmp_path, server)

    async def main() -> list[Any]:
        server.gate.clear()
        waiting = [asyncio.create_task(verifier.verify(parse_path(NOBODY), SERVER, CLIENT))
                   for _ in range(5)]
        await asyncio.sleep(0)
        server.gate.set()
        first = await asyncio.gather(*waiting)
        second = await verifier.verify(parse_path(NOBODY), SERVER, CLIENT)
        return [*first, second]

    decisions = asyncio.run(main())
    assert server.calls == [NOBODY]
    assert all(d.reply.startswith("550 5.1.1 <nobody@example.com>") for d in decisions)
    assert [d.cached for d in decisions] == [False] * 5 + [True]


def test_a_slow_server_is_a_tempfail_within_verify_timeout(tmp_path: Path) -> None:
    server = ScriptedServer(known=[ALICE])
    server.gate.clear()  # never answers
    verifier = make_verifier(tmp_path, server, verify_timeout=0.05)
    decision = asyncio.run(verifier.verify(parse_path(ALICE), SERVER, CLIENT))
    assert not decision.accepted
    assert decision.reply.startswith("450 4.1.1 <alice@example.com>: Recipient address "
                                     "rejected: unverified address: 451 4.4.2 probe timed out")


def test_who_is_verified(tmp_path: Path) -> None:
    verifier = make_verifier(tmp_path, ScriptedServer(known=[]))
    assert verifier.applies(parse_path(ALICE), CLIENT)
    assert not verifier.applies(parse_path(ALICE), "192.0.2.10")        # relay_networks
    assert not verifier.applies(parse_path("x@elsewhere.example"), "192.0.2.10")
    # ... and why not, as `mailgate queue` shows it.
    assert verifier.not_verified(parse_path(ALICE), CLIENT) is None
    assert verifier.not_verified(parse_path(ALICE), "192.0.2.10") == "relay-client"
    assert verifier.not_verified(parse_path("x@elsewhere.example"), "192.0.2.10") == "outbound"
    asked = make_verifier(tmp_path, ScriptedServer(known=[]), verify_relay_networks=True)
    assert asked.applies(parse_path(ALICE), "192.0.2.10")


# --- in the handler -------------------------------------------------------------------------


class FakeSession:
    def __init__(self) -> None:
        self.mailgate_client = ClientInfo(CLIENT, 40000, SERVER, "1.1")


def test_handler_refuses_an_unknown_recipient_at_rcpt(tmp_path: Path) -> None:
    server = ScriptedServer(known=[ALICE])
    verifier = make_verifier(tmp_path, server)
    handler = GatewayHandler(verifier.config, Queue(tmp_path / "queue"), NoFilter(),
                             verifier=verifier)
    envelope = Envelope()

    async def rcpt(address: str) -> str:
        return await handler.handle_RCPT(None, FakeSession(), envelope,  # type: ignore[arg-type]
                                         address, [])

    assert asyncio.run(rcpt(ALICE)) == "250 2.1.5 Ok"
    assert asyncio.run(rcpt(NOBODY)).startswith("550 5.1.1 <nobody@example.com>")
    assert envelope.rcpt_tos == [ALICE]
    # Relay denied is still decided first, without a probe.
    assert asyncio.run(rcpt("x@elsewhere.example")).startswith("554 5.7.1")
    assert server.calls == [ALICE, NOBODY]
