"""The delivery agent's own paths (proxies/smtp/delivery.py), with a real Postfix receiving.

Router lab, one server host. Postfix listens there on several addresses, each listener set up
to behave in one way the agent must cope with; the lab's DNS server runs beside it and only the
gateway namespace asks it (as in test_smtp_nexthop.py). The sender host talks either through
the gateway to a server address (intercepted: the message goes to that address, from the
sender's own address) or to the gateway's own address and port (the `transport` table or MX
records decide, with names looked up in the lab's DNS).

    198.51.100.25  Postfix, plain (and the DNS server, port 53)
    198.51.100.26  nothing listens: connection refused
    198.51.100.27  Postfix with smtpd_timeout = 1s: it closes an idle connection after 1 s,
                   sooner than the agent's 2 s connection cache lets one idle
    198.51.100.28  Postfix greeting 450 (client restrictions evaluated at connect: "defer")
    198.51.100.29  Postfix greeting 554 (the same with "reject")
    198.51.100.99  no host: unanswered ARP, so a connect times out (connect_timeout 1s)

What a user checks: the message is in Postfix's mailbox once (its X-Original-To), Postfix's
own log (one "connect from" per connection, the "disconnect from ... mail=N" summary),
`mailgate queue list --json` (empty, or the message deferred with the reason), and the
gateway's log lines. Each test names, in its docstring, the break of delivery.py it was seen
to fail with.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netsetup.lab.peers._common import wait_until
from netsetup.lab.peers.dns import DnsServer, ZoneData
from netsetup.lab.peers.postfix import Delivery, Postfix, PostfixInstance, listen_service
from netsetup.lab.topology import NETNS_ETC, Lab
from proxies.queue import Envelope, Queue
from tests.lab.smtp_helpers import (
    GATEWAY_HOSTNAME,
    HELO,
    SENDER_DOMAIN,
    SMTP_LISTEN,
    Gateway,
    message,
    qid_of,
    sender_address,
    smtp_client,
)

PLAIN = "198.51.100.25"
REFUSING = "198.51.100.26"
IMPATIENT = "198.51.100.27"
GREETS_450 = "198.51.100.28"
GREETS_554 = "198.51.100.29"
NOBODY = "198.51.100.99"
GATEWAY_ON_SERVER_LINK = "198.51.100.1"  # the gateway's own address towards the server

ZONE: ZoneData = {
    # Mail hosts tried in MX preference order (RFC 5321 5.1). The A records of one name would
    # not do: the lab's DNS server, like most, shuffles the records of an answer.
    "failover.dlv.example.": {"MX": [[10, "nobody.dlv.example."], [20, "refusing.dlv.example."],
                                     [30, "mx.dlv.example."]]},
    "dead.dlv.example.": {"MX": [[10, "nobody.dlv.example."], [20, "refusing.dlv.example."]]},
    "greet450.dlv.example.": {"MX": [[10, "greets450.dlv.example."], [20, "mx.dlv.example."]]},
    "greet554.dlv.example.": {"MX": [[10, "greets554.dlv.example."], [20, "mx.dlv.example."]]},
    "ok.dlv.example.": {"MX": [[10, "mx.dlv.example."]]},
    "mx.dlv.example.": {"A": [PLAIN]},
    "nobody.dlv.example.": {"A": [NOBODY]},
    "refusing.dlv.example.": {"A": [REFUSING]},
    "greets450.dlv.example.": {"A": [GREETS_450]},
    "greets554.dlv.example.": {"A": [GREETS_554]},
    # An MX whose exchange has no address at all (the name exists: NOERROR, no A, no AAAA).
    "noaddr.dlv.example.": {"MX": [[10, "void.dlv.example."]]},
    "void.dlv.example.": {"TXT": ["no address here"]},
    # nosuch.dlv.example is not in the zone: NXDOMAIN.
}
TRANSPORT = {
    SENDER_DOMAIN: f"{PLAIN}:25",  # DSNs come back to the same Postfix mailbox
    "internal.dlv.example": f"{PLAIN}:25",
}
INTERCEPTED_DOMAIN = "example.com"
DOMAINS = [INTERCEPTED_DOMAIN, "failover.dlv.example", "dead.dlv.example",
           "greet450.dlv.example", "greet554.dlv.example", "internal.dlv.example",
           "ok.dlv.example", "noaddr.dlv.example", "nosuch.dlv.example"]


@dataclass
class Env:
    lab: Lab
    receiver: PostfixInstance
    dns: DnsServer
    base: Path
    gateways: list[Gateway] = field(default_factory=list)
    log_mark: int = 0

    def gateway(self, start: bool = True) -> Gateway:
        gateway = Gateway(self.lab, self.base / f"gateway{len(self.gateways)}")
        # verify_recipients = false: the paths under test (hops down, recipients refused at
        # delivery) are what recipient verification would refuse at RCPT instead.
        gateway.write_config(relay_domains=DOMAINS, transport=TRANSPORT, connect_timeout="1s",
                             delivery_timeout="10s", verify_recipients=False)
        self.gateways.append(gateway)
        return gateway.start() if start else gateway

    def receiver_log(self) -> str:
        """What Postfix logged since the test began."""
        with self.receiver.log_path.open("rb") as log:
            log.seek(self.log_mark)
            return log.read().decode(errors="replace")

    def cleanup(self) -> None:
        for gateway in self.gateways:
            if gateway.process is not None and gateway.process.poll() is None:
                gateway.kill()
        self.gateways.clear()


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("smtp-delivery-paths")
    lab = Lab("router", name=f"dlv{secrets.token_hex(2)}")
    try:
        lab.up()
        for address in (REFUSING, IMPATIENT, GREETS_450, GREETS_554):
            lab.ip(lab.server, "addr", "add", f"{address}/24", "dev", "eth0")
        Gateway(lab, base / "network").apply_network()
        receiver = Postfix.receiver(
            lab, lab.server, [INTERCEPTED_DOMAIN, *DOMAINS[1:], SENDER_DOMAIN],
            base / "receiver", addresses=(PLAIN, IMPATIENT, GREETS_450, GREETS_554),
            service_options={
                listen_service(IMPATIENT, 25): {"smtpd_timeout": "1s"},
                # With smtpd_delay_reject = no the client restrictions run at connect, and
                # their answer replaces the 220 greeting.
                listen_service(GREETS_450, 25): {"smtpd_delay_reject": "no",
                                                 "smtpd_client_restrictions": "defer"},
                listen_service(GREETS_554, 25): {"smtpd_delay_reject": "no",
                                                 "smtpd_client_restrictions": "reject"},
            })
        dns = DnsServer.start(lab, lab.server, ZONE, base / "dns")
        (NETNS_ETC / lab.gateway.netns / "resolv.conf").write_text(
            f"nameserver {dns.address[0]}\noptions timeout:1 attempts:1\n")
        yield Env(lab, receiver, dns, base)
    finally:
        lab.down()


@pytest.fixture
def env(lab_env: Env, tmp_path: Path) -> Iterator[Env]:
    lab_env.base = tmp_path
    lab_env.log_mark = lab_env.receiver.log_path.stat().st_size
    try:
        yield lab_env
    finally:
        lab_env.cleanup()


# --- sending and looking ---------------------------------------------------------------------


def transaction(client: smtplib.SMTP, rcpts: list[str], subject: str) -> str:
    try:
        client.ehlo()
        assert client.mail(f"sender@{SENDER_DOMAIN}")[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250, rcpt
        code, text = client.data(message(subject, to=", ".join(rcpts)))
        assert code == 250, (code, text)
        return qid_of(text)
    finally:
        client.quit()


def send_intercepted(env: Env, server: str, subject: str,
                     rcpt: str = f"alice@{INTERCEPTED_DOMAIN}") -> str:
    """A message from the sender host to server:25, which the gateway intercepts."""
    return transaction(smtp_client(env.lab.sender, server), [rcpt], subject)


def send_direct(env: Env, rcpts: list[str], subject: str) -> str:
    """A message to the gateway's own address and port: transport / MX decide."""
    gateway_v4 = env.lab.gateway_address("sender")
    return transaction(smtp_client(env.lab.sender, gateway_v4, SMTP_LISTEN), rcpts, subject)


