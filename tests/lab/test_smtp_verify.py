"""Recipient verification with a real Postfix behind the gateway (router mode, lab "vfy1").

The receiving Postfix knows one user (alice@example.com); every other local part gets its
`550 5.1.1 ... User unknown in virtual mailbox table` at RCPT. Through the gateway, a client
(smtplib in the sender host) must see that refusal at RCPT, and the gateway must queue and
bounce nothing; alice's mail goes through; with the server down the answer is 450 4.1.1; a
second RCPT for a recipient comes from the cache (Postfix logs one probe), also after a
restart of the gateway; with verify_recipients = false it is the old accept-then-bounce.
"""

from __future__ import annotations

import re
import smtplib
import time
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

ALICE = "alice@example.com"
SENDER = f"vera@{SENDER_DOMAIN}"


@dataclass
class Env:
    lab: Lab
    receiver: PostfixInstance
    base: Path
    gateways: list[Gateway] = field(default_factory=list)

    def gateway(self, **smtp: TomlValue) -> Gateway:
        gateway = Gateway(self.lab, self.base / f"gateway{len(self.gateways)}")
        gateway.write_config(**smtp)
        self.gateways.append(gateway)
        return gateway.start()

    def cleanup(self) -> None:
        kill_gateways(self.gateways)
        if self.receiver.process is None:  # a test stopped it to play "server down"
            self.receiver.start()

    def client(self) -> smtplib.SMTP:
        client = smtp_client(self.lab.sender, server_address(self.lab))
        client.ehlo()
        code, text = client.mail(SENDER)
        assert code == 250, text
        return client

    def rcpt(self, address: str) -> tuple[int, str]:
        """One session's answer to RCPT TO:<address>."""
        client = self.client()
        try:
            code, text = client.rcpt(address)
        finally:
            client.quit()
        return code, text.decode()

    def probes_for(self, address: str) -> list[str]:
        """The receiving Postfix's log lines for RCPTs of `address` it refused."""
        return [line for line in self.receiver.log().splitlines()
                if "NOQUEUE: reject: RCPT" in line and f"<{address}>" in line]


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("smtp-verify")
    lab = Lab("router", name="vfy1")
    try:
        lab.up()
        Gateway(lab, base / "network").apply_network()
        receiver = Postfix.receiver(lab, lab.server, ["example.com"], base / "receiver",
                                    users=[ALICE])
        yield Env(lab, receiver, base)
    finally:
        lab.down()


@pytest.fixture
def env(lab_env: Env, tmp_path: Path) -> Iterator[Env]:
    yield from per_test(lab_env, tmp_path)


def test_unknown_refused_at_rcpt_known_delivered_second_rcpt_from_the_cache(env: Env) -> None:
    """Broken by: handle_RCPT not asking (250, then a bounce), the cache not consulted (a
    second probe in Postfix's log), or the refusal answered as a tempfail."""
    gateway = env.gateway()
    ghost = "ghost1@example.com"
    before = len(env.receiver.deliveries())
    client = env.client()
    try:
        code, text = client.rcpt(ghost)
        assert code == 550, text
        assert text.startswith(f"5.1.1 <{ghost}>: Recipient address rejected: undeliverable "
                               "address: host ".encode()), text
        assert b"User unknown in virtual mailbox table" in text  # the server's own words
        code, text = client.rcpt(ALICE)
        assert code == 250, text
        code, text = client.data(message("verified", to=ALICE))
        assert code == 250, text
        qid = qid_of(text)
    finally:
        client.quit()
    (delivery,) = env.receiver.wait_for_messages(before + 1, timeout=20)[before:]
    assert delivery.header("X-Original-To") == ALICE
    # The probe came from the client's own address (spoof_source), as the delivery did.
    (probe,) = env.probes_for(ghost)
    assert f"[{sender_address(env.lab)}]" in probe, probe
    assert delivery.client_address == sender_address(env.lab)

    # Again, in a new session: answered from the cache, no second probe.
    code, text = env.rcpt(ghost)
    assert code == 550 and "5.1.1" in text, text
    assert len(env.probes_for(ghost)) == 1
    verified = gateway.events("smtp_rcpt_verified", rcpt=ghost)
    assert [e["cached"] for e in verified] == ["no", "yes"], verified
    # Nothing queued for the ghost, nothing bounced to anyone.
    gateway.wait_event("delivery_attempt_done", qid=qid)
    gateway.wait_queue_empty()
    assert not gateway.events("bounced") and not gateway.events("queue_bounced")
    assert len(env.receiver.deliveries()) == before + 1


def test_server_down_is_450_then_accepted_once_it_is_back(env: Env) -> None:
    """Broken by: an unreachable server taken as a refusal (550) or as an acceptance (250 and
    a queued message), or a tempfail cached for as long as an answer."""
    env.receiver.stop()
    gateway = env.gateway(verify_tempfail_ttl="1s")
    code, text = env.rcpt(ALICE)
    assert code == 450, text
    assert text.startswith(f"4.1.1 <{ALICE}>: Recipient address rejected: unverified "
                           "address: "), text
    assert re.search(r"connect to 198\.51\.100\.\d+:25: Connection refused", text), text
    assert gateway.queue_list() == []
    env.receiver.start()
    time.sleep(1.2)  # verify_tempfail_ttl
    code, text = env.rcpt(ALICE)
    assert code == 250, text


def test_server_down_with_verify_unreachable_accept_queues(env: Env) -> None:
    env.receiver.stop()
    gateway = env.gateway(verify_unreachable="accept")
    client = env.client()
    try:
        code, text = client.rcpt(ALICE)
        assert code == 250, text
        code, text = client.data(message("accepted-unverified", to=ALICE))
        assert code == 250, text
    finally:
        client.quit()
    assert [e["queue_id"] for e in gateway.queue_list()] == [qid_of(text)]
    (verified,) = gateway.events("smtp_rcpt_verified", rcpt=ALICE)
    assert verified["status"] == "tempfail"


def test_the_cache_survives_a_restart(env: Env) -> None:
    """Broken by: a cache in memory only. After the restart the server is down, so only the
    cache can answer."""
    ghost = "ghost2@example.com"
    gateway = env.gateway()
    assert env.rcpt(ghost)[0] == 550
    assert env.rcpt(ALICE)[0] == 250
    code, _elapsed = gateway.stop()
    assert code == 0
    env.receiver.stop()
    gateway.start()
    code, text = env.rcpt(ghost)
    assert code == 550 and "User unknown" in text, text
    assert env.rcpt(ALICE)[0] == 250
    assert len(env.probes_for(ghost)) == 1
    assert [e["cached"] for e in gateway.events("smtp_rcpt_verified", rcpt=ghost)] == \
        ["no", "yes"]


def test_verify_recipients_false_is_the_old_accept_then_bounce(env: Env) -> None:
    ghost = "ghost3@example.com"
    gateway = env.gateway(verify_recipients=False)
    client = env.client()
    try:
        code, text = client.rcpt(ghost)
        assert code == 250, text
        code, text = client.data(message("unverified", to=ghost))
        assert code == 250, text
    finally:
        client.quit()
    (bounced,) = gateway.wait_event("bounced", qid=qid_of(text), timeout=20)
    assert bounced["rcpts"] == ghost
    assert not gateway.events("smtp_rcpt_verified")
    assert not (gateway.queue_dir / "verify.db").exists()
