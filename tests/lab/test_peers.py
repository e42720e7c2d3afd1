"""The real peers run in lab hosts and do their job: Postfix receives, sends, relays and gets
bounces; smtp-sink and smtp-source; Dovecot serves POP3; clamd finds EICAR; spamd flags GTUBE;
the lab's DNS server answers MX queries. Router mode, no gateway interception: the gateway
host only routes.
"""

from __future__ import annotations

import contextlib
import io
import poplib
import re
import socket
import ssl
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from netsetup.lab.peers._common import PeerError, in_netns, wait_until
from netsetup.lab.peers.clamd import EICAR, EICAR_FOUND, Clamd
from netsetup.lab.peers.dns import DnsServer, ZoneData
from netsetup.lab.peers.dovecot import Dovecot
from netsetup.lab.peers.postfix import Postfix
from netsetup.lab.peers.sink import SmtpSink, smtp_source, swaks
from netsetup.lab.peers.spamd import GTUBE, Spamd
from netsetup.lab.topology import Host, Lab

LabFactory = Callable[..., Lab]
SERVER_V4 = "198.51.100.25"
SERVER_V6 = "2001:db8:2::25"
SENDER_V4 = "192.0.2.10"
SENDER_V6 = "2001:db8:1::10"


def programs_in(lab: Lab, host: Host) -> list[str]:
    """Names of the programs running in a lab host."""
    out = lab.run(host, ["sh", "-c", "ip netns pids $(ip netns identify $$) 2>/dev/null"],
                  check=False).stdout
    names = []
    for pid in out.split():
        with contextlib.suppress(OSError):  # gone meanwhile
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
    return [n for n in names if n not in ("sh", "ip")]