def arrived(env: Env, subject: str) -> list[Delivery]:
    """Messages in Postfix's mailbox with that subject (in their own header section, so a
    DSN quoting the headers of one is not one)."""
    marker = f"\r\nSubject: {subject}\r\n".encode()
    return [d for d in env.receiver.deliveries()
            if marker in d.content.partition(b"\r\n\r\n")[0] + b"\r\n"]


def wait_arrived(env: Env, gateway: Gateway, subject: str, timeout: float = 10) -> Delivery:
    """The one copy of `subject` in Postfix's mailbox."""
    try:
        wait_until(lambda: bool(arrived(env, subject)), f"{subject!r} in Postfix's mailbox",
                   timeout, gateway.process, (gateway.log_path,))
    except Exception as exc:
        raise AssertionError(f"{exc}\nqueue: {gateway.queue_list()}\n"
                             f"postfix log:\n{env.receiver_log()[-3000:]}") from None
    (got,) = arrived(env, subject)
    return got


def wait_log(env: Env, pattern: str, what: str, timeout: float = 10) -> re.Match[str]:
    wait_until(lambda: re.search(pattern, env.receiver_log(), re.M) is not None, what, timeout)
    found = re.search(pattern, env.receiver_log(), re.M)
    assert found is not None
    return found


def connects_from(env: Env, client: str) -> int:
    return len(re.findall(rf"smtpd\[\d+\]: connect from \S+\[{re.escape(client)}\]$",
                          env.receiver_log(), re.M))


