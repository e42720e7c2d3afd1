"""Where the gateway sends mail it was handed directly (not intercepted), with real DNS.

Router lab with two server hosts. The lab's DNS server (netsetup.lab.peers.dns) runs in the
server host and the gateway namespace's resolv.conf points at it (every other namespace keeps
the lab's loopback resolver, so no lookup ever leaves the lab); smtp-sinks stand for the mail
hosts: `primary` (198.51.100.25:25), `backup` (203.0.113.25:25), `relay` (203.0.113.25:2525),
and `bounces` (the sender host, 192.0.2.10:25, where the transport table sends DSNs).

The sender connects to the gateway's own address and listening port, so the message has no
original destination and nexthop.py decides: `transport`, else `next_hop`, else MX (RFC 5321
5.1). What a user checks: which sink got the message, what `mailgate queue list --json` says,
and the DSN the sender got back.

Each test runs its own `mailgate run` (own queue) and sends to domains of ZONE no other test
uses (but for next_hop, which must override an MX); each was seen to fail with nexthop.py
broken the way its docstring says.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netsetup.lab.peers._common import wait_until
from netsetup.lab.peers.dns import DnsServer, ZoneData
from netsetup.lab.peers.sink import SinkMessage, SmtpSink
from netsetup.lab.topology import NETNS_ETC, Lab
from tests.lab.smtp_helpers import (
    SENDER_DOMAIN,
    SMTP_LISTEN,
    Gateway,
    kill_gateways,
    message,
    per_test,
    qid_of,
    smtp_client,
)

PRIMARY_V4 = "198.51.100.25"  # the server host
BACKUP_V4 = "203.0.113.25"  # the server2 host
RELAY_PORT = 2525  # a second sink in server2, for transport / next_hop host names
BOUNCE_V4 = "192.0.2.10"  # the sender host

ZONE: ZoneData = {
    # Listed highest preference value first, and the preferred exchange's name sorts last:
    # only a sort by preference tries `primary` first.
    "mx.example.": {"MX": [[20, "backup.mx.example."], [10, "primary.mx.example."]]},
    "primary.mx.example.": {"A": [PRIMARY_V4]},
    "backup.mx.example.": {"A": [BACKUP_V4]},
    # No MX, an address: the domain is its own mail host (RFC 5321 5.1).
    "implicit.example.": {"A": [BACKUP_V4]},
    # RFC 7505 null MX: the domain accepts no mail. Its A record is bait for a sender that
    # ignored the null MX and fell back to the implicit MX.
    "nullmx.example.": {"MX": [[0, "."]], "A": [PRIMARY_V4]},
    "later.example.": {"MX": [[10, "primary.mx.example."]]},
    # A transport entry's host name; the domain's own MX says otherwise (to the primary).
    "transport.example.": {"MX": [[10, "primary.mx.example."]]},
    "relay.transport.example.": {"A": [BACKUP_V4]},
    "smarthost.example.": {"A": [BACKUP_V4]},
    # nosuch.example and missing.example are not in the zone: NXDOMAIN.
    "servfail.example.": {"MX": [[10, "primary.mx.example."]]},  # but see SERVFAIL
}
SERVFAIL = ["servfail.example."]
DOMAINS = ["mx.example", "implicit.example", "nullmx.example", "nosuch.example",
           "later.example", "servfail.example", "transport.example", "unresolvable.example"]
TRANSPORT = {
    SENDER_DOMAIN: f"{BOUNCE_V4}:25",  # DSNs go back to the sender host by address
    "transport.example": f"relay.transport.example:{RELAY_PORT}",
    "unresolvable.example": "missing.example:25",
}


@dataclass
class Env:
    lab: Lab
    dns: DnsServer
    base: Path
    primary: SmtpSink
    backup: SmtpSink
    relay: SmtpSink
    bounces: SmtpSink
    gateways: list[Gateway] = field(default_factory=list)
    restore: list[Callable[[], None]] = field(default_factory=list)

    def sinks(self) -> dict[str, SmtpSink]:
        return {"primary": self.primary, "backup": self.backup, "relay": self.relay,
                "bounces": self.bounces}

    def gateway(self, **smtp: Any) -> Gateway:
        gateway = Gateway(self.lab, self.base / f"gateway{len(self.gateways)}")
        # verify_recipients = false: unreachable hops, null MX and NXDOMAIN are tested at
        # delivery (deferred, bounced); recipient verification would refuse them at RCPT.
        smtp = {"verify_recipients": False, **smtp}
        gateway.write_config(relay_domains=DOMAINS, transport=TRANSPORT, **smtp)
        self.gateways.append(gateway)
        return gateway.start()

    def cleanup(self) -> None:
        kill_gateways(self.gateways)
        for undo in reversed(self.restore):
            undo()
        self.restore.clear()


def start_sink(lab: Lab, role: str, dir: Path, port: int = 25) -> SmtpSink:
    return SmtpSink.start(lab, lab.hosts[role], dir, port=port, dump=True)


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("smtp-nexthop")
    lab = Lab("router", servers=2)
    try:
        lab.up()
        Gateway(lab, base / "network").apply_network()
        dns = DnsServer.start(lab, lab.server, ZONE, base / "dns", servfail=SERVFAIL)
        # Only the gateway asks the lab's DNS server; dnspython reads /etc/resolv.conf, which
        # `ip netns exec` binds from here (removed with the namespace at lab.down()).
        (NETNS_ETC / lab.gateway.netns / "resolv.conf").write_text(
            f"nameserver {dns.address[0]}\noptions timeout:1 attempts:1\n")
        yield Env(lab, dns, base,
                  primary=start_sink(lab, "server", base / "primary"),
                  backup=start_sink(lab, "server2", base / "backup"),
                  relay=start_sink(lab, "server2", base / "relay", RELAY_PORT),
                  bounces=start_sink(lab, "sender", base / "bounces"))
    finally:
        lab.down()


@pytest.fixture
def env(lab_env: Env, tmp_path: Path) -> Iterator[Env]:
    yield from per_test(lab_env, tmp_path)


def send(env: Env, rcpt: str, subject: str) -> str:
    """One message straight to the gateway's own address and port; its queue id."""
    gateway_v4 = env.lab.gateway_address("sender")
    client: smtplib.SMTP = smtp_client(env.lab.sender, gateway_v4, SMTP_LISTEN)
    try:
        client.ehlo()
        assert client.mail(f"sender@{SENDER_DOMAIN}")[0] == 250
        assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(message(subject, to=rcpt))
        assert code == 250, (code, text)
        return qid_of(text)
    finally:
        client.quit()


