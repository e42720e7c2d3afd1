"""Verification shown per recipient, and the bounce rate limit, through `mailgate run` with a
real Postfix behind it (router mode, lab "vfs1").

The receiving Postfix (example.com) takes alice and bob at RCPT, answers carol with a 450 at
RCPT (so a probe for her cannot tell), and defers every message at DATA: whatever the gateway
accepts stays in its queue, where `mailgate queue` must say per recipient whether it was
verified live, from the cache, or not and why. A second Postfix, on the sender's host, is
sender.example's mailbox: the notifications the gateway sends arrive there, and only as many
as `bounce_rate_limit` allows.
"""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from netsetup.lab.peers.postfix import Postfix, PostfixInstance
from netsetup.lab.topology import Lab
from tests.lab.smtp_helpers import (
    SENDER_DOMAIN,
    Gateway,
    TomlValue,
    kill_gateways,
    message,
    per_test,
    qid_of,
    sender_address,
    server_address,
    smtp_client,
)

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"


@dataclass
class Env:
    lab: Lab
    receiver: PostfixInstance
    senders_mailbox: PostfixInstance
    base: Path
    gateways: list[Gateway] = field(default_factory=list)

    def gateway(self, **smtp: TomlValue) -> Gateway:
        gateway = Gateway(self.lab, self.base / f"gateway{len(self.gateways)}")
        gateway.write_config(**smtp)
        self.gateways.append(gateway)
        return gateway.start()

    def cleanup(self) -> None:
        kill_gateways(self.gateways)

    def send(self, rcpts: list[str], *, family: int = 4,
             sender: str = f"vera@{SENDER_DOMAIN}") -> str:
        """One message from the sender host; its queue id."""
        client: smtplib.SMTP = smtp_client(self.lab.sender, server_address(self.lab, family))
        try:
            client.ehlo()
            code, text = client.mail(sender)
            assert code == 250, text
            for rcpt in rcpts:
                code, text = client.rcpt(rcpt)
                assert code == 250, (rcpt, text)
            code, text = client.data(message("verification shown", to=rcpts[0]))
            assert code == 250, text
        finally:
            client.quit()
        return qid_of(text)


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("smtp-verify-shown")
    lab = Lab("router", name="vfs1")
    try:
        lab.up()
        Gateway(lab, base / "network").apply_network()
        receiver = Postfix.receiver(
            lab, lab.server, ["example.com"], base / "receiver", users=[ALICE, BOB, CAROL],
            extra={"smtpd_recipient_restrictions":
                   "check_recipient_access inline:{carol@example.com=DEFER}",
                   "smtpd_data_restrictions": "defer"})
        mailbox = Postfix.receiver(lab, lab.sender, [SENDER_DOMAIN], base / "senders-mailbox")
        yield Env(lab, receiver, mailbox, base)
    finally:
        lab.down()


@pytest.fixture
def env(lab_env: Env, tmp_path: Path) -> Iterator[Env]:
    yield from per_test(lab_env, tmp_path)


def shown(gateway: Gateway) -> dict[str, dict[str, str | None]]:
    """`mailgate queue list --json`: queue id -> recipient -> verification."""
    return {e["queue_id"]: {r["address"]: r["verification"] for r in e["recipients"]}
            for e in gateway.queue_list()}


def test_mailgate_queue_shows_per_recipient_how_it_was_verified(env: Env) -> None:
    """Broken by: the RCPT's result not carried into the queue file, the cache answer shown
    as live (or the reverse), or a reason missing for a recipient that was not asked."""
    sender_v6 = sender_address(env.lab, 6)
    gateway = env.gateway(verify_unreachable="accept", relay_networks=[f"{sender_v6}/128"])
    asked = env.send([ALICE, BOB, CAROL])
    cached = env.send([BOB])
    own_user = env.send([ALICE], family=6)  # from relay_networks: our own user
    assert shown(gateway) == {
        asked: {ALICE: "live", BOB: "live", CAROL: "unreachable"},
        cached: {BOB: "cache"},
        own_user: {ALICE: "relay-client"},
    }
    # The server deferred them at DATA: they wait in the queue, still verified.
    gateway.wait_event("delivery_attempt_done", qid=asked)
    listing = gateway.queue("list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any(line.strip() == f"{ALICE}  [verified live]" for line in lines), listing.stdout
    assert any(line.strip() == f"{BOB}  [verified from cache]" for line in lines)
    assert any(line.strip() == f"{CAROL}  [not verified: server unreachable, accepted "
               "(smtp.verify_unreachable)]" for line in lines), listing.stdout
    assert any(line.strip() == f"{ALICE}  [not verified: client in smtp.relay_networks]"
               for line in lines), listing.stdout
    details = gateway.queue("show", asked, "--no-content")
    assert details.returncode == 0, details.stderr
    assert f"  <{BOB}> deferred  [verified live]  " in details.stdout, details.stdout
    # The log says it too, per recipient, in the order of rcpts=.
    (accepted,) = gateway.events("smtp_accepted", qid=asked)
    assert (accepted["rcpts"], accepted["verify"]) == (f"{ALICE},{BOB},{CAROL}",
                                                       "live,live,unreachable")
    assert gateway.events("smtp_accepted", qid=cached)[0]["verify"] == "cache"

    # Restarted with verification off: new mail says so, the queued mail keeps what it had.
    code, _elapsed = gateway.stop()
    assert code == 0
    gateway.start(verify_recipients=False)
    unverified = env.send([ALICE])
    after = shown(gateway)
    assert after[unverified] == {ALICE: "off"}
    assert after[asked] == {ALICE: "live", BOB: "live", CAROL: "unreachable"}
    assert json.loads(gateway.queue("show", unverified, "--json", "--no-content").stdout)[
        "recipients"][0]["verification"] == "off"


def test_bounces_from_one_sender_domain_get_at_most_the_limits_notifications(env: Env) -> None:
    """Five messages to unknown recipients (verification off, so the server refuses them at
    delivery): five bounces, two notifications in the sender's mailbox, three withheld and
    logged with their queue ids. Broken by: a limit not applied, or applied by withholding
    the bounce itself (mail left in the queue)."""
    before = len(env.senders_mailbox.deliveries())
    gateway = env.gateway(
        verify_recipients=False, bounce_rate_limit=2,
        transport={SENDER_DOMAIN: f"{sender_address(env.lab)}:25"})
    qids = [env.send([f"ghost{n}@example.com"], sender=f"user{n}@{SENDER_DOMAIN}")
            for n in range(5)]
    bounced = gateway.wait_event("queue_bounced", count=5, timeout=30)
    assert sorted(e["qid"] for e in bounced) == sorted(qids)
    limited = gateway.wait_event("dsn_rate_limited", count=3)
    assert {e["sender_domain"] for e in limited} == {SENDER_DOMAIN}
    assert {e["qid"] for e in limited} < set(qids)
    assert sum(e["no_dsn"] == "rate_limited" for e in bounced) == 3
    notices = env.senders_mailbox.wait_for_messages(before + 2, timeout=30)[before:]
    assert len(notices) == 2
    assert all(b"Undelivered Mail Returned to Sender" in n.raw for n in notices)
    gateway.wait_queue_empty()  # the bounced messages and the two notifications are gone
    assert len(env.senders_mailbox.deliveries()) == before + 2