def queued(gateway: Gateway, qid: str) -> dict[str, Any]:
    entry = next((e for e in gateway.queue_list() if e["queue_id"] == qid), None)
    assert entry is not None, f"{qid} left the queue: {gateway.events(qid=qid)}"
    return entry


def recipient(entry: dict[str, Any], address: str) -> dict[str, Any]:
    (rcpt,) = [r for r in entry["recipients"] if r["address"] == address]
    return rcpt


def dsns(env: Env) -> list[str]:
    """Notifications in Postfix's mailbox (for sender@sender.example), folds unfolded."""
    return [re.sub(r"\r\n[ \t]+", " ", d.content.decode(errors="replace"))
            for d in env.receiver.deliveries()
            if d.header("X-Original-To") == f"sender@{SENDER_DOMAIN}"]


# --- the connection cache ----------------------------------------------------------------------


def test_two_messages_to_one_destination_share_one_connection(env: Env) -> None:
    """The second message goes over the connection the first one left in the cache (RSET,
    then the next transaction), and the idle connection is QUIT after the cache time.
    Broken by: `_keep_idle` closing every connection (Postfix logs two connections, each
    with mail=1)."""
    gateway = env.gateway()
    qid1 = send_intercepted(env, PLAIN, "reuse-1")
    gateway.wait_event("delivery_attempt_done", qid=qid1)
    # At once, well inside the 2 s the agent keeps an idle connection.
    qid2 = send_intercepted(env, PLAIN, "reuse-2")
    for subject in ("reuse-1", "reuse-2"):
        got = wait_arrived(env, gateway, subject)
        assert got.header("X-Original-To") == f"alice@{INTERCEPTED_DOMAIN}"
        assert got.client_address == sender_address(env.lab)  # spoofed, as ever
    gateway.wait_event("delivery_attempt_done", qid=qid2)
    gateway.wait_queue_empty(timeout=5)
    for qid in (qid1, qid2):
        (delivered,) = gateway.events("delivery", qid=qid)
        assert delivered["reply"].startswith("250"), delivered
        assert delivered["relay"] == f"{PLAIN}:25"
    client = sender_address(env.lab)
    # The session's summary, written when the cached connection is QUIT (2 s idle).
    summary = wait_log(env, rf"disconnect from \S+\[{re.escape(client)}\] (.*)$",
                       "Postfix's disconnect line", timeout=8)
    assert connects_from(env, client) == 1, env.receiver_log()
    counts = dict(item.split("=") for item in summary.group(1).split())
    assert {k: counts.get(k) for k in ("ehlo", "mail", "rcpt", "data", "rset", "quit")} == {
        "ehlo": "1", "mail": "2", "rcpt": "2", "data": "2", "rset": "1", "quit": "1"}, \
        summary.group(0)