def with_subject(sink: SmtpSink, subject: str) -> list[SinkMessage]:
    marker = f"Subject: {subject}\r\n".encode()
    return [m for m in sink.messages() if marker in m.content]


def wait_arrival(env: Env, gateway: Gateway, expected: str, subject: str,
                 timeout: float = 10) -> SinkMessage:
    """Wait until `subject` arrives at any sink; it must be the `expected` one, once."""
    def where() -> list[str]:
        return [name for name, sink in env.sinks().items()
                for _ in with_subject(sink, subject)]

    try:
        wait_until(lambda: bool(where()), f"{subject!r} at a sink", timeout, gateway.process,
                   (gateway.log_path,))
    except Exception as exc:
        raise AssertionError(f"{exc}\nqueue: {gateway.queue_list()}") from None
    assert where() == [expected], f"{subject!r} arrived at {where()}, not at {expected}"
    (got,) = with_subject(env.sinks()[expected], subject)
    # The gateway logs the delivery once the sink's 250 is back: a moment after the sink has
    # the message. Wait for that line (by the queue id in our Received header).
    found = re.search(rb"\(mailgate\) with \w+ id ([0-9A-F]+)", got.content)
    if found is not None:
        gateway.wait_event("delivery_attempt_done", qid=found.group(1).decode())
    return got


def wait_dsn(env: Env, rcpt: str, timeout: float = 10) -> str:
    """The DSN the sender got for `rcpt`, as text with folded fields unfolded."""
    def dsns() -> list[str]:
        texts = [re.sub(r"\r\n[ \t]+", " ", m.content.decode(errors="replace"))
                 for m in env.bounces.messages()]
        return [t for t in texts if "multipart/report" in t
                and f"Final-Recipient: rfc822; {rcpt}" in t]

    wait_until(lambda: bool(dsns()), f"DSN for {rcpt}", timeout, env.bounces.process,
               (env.bounces.log_path,))
    (dsn,) = dsns()
    return dsn


def entry(gateway: Gateway, qid: str) -> dict[str, Any] | None:
    return next((e for e in gateway.queue_list() if e["queue_id"] == qid), None)


