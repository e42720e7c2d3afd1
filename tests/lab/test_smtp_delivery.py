"""The SMTP proxy between real MTAs, in router and bridge mode: a Postfix with its own queue and
swaks in the sender host send to a Postfix in the server host; `mailgate run` in the gateway
intercepts (rules from `netsetup apply`), queues and delivers.

What a user would check: the message arrives byte for byte (ours adds one `Received:` field on
top), the server sees the sender's own address (spoof_source), several recipients in several
domains all get it, STARTTLS works towards the client (swaks --tls) and towards the server
(the receiving Postfix offers it and logs "with ESMTPS"), and every log line of a message's life
carries its queue id.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netsetup.lab.peers._common import PEER_MOUNT, peer_command
from netsetup.lab.peers.postfix import Postfix, PostfixInstance
from netsetup.lab.peers.sink import swaks
from netsetup.lab.topology import Lab
from tests.lab.smtp_helpers import (
    GATEWAY_HOSTNAME,
    SENDER_DOMAIN,
    Gateway,
    message,
    qid_of,
    sender_address,
    server_address,
    split_our_received,
)

OTHER_DOMAIN = "example.net"


@dataclass
class Setup:
    lab: Lab
    gateway: Gateway
    receiver: PostfixInstance
    sender: PostfixInstance

    def wait_delivered(self, count: int) -> None:
        """Wait until `count` messages are in the receiver's mailbox in total."""
        self.receiver.wait_for_messages(count, timeout=20)


def make_test_certificate(directory: Path, hostname: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={hostname}", "-keyout", str(directory / "key.pem"),
                    "-out", str(directory / "cert.pem")], check=True, capture_output=True)


def enable_tlsmgr(instance: PostfixInstance) -> None:
    """The peer helper's master.cf has no tlsmgr, without which smtpd finds "no entropy for
    TLS key generation" and answers STARTTLS with 454: add it and reload."""
    with (instance.conf_dir / "master.cf").open("a") as master_cf:
        master_cf.write("tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n")
    instance.lab.run(instance.host, peer_command(
        instance.dir, ["postfix", "-c", f"{PEER_MOUNT}/conf", "reload"]))


