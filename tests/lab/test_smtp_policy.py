"""What the SMTP proxy refuses, seen from a client in the sender host, with `mailgate run` in
the gateway (router mode) and an smtp-sink that accepts anything in the server host, so
whatever the gateway lets through would show up there.

- relay: a client outside relay_networks gets a 5xx for every foreign recipient, the old
  open-relay tricks included, and nothing reaches the server; a relay_networks client relays;
- smuggling (smtpsmug style): a bare LF or CR end-of-data followed by a pipelined second
  transaction never turns into two messages, checked at a Postfix in the second server host
  that would itself split at a bare-LF end of data (Postfix 3.7 with bare newlines and
  unauthorised pipelining allowed, its Debian 12 defaults; a probe sent to it directly shows
  it does);
- limits: SIZE, recipients, command line length, connections per client, a full queue disk,
  junk commands, an idle client; the EHLO reply and enhanced status codes (RFC 2034);
- `mailgate run` reports start-up problems in one line, without a traceback.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netsetup.lab.peers._common import wait_until
from netsetup.lab.peers.postfix import Delivery, Postfix, PostfixInstance
from netsetup.lab.peers.sink import SinkMessage, SmtpSink
from netsetup.lab.topology import Lab
from tests.lab.smtp_helpers import (
    GATEWAY_HOSTNAME,
    HELO,
    PYTHON,
    ROOT,
    SENDER_DOMAIN,
    Gateway,
    RawSmtp,
    message,
    server_address,
    smtp_client,
    split_our_received,
)

RELAY_CLIENT_V4 = "192.0.2.20"
MAX_RECIPIENTS = 5
PER_CLIENT = 3
COMMAND_TIMEOUT = 3.0
# Postfix 3.7.11's defaults, said out loud: a bare LF ends a line (so "\n.\n" ends the data)
# and commands pipelined after the end of data are run, not refused. A smuggled message that
# the gateway passed on would be a second message here. (smtp-sink would not show it: it
# does not end DATA at a bare "\n.\n".) smtpd_forbid_bare_newline_exclusions ($mynetworks,
# every lab range) would exempt our clients even from a stricter default: the direct probe in
# test_the_lenient_postfix_splits_a_smuggled_message is what shows this one splits.
LENIENT_POSTFIX = {"smtpd_forbid_bare_newline": "no", "smtpd_forbid_unauth_pipelining": "no"}


@dataclass
class Env:
    lab: Lab
    sink: SmtpSink
    # In the second server host: a Postfix that splits at a bare-LF end of data.
    lenient: PostfixInstance
    base: Path
    gateway: Gateway | None = None

    @property
    def server(self) -> str:
        return server_address(self.lab)

    def start_gateway(self, name: str, **smtp: object) -> Gateway:
        settings: dict[str, object] = {
            "relay_networks": [f"{RELAY_CLIENT_V4}/32"],
            "max_message_size": "100k",
            "max_recipients": MAX_RECIPIENTS,
            "max_connections_per_client": PER_CLIENT,
            "command_timeout": f"{COMMAND_TIMEOUT:g}s",
        }
        settings.update(smtp)
        self.gateway = Gateway(self.lab, self.base / name)
        self.gateway.write_config(**settings)  # type: ignore[arg-type]
        return self.gateway.start()

    @property
    def lenient_server(self) -> str:
        address = self.lab.hosts["server2"].ipv4
        assert address is not None
        return address

    def raw(self, server: str | None = None) -> RawSmtp:
        session = RawSmtp(self.lab.sender, server or self.server)
        greeting = session.reply()
        assert greeting.startswith(b"220 "), greeting
        return session

    def sink_messages(self) -> list[SinkMessage]:
        return self.sink.messages()


@pytest.fixture(scope="module")
def lab_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("smtp-policy")
    lab = Lab("router", servers=2)
    try:
        lab.up()
        lab.ip(lab.sender, "addr", "add", f"{RELAY_CLIENT_V4}/24", "dev", "eth0")
        Gateway(lab, base / "network").apply_network()
        sink = SmtpSink.start(lab, lab.server, base / "sink", dump=True)
        lenient = Postfix.receiver(lab, lab.hosts["server2"], ["example.com"], base / "lenient",
                                   extra=LENIENT_POSTFIX)
        yield Env(lab, sink, lenient, base)
    finally:
        lab.down()


@pytest.fixture
def env(lab_env: Env, tmp_path: Path) -> Iterator[Env]:
    lab_env.base = tmp_path
    lab_env.start_gateway("gateway")
    try:
        yield lab_env
    finally:
        gateway = lab_env.gateway
        if gateway is not None and gateway.process is not None \
                and gateway.process.poll() is None:
            gateway.kill()
        lab_env.gateway = None


def settle(env: Env, sentinel_subject: str) -> list[SinkMessage]:
    """Send one good message and wait for it and an empty queue: whatever the gateway
    accepted before has reached the sink by then. Returns the sink's messages."""
    with env.raw() as session:
        assert session.command(b"EHLO " + HELO.encode()).startswith(b"250")
        assert session.command(b"MAIL FROM:<ok@sender.example>").startswith(b"250")
        assert session.command(b"RCPT TO:<alice@example.com>").startswith(b"250")
        assert session.command(b"DATA").startswith(b"354")
        session.send(message(sentinel_subject) + b".\r\n")
        assert session.reply().startswith(b"250 2.0.0 Ok: queued as")
        session.command(b"QUIT")
    wait_until(lambda: any(sentinel_subject.encode() in m.content for m in env.sink_messages()),
               f"{sentinel_subject} at the sink", 15, env.sink.process, (env.sink.log_path,))
    assert env.gateway is not None
    env.gateway.wait_queue_empty()
    return env.sink_messages()