def assert_bounced_at_once(env: Env, gateway: Gateway, qid: str, rcpt: str) -> str:
    """The permanent NoRoute path: one attempt, no connection, a DSN, an empty queue; the
    DSN's text."""
    try:
        dsn = wait_dsn(env, rcpt)
    except Exception as exc:
        raise AssertionError(f"{exc}\nqueue: {gateway.queue_list()}") from None
    gateway.wait_queue_empty(timeout=5)
    assert len(gateway.events("delivery_attempt_done", qid=qid)) == 1
    assert not gateway.events("delivery_connect_failed", qid=qid)
    assert not gateway.events("delivery", qid=qid)
    assert "Action: failed" in dsn
    assert dsn.count("Final-Recipient:") == 1
    return dsn


# --- MX ------------------------------------------------------------------------------------


def test_mx_lowest_preference_first_then_the_next(env: Env) -> None:
    """Broken by: reversing or dropping the sort (the backup gets the first message); trying
    only the first exchange (the second message stays deferred)."""
    gateway = env.gateway()
    qid = send(env, "alice@mx.example", "mx-order-primary-up")
    got = wait_arrival(env, gateway, "primary", "mx-order-primary-up")
    assert got.rcpts == ("<alice@mx.example>",)
    (delivered,) = gateway.events("delivery", qid=qid)
    assert (delivered["relay"], delivered["via"]) == (f"{PRIMARY_V4}:25", "mx")
    assert delivered["reply"].startswith("250")
    gateway.wait_queue_empty(timeout=5)

    # The preferred exchange is down: the message goes to the next one in the same attempt.
    env.primary.stop()
    env.restore.append(lambda: setattr(env, "primary", start_sink(
        env.lab, "server", env.primary.log_path.parent)))
    qid = send(env, "bob@mx.example", "mx-order-primary-down")
    wait_arrival(env, gateway, "backup", "mx-order-primary-down")
    gateway.wait_queue_empty(timeout=5)
    (refused,) = gateway.events("delivery_connect_failed", qid=qid)
    assert refused["relay"] == f"{PRIMARY_V4}:25" and "refused" in refused["error"].lower()
    (delivered,) = gateway.events("delivery", qid=qid)
    assert (delivered["relay"], delivered["via"]) == (f"{BACKUP_V4}:25", "mx")
    assert len(gateway.events("delivery_attempt_done", qid=qid)) == 1


def test_no_mx_the_domain_is_its_own_mail_host(env: Env) -> None:
    """Broken by: treating an MX NoAnswer as no route (deferred, or bounced)."""
    gateway = env.gateway()
    qid = send(env, "carol@implicit.example", "implicit-mx")
    wait_arrival(env, gateway, "backup", "implicit-mx")
    gateway.wait_queue_empty(timeout=5)
    (delivered,) = gateway.events("delivery", qid=qid)
    assert (delivered["relay"], delivered["via"]) == (f"{BACKUP_V4}:25", "mx")


def test_null_mx_bounces_at_once(env: Env) -> None:
    """RFC 7505: `MX 0 .` means no mail, so no attempt at the domain's A record and no
    retry. Broken by: dropping the null MX check (the lookup of the root name "" finds no
    address: deferred, no DSN); making it temporary (deferred, no DSN); the generic 5.1.2
    instead of RFC 7505 section 3's 556 5.1.10 ("recipient address has null MX")."""
    gateway = env.gateway()
    qid = send(env, "dave@nullmx.example", "null-mx")
    dsn = assert_bounced_at_once(env, gateway, qid, "dave@nullmx.example")
    assert re.search(r"^Status: 5\.1\.10\r?$", dsn, re.M), dsn
    assert re.search(r"^Diagnostic-Code: X-mailgate; 5\.1\.10 domain nullmx\.example "
                     r"accepts no mail \(null MX\)", dsn, re.M), dsn
    assert "Subject: null-mx" in dsn  # the original headers come back
    assert not with_subject(env.primary, "null-mx")


def test_nxdomain_bounces_at_once_with_5_1_2(env: Env) -> None:
    """RFC 3463 5.1.2: the destination domain does not exist. Broken by: NXDOMAIN made
    temporary (deferred, no DSN)."""
    gateway = env.gateway()
    qid = send(env, "erin@nosuch.example", "nxdomain")
    dsn = assert_bounced_at_once(env, gateway, qid, "erin@nosuch.example")
    assert "\nStatus: 5.1.2" in dsn, dsn
    assert "Diagnostic-Code: X-mailgate; 5.1.2 domain nosuch.example does not exist" in dsn