def test_stale_cached_connection_is_replaced_by_a_fresh_one(env: Env) -> None:
    """Postfix (smtpd_timeout = 1s) closes the cached connection ("421 4.4.2 ... timeout
    exceeded", then FIN) while the agent still keeps it; the next message finds it stale at
    its RSET and is delivered, in the same attempt, over a new connection: no deferral, no
    second attempt, one copy. Broken by: dropping the stale-RSET case in `_run_session` (the
    message is deferred with the 421 and only a retry delivers it)."""
    gateway = env.gateway()
    client = sender_address(env.lab)
    qid1 = send_intercepted(env, IMPATIENT, "stale-1")
    gateway.wait_event("delivery_attempt_done", qid=qid1)
    closed_at = time.monotonic()
    wait_log(env, rf"timeout after END-OF-MESSAGE from \S+\[{re.escape(client)}\]$",
             "Postfix closing the idle connection", timeout=5)
    closed_after = time.monotonic() - closed_at
    qid2 = send_intercepted(env, IMPATIENT, "stale-2")
    wait_arrived(env, gateway, "stale-1")
    wait_arrived(env, gateway, "stale-2")
    gateway.wait_event("delivery_attempt_done", qid=qid2)
    gateway.wait_queue_empty(timeout=5)
    # Delivered in its first attempt, with no failure on the way.
    attempts = gateway.events("delivery_attempt_done", qid=qid2)
    assert len(attempts) == 1 and attempts[0]["outcome"].startswith("delivered="), \
        gateway.events(qid=qid2)
    (delivered,) = gateway.events("delivery", qid=qid2)
    assert delivered["reply"].startswith("250"), delivered
    assert not gateway.events("delivery_failed") and not gateway.events(
        "delivery_connection_lost"), gateway.events(qid=qid2)
    # And the agent did take the cached connection (else this proved nothing): the cache
    # keeps one 2 s, Postfix closed it after 1 s, and we sent at once.
    stale = gateway.events("delivery_cached_connection_stale", qid=qid2)
    assert len(stale) == 1, (f"cached connection not tried (Postfix closed it, seen "
                             f"{closed_after:.2f} s after the 1st delivery)",
                             gateway.events(qid=qid2))
    # Postfix saw two connections, each with one message.
    assert connects_from(env, client) == 2, env.receiver_log()
    first = re.search(rf"disconnect from \S+\[{re.escape(client)}\] (.*)$", env.receiver_log(),
                      re.M)
    assert first is not None and "mail=1 rcpt=1 data=1" in first.group(1), first


# --- failover ----------------------------------------------------------------------------------


def test_next_address_after_an_unreachable_and_a_refusing_one(env: Env) -> None:
    """Three MX hosts: the first never answers (connect_timeout), the second refuses, the
    third is Postfix. One attempt, delivered by the third, each failure
    logged. Broken by: giving up after the first connect failure (`break` for `continue`:
    deferred 451 4.4.1 and no copy)."""
    gateway = env.gateway()
    qid = send_direct(env, ["ann@failover.dlv.example"], "failover")
    got = wait_arrived(env, gateway, "failover")
    assert got.header("X-Original-To") == "ann@failover.dlv.example"
    assert got.client_address == GATEWAY_ON_SERVER_LINK
    gateway.wait_event("delivery_attempt_done", qid=qid)
    gateway.wait_queue_empty(timeout=5)
    failed = gateway.events("delivery_connect_failed", qid=qid)
    assert [f["relay"] for f in failed] == [f"{NOBODY}:25", f"{REFUSING}:25"], failed
    assert "timed out" in failed[0]["error"], failed[0]
    assert "connection refused" in failed[1]["error"].lower(), failed[1]
    (delivered,) = gateway.events("delivery", qid=qid)
    assert (delivered["relay"], delivered["via"]) == (f"{PLAIN}:25", "mx"), delivered
    assert delivered["reply"].startswith("250"), delivered
    assert len(gateway.events("delivery_attempt_done", qid=qid)) == 1
    assert connects_from(env, GATEWAY_ON_SERVER_LINK) == 1