def message(subject: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (b"From: Sender <sender@sender.example>\r\nTo: <alice@example.com>\r\n"
            b"Subject: " + subject.encode() + b"\r\nMessage-ID: <" + subject.encode() +
            b"@sender.example>\r\n\r\n" + body)


# --- Postfix ------------------------------------------------------------------------------


def test_swaks_to_receiver_postfix_over_ipv4_and_ipv6(lab_factory: LabFactory,
                                                       tmp_path: Path) -> None:
    lab = lab_factory("router")
    receiver = Postfix.receiver(lab, lab.server, domains=["example.com"], dir=tmp_path / "rx")
    v4 = message("over-ipv4", b"Line one.\r\n.A line that starts with a dot.\r\n")
    swaks(lab, lab.sender, SERVER_V4, 25, mail_from="sender@sender.example",
          rcpt="alice@example.com", data=v4)
    swaks(lab, lab.sender, SERVER_V6, 25, mail_from="sender@sender.example",
          rcpt="alice@example.com", data=message("over-ipv6"))
    first, second = receiver.wait_for_messages(2)
    assert first.content == v4  # what swaks sent after DATA, dot-unstuffed
    assert first.client_address == SENDER_V4
    assert first.header("X-Original-To") == "alice@example.com"
    assert second.client_address == SENDER_V6
    assert "client=unknown[192.0.2.10]" in receiver.log()

    # Stopped means gone, and the same folder takes a new instance without a clash.
    receiver.stop()
    assert not [p for p in programs_in(lab, lab.server) if p in ("master", "smtpd", "qmgr")]
    again = Postfix.receiver(lab, lab.server, domains=["example.com"], dir=tmp_path / "rx")
    swaks(lab, lab.sender, SERVER_V4, 25, rcpt="alice@example.com", data=message("again"))
    assert len(again.wait_for_messages(3)) == 3


def test_sender_postfix_relays_to_receiver_postfix(lab_factory: LabFactory,
                                                   tmp_path: Path) -> None:
    lab = lab_factory("router")
    receiver = Postfix.receiver(lab, lab.server, domains=["example.com"], dir=tmp_path / "rx")
    sender = Postfix.sender(lab, lab.sender, dir=tmp_path / "tx",
                            routes={"example.com": f"[{SERVER_V4}]:25"})
    content = message("relayed", b"Through two Postfixes.\r\n")
    sender.send("sender@sender.example", ["alice@example.com"], content)
    (delivery,) = receiver.wait_for_messages(1)
    assert delivery.client_address == SENDER_V4
    assert b"Subject: relayed\r\n" in delivery.content
    assert delivery.content.endswith(b"\r\n\r\nThrough two Postfixes.\r\n")
    sender.wait_queue_empty(timeout=10)
    assert "status=sent" in sender.log()


def test_sender_postfix_receives_the_bounce(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory("router")
    Postfix.receiver(lab, lab.server, domains=["example.com"], dir=tmp_path / "rx",
                     users=["alice@example.com"])
    sender = Postfix.sender(lab, lab.sender, dir=tmp_path / "tx", domain="sender.example",
                            routes={"example.com": f"[{SERVER_V4}]:25"})
    sender.send("sender@sender.example", ["nobody-here@example.com"], message("will-bounce"))
    (dsn,) = sender.wait_for_messages(1)
    assert dsn.header("X-Original-To") == "sender@sender.example"
    assert b"From: Mail Delivery System <MAILER-DAEMON@sender.example>" in dsn.raw
    assert b"Content-Type: multipart/report; report-type=delivery-status" in dsn.raw
    assert b"Status: 5.1.1" in dsn.raw
    assert b"nobody-here@example.com" in dsn.raw
    sender.wait_queue_empty(timeout=10)


def test_relay_postfix_forwards_smtp_source_load(lab_factory: LabFactory,
                                                 tmp_path: Path) -> None:
    lab = lab_factory("router", servers=2)
    server2 = lab.hosts["server2"]
    receiver = Postfix.receiver(lab, server2, domains=["example.com"], dir=tmp_path / "rx")
    relay = Postfix.relay(lab, lab.server, dir=tmp_path / "relay",
                          relayhost=f"[{server2.ipv4}]:25")
    run = smtp_source(lab, lab.sender, SERVER_V4, 25, count=20, sessions=4, size=2048,
                      rcpt="alice@example.com")
    assert run.messages == 20
    deliveries = receiver.wait_for_messages(20, timeout=20)
    assert {d.client_address for d in deliveries} == {SERVER_V4}  # came through the relay
    relay.wait_queue_empty(timeout=10)


def test_a_peer_that_cannot_start_says_why(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory("router")
    Postfix.receiver(lab, lab.server, domains=["example.com"], dir=tmp_path / "first")
    # Postfix would share port 25 silently (SO_REUSEPORT): the helper refuses instead.
    with pytest.raises(PeerError, match="port 25 already has a listener"):
        Postfix.receiver(lab, lab.server, domains=["example.com"], dir=tmp_path / "second")
    # A peer that dies on its config fails at once, with the tail of its log.
    with pytest.raises(PeerError) as failed:
        Postfix.receiver(lab, lab.server, domains=["example.com"], dir=tmp_path / "third",
                         port=2525, extra={"queue_directory": "/nonexistent/queue"})
    assert "the program exited" in str(failed.value)
    assert "last lines of" in str(failed.value)


# --- smtp-sink, smtp-source ------------------------------------------------------------


def test_smtp_sink_dumps_and_smtp_source_times(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory("router")
    sink = SmtpSink.start(lab, lab.server, tmp_path / "sink", dump=True)
    content = message("to-the-sink")
    swaks(lab, lab.sender, SERVER_V4, 25, mail_from="a@sender.example", rcpt="b@example.com",
          data=content)
    (dumped,) = sink.wait_for_messages(1)
    assert dumped.client_address == SENDER_V4
    assert dumped.mail_from.startswith("<a@sender.example>")
    assert dumped.rcpts == ("<b@example.com>",)
    assert dumped.content == content
    sink.stop()

    # No dumps: a pure sink, counting (-c) the sessions, QUITs and messages it took. A rate
    # bound on `run.seconds` would measure the start of `ip netns exec` and smtp-source as
    # much as the transfer, so the run is checked by what both ends counted.
    fast = SmtpSink.start(lab, lab.server, tmp_path / "fast", extra_args=["-c"])
    run = smtp_source(lab, lab.sender, SERVER_V4, 25, count=100, sessions=5, size=4096)
    assert run.messages == 100 and run.seconds > 0
    # smtp-source's own counter (-c): one number per completed DATA, up to 100.
    counted = [int(token) for token in run.output.split() if token.isdigit()]
    assert counted and max(counted) == 100, run.output[-200:]

    def sink_counted() -> tuple[str, ...] | None:
        # sess= also counts the start-up probe's connection (it sends no QUIT).
        counts = re.findall(r"sess=\d+ quit=(\d+) mesg=(\d+)", fast.log_path.read_text())
        return counts[-1] if counts else None

    wait_until(lambda: sink_counted() == ("100", "100"),
               "smtp-sink counting 100 QUITs and 100 messages", 10, fast.process,
               (fast.log_path,))
    fast.stop()


# --- Dovecot -----------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "stls"])
def test_dovecot_serves_the_delivered_message(lab_factory: LabFactory, tmp_path: Path,
                                              tls: bool) -> None:
    lab = lab_factory("router")
    pop = Dovecot.start(lab, lab.server, users={"alice": "secret"}, dir=tmp_path / "pop",
                        tls=tls)
    content = message("pop", b"First line.\r\n.Dot-started line.\r\n\r\nLast.\r\n")
    pop.deliver("alice", content)

    def retrieve() -> tuple[bytes, int]:
        client = poplib.POP3(SERVER_V4, 110, timeout=10)
        try:
            if tls:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE  # the throw-away self-signed certificate
                client.stls(context)
            client.user("alice")
            client.pass_("secret")
            _resp, lines, octets = client.retr(1)
            return b"".join(line + b"\r\n" for line in lines), octets
        finally:
            client.quit()

    got, octets = in_netns(lab.sender, retrieve)
    assert got == content
    assert octets == len(content)  # poplib counts the octets after undoing dot-stuffing
    pop.stop()
    assert not pop.pid_file.exists()


# --- clamd -------------------------------------------------------------------------------


def _instream_raw(sock: socket.socket, data: bytes) -> bytes:
    """clamd INSTREAM spelled out: zINSTREAM\\0, <len32><bytes>..., <0>, reply up to \\0."""
    sock.sendall(b"zINSTREAM\0" + struct.pack("!L", len(data)) + data + struct.pack("!L", 0))
    reply = b""
    while not reply.endswith(b"\0"):
        part = sock.recv(1024)
        assert part, "clamd closed the connection"
        reply += part
    return reply


def test_clamd_finds_eicar_plain_and_zipped(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory("router")
    clamd = Clamd.start(lab, lab.server, tmp_path / "clamd", tcp=("127.0.0.1", 3310))
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("eicar.com", EICAR)
    for data, expected in [(EICAR, f"{EICAR_FOUND} FOUND"),
                           (zipped.getvalue(), f"{EICAR_FOUND} FOUND"),
                           (message("clean"), "OK")]:
        with clamd.tcp_connection() as sock:
            assert _instream_raw(sock, data) == f"stream: {expected}\0".encode()
    assert clamd.scan(EICAR) == f"{EICAR_FOUND} FOUND"  # the local socket too
    clamd.stop()
    assert not clamd.socket_path.exists()


# --- spamd -------------------------------------------------------------------------------


def test_spamd_scores_gtube_as_spam(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory("router")
    spamd = Spamd.start(lab, lab.server, tmp_path / "spamd", address="127.0.0.1", port=783)
    spam = message("gtube", GTUBE + b"\r\n")
    with spamd.connection() as sock:
        sock.sendall(b"CHECK SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(spam) + spam)
        reply = b""
        while part := sock.recv(4096):
            reply += part
    assert reply.startswith(b"SPAMD/1.1 0 EX_OK\r\n")  # spamd answers in protocol 1.1
    spam_line = next(line for line in reply.split(b"\r\n") if line.startswith(b"Spam:"))
    assert spam_line.startswith(b"Spam: True ; ")
    assert float(spam_line.split()[3]) >= 900  # GTUBE alone is worth 1000
    ham = spamd.check(message("ham", b"Lunch at noon?\r\n"))
    assert not ham.is_spam and ham.score < ham.threshold
    spamd.stop()


# --- DNS ---------------------------------------------------------------------------------


def test_dns_server_answers_mx_from_the_sender(lab_factory: LabFactory, tmp_path: Path) -> None:
    lab = lab_factory("router")
    zone: ZoneData = {"example.com.": {"MX": [[10, "mx.example.com."], [20, "mx2.example.com."]]},
                      "mx.example.com.": {"A": [SERVER_V4], "AAAA": [SERVER_V6]}}
    server = DnsServer.start(lab, lab.server, zone, tmp_path / "dns")

    def ask(name: str, rdtype: str, tcp: bool = False) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        if tcp:
            return dns.query.tcp(query, SERVER_V4, timeout=3)
        return dns.query.udp(query, SERVER_V4, timeout=3)

    mx = in_netns(lab.sender, lambda: ask("example.com.", "MX"))
    assert mx.rcode() == dns.rcode.NOERROR and mx.flags & dns.flags.AA
    exchanges = sorted((r.preference, r.exchange.to_text()) for r in mx.answer[0])
    assert exchanges == [(10, "mx.example.com."), (20, "mx2.example.com.")]
    aaaa = in_netns(lab.sender, lambda: ask("mx.example.com.", "AAAA", tcp=True))
    assert aaaa.answer[0][0].address == SERVER_V6
    missing = in_netns(lab.sender, lambda: ask("other.example.", "MX"))
    assert missing.rcode() == dns.rcode.NXDOMAIN
    nodata = in_netns(lab.sender, lambda: ask("mx.example.com.", "MX"))
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert server.query("example.com.", "MX", from_host=lab.sender).answer[0].rdtype == \
        dns.rdatatype.MX
    server.stop()