# --- relay control -----------------------------------------------------------------------------

# Recipients a client outside relay_networks must not get through (example.com is ours).
RELAY_TRICKS = [
    "user@foreign.example",
    "user@FOREIGN.Example",
    "user%foreign.example@example.com",          # the % hack
    "user%FOREIGN.example@EXAMPLE.COM",
    "foreign.example!user@example.com",           # UUCP bang path
    "foreign.example!user",
    "@example.com:user@foreign.example",           # source route
    "@example.com,@other.example:user@foreign.example",
    '"user@foreign.example"@example.com',          # quoted local part holding an @
    '"user%foreign.example"@example.com',
    '"foreign.example!user"@example.com',
    "user@foreign.example@example.com",
    "user@[198.51.100.25]",                        # address literals
    "user@[IPv6:2001:db8:2::25]",
    "user@[192.0.2.1]",
    "user@foreign.example.",                       # trailing dot
    "user@example.com.",
    "user@example.com.foreign.example",
    "user@sub.example.com",
    "Postmaster",
]


def test_relay_denied_from_a_foreign_network(env: Env) -> None:
    before = len(env.sink_messages())
    with env.raw() as session:
        assert session.command(b"EHLO " + HELO.encode()).startswith(b"250")
        assert session.command(b"MAIL FROM:<spammer@sender.example>").startswith(b"250")
        for rcpt in RELAY_TRICKS:
            reply = session.command(f"RCPT TO:<{rcpt}>".encode())
            assert reply[:1] == b"5", (rcpt, reply)
            assert re.match(rb"^5\d\d 5\.\d+\.\d+ ", reply), (rcpt, reply)
        # Nothing was accepted, so there is nothing to send.
        assert session.command(b"DATA").startswith(b"503 5.5.1")
        # Our own domain is matched without regard to case.
        assert session.command(b"RCPT TO:<alice@EXAMPLE.com>").startswith(b"250")
        assert session.command(b"QUIT").startswith(b"221 2.0.0")
    got = settle(env, "after-relay-probes")[before:]
    assert [m.rcpts for m in got] == [("<alice@example.com>",)], [m.rcpts for m in got]