def test_no_address_answering_defers_with_the_last_error(env: Env) -> None:
    """Every address fails to connect: 451 4.4.1 with the last failure, no DSN, and retried.
    Broken by: the same `break` (then the first failure, a time-out, is the reason)."""
    gateway = env.gateway()
    qid = send_direct(env, ["bo@dead.dlv.example"], "all-dead")
    gateway.wait_event("delivery_attempt_done", count=2, qid=qid, timeout=15)
    entry = queued(gateway, qid)
    rcpt = recipient(entry, "bo@dead.dlv.example")
    assert (rcpt["status"], rcpt["code"]) == ("deferred", 451), entry
    assert rcpt["text"] == f"4.4.1 connect to {REFUSING}:25: Connection refused", rcpt
    assert [f["relay"] for f in gateway.events("delivery_connect_failed", qid=qid)][:2] == [
        f"{NOBODY}:25", f"{REFUSING}:25"]
    assert not gateway.events("delivery", qid=qid)
    assert not [d for d in dsns(env) if "bo@dead.dlv.example" in d]


def test_next_address_after_a_server_that_greets_with_an_error(env: Env) -> None:
    """A domain whose first MX host greets 450 (or 554) and whose second is a working
    Postfix: the message arrives via the second, in the first attempt (RFC 5321 5.1; Postfix's
    smtp(8) with its default smtp_skip_5xx_greeting = yes). Broken by: ending the attempt at
    the first host's greeting (both messages deferred, retried at the same host for ever)."""
    gateway = env.gateway()
    qids = {domain: send_direct(env, [f"cy@{domain}.dlv.example"], f"greeting-{domain}")
            for domain in ("greet450", "greet554")}
    for qid in qids.values():
        gateway.wait_event("delivery_attempt_done", qid=qid)
    outcomes = {domain: (gateway.events("delivery_failed", qid=qid),
                         gateway.events("delivery_attempt_done", qid=qid)[0]["outcome"])
                for domain, qid in qids.items()}
    for domain, qid in qids.items():
        delivered = gateway.events("delivery", qid=qid)
        assert [d["relay"] for d in delivered] == [f"{PLAIN}:25"], outcomes
        wait_arrived(env, gateway, f"greeting-{domain}")
    gateway.wait_queue_empty(timeout=5)
    assert not dsns(env)


# --- the internal-error path -------------------------------------------------------------------