@pytest.fixture(scope="module", params=["router", "bridge"])
def setup(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    mode: str = request.param
    base = tmp_path_factory.mktemp(f"smtp-{mode}")
    # In bridge mode netsetup builds the bridge from [network] ports.
    lab = Lab(mode, make_bridge=False)
    try:
        lab.up()
        gateway = Gateway(lab, base / "gateway")
        gateway.write_config(relay_domains=["example.com", OTHER_DOMAIN])
        gateway.apply_network()
        gateway.start()
        # The receiver offers STARTTLS with a test certificate: the proxy must use it.
        rx_dir = base / "receiver"
        make_test_certificate(rx_dir / "tls", "mx.example.com")
        receiver = Postfix.receiver(lab, lab.server, ["example.com", OTHER_DOMAIN], rx_dir,
                                    extra={
                                        "smtpd_tls_security_level": "may",
                                        "smtpd_tls_cert_file": f"{PEER_MOUNT}/tls/cert.pem",
                                        "smtpd_tls_key_file": f"{PEER_MOUNT}/tls/key.pem",
                                        "smtpd_tls_loglevel": "1",
                                    })
        enable_tlsmgr(receiver)
        hop = f"[{server_address(lab)}]:25"
        sender = Postfix.sender(lab, lab.sender, {"example.com": hop, OTHER_DOMAIN: hop},
                                base / "sender")
        yield Setup(lab, gateway, receiver, sender)
    finally:
        lab.down()


def test_postfix_sender_through_the_gateway(setup: Setup) -> None:
    before = len(setup.receiver.deliveries())
    body = b"A body line.\r\n.A line that starts with a dot.\r\n\r\nLast line.\r\n"
    content = message(f"postfix-{setup.lab.mode}", body)
    setup.sender.send(f"carol@{SENDER_DOMAIN}", ["alice@example.com"], content)
    setup.sender.wait_queue_empty(timeout=20)
    setup.wait_delivered(before + 1)
    delivery = setup.receiver.deliveries()[before]
    ours, rest = split_our_received(delivery.content)
    assert f"by {GATEWAY_HOSTNAME} (mailgate) with ESMTP".encode() in ours
    assert b"for <alice@example.com>" in ours
    # Postfix (the sender) put its own headers on top; the body is untouched.
    assert rest.endswith(b"\r\n\r\n" + body)
    assert b"Subject: postfix-" in rest
    # spoof_source: the server saw the sender's own address, not the gateway's.
    assert delivery.client_address == sender_address(setup.lab)
    # The onward connection used the STARTTLS the receiving Postfix offers.
    assert b"with ESMTPS" in (delivery.received_header or b""), delivery.received_header


@pytest.mark.parametrize("family", [4, 6])
def test_swaks_through_the_gateway(setup: Setup, family: int) -> None:
    before = len(setup.receiver.deliveries())
    content = message(f"swaks-{setup.lab.mode}-v{family}",
                      b"Line one.\r\n.Dot line.\r\n..Two dots.\r\n\r\n" + b"x" * 990 + b"\r\n")
    result = swaks(setup.lab, setup.lab.sender, server_address(setup.lab, family),
                   mail_from=f"dave@{SENDER_DOMAIN}", rcpt="alice@example.com", data=content)
    qid = qid_of(result.stdout)
    setup.wait_delivered(before + 1)
    delivery = setup.receiver.deliveries()[before]
    ours, rest = split_our_received(delivery.content)
    assert rest == content  # byte for byte, dot-stuffing undone
    expected_client = (f"[IPv6:{sender_address(setup.lab, 6)}]" if family == 6
                       else f"[{sender_address(setup.lab)}]")
    assert expected_client.encode() in ours
    assert f"by {GATEWAY_HOSTNAME} (mailgate) with ESMTP id {qid}".encode() in ours
    assert delivery.client_address == sender_address(setup.lab, family)
    # The message's whole story is in the log under its queue id (the last line is written
    # after the server's 250, so it may come a moment after the message is in the mailbox).
    setup.gateway.wait_event("delivery_attempt_done", qid=qid)
    events = {e["event"] for e in setup.gateway.events(qid=qid)}
    assert {"smtp_accepted", "delivery", "delivery_attempt_done"} <= events, events
    (delivered,) = setup.gateway.events("delivery", qid=qid)
    assert delivered["reply"].startswith("250"), delivered
    assert delivered["spoofed"] == sender_address(setup.lab, family)


def test_swaks_starttls_to_the_gateway(setup: Setup) -> None:
    before = len(setup.receiver.deliveries())
    content = message(f"tls-{setup.lab.mode}")
    result = swaks(setup.lab, setup.lab.sender, server_address(setup.lab),
                   mail_from=f"erin@{SENDER_DOMAIN}", rcpt="alice@example.com", data=content,
                   extra_args=["--tls"])
    assert "STARTTLS" in result.stdout and "TLS started" in result.stdout, result.stdout
    setup.wait_delivered(before + 1)
    delivery = setup.receiver.deliveries()[before]
    ours, rest = split_our_received(delivery.content)
    assert rest == content
    assert b"(mailgate) with ESMTPS id" in ours
    # The certificate was generated at the first start, in the queue directory.
    assert (setup.gateway.queue_dir / "tls" / "smtpd-cert.pem").exists()


def test_several_recipients_in_several_domains(setup: Setup) -> None:
    before = len(setup.receiver.deliveries())
    rcpts = ["alice@example.com", "bob@example.com", f"frank@{OTHER_DOMAIN}"]
    content = message(f"multi-{setup.lab.mode}", to=", ".join(rcpts))
    result = swaks(setup.lab, setup.lab.sender, server_address(setup.lab),
                   mail_from=f"gina@{SENDER_DOMAIN}", rcpt=rcpts, data=content)
    assert "queued as" in result.stdout
    setup.wait_delivered(before + 3)
    # The virtual agent writes one file per recipient.
    got = setup.receiver.deliveries()[before:]
    assert sorted(d.header("X-Original-To") or "" for d in got) == sorted(rcpts)
    for delivery in got:
        ours, rest = split_our_received(delivery.content)
        assert rest == content
        assert b"\tfor <" not in ours  # no "for" clause naming one of several recipients