def deferred_entry(gateway: Gateway, qid: str) -> dict[str, Any]:
    """The queue entry after its first attempt; it must still be there."""
    wait_until(lambda: bool(gateway.events("delivery_attempt_done", qid=qid)),
               "a first attempt", 15, gateway.process, (gateway.log_path,))
    queued = entry(gateway, qid)
    assert queued is not None, f"{qid} left the queue: {gateway.events(qid=qid)}"
    assert queued["status"] in ("deferred", "active"), queued
    return queued


def test_servfail_defers_with_4_4_3(env: Env) -> None:
    """SERVFAIL (the domain's servers are broken) is temporary: still queued, 451 4.4.3, no
    DSN, retried. Broken by: DNS errors made permanent (a 5.x bounce)."""
    gateway = env.gateway()
    qid = send(env, "judy@servfail.example", "servfail")
    queued = deferred_entry(gateway, qid)
    (rcpt,) = queued["recipients"]
    assert (rcpt["status"], rcpt["code"]) == ("deferred", 451), queued
    assert rcpt["text"].startswith("4.4.3 MX lookup for servfail.example failed"), rcpt
    assert "SERVFAIL" in rcpt["text"], rcpt
    wait_until(lambda: len(gateway.events("delivery_attempt_done", qid=qid)) >= 2,
               "a retry", 5, gateway.process, (gateway.log_path,))
    assert entry(gateway, qid) is not None
    assert not gateway.events("delivery_connect_failed", qid=qid)
    assert not [m for m in env.bounces.messages() if b"judy@servfail.example" in m.content]


def test_dns_server_down_defers_with_4_4_3_then_delivers(env: Env) -> None:
    """No answer from the DNS server is not NXDOMAIN: the message stays queued (4.4.3, no
    DSN) and goes once DNS is back. Broken by: DNS errors made permanent (a 5.x bounce)."""
    env.dns.stop()
    env.restore.append(lambda: setattr(env, "dns", DnsServer.start(
        env.lab, env.lab.server, ZONE, env.dns.log_path.parent, servfail=SERVFAIL)))
    gateway = env.gateway()
    qid = send(env, "frank@later.example", "dns-down")
    # Nothing answers: the first attempt ends with nexthop.py's 10 s resolver lifetime.
    queued = deferred_entry(gateway, qid)
    (rcpt,) = queued["recipients"]
    assert (rcpt["status"], rcpt["code"]) == ("deferred", 451), queued
    assert rcpt["text"].startswith("4.4.3 MX lookup for later.example failed"), rcpt
    assert not gateway.events("delivery_connect_failed", qid=qid)
    assert not [m for m in env.bounces.messages() if b"frank@later.example" in m.content]

    env.restore.pop()()  # the DNS server is back
    wait_arrival(env, gateway, "primary", "dns-down")
    gateway.wait_queue_empty(timeout=5)
    (delivered,) = gateway.events("delivery", qid=qid)
    assert (delivered["relay"], delivered["via"]) == (f"{PRIMARY_V4}:25", "mx")


# --- host names in transport and next_hop ----------------------------------------------------


def test_transport_host_name_resolved_port_kept(env: Env) -> None:
    """A transport entry's host name is looked up (A), its port kept; it wins over the
    domain's MX (primary). An entry whose host does not resolve defers (4.4.3). Broken by:
    not looking names up (AAAA only; names taken as addresses)."""
    gateway = env.gateway()
    qid = send(env, "grace@transport.example", "transport-host-name")
    wait_arrival(env, gateway, "relay", "transport-host-name")
    (delivered,) = gateway.events("delivery", qid=qid)
    assert (delivered["relay"], delivered["via"]) == (f"{BACKUP_V4}:{RELAY_PORT}", "transport")

    qid = send(env, "heidi@unresolvable.example", "transport-no-such-host")
    queued = deferred_entry(gateway, qid)  # a typo in the config must not bounce mail
    (rcpt,) = queued["recipients"]
    assert (rcpt["status"], rcpt["code"]) == ("deferred", 451), queued
    assert rcpt["text"] == "4.4.3 host missing.example not found", rcpt


def test_next_hop_host_name_wins_over_mx(env: Env) -> None:
    """`next_hop` by name: mx.example's MX (primary) is not used. Broken by: not looking
    names up."""
    gateway = env.gateway(next_hop=f"smarthost.example:{RELAY_PORT}")
    qid = send(env, "ivan@mx.example", "next-hop-host-name")
    wait_arrival(env, gateway, "relay", "next-hop-host-name")
    gateway.wait_queue_empty(timeout=5)
    (delivered,) = gateway.events("delivery", qid=qid)
    assert (delivered["relay"], delivered["via"]) == (f"{BACKUP_V4}:{RELAY_PORT}", "next_hop")