def test_relay_tricks_with_smtplib_and_a_message(env: Env) -> None:
    """What a spammer's library does, and what reaches the server each time.

    Beside one of our recipients a foreign one is refused (554 5.7.1) while DATA goes on: the
    body really passes through the gateway, so the check means something: the server gets it
    for our recipient only, never for the refused one. With foreign recipients only, DATA gets
    503 and the text the client sends anyway is read as commands, each refused: no transaction
    of that client reaches the server at all. Broken by: a refused recipient kept in the
    envelope (the sink gets the body for victim@ too; this test's earlier form, with the
    all-refused sessions only, passed)."""
    before = len(env.sink_messages())
    tricks = ("victim@foreign.example", "victim%foreign.example@example.com")
    sent = {}
    for index, rcpt in enumerate(tricks):
        client = smtp_client(env.lab.sender, env.server)
        try:
            client.ehlo_or_helo_if_needed()
            assert client.mail(f"spammer{index}@{SENDER_DOMAIN}")[0] == 250
            assert client.rcpt("alice@example.com")[0] == 250
            refused = client.rcpt(rcpt)
            assert refused[0] == 554 and refused[1].startswith(b"5.7.1"), (rcpt, refused)
            sent[index] = message(f"relayed-spam-{index}", to=f"alice@example.com, {rcpt}")
            code, text = client.data(sent[index])
            assert code == 250, (rcpt, code, text)
            client.quit()
        finally:
            client.close()
    probes = []
    spam = message("refused-spam", to="victim@foreign.example") + b".\r\n"
    for rcpt in tricks:
        client = smtp_client(env.lab.sender, env.server)
        try:
            client.ehlo_or_helo_if_needed()
            mail = client.mail(f"refused-spammer@{SENDER_DOMAIN}")
            refused = client.rcpt(rcpt)
            data = client.docmd("DATA")
            client.send(spam + b"QUIT\r\n")
            # Every reply to the text and the QUIT, up to the 221 or the close.
            after: list[tuple[int, bytes]] = []
            while not after or after[-1][0] != 221:
                try:
                    after.append(client.getreply())
                except smtplib.SMTPServerDisconnected:
                    break
            probes.append((rcpt, mail, refused, data, after))
        finally:
            client.close()
    got = settle(env, "after-smtplib-relay")[before:]
    # The bodies that went through arrived once each, whole, for our recipient alone.
    relayed = {m.mail_from.split()[0]: m for m in got if b"relayed-spam-" in m.content}
    assert sorted(relayed) == [f"<spammer{i}@{SENDER_DOMAIN}>" for i in sent], \
        [(m.mail_from, m.rcpts) for m in got]
    for index, body in sent.items():
        sunk = relayed[f"<spammer{index}@{SENDER_DOMAIN}>"]
        assert sunk.rcpts == ("<alice@example.com>",), sunk.rcpts
        assert split_our_received(sunk.content)[1] == body
    # Every transaction at the sink is one of those or the settling one: for alice only.
    assert all(m.rcpts == ("<alice@example.com>",) for m in got), [m.rcpts for m in got]
    assert len(got) == len(sent) + 1, [(m.mail_from, m.rcpts) for m in got]
    # The all-refused sessions: nothing of them at the server, in the envelope or the text.
    assert not [m for m in got if "refused-spammer" in m.mail_from or b"refused-spam"
                in m.content], [(m.mail_from, m.rcpts) for m in got]
    for rcpt, mail, refused, data, after in probes:
        assert mail[0] == 250, (rcpt, mail)
        assert refused[0] == 554 and refused[1].startswith(b"5.7.1"), (rcpt, refused)
        assert data[0] == 503, (rcpt, data)
        # One 5xx per line of the text (nothing took it as message content), then the 221.
        assert [code // 100 for code, _text in after] == [5] * len(spam.splitlines()) + [2], \
            (rcpt, after)
        assert after[-1][0] == 221, (rcpt, after)


def test_relay_networks_client_may_relay(env: Env) -> None:
    before = len(env.sink_messages())
    client = smtp_client(env.lab.sender, env.server, source=RELAY_CLIENT_V4)
    try:
        refused = client.sendmail(f"boss@{SENDER_DOMAIN}", ["partner@foreign.example"],
                                  message("relayed-for-a-trusted-client",
                                          to="partner@foreign.example"))
        assert refused == {}
        client.quit()
    except BaseException:
        client.close()
        raise
    wait_until(lambda: len(env.sink_messages()) > before, "the relayed message at the sink",
               15, env.sink.process, (env.sink.log_path,))
    (got,) = env.sink_messages()[before:]
    assert got.rcpts == ("<partner@foreign.example>",), got.rcpts
    assert got.client_address == RELAY_CLIENT_V4  # spoof_source


# --- smuggling ---------------------------------------------------------------------------------

SMUGGLING_ENDS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n"]
SMUGGLER = "a@sender.example"


def smuggling_text(index: int, end: bytes) -> bytes:
    """The DATA text of one probe up to its real end (CRLF . CRLF): an outer message, a false
    end, and a second transaction that a lenient reader would run."""
    first = f"Subject: smuggle-{index}-outer\r\n\r\nouter message".encode()
    inner = (b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
             + f"Subject: smuggle-{index}-INNER\r\n\r\nsmuggled message\r\n".encode())
    return first + end + inner


def smuggle(env: Env, index: int, end: bytes, server: str | None = None) -> list[bytes]:
    """One smtpsmug-style probe through the gateway; returns every reply after the 354."""
    with env.raw(server) as session:
        return smuggle_on(session, index, end)


def smuggle_on(session: RawSmtp, index: int, end: bytes) -> list[bytes]:
    assert session.command(b"EHLO " + HELO.encode()).startswith(b"250")
    assert session.command(f"MAIL FROM:<{SMUGGLER}>".encode()).startswith(b"250")
    assert session.command(b"RCPT TO:<alice@example.com>").startswith(b"250")
    assert session.command(b"DATA").startswith(b"354")
    session.send(smuggling_text(index, end) + b".\r\nQUIT\r\n")
    replies = []
    while reply := session.reply():
        replies.append(reply)
        if reply.startswith(b"221"):
            break
    return replies


def normalised(text: bytes) -> bytes:
    """What `bare_line_endings = "normalise"` makes of DATA text: the transparency dot taken
    off every line (CRLF-delimited, RFC 5321 4.5.2) that starts with one, then every bare CR
    or LF made a CRLF."""
    unstuffed = re.sub(rb"(^|(?<=\r\n))\.", b"", text)
    return re.sub(rb"\r\n|\r|\n", b"\r\n", unstuffed)


def postfix_log(instance: PostfixInstance, since: int) -> str:
    with instance.log_path.open("rb") as log:
        log.seek(since)
        return log.read().decode(errors="replace")


def settle_lenient(env: Env, subject: str) -> list[Delivery]:
    """settle() for the lenient Postfix: one good message through the gateway; once it is in
    the mailbox and both queues are empty, whatever the gateway accepted before is there."""
    with env.raw(env.lenient_server) as session:
        assert session.command(b"EHLO " + HELO.encode()).startswith(b"250")
        assert session.command(b"MAIL FROM:<ok@sender.example>").startswith(b"250")
        assert session.command(b"RCPT TO:<alice@example.com>").startswith(b"250")
        assert session.command(b"DATA").startswith(b"354")
        session.send(message(subject) + b".\r\n")
        assert session.reply().startswith(b"250 2.0.0 Ok: queued as")
        session.command(b"QUIT")
    marker = f"\r\nSubject: {subject}\r\n".encode()
    wait_until(lambda: any(marker in d.content for d in env.lenient.deliveries()),
               f"{subject} at the lenient Postfix", 15, env.lenient.process,
               (env.lenient.log_path,))
    assert env.gateway is not None
    env.gateway.wait_queue_empty()
    env.lenient.wait_queue_empty()
    return env.lenient.deliveries()


def test_the_lenient_postfix_splits_a_smuggled_message(env: Env) -> None:
    """What makes the smuggling test below mean something: the Postfix behind the gateway,
    sent a probe directly (from its own host, so not intercepted), makes two messages of it,
    the second from admin@ to victim@. If a later Postfix refused bare newlines by default,
    this fails instead of the smuggling test passing for nothing."""
    before = len(env.lenient.deliveries())
    server2 = env.lab.hosts["server2"]
    with RawSmtp(server2, env.lenient_server) as session:
        assert session.reply().startswith(b"220 ")
        replies = smuggle_on(session, 7, b"\n.\n")
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250", b"221"], replies
    got = env.lenient.wait_for_messages(before + 2)[before:]
    env.lenient.wait_queue_empty()
    wait_until(lambda: "to=<victim@example.com>" in env.lenient.log(), "the log line", 5)
    assert sorted(d.header("X-Original-To") or "" for d in got) == [
        "alice@example.com", "victim@example.com"], got
    assert [d.content for d in got if d.header("X-Original-To") == "victim@example.com"] == [
        b"Subject: smuggle-7-INNER\r\n\r\nsmuggled message\r\n"]


@pytest.mark.parametrize("mode", ["reject", "normalise"])
def test_smuggling_probes_never_make_two_messages(env: Env, mode: str) -> None:
    """Each probe is one DATA to the gateway and, at a server that would split it, at most
    one message: the gateway's own. Checked at the lenient Postfix, whatever the headers of
    what arrives: every transaction Postfix's log shows (envelope sender and recipient), the
    number of messages, and each one's content byte for byte, which ends where the client's
    data really ended. Broken by: the gateway passing bare line endings on (normalising a
    no-op, DotStuffer's check off): Postfix's log shows a message from admin@ to victim@ per
    LF probe (this test's earlier form, checking an smtp-sink, passed); and by the DATA
    reader taking LF . LF as an end (six replies instead of two)."""
    if mode == "normalise":
        assert env.gateway is not None
        env.gateway.kill()
        env.start_gateway("gateway-normalise", bare_line_endings="normalise")
    before = len(env.lenient.deliveries())
    log_mark = env.lenient.log_path.stat().st_size
    for index, end in enumerate(SMUGGLING_ENDS):
        replies = smuggle(env, index, end, env.lenient_server)
        # One reply to the one DATA, then the 221: the "inner" commands were message text.
        assert len(replies) == 2 and replies[1].startswith(b"221"), (end, replies)
        if mode == "reject":
            assert replies[0].startswith(b"550 5.5.2"), (end, replies)
        else:
            assert replies[0].startswith(b"250 2.0.0"), (end, replies)
    sentinel = f"after-smuggling-{mode}"
    got = settle_lenient(env, sentinel)[before:]
    expected = [] if mode == "reject" else [normalised(smuggling_text(index, end))
                                            for index, end in enumerate(SMUGGLING_ENDS)]
    expected.append(message(sentinel))
    # Every transaction Postfix took in: its queue manager logs each message's envelope
    # sender, and its delivery agent each recipient. A smuggled one would be from admin@,
    # for victim@, whatever it carried.
    def delivered_to() -> list[str]:
        return re.findall(r"postfix/virtual\[\d+\]: \w+: to=<([^>]*)>",
                          postfix_log(env.lenient, log_mark))

    # (Log lines reach Postfix's log through postlogd a moment after the mailbox file.)
    wait_until(lambda: len(delivered_to()) >= len(expected), "Postfix's delivery log lines", 5)
    log = postfix_log(env.lenient, log_mark)
    senders = re.findall(r"postfix/qmgr\[\d+\]: \w+: from=<([^>]*)>", log)
    assert sorted(senders) == sorted([SMUGGLER] * (len(expected) - 1) + ["ok@sender.example"]), \
        log
    assert delivered_to() == ["alice@example.com"] * len(expected), log
    # The mailbox: exactly those messages, each the client's data up to its real end, as one
    # message (below our Received:), so no part of the smuggled text is anywhere else.
    assert [d.header("X-Original-To") for d in got] == ["alice@example.com"] * len(got)
    contents = [split_our_received(d.content)[1] for d in got]
    assert sorted(contents) == sorted(expected), contents
    if mode == "reject":
        assert not [c for c in contents if b"smuggle" in c], contents


def test_nul_in_data_is_refused_and_never_ends_data(env: Env) -> None:
    """A server that drops NULs would read "CRLF NUL . CRLF" as the end of data and the rest as
    commands: the gateway refuses any message with a NUL, and nothing reaches the server."""
    before = len(env.sink_messages())
    with env.raw() as session:
        assert session.command(b"EHLO " + HELO.encode()).startswith(b"250")
        assert session.command(b"MAIL FROM:<a@sender.example>").startswith(b"250")
        assert session.command(b"RCPT TO:<alice@example.com>").startswith(b"250")
        assert session.command(b"DATA").startswith(b"354")
        session.send(b"Subject: nul-in-a-line\r\n\r\nbefore\0after\r\n.\r\n")
        reply = session.reply()
        assert reply.startswith(b"550 5.6.0"), reply
        # Refused, not disconnected: the next transaction may begin.
        assert session.command(b"MAIL FROM:<a@sender.example>").startswith(b"250")
        assert session.command(b"QUIT").startswith(b"221")
    replies = smuggle(env, 9, b"\r\n\0.\r\n")
    # One reply to the one DATA, then the 221: the pipelined MAIL FROM... was message text.
    assert len(replies) == 2 and replies[1].startswith(b"221"), replies
    assert replies[0].startswith(b"550 5.6.0"), replies
    got = settle(env, "after-nul")[before:]
    assert [m.content[:300] for m in got if b"after-nul" not in m.content] == []
    assert all("victim" not in rcpt for m in got for rcpt in m.rcpts)
    assert env.gateway is not None and env.gateway.events("smtp_nul_in_data")


# --- limits ------------------------------------------------------------------------------------


def test_size_limits(env: Env) -> None:
    with env.raw() as session:
        ehlo = session.command(b"EHLO " + HELO.encode())
        assert b"250-SIZE 102400" in ehlo
        reply = session.command(b"MAIL FROM:<a@sender.example> SIZE=200000")
        assert reply.startswith(b"552 5.3.4"), reply
        assert session.command(b"MAIL FROM:<a@sender.example>").startswith(b"250")
        assert session.command(b"RCPT TO:<alice@example.com>").startswith(b"250")
        assert session.command(b"DATA").startswith(b"354")
        session.send(message("too-big", (b"z" * 78 + b"\r\n") * 2000) + b".\r\n")  # 160 KB
        reply = session.reply()
        assert reply.startswith(b"552 5.3.4"), reply
        assert session.command(b"NOOP").startswith(b"250 2.0.0")


def test_too_many_recipients(env: Env) -> None:
    with env.raw() as session:
        session.command(b"EHLO " + HELO.encode())
        assert session.command(b"MAIL FROM:<a@sender.example>").startswith(b"250")
        for index in range(MAX_RECIPIENTS):
            assert session.command(f"RCPT TO:<u{index}@example.com>".encode()).startswith(b"250")
        reply = session.command(b"RCPT TO:<one-too-many@example.com>")
        assert reply.startswith(b"452 4.5.3"), reply


def test_command_line_too_long(env: Env) -> None:
    with env.raw() as session:
        session.command(b"EHLO " + HELO.encode())
        reply = session.command(b"NOOP " + b"x" * 600)
        assert reply.startswith(b"500 5.5."), reply
        reply = session.command(b"MAIL FROM:<" + b"a" * 600 + b"@sender.example>")
        assert reply.startswith(b"500"), reply
        assert session.command(b"NOOP").startswith(b"250 2.0.0")


def test_connection_limit_per_client(env: Env) -> None:
    sessions = [env.raw() for _ in range(PER_CLIENT)]
    try:
        extra = RawSmtp(env.lab.sender, env.server)
        with extra:
            reply = extra.reply()
            assert reply.startswith(b"421 4.7.0"), reply
            assert extra.closed()
        # A client that leaves makes room.
        sessions.pop().close()

        def admitted() -> bool:
            with RawSmtp(env.lab.sender, env.server) as probe:
                return probe.reply().startswith(b"220 ")

        wait_until(admitted, "a free connection slot", 5)
    finally:
        for session in sessions:
            session.close()


JUNK = [
    b"FOO",
    b"MAIL FROM:<a@sender.example",
    b"RCPT TO:<alice@example.com>",            # before MAIL
    b"DATA",                                   # before RCPT
    b"MAIL FROM:<a@sender.example> BODY=BINARYMIME",
    b"MAIL FROM:<a@sender.example> SIZE=lots",
    b"MAIL FROM:<a@sender.example> FOO=BAR",
    b"MAIL TO:<a@sender.example>",
    b"HELO",
    b"EHLO",
    b"\xff\xfe\x00\x01",
    b"",
    b"AUTH PLAIN AGFkbWluAHNlY3JldA==",
    b"STARTTLS now",
    b"VRFY",
    b"MAIL FROM:<\xc3\x28@sender.example>",
    b"RCPT TO:",
]


def test_bad_commands_get_5xx_and_the_session_goes_on(env: Env) -> None:
    with env.raw() as session:
        session.command(b"EHLO " + HELO.encode())
        for line in JUNK:
            reply = session.command(line)
            assert re.match(rb"^5\d\d 5\.\d+\.\d+ ", reply), (line, reply)
            assert b"Traceback" not in reply and b"Error: (" not in reply, (line, reply)
            # Still in step: the next command gets its own reply.
            assert session.command(b"NOOP").startswith(b"250 2.0.0"), line
        assert session.command(b"QUIT").startswith(b"221 2.0.0")
    assert env.gateway is not None
    assert not env.gateway.events("smtp_internal_error")
    assert "Traceback" not in env.gateway.log()


def test_ehlo_and_enhanced_status_codes(env: Env) -> None:
    with env.raw() as session:
        ehlo = session.command(b"EHLO " + HELO.encode()).split(b"\r\n")
        assert ehlo[0] == f"250-{GATEWAY_HOSTNAME}".encode()
        keywords = [line[4:] for line in ehlo[1:]]
        assert ehlo[-1][:4] == b"250 " and all(line[:4] == b"250-" for line in ehlo[:-1])
        for keyword in (b"PIPELINING", b"ENHANCEDSTATUSCODES", b"STARTTLS", b"8BITMIME",
                        b"SMTPUTF8", b"SIZE 102400"):
            assert keyword in keywords, ehlo
        assert not [k for k in keywords if k.startswith((b"AUTH", b"HELP", b"2."))], ehlo
        replies = [session.command(c) for c in (
            b"NOOP", b"RSET", b"VRFY alice@example.com", b"HELP",
            b"MAIL FROM:<a@sender.example>", b"RCPT TO:<alice@example.com>", b"RSET",
            b"EXPN staff", b"QUIT")]
    for reply in replies:
        for line in reply.split(b"\r\n"):
            match = re.match(rb"^(\d)\d\d[ -](\d)\.\d{1,3}\.\d{1,3} ", line)
            assert match and match.group(1) == match.group(2), (line, replies)


def test_idle_client_is_disconnected(env: Env) -> None:
    with env.raw() as session:
        session.sock.settimeout(COMMAND_TIMEOUT + 5)
        reply = session.reply()  # nothing sent: the next thing is the timeout
        assert reply.startswith(b"421 4.4.2"), reply
        assert session.closed(timeout=2)


def test_queue_disk_full(env: Env) -> None:
    assert env.gateway is not None
    env.gateway.kill()
    tiny = env.base / "tiny-queue"
    tiny.mkdir()
    # A 512 KB tmpfs as the queue, mounted in a mount namespace of mailgate's own: the host
    # never sees it, and it goes away with the process.
    gateway = Gateway(env.lab, env.base / "gateway-tiny", wrap=lambda argv: [
        "unshare", "-m", "--propagation", "private", "sh", "-c",
        f'mount -t tmpfs -o size=512k mailgate-test "{tiny}" && exec "$@"', "sh", *argv])
    gateway.queue_dir = tiny
    env.gateway = gateway
    gateway.write_config(max_message_size="2M")
    gateway.start()
    before = len(env.sink_messages())
    big = message("does-not-fit", (b"b" * 98 + b"\r\n") * 7000)  # 700 KB
    with env.raw() as session:
        session.command(b"EHLO " + HELO.encode())
        assert session.command(b"MAIL FROM:<a@sender.example>").startswith(b"250")
        assert session.command(b"RCPT TO:<alice@example.com>").startswith(b"250")
        assert session.command(b"DATA").startswith(b"354")
        session.send(big + b".\r\n")
        reply = session.reply()
        assert reply.startswith(b"452 4.3.1"), reply
        # Nothing of it is left behind: a small message still fits.
        assert session.command(b"MAIL FROM:<a@sender.example>").startswith(b"250")
        assert session.command(b"RCPT TO:<alice@example.com>").startswith(b"250")
        assert session.command(b"DATA").startswith(b"354")
        session.send(message("fits") + b".\r\n")
        assert session.reply().startswith(b"250 2.0.0 Ok: queued as")
    # By subject: a message of an earlier test in this module may still arrive meanwhile.
    def arrived(subject: bytes) -> int:
        return sum(subject in m.content for m in env.sink_messages()[before:])

    wait_until(lambda: arrived(b"Subject: fits") > 0, "the small message", 15)
    assert arrived(b"Subject: fits") == 1 and arrived(b"Subject: does-not-fit") == 0
    assert gateway.events("queue_full")
    assert tiny.is_dir() and not any(tiny.iterdir())  # the host never saw the tmpfs


# --- start-up errors ---------------------------------------------------------------------------


def test_start_up_errors_are_one_line_not_a_traceback(env: Env, tmp_path: Path) -> None:
    lab = env.lab

    def run(config_text: str) -> tuple[int, str]:
        path = tmp_path / "bad.toml"
        path.write_text(config_text)
        result = lab.run(lab.gateway, [PYTHON, "-m", "proxies.cli", "run", "--config",
                                       str(path)], check=False, cwd=ROOT, timeout=30)
        output = result.stdout + result.stderr
        assert "Traceback" not in output, output
        return result.returncode, result.stderr

    code, err = run('[smtp]\nqueue_dirr = "/tmp/x"\nrelay_networks = ["10.0.0.0/33"]\n'
                    'retry_min = "soon"\n')
    assert code == 2
    assert "smtp.queue_dirr: unknown key" in err
    assert "smtp.relay_networks" in err and "smtp.retry_min" in err
    code, err = run("[smtp\n")
    assert code == 2 and "not valid TOML" in err
    # Problems found only when starting: each names the key to look at.
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    code, err = run(f'[smtp]\nqueue_dir = "{not_a_dir}/queue"\n')
    assert code == 1 and "smtp.queue_dir" in err
    assert err.splitlines()[-1].startswith("mailgate: queue directory"), err
    code, err = run(f'[smtp]\nqueue_dir = "{tmp_path}/q2"\ntls_cert = "{tmp_path}/none.pem"\n'
                    f'tls_key = "{tmp_path}/none.key"\n')
    assert code == 1 and err.splitlines()[-1].startswith("mailgate: smtp TLS"), err
    # The port is taken by the running gateway.
    code, err = run(f'[smtp]\nqueue_dir = "{tmp_path}/q3"\n')
    assert code == 1, err
    assert err.splitlines()[-1].startswith("mailgate: cannot listen on port 10025"), err