def test_unexpected_exception_defers_and_keeps_the_message(env: Env) -> None:
    """`_deliver` catches what nothing else expected: the message is deferred (451 4.3.0
    internal error), kept and retried, never bounced or dropped; the gateway goes on
    delivering other mail. Broken by: recording the internal error as 550 (the message
    bounces: a DSN and an empty queue).

    The fault is planted, as no real peer can cause one: the front end refuses or normalises
    bare line endings before it queues, so this queue file holds content that our front end
    would never have written (one from another tool, a restored backup, a future bug). The
    real client core then refuses to put it on the wire (LocalProtocolError, after the 354),
    an exception delivery.py has no case for."""
    gateway = env.gateway(start=False)
    rcpt = "zed@internal.dlv.example"
    content = message("internal-error", b"a line\nwith a bare LF inside it\r\n", to=rcpt)
    queue = Queue(gateway.queue_dir, hostname=GATEWAY_HOSTNAME)
    try:
        qid = asyncio.run(queue.accept(Envelope(
            sender=f"sender@{SENDER_DOMAIN}", recipients=(rcpt,),
            client_address=sender_address(env.lab), client_port=40000, helo=HELO,
            protocol="ESMTP"), content))
    finally:
        queue.close()
    gateway.start()
    errors = gateway.wait_event("delivery_internal_error", count=2, qid=qid, timeout=15)
    assert "LocalProtocolError" in errors[0]["error"], errors[0]
    assert "bare CR or LF" in errors[0]["error"], errors[0]
    entry = queued(gateway, qid)
    assert entry["status"] in ("deferred", "active"), entry
    state = recipient(entry, rcpt)
    assert (state["status"], state["code"]) == ("deferred", 451), entry
    assert state["text"].startswith("4.3.0 internal error: LocalProtocolError("), state
    assert entry["size"] >= len(content), entry  # the content is kept whole
    assert gateway.process is not None and gateway.process.poll() is None
    # The agent had opened a transaction and dropped the connection at the 354: Postfix
    # threw the half-begun message away.
    wait_log(env, rf"lost connection after DATA \(0 bytes\) from \S+\[{GATEWAY_ON_SERVER_LINK}\]",
             "Postfix losing the abandoned transaction")
    assert not arrived(env, "internal-error")
    assert not dsns(env)
    # Other mail still flows, to the same server, from the same agent.
    after = send_direct(env, ["amy@internal.dlv.example"], "after-internal-error")
    wait_arrived(env, gateway, "after-internal-error")
    gateway.wait_event("delivery_attempt_done", qid=after)
    assert queued(gateway, qid)["recipients"][0]["status"] == "deferred"


# --- no route ----------------------------------------------------------------------------------


def test_no_route_answers_each_recipient_and_the_others_go(env: Env) -> None:
    """One message, three domains: one routes by MX to Postfix, one does not exist (NoRoute,
    permanent: 550 5.1.2, a DSN at once), one has an MX without an address (NoRoute,
    temporary: 451 4.4.3, kept). No connection is tried for the two. Broken by: returning
    at the first NoRoute instead of going on (the routable recipient is never tried: every
    retry stops again at the unroutable one)."""
    gateway = env.gateway()
    ok, nx, na = "ok@ok.dlv.example", "nx@nosuch.dlv.example", "na@noaddr.dlv.example"
    # The two without a route first: the routable one must not wait for them.
    qid = send_direct(env, [nx, na, ok], "no-route")
    (attempt,) = gateway.wait_event("delivery_attempt_done", qid=qid)
    got = wait_arrived(env, gateway, "no-route")
    assert got.header("X-Original-To") == ok
    (delivered,) = gateway.events("delivery", qid=qid)
    assert (delivered["rcpt"], delivered["relay"], delivered["via"]) == (ok, f"{PLAIN}:25",
                                                                           "mx"), delivered
    assert not gateway.events("delivery_connect_failed", qid=qid)
    assert attempt["outcome"].startswith(f"delivered={ok} deferred={na} bounced={nx}"), attempt
    wait_until(lambda: bool(dsns(env)), "the DSN in Postfix's mailbox", 10, gateway.process,
               (gateway.log_path,))
    (dsn,) = dsns(env)
    assert dsn.count("Final-Recipient:") == 1 and f"Final-Recipient: rfc822; {nx}" in dsn, dsn
    assert re.search(r"^Status: 5\.1\.2\r?$", dsn, re.M), dsn
    assert ("Diagnostic-Code: X-mailgate; 5.1.2 domain nosuch.dlv.example does not exist"
            in dsn), dsn
    entry = queued(gateway, qid)
    states = {r["address"]: (r["status"], r["code"]) for r in entry["recipients"]}
    assert states == {ok: ("delivered", 250), nx: ("bounced", 550), na: ("deferred", 451)}, \
        entry
    assert recipient(entry, na)["text"] == \
        "4.4.3 no address for the MX hosts of noaddr.dlv.example", entry
