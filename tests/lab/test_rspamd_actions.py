"""rspamd's actions mean what they say, and Authentication-Results, with the REAL rspamd.

`mailgate run` in the gateway intercepts mail from the sender (swaks, and a real Postfix that
retries) on its way to smtp-sink in the server, and asks rspamd in the gateway. Everything
rspamd looks up is the lab's own: a DNS server of the lab (netsetup.lab.peers.dns) on the
gateway's loopback answers the SPF and DMARC records of sender.example and forged.example,
and a private redis-server (netsetup.lab.peers.redis) keeps the greylisting triplets.

Two rspamd instances share the lab: one with SPF, DKIM and DMARC (for the results), one with
greylisting as well, its delay GREYLIST_DELAY seconds and its greylist threshold below any
score, so every new triplet is greylisted (classic greylisting; rspamd's default greylists
only mail that scores 4 or more).

Time: about 10 s for the module after the first rspamd start on a machine (see
test_filtering_rspamd); the greylisting test waits for the delay and the sender's backoff.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from netsetup.lab.peers.dns import DnsServer
from netsetup.lab.peers.postfix import Postfix
from netsetup.lab.peers.redis import Redis, RedisInstance
from netsetup.lab.peers.rspamd import GTUBE, Greylist, Rspamd, RspamdInstance
from netsetup.lab.peers.sink import SmtpSink, swaks
from netsetup.lab.topology import Lab
from proxies.mail.headers import split_message
from tests.lab.test_filtering import (
    NETWORK,
    PYTHON,
    ROOT,
    SERVER,
    Gateway,
    mailgate,
    reply_to_dot,
)

DNS_ADDRESS = "127.0.0.53"  # the gateway's loopback; rspamd's only nameserver
GREYLIST_DELAY = 3.0
CHECKS = ("spf", "dkim", "dmarc")
SENDER_IP = "192.0.2.10"
# TXT values in their text form: quoted, or the spaces would split them into strings.
ZONE = {
    "sender.example.": {"TXT": [f'"v=spf1 ip4:{SENDER_IP} -all"']},
    "_dmarc.sender.example.": {"TXT": ['"v=DMARC1; p=reject"']},
    "forged.example.": {"TXT": ['"v=spf1 -all"']},
    "_dmarc.forged.example.": {"TXT": ['"v=DMARC1; p=reject"']},
}
OURS = "gw.lab.example"  # the [smtp] hostname test_filtering's config gives mailgate


@dataclass
class Setup:
    gateway: Gateway
    checks: RspamdInstance  # SPF, DKIM, DMARC
    greylisting: RspamdInstance  # the same, and greylisting on Redis
    redis: RedisInstance


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("rspamd-actions")
    lab = Lab("router")
    try:
        lab.up()
        sink = SmtpSink.start(lab, lab.server, base / "sink", port=25, dump=True)
        dns = DnsServer.start(lab, lab.gateway, ZONE, base / "dns", address=DNS_ADDRESS)
        redis = Redis.start(lab, lab.gateway, base / "redis")
        checks = Rspamd.start(lab, lab.gateway, base / "rspamd-checks", port=11433,
                              checks=CHECKS, nameserver=DNS_ADDRESS)
        greylisting = Rspamd.start(lab, lab.gateway, base / "rspamd-greylist", port=11533,
                                   checks=CHECKS, nameserver=DNS_ADDRESS,
                                   greylist=Greylist(redis.server, GREYLIST_DELAY),
                                   actions={"greylist": -100.0})
        config = base / "network.toml"
        config.write_text(NETWORK)
        result = lab.run(lab.gateway, [PYTHON, "-m", "netsetup.cli", "--config", str(config),
                                       "--state-file", str(base / "netsetup.json"), "apply"],
                         check=False, cwd=ROOT, timeout=60)
        assert result.returncode == 0, f"netsetup apply:\n{result.stdout}\n{result.stderr}"
        # No clamd here: the gateway helpers never touch it when given their [scan] section.
        yield Setup(Gateway(lab, base, clamd=None, sink=sink),  # type: ignore[arg-type]
                    checks, greylisting, redis)
        for peer in (greylisting, checks, redis, dns):
            peer.stop()
    finally:
        lab.down()


def scan(rspamd: RspamdInstance, frontend: str = "mailgate") -> str:
    # test_filtering's config puts this right after its [smtp] keys, so [smtp] settings go
    # first. Recipient verification is not what these tests look at (smtp-sink takes all).
    # Under either front end the mail goes on to the intercepted destination: no transport.
    return (f'frontend = "{frontend}"\nverify_recipients = false\n'
            f'[scan]\nrspamd = "{rspamd.url}"\ntimeout = "20s"\n')


def message(sender: str, subject: str, extra: bytes = b"", body: bytes = b"") -> bytes:
    """A message as a mail client writes it (Date and Message-ID, so rspamd has nothing to
    hold against it), `extra` fields on top."""
    return extra + (f"From: Alice <{sender}>\r\nTo: <bob@example.com>\r\n"
                    f"Subject: {subject}\r\n"
                    f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
                    f"Message-ID: <{time.monotonic_ns()}@{sender.split('@')[1]}>\r\n\r\n"
                    f"Hello Bob, about {subject}.\r\n").encode() + body


def send(gateway: Gateway, content: bytes, sender: str) -> str:
    """swaks from the sender host, envelope sender `sender`: its reply to the final dot."""
    result = swaks(gateway.lab, gateway.lab.sender, SERVER, 25, mail_from=sender,
                   rcpt="bob@example.com", data=content, helo="mail.sender.example",
                   check=False)
    return reply_to_dot(result.stdout)


def results_fields(content: bytes) -> list[str]:
    """The Authentication-Results fields of a message, unfolded, in order."""
    fields, _ = split_message(content)
    return [" ".join(f.decode().split(":", 1)[1].split()) for f in fields
            if f.lower().startswith(b"authentication-results")]


@pytest.mark.parametrize("frontend", ["mailgate", "aiosmtpd"])
def test_delivered_mail_carries_rspamds_results_under_our_id(setup: Setup,
                                                              frontend: str) -> None:
    gateway = setup.gateway
    forged = (b"Authentication-Results: GW.Lab.Example;\r\n\tspf=pass\r\n"
              b"\tsmtp.mailfrom=ceo@example.com\r\n"
              b"Authentication-Results: mx.sender.example; dkim=pass header.d=sender.example\r\n")
    with mailgate(gateway, f"results-{frontend}", scan(setup.checks, frontend)) as run:
        # SPF passes (the sender's own address is in sender.example's record) and so does
        # DMARC (aligned with the From domain); nothing is signed: dkim=none.
        good = message("alice@sender.example", "lunch", forged)
        assert send(gateway, good, "alice@sender.example").startswith("250 ")
        delivered = gateway.delivered()[0]
        assert results_fields(delivered.content) == [
            f"{OURS}; spf=pass smtp.mailfrom=alice@sender.example; dkim=none; "
            "dmarc=pass header.from=sender.example",
            "mx.sender.example; dkim=pass header.d=sender.example",  # someone else's: kept
        ]
        assert b"ceo@example.com" not in delivered.content  # the forged one is gone
        assert delivered.content.endswith(good.split(b"\r\n\r\n", 1)[1])

        # forged.example publishes "-all" and p=reject: rspamd fails SPF and DMARC and
        # answers "add header" ([policy] spam = "tag"): tagged, with the failures shown.
        spoofed = message("alice@forged.example", "invoice")
        assert send(gateway, spoofed, "alice@forged.example").startswith("250 ")
        tagged = gateway.delivered()[0]
        assert results_fields(tagged.content) == [
            f"{OURS}; spf=fail smtp.mailfrom=alice@forged.example; dkim=none; "
            "dmarc=fail header.from=forged.example"]
        assert b"\r\nX-Spam-Flag: YES\r\n" in tagged.content

        # rspamd's "reject" (GTUBE) is refused at the final dot: nothing to bounce later.
        spam = message("alice@sender.example", "buy", body=GTUBE + b"\r\n")
        assert send(gateway, spam, "alice@sender.example").startswith("554 5.7.1 ")
        gateway.nothing_delivered()
        # What the log says about each: grep for rspamd's action and the results.
        log = run.log.read_text()
        assert 'auth="spf=pass dkim=none dmarc=pass"' in log
        assert 'rspamd_action=reject' in log


def test_forged_results_are_removed_without_any_scanner(setup: Setup) -> None:
    gateway = setup.gateway
    forged = b"authentication-results : gw.lab.example.; dmarc=pass\r\n"
    theirs = b"Authentication-Results: mx.sender.example; spf=pass\r\n"
    with mailgate(gateway, "no-scanner", "verify_recipients = false\n"):
        sent = message("alice@sender.example", "hello", forged + theirs)
        assert send(gateway, sent, "alice@sender.example").startswith("250 ")
        delivered = gateway.delivered()[0]
        fields, rest = split_message(delivered.content)
        assert fields[0].startswith(b"Received: from mail.sender.example ")
        assert b"".join(fields[1:]) + rest == sent.replace(forged, b"")


def test_greylisting_tempfails_first_and_a_real_postfix_retry_is_delivered(
        setup: Setup) -> None:
    gateway = setup.gateway
    with mailgate(gateway, "greylist", scan(setup.greylisting)) as run:
        # A new triplet: 451 4.7.1 with rspamd's words; the sender keeps the message.
        first = message("alice@sender.example", "first contact")
        assert send(gateway, first, "alice@sender.example") == "451 4.7.1 Try again later"
        gateway.nothing_delivered()

        # A real Postfix retries on its own (backoff 1-4 s), like any MTA on the Internet.
        postfix = Postfix.sender(gateway.lab, gateway.lab.sender,
                                 {"example.com": f"[{SERVER}]:25"}, gateway.dir / "postfix")
        try:
            content = message("alice@sender.example", "greylisted")
            started = time.monotonic()
            postfix.send("alice@sender.example", ["bob@example.com"], content)
            delivered = gateway.sink.wait_for_messages(
                gateway.seen + 1, timeout=GREYLIST_DELAY + 40,
                logs=(postfix.log_path, run.log, setup.greylisting.log_path))
            seconds = time.monotonic() - started
            postfix.wait_queue_empty()
            log = postfix.log()
        finally:
            postfix.stop()
        new = delivered[gateway.seen:]
        gateway.seen = len(delivered)
        assert len(new) == 1 and new[0].content.endswith(content.split(b"\r\n\r\n", 1)[1])
        assert results_fields(new[0].content)[0].startswith(f"{OURS}; spf=pass ")
        # Its first attempt was greylisted, and not one retry got through before the delay.
        assert re.search(r"status=deferred \(host 198\.51\.100\.25\[198\.51\.100\.25\] said: "
                         r"451 4\.7\.1 Try again later", log), log[-3000:]
        # rspamd keeps a triplet's first sight in whole seconds: the delay is 2-3 s here.
        assert seconds >= GREYLIST_DELAY - 1
        print(f"greylisted message delivered after {seconds:.1f} s "
              f"(greylist delay {GREYLIST_DELAY:g} s)")
        # The greylisting state is in Redis: a body key and an envelope key (both messages
        # share the envelope, so the second was held until the first sight's delay ran out).
        assert setup.redis.count("rg*") >= 2
        assert 'rspamd_action="soft reject"' in run.log.read_text()
