"""The POP3 proxy's layer in whole conversations, with no sockets and no event loop: the test
plays the client, the server, the scanner, the quarantine and the clock, and checks what the
layer sends each of them and when."""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

import pytest

from proxies.pop3.cache import CacheKey, ScanCache
from proxies.pop3.config import Pop3Config
from proxies.pop3.events import (
    CancelScan,
    ClientLost,
    ClientPaused,
    ClientReadable,
    ClientWritable,
    Close,
    Command_,
    Connect,
    Connected,
    ConnectFailed,
    Event,
    Passthrough,
    Quarantine,
    QuarantineDone,
    Scan,
    ScanData,
    ScanDone,
    SendClient,
    SendServer,
    ServerReadable,
    StartTls,
    StreamScan,
    Tick,
    TlsDone,
)
from proxies.pop3.layer import CHUNK, LayerSetup, Pop3Layer
from proxies.pop3.states import SessionState
from proxies.scan.api import ScanResult
from tests.unit.test_pop3_support import message, stuff

GREETING = b"+OK Dovecot ready.\r\n"
CAPA_WITH_STLS = b"+OK\r\nTOP\r\nUIDL\r\nSTLS\r\nPIPELINING\r\nSASL PLAIN\r\n.\r\n"
CLEAN = ScanResult("clean", scanners=("clamd",))
SPAM = ScanResult("spam", score=1000.0, threshold=5.0, rules=("GTUBE",), scanners=("spamd",))
VIRUS = ScanResult("virus", virus="Eicar-Test-Signature", scanners=("clamd",))
FAILED = ScanResult("failed", reason="clamd: connection refused")


class Script:
    """One session's layer and its peers, played by the test (TLS passthrough unless told:
    the server connection is not upgraded first). What the layer sends each peer
    collects until the test takes it; the other commands too. Like the driver, it answers a
    wait to flush at once unless the test says the client is not reading."""

    def __init__(self, *, scanning: bool = False, quarantining: bool = True,
                 certificate: bool = False, cache_ttl: float = 0.0, streaming: bool = False,
                 **config: Any) -> None:
        config.setdefault("scan_ahead", "off")  # its own tests say when
        settings = replace(Pop3Config(), tls=config.pop("tls", "passthrough"), **config)
        self.layer = Pop3Layer(LayerSetup(
            config=settings, ident=1, client=("192.0.2.10", 40000),
            destination=("198.51.100.20", 110), cache=ScanCache(cache_ttl),
            hostname="gw.example", scanning=scanning, quarantining=quarantining,
            our_certificate=certificate, streaming=streaming))
        self.now = 0.0
        self.to_client = bytearray()
        self.to_server = bytearray()
        self.commands: list[Command_] = []
        self.paused = False
        self.scan_token = 0  # the last scan scanned_retr saw asked for
        self._apply(self.layer.start(self.now))

    def _apply(self, commands: list[Command_]) -> None:
        for command in commands:
            if isinstance(command, SendClient):
                self.to_client += command.data
            elif isinstance(command, SendServer):
                self.to_server += command.data
            else:
                self.commands.append(command)
        if self.layer.waiting == "flush" and not self.paused:
            self._apply(self.layer.handle(ClientWritable(), self.now))

    def event(self, event: Event) -> None:
        self._apply(self.layer.handle(event, self.now))

    def client(self, data: bytes) -> None:
        self.layer.client.receive_data(data)
        self.event(ClientReadable())

    def server(self, data: bytes, piece: int = 0) -> None:
        """The server's bytes, at once or in pieces of `piece` bytes."""
        step = piece or max(len(data), 1)
        for start in range(0, max(len(data), 1), step):
            self.layer.server.receive_data(data[start:start + step])
            self.event(ServerReadable())

    def at(self, when: float) -> None:
        self.now = when
        self.event(Tick())

    def took_client(self) -> bytes:
        data = bytes(self.to_client)
        self.to_client.clear()
        return data

    def took_server(self) -> bytes:
        data = bytes(self.to_server)
        self.to_server.clear()
        return data

    def took(self) -> list[Command_]:
        commands, self.commands = self.commands, []
        return commands

    def connected(self, greeting: bytes = GREETING) -> None:
        assert self.took() == [Connect()]
        self.event(Connected())
        self.server(greeting)

    def logged_in(self) -> None:
        self.connected()
        assert self.took_client() == GREETING
        self.exchange(b"USER alice\r\n", b"+OK\r\n")
        self.exchange(b"PASS secret\r\n", b"+OK Logged in.\r\n")
        assert self.layer.state is SessionState.TRANSACTION

    def exchange(self, command: bytes, response: bytes) -> bytes:
        """A command relayed as it is, its response likewise; what the client got."""
        self.client(command)
        assert self.took_server() == command
        self.server(response)
        got = self.took_client()
        assert got == response
        return got

    @property
    def closed(self) -> Close | None:
        closes = [c for c in self.commands if isinstance(c, Close)]
        return closes[-1] if closes else None


def retr_response(content: bytes) -> bytes:
    return b"+OK %d octets\r\n" % len(content) + stuff(content) + b".\r\n"


# --- the start of a session -------------------------------------------------------------------

def test_greeting_reaches_the_client_only_once_the_server_has_sent_it() -> None:
    script = Script()
    assert script.took() == [Connect()]
    assert script.took_client() == b""
    script.event(Connected())
    assert script.took_client() == b""
    script.server(GREETING[:5])
    assert script.took_client() == b""
    script.server(GREETING[5:])
    assert script.took_client() == GREETING


def test_an_unreachable_server_gives_the_client_a_temporary_error() -> None:
    script = Script()
    script.event(ConnectFailed("Connection refused"))
    close = script.closed
    assert close is not None and close.reply is not None
    assert close.reply.startswith(b"-ERR [SYS/TEMP]")
    assert "Connection refused" in (close.error or "")


def test_a_refusing_server_greeting_is_passed_on_and_ends_the_session() -> None:
    script = Script()
    script.connected(b"-ERR [SYS/TEMP] too busy\r\n")
    assert script.took_client() == b"-ERR [SYS/TEMP] too busy\r\n"
    assert script.closed == Close("the server refused the session", None)


def test_a_silent_server_times_out_with_a_temporary_error() -> None:
    script = Script(server_timeout=30.0)
    script.took()
    script.event(Connected())
    assert script.layer.wake_at == 30.0
    script.at(29.0)
    assert script.closed is None
    script.at(30.0)
    close = script.closed
    assert close is not None and close.reply is not None
    assert b"did not answer in time" in close.reply


def test_garbage_for_a_greeting_is_refused() -> None:
    script = Script()
    script.connected(b"HELLO I AM A WEB SERVER\r\n")
    close = script.closed
    assert close is not None and close.reply is not None
    assert close.reply.startswith(b"-ERR [SYS/TEMP]")


# --- logging in ----------------------------------------------------------------------------------

def test_user_pass_is_relayed_and_teaches_the_user() -> None:
    script = Script()
    script.logged_in()
    assert script.layer.user == "alice"


def test_a_failed_pass_leaves_the_session_unauthenticated() -> None:
    script = Script()
    script.connected()
    script.took_client()
    script.exchange(b"USER alice\r\n", b"+OK\r\n")
    script.exchange(b"PASS wrong\r\n", b"-ERR [AUTH] Authentication failed.\r\n")
    assert script.layer.state is SessionState.AUTHORIZATION
    assert script.layer.user is None


def test_apop_is_relayed() -> None:
    script = Script()
    script.connected(b"+OK ready <1896.697170952@dbc.mtview.ca.us>\r\n")
    script.took_client()
    script.exchange(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n", b"+OK maildrop\r\n")
    assert script.layer.user == "mrose"
    assert script.layer.state is SessionState.TRANSACTION


def test_auth_plain_is_relayed_line_by_line() -> None:
    script = Script()
    script.connected()
    script.took_client()
    script.client(b"AUTH PLAIN\r\n")
    assert script.took_server() == b"AUTH PLAIN\r\n"
    script.server(b"+ \r\n")
    assert script.took_client() == b"+ \r\n"
    line = base64.b64encode(b"\0alice\0secret") + b"\r\n"
    script.client(line)
    assert script.took_server() == line
    script.server(b"+OK Logged in.\r\n")
    assert script.took_client() == b"+OK Logged in.\r\n"
    assert script.layer.user == "alice"
    assert script.layer.state is SessionState.TRANSACTION


def test_a_command_in_the_wrong_state_is_answered_by_the_proxy() -> None:
    script = Script()
    script.connected()
    script.took_client()
    script.client(b"RETR 1\r\n")
    assert script.took_server() == b""
    assert script.took_client().startswith(b"-ERR")


# --- CAPA and STLS -------------------------------------------------------------------------

def upgraded(script: Script) -> None:
    """The server connection upgraded with STLS after its greeting; the client greeted."""
    script.took()
    script.event(Connected())
    script.server(GREETING)
    assert script.took_server() == b"CAPA\r\n"
    script.server(CAPA_WITH_STLS)
    assert script.took_server() == b"STLS\r\n"
    script.server(b"+OK Begin TLS\r\n")
    assert script.took() == [StartTls("server")]
    assert script.took_client() == b""  # no greeting before the upgrade is done
    script.event(TlsDone("server"))
    assert script.took_client() == GREETING


@pytest.mark.parametrize(("mode", "certificate", "shows_stls"), [
    ("terminate", True, True), ("terminate", False, False), ("strip", True, False),
    ("passthrough", False, True)])
def test_capa_shows_stls_by_mode(mode: str, certificate: bool, shows_stls: bool) -> None:
    script = Script(tls=mode, certificate=certificate)
    if mode == "passthrough":  # the server connection is not upgraded
        script.connected()
        assert script.took_client() == GREETING
    else:
        upgraded(script)
    script.client(b"CAPA\r\n")
    assert script.took_server() == b"CAPA\r\n"
    script.server(CAPA_WITH_STLS, piece=7)
    capabilities = script.took_client()
    assert capabilities.startswith(b"+OK\r\n") and capabilities.endswith(b"\r\n.\r\n")
    assert (b"\r\nSTLS\r\n" in capabilities) is shows_stls
    assert b"PIPELINING" in capabilities


def test_stls_terminate_does_tls_with_the_client_here() -> None:
    script = Script(tls="terminate", certificate=True)
    upgraded(script)
    script.client(b"STLS\r\n")
    assert script.took_server() == b""  # the server's TLS is already up
    assert script.took_client() == b"+OK Begin TLS negotiation now\r\n"
    assert script.took() == [StartTls("client")]
    script.event(TlsDone("client"))
    assert script.layer.client_tls
    script.client(b"STLS\r\n")
    assert script.took_client().startswith(b"-ERR already using TLS")


def test_plaintext_after_stls_is_refused_not_read_as_if_encrypted() -> None:
    script = Script(tls="terminate", certificate=True)
    upgraded(script)
    script.client(b"STLS\r\nUSER injected\r\n")
    close = script.closed
    assert close is not None and close.reply is not None
    assert b"nothing may follow STLS" in close.reply
    assert not any(isinstance(c, StartTls) for c in script.commands)


def test_a_failed_client_handshake_ends_the_session() -> None:
    script = Script(tls="terminate", certificate=True)
    upgraded(script)
    script.client(b"STLS\r\n")
    script.took()
    script.event(TlsDone("client", "wrong version number"))
    assert script.closed == Close("TLS with the client failed: wrong version number", None)


def test_a_server_that_offers_stls_and_refuses_it_ends_the_session() -> None:
    script = Script(tls="strip")
    script.connected()
    assert script.took_server() == b"CAPA\r\n"
    script.server(CAPA_WITH_STLS)
    assert script.took_server() == b"STLS\r\n"
    script.server(b"-ERR no\r\n")
    close = script.closed
    assert close is not None and close.reply is not None
    assert b"TLS with the mail server failed" in close.reply
    assert script.took_client() == b""  # not even the greeting: no silent downgrade


def test_strip_answers_stls_itself() -> None:
    script = Script(tls="strip")
    upgraded(script)
    script.client(b"STLS\r\n")
    assert script.took_client().startswith(b"-ERR STLS not available")
    assert script.took_server() == b""


def test_stls_passthrough_hands_the_bytes_over_to_the_driver() -> None:
    script = Script(tls="passthrough")
    script.connected()
    script.took_client()
    script.client(b"STLS\r\n")
    assert script.took_server() == b"STLS\r\n"
    script.server(b"+OK Begin TLS\r\n")
    assert script.took_client() == b"+OK Begin TLS\r\n"
    assert script.took() == [Passthrough()]
    assert script.layer.finished and script.closed is None


# --- relaying and pipelining ---------------------------------------------------------------------

def test_pipelined_commands_are_answered_in_order_one_at_a_time() -> None:
    script = Script()
    script.logged_in()
    script.client(b"STAT\r\nLIST\r\nNOOP\r\n")
    assert script.took_server() == b"STAT\r\n"  # the next waits for this response
    script.server(b"+OK 2 320\r\n")
    assert script.took_client() == b"+OK 2 320\r\n"
    assert script.took_server() == b"LIST\r\n"
    script.server(b"+OK 2 messages\r\n1 120\r\n", piece=5)
    assert script.took_server() == b""
    script.server(b"2 200\r\n.\r\n")
    assert script.took_client() == b"+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n"
    assert script.took_server() == b"NOOP\r\n"


def test_retr_is_relayed_unchanged_when_nothing_scans() -> None:
    script = Script()
    script.logged_in()
    content = message("hello", b".leading dot\r\nbody\r\n")
    response = retr_response(content)
    script.client(b"RETR 1\r\n")
    assert script.took_server() == b"RETR 1\r\n"
    script.server(response, piece=100)
    assert script.took_client() == response


def test_quit_is_relayed_and_ends_the_session() -> None:
    script = Script()
    script.logged_in()
    script.exchange(b"QUIT\r\n", b"+OK Logging out, messages deleted.\r\n")
    assert script.closed == Close(None, None)


def test_a_client_that_leaves_ends_the_session_without_quit() -> None:
    script = Script()
    script.logged_in()
    script.layer.client.receive_data(b"")
    script.event(ClientReadable())
    assert script.closed == Close(None, None)
    assert script.took_server() == b""  # no QUIT on the client's behalf


def test_the_server_gone_mid_listing_closes_the_client_without_the_final_dot() -> None:
    script = Script()
    script.logged_in()
    script.client(b"LIST\r\n")
    script.server(b"+OK 2 messages\r\n1 120\r\n")
    assert script.took_client() == b"+OK 2 messages\r\n1 120\r\n"
    script.layer.server.receive_data(b"")
    script.event(ServerReadable())
    close = script.closed
    assert close is not None and close.reply is None


def test_server_data_nobody_asked_for_ends_the_session() -> None:
    script = Script()
    script.logged_in()
    script.server(b"+OK surprise\r\n")
    script.client(b"NOOP\r\n")
    close = script.closed
    assert close is not None and close.reply is not None
    assert close.reply.startswith(b"-ERR [SYS/TEMP]")


def test_autologout_counts_from_the_last_response() -> None:
    script = Script(client_timeout=600.0)
    script.logged_in()
    script.now = 100.0
    script.client(b"NO")  # a command trickling in does not restart the clock
    assert script.layer.wake_at == 600.0
    script.at(600.0)
    close = script.closed
    assert close is not None and close.reply is not None
    assert b"autologout" in close.reply


def test_a_client_that_stops_reading_gets_no_new_command_and_times_out() -> None:
    script = Script(client_timeout=60.0)
    script.logged_in()
    script.paused = True
    script.now = 10.0
    script.event(ClientPaused())
    script.client(b"NOOP\r\n")
    assert script.took_server() == b""  # not taken while it does not read
    script.at(69.0)
    assert script.closed is None
    script.at(70.0)
    assert script.closed == Close("the client stopped reading", None)


def test_a_paused_client_delays_the_server_timeout_of_a_relay() -> None:
    script = Script(client_timeout=600.0, server_timeout=30.0)
    script.logged_in()
    script.client(b"RETR 1\r\n")
    script.server(b"+OK 100 octets\r\nSubject: x\r\n")
    script.paused = True
    script.event(ClientPaused())
    script.at(100.0)  # the server is not read meanwhile: its silence is not its fault
    assert script.closed is None
    script.paused = False
    script.event(ClientWritable())
    script.at(129.0)
    assert script.closed is None
    script.at(131.0)
    close = script.closed
    assert close is not None and close.reply is None  # part of the response went already


def test_unknown_commands_are_relayed_but_limited() -> None:
    script = Script()
    script.logged_in()
    for _ in range(20):
        script.exchange(b"XFOO\r\n", b"-ERR unknown\r\n")
    script.client(b"XFOO\r\n")
    close = script.closed
    assert close is not None and close.reply == b"-ERR too many unknown commands\r\n"


# --- RETR and TOP, scanned ----------------------------------------------------------------------

def scanned_retr(script: Script, content: bytes, result: ScanResult | None,
                 command: bytes = b"RETR 1\r\n") -> bytes:
    script.logged_in()
    script.client(command)
    assert script.took_server() == command
    script.server(retr_response(content), piece=1000)
    assert script.took_client() == b""  # nothing before the verdict
    scans = [c for c in script.took() if isinstance(c, Scan)]
    assert [s.content for s in scans] == [content]
    script.scan_token = scans[0].token
    if result is not None:
        script.event(ScanDone(result, scans[0].token))
    return script.took_client()


def test_clean_mail_passes_byte_for_byte() -> None:
    script = Script(scanning=True)
    content = message("clean", b".dot\r\nbody\r\n")
    assert scanned_retr(script, content, CLEAN) == retr_response(content)


def test_top_is_scanned_too() -> None:
    script = Script(scanning=True)
    content = message("top", b"")
    assert scanned_retr(script, content, CLEAN, b"TOP 1 0\r\n") == retr_response(content)


def test_spam_is_tagged() -> None:
    script = Script(scanning=True)
    got = scanned_retr(script, message("offer", b"buy now\r\n"), SPAM)
    assert got.startswith(b"+OK")
    assert b"X-Spam-Flag: YES" in got
    assert b"Subject: [SPAM] offer" in got
    assert got.endswith(b"\r\n.\r\n")


def test_a_virus_is_quarantined_and_replaced_by_a_notice() -> None:
    script = Script(scanning=True)
    content = message("infected", b"payload\r\n")
    assert scanned_retr(script, content, VIRUS) == b""  # not before the original is stored
    (stored,) = script.took()
    assert isinstance(stored, Quarantine) and stored.content == content
    assert stored.origin["user"] == "alice"
    script.event(QuarantineDone("q-123"))
    got = script.took_client()
    assert got.startswith(b"+OK")
    assert b"payload" not in got and b"Eicar-Test-Signature" in got and b"q-123" in got


def test_a_failed_quarantine_write_leaves_the_message_on_the_server() -> None:
    script = Script(scanning=True)
    scanned_retr(script, message("infected", b"payload\r\n"), VIRUS)
    script.took()
    script.event(QuarantineDone(None))
    got = script.took_client()
    assert got.startswith(b"-ERR [SYS/TEMP]") and b"quarantine write failed" in got
    assert script.closed is None  # the session goes on
    script.exchange(b"NOOP\r\n", b"+OK\r\n")


def test_a_failed_scan_is_a_temporary_error_by_default() -> None:
    script = Script(scanning=True)
    got = scanned_retr(script, message("x"), FAILED)
    assert got.startswith(b"-ERR [SYS/TEMP]") and b"content scanner failed" in got


def test_a_failed_scan_passes_under_fail_mode_pass() -> None:
    script = Script(scanning=True, fail_mode="pass")
    got = scanned_retr(script, message("x"), FAILED)
    assert got.startswith(b"+OK") and b"X-Mailgate-Scan" in got


def test_a_scan_that_never_answers_times_out_and_is_cancelled() -> None:
    script = Script(scanning=True, scan_timeout=20.0, keepalive_after=60.0)
    scanned_retr(script, message("x"), None)
    script.at(20.0)
    assert CancelScan(script.scan_token) in script.took()
    assert script.took_client().startswith(b"-ERR [SYS/TEMP]")
    # A verdict that comes after all is not taken for the next message's.
    script.event(ScanDone(CLEAN, script.scan_token))
    script.exchange(b"NOOP\r\n", b"+OK\r\n")


def test_a_streaming_scan_is_fed_as_the_message_arrives() -> None:
    """Where the scanner can take a message in pieces, each piece goes to it as it comes from
    the server (from the second on: a message in one piece is scanned whole), and the Scan at
    the end, with the whole content, ends that same scan; still nothing reaches the client
    before the verdict."""
    script = Script(scanning=True, streaming=True)
    content = message("streamed", b"line\r\n" * 2000)
    script.logged_in()
    script.client(b"RETR 1\r\n")
    script.took_server()
    response = retr_response(content)
    script.server(response[:5000])
    assert script.took() == [] and script.took_client() == b""  # one piece: maybe the whole
    script.server(response[5000:], piece=3000)
    commands = script.took()
    assert isinstance(commands[0], StreamScan) and script.took_client() == b""
    token = commands[0].token
    commands = commands[1:]
    pieces = [c for c in commands if isinstance(c, ScanData)]
    assert len(pieces) > 1 and {c.token for c in pieces} == {token}
    assert b"".join(c.data for c in pieces) == content
    assert commands[-1] == Scan(content, token) and script.took_client() == b""
    script.event(ScanDone(VIRUS, token))
    script.event(QuarantineDone("q-1"))
    assert b"[VIRUS REMOVED]" in script.took_client()
    assert not any(isinstance(c, CancelScan) for c in script.took())  # it ended with a verdict


def test_a_streaming_scan_is_cancelled_when_the_message_does_not_end() -> None:
    """The server closes mid-message, or the message turns out too large to scan: the scan
    being fed is cancelled, not left holding a scanner's connection, and never ended with a
    Scan."""
    content = message("cut", b"x" * 70 + b"\r\n" + (b"y" * 70 + b"\r\n") * 1000)
    for server_closes in (True, False):
        script = Script(scanning=True, streaming=True, max_scan_size=65536,
                        oversize_action="pass")
        script.logged_in()
        script.client(b"RETR 1\r\n")
        script.took_server()
        response = retr_response(content)
        script.server(response[:30000], piece=10000)
        if server_closes:
            script.layer.server.receive_data(b"")
            script.event(ServerReadable())
        else:
            script.server(response[30000:], piece=8000)
        commands = script.took()
        token = next(c.token for c in commands if isinstance(c, StreamScan))
        assert not any(isinstance(c, Scan) for c in commands)
        assert [c for c in commands if isinstance(c, CancelScan)] == [CancelScan(token)]
        if server_closes:
            assert script.took_client() == b""
            assert any(isinstance(c, Close) for c in commands)
        else:  # passed unscanned, whole
            assert script.took_client() == response


def test_a_verdict_cached_meanwhile_ends_the_stream_before_the_delivery() -> None:
    """Another session of the mailbox scanned the message while this one streamed it: the
    cached verdict is used, and the stream ends at once, not after a slow client's read."""
    script = Script(scanning=True, streaming=True, cache_ttl=3600.0, max_scan_size=8 << 20)
    content = message("big", b"line of the body\r\n" * 150000)  # several CHUNKs to deliver
    script.logged_in()
    script.exchange(b"UIDL 1\r\n", b"+OK 1 uid-one\r\n")
    script.client(b"RETR 1\r\n")
    script.took_server()
    response = retr_response(content)
    script.server(response[:10000], piece=5000)
    token = next(c.token for c in script.took() if isinstance(c, StreamScan))
    layer = script.layer
    assert layer.user is not None
    layer.setup.cache.put(CacheKey(layer.setup.destination, layer.user,
                                   layer.facts.uidls[b"1"], "RETR"), CLEAN)
    script.paused = True  # a slow client
    script.server(response[10000:], piece=65536)
    commands = script.took()
    assert not any(isinstance(c, Scan) for c in commands) and CancelScan(token) in commands
    assert layer.waiting == "flush"  # the delivery has only begun


def test_a_message_in_one_piece_is_scanned_whole() -> None:
    script = Script(scanning=True, streaming=True)
    content = message("short", b"body\r\n")
    script.logged_in()
    script.client(b"RETR 1\r\n")
    script.took_server()
    script.server(retr_response(content))
    (scan,) = script.took()
    assert isinstance(scan, Scan) and scan.content == content
    script.event(ScanDone(CLEAN, scan.token))
    assert script.took_client() == retr_response(content) and script.took() == []


def test_no_streaming_scan_for_a_message_whose_verdict_is_remembered() -> None:
    script = Script(scanning=True, streaming=True, cache_ttl=3600.0)
    content = message("again", b"body\r\n")
    script.logged_in()
    script.exchange(b"UIDL 1\r\n", b"+OK 1 uid-one\r\n")
    for fetch in range(2):
        script.client(b"RETR 1\r\n")
        script.took_server()
        script.server(retr_response(content), piece=40)
        commands = script.took()
        if fetch == 0:
            token = next(c.token for c in commands if isinstance(c, StreamScan))
            assert commands[-1] == Scan(content, token)
            script.event(ScanDone(CLEAN, token))
        else:
            assert commands == []  # the cache's verdict: no scan at all
        assert script.took_client() == retr_response(content)


def test_a_slow_scan_keeps_the_client_alive_with_the_trace_fields() -> None:
    script = Script(scanning=True, keepalive_after=10.0, keepalive_interval=10.0)
    content = message("slow", b"body\r\n", trace=2)
    scanned_retr(script, content, None)
    script.at(9.9)
    assert script.took_client() == b""
    script.at(10.0)
    status = b"+OK %d octets\r\n" % len(content)
    assert script.took_client() == status + content[:1]  # the status, then one byte
    script.at(20.0)
    assert script.took_client() == content[1:2]
    script.event(ScanDone(CLEAN, script.scan_token))
    assert script.took_client() == stuff(content)[2:] + b".\r\n"


def test_a_scan_failure_after_the_early_status_ends_without_the_final_dot() -> None:
    script = Script(scanning=True, keepalive_after=10.0)
    scanned_retr(script, message("slow"), None)
    script.at(10.0)
    assert script.took_client().startswith(b"+OK")
    script.event(ScanDone(FAILED, script.scan_token))
    assert script.took_client() == b""
    assert script.closed == Close("content scanner failed", None)


def test_the_server_gone_mid_message_is_a_temporary_error() -> None:
    script = Script(scanning=True)
    script.logged_in()
    script.client(b"RETR 1\r\n")
    script.server(b"+OK 300 octets\r\nSubject: x\r\n")
    script.layer.server.receive_data(b"")
    script.event(ServerReadable())
    close = script.closed
    assert close is not None and close.reply is not None
    assert close.reply.startswith(b"-ERR [SYS/TEMP]")
    assert script.took_client() == b""


def test_a_message_over_max_scan_size_passes_unscanned_as_it_comes() -> None:
    script = Script(scanning=True, max_scan_size=1000)
    content = message("big", b"x" * 70 + b"\r\n" * 1 + (b"y" * 70 + b"\r\n") * 40)
    script.logged_in()
    script.client(b"RETR 1\r\n")
    assert script.took_server() == b"RETR 1\r\n"
    script.server(retr_response(content), piece=500)
    assert not any(isinstance(c, Scan) for c in script.took())
    assert script.took_client() == retr_response(content)
    script.exchange(b"NOOP\r\n", b"+OK\r\n")


def test_a_big_clean_message_goes_out_in_chunks_as_the_client_drains() -> None:
    script = Script(scanning=True, max_scan_size=4 * CHUNK)
    content = message("big", (b"z" * 98 + b"\r\n") * (3 * CHUNK // 100))
    script.paused = True  # the client is slow: each chunk waits for the last to drain
    first = scanned_retr(script, content, CLEAN)
    assert 0 < len(first) < len(retr_response(content))
    script.paused = False
    script.event(ClientWritable())
    assert first + script.took_client() == retr_response(content)


def test_a_cached_verdict_is_used_for_the_same_message() -> None:
    script = Script(scanning=True, cache_ttl=3600.0)
    content = message("again")
    script.logged_in()
    for round_ in range(2):
        script.client(b"RETR 1\r\n")
        if round_ == 0:
            assert script.took_server() == b"UIDL 1\r\n"
            script.server(b"+OK 1 uid-1\r\n")
        assert script.took_server() == b"RETR 1\r\n"
        script.server(retr_response(content))
        scans = [c for c in script.took() if isinstance(c, Scan)]
        if round_ == 0:
            assert len(scans) == 1
            script.event(ScanDone(CLEAN, scans[0].token))
        else:
            assert scans == []  # the verdict came from the cache
        assert script.took_client() == retr_response(content)


def test_the_client_gone_while_a_message_is_scanned_ends_the_session() -> None:
    script = Script(scanning=True)
    scanned_retr(script, message("x"), None)
    script.event(ClientLost())
    assert script.closed == Close("the client closed the connection", None)


# --- scanning ahead ---------------------------------------------------------------------------

FIRST = message("first", b"one\r\n")
SECOND = message("second", b"two\r\n.dotted\r\n")


THIRD_SIZE = 300


def listing(*sizes: int) -> bytes:
    return (b"+OK %d messages\r\n" % len(sizes)
            + b"".join(b"%d %d\r\n" % (n, size) for n, size in enumerate(sizes, 1)) + b".\r\n")


MAILBOX = listing(len(FIRST), len(SECOND), THIRD_SIZE)


def after_first_retr(script: Script) -> None:
    """RETR 1 scanned and delivered; the layer has asked the server for the messages' sizes."""
    assert scanned_retr(script, FIRST, CLEAN) == retr_response(FIRST)
    assert script.took_server() == b"LIST\r\n"


def scanned_ahead(script: Script, fetch: bytes = b"RETR 2\r\n") -> Scan:
    after_first_retr(script)
    script.server(MAILBOX)
    assert script.took_server() == fetch
    script.server(retr_response(SECOND), piece=9)
    (scan,) = script.took()
    assert isinstance(scan, Scan) and scan.content == SECOND
    assert script.took_client() == b""  # nothing of it before the client asks
    return scan


def scanned_clean(script: Script, command: bytes, content: bytes) -> None:
    """`command` goes to the server, its `content` is scanned clean and delivered."""
    script.client(command)
    assert script.took_server() == command
    script.server(retr_response(content))
    (scan,) = script.took()
    script.event(ScanDone(CLEAN, scan.token))
    assert script.took_client() == retr_response(content)


def retrieved_unscanned_ahead(script: Script) -> None:
    """RETR 2 goes to the server and is scanned then, as without scanning ahead."""
    scanned_clean(script, b"RETR 2\r\n", SECOND)


def test_the_next_message_is_fetched_and_scanned_while_the_client_reads() -> None:
    script = Script(scanning=True, scan_ahead="retr")
    scan = scanned_ahead(script)
    script.event(ScanDone(CLEAN, scan.token))
    script.client(b"RETR 2\r\n")
    assert script.took_client() == retr_response(SECOND)  # at once, from what was fetched
    assert not any(isinstance(c, Scan) for c in script.took())
    assert script.took_server() == b"RETR 3\r\n"  # and on to the next one, sizes known


def test_a_retrieval_before_the_scan_ahead_is_done_waits_for_its_verdict() -> None:
    script = Script(scanning=True, scan_ahead="retr")
    scan = scanned_ahead(script)
    script.client(b"RETR 2\r\n")
    assert script.took_server() == b""
    assert script.took_client() == b""
    assert script.took() == []  # no second scan: the first one's verdict is awaited
    script.event(ScanDone(VIRUS, scan.token))
    (stored,) = script.took()
    assert isinstance(stored, Quarantine) and stored.content == SECOND


def test_a_verdict_scanned_ahead_serves_no_other_command() -> None:
    script = Script(scanning=True, scan_ahead="retr")
    ahead = scanned_ahead(script)
    script.client(b"TOP 2 10\r\n")
    assert script.took_server() == b"TOP 2 10\r\n"
    script.server(retr_response(SECOND))
    cancel, scan = script.took()
    assert cancel == CancelScan(ahead.token)
    assert isinstance(scan, Scan) and scan.token != ahead.token
    script.event(ScanDone(VIRUS, ahead.token))  # a late one for the dropped scan is not taken
    assert script.took_client() == b"" and script.took() == []
    script.event(ScanDone(CLEAN, scan.token))
    assert script.took_client() == retr_response(SECOND)


def test_a_command_sent_during_the_scan_ahead_waits_for_its_response() -> None:
    script = Script(scanning=True, scan_ahead="retr")
    after_first_retr(script)
    script.client(b"DELE 1\r\n")
    assert script.took_server() == b""  # the server is answering LIST
    script.server(MAILBOX)
    assert script.took_server() == b"RETR 2\r\n"
    script.server(retr_response(SECOND))
    assert script.took_server() == b"DELE 1\r\n"
    script.server(b"+OK deleted\r\n")
    assert script.took_client() == b"+OK deleted\r\n"


def test_no_scan_ahead_when_the_client_has_sent_its_next_command() -> None:
    script = Script(scanning=True, scan_ahead="retr")
    script.logged_in()
    script.client(b"RETR 1\r\nQUIT\r\n")
    script.took_server()
    script.server(retr_response(FIRST))
    (scan,) = script.took()
    assert isinstance(scan, Scan)
    script.event(ScanDone(CLEAN, scan.token))
    assert script.took_client() == retr_response(FIRST)
    assert script.took_server() == b"QUIT\r\n"


def test_no_scan_ahead_for_a_big_message_or_one_that_is_not_there() -> None:
    script = Script(scanning=True, scan_ahead="retr")
    after_first_retr(script)
    script.server(listing(len(FIRST), 99000000))  # too big to keep until it is asked for
    assert script.took_server() == b""
    retrieved_unscanned_ahead(script)
    assert script.took_server() == b""  # there is no message 3
    script.exchange(b"QUIT\r\n", b"+OK bye\r\n")


def test_the_clients_own_listing_gives_the_sizes_and_deleted_messages_are_skipped() -> None:
    script = Script(scanning=True, scan_ahead="retr")
    script.logged_in()
    script.exchange(b"LIST\r\n", MAILBOX)
    script.exchange(b"DELE 3\r\n", b"+OK marked\r\n")
    script.client(b"RETR 1\r\n")
    script.took_server()
    script.server(retr_response(FIRST))
    (scan,) = script.took()
    script.event(ScanDone(CLEAN, scan.token))
    assert script.took_client() == retr_response(FIRST)
    assert script.took_server() == b"RETR 2\r\n"  # no LIST of its own
    script.server(retr_response(SECOND))
    (ahead,) = script.took()
    script.event(ScanDone(CLEAN, ahead.token))
    script.client(b"RETR 2\r\n")
    assert script.took_client() == retr_response(SECOND)
    assert script.took_server() == b""  # message 3 is deleted: not fetched ahead


LIST_ALL = (b"LIST\r\n", MAILBOX)


def first_after(script: Script, *exchanges: tuple[bytes, bytes]) -> None:
    """The client's `exchanges`, relayed, then RETR 1 scanned and delivered."""
    script.logged_in()
    for command, response in exchanges:
        script.exchange(command, response)
    scanned_clean(script, b"RETR 1\r\n", FIRST)


def test_a_message_deleted_in_any_spelling_is_not_fetched_ahead() -> None:
    script = Script(scanning=True, scan_ahead="top")
    first_after(script, LIST_ALL, (b"DELE 02\r\n", b"+OK marked\r\n"))  # 02 is message 2
    assert script.took_server() == b""
    assert script.layer.setup.no_peek == set()


def fetched_ahead_after_listing(script: Script) -> None:
    first_after(script, LIST_ALL)
    assert script.took_server() == b"RETR 2\r\n"
    script.server(retr_response(SECOND))
    (ahead,) = script.took()
    script.event(ScanDone(CLEAN, ahead.token))


def test_a_message_deleted_after_it_was_fetched_ahead_is_not_served_from_the_copy() -> None:
    script = Script(scanning=True, scan_ahead="retr")
    fetched_ahead_after_listing(script)
    script.exchange(b"DELE 2\r\n", b"+OK marked\r\n")
    script.exchange(b"RETR 2\r\n", b"-ERR Message is deleted.\r\n")  # the server answers


def test_a_copy_fetched_ahead_serves_any_spelling_of_its_number() -> None:
    script = Script(scanning=True, scan_ahead="retr")
    fetched_ahead_after_listing(script)
    script.client(b"RETR 002\r\n")
    assert script.took_client() == retr_response(SECOND)


def test_after_rset_the_listing_is_asked_for_again() -> None:
    script = Script(scanning=True, scan_ahead="retr")
    first_after(script, (b"DELE 2\r\n", b"+OK marked\r\n"),
                (b"LIST\r\n", listing(len(FIRST))),  # a listing leaves message 2 out
                (b"RSET\r\n", b"+OK\r\n"))
    assert script.took_server() == b"LIST\r\n"  # a listing of its own, with message 2


def test_without_a_listing_each_message_is_listed_alone() -> None:
    script = Script(scanning=True, scan_ahead="retr")
    after_first_retr(script)
    script.server(b"-ERR [SYS/TEMP] not now\r\n")
    assert script.took_server() == b"LIST 2\r\n"
    script.server(b"+OK 2 %d\r\n" % len(SECOND))
    assert script.took_server() == b"RETR 2\r\n"


def test_scanning_ahead_is_off_unless_configured() -> None:
    script = Script(scanning=True, scan_ahead="off")
    after_first = scanned_retr(script, FIRST, CLEAN)
    assert after_first == retr_response(FIRST)
    assert script.took_server() == b""


# scan_ahead = "top": the next message is peeked at, and the client's RETR still goes out

def peeked_ahead(script: Script) -> Scan:
    return scanned_ahead(script, b"TOP 2 %d\r\n" % len(SECOND))


def peeked_then_asked(script: Script, verdict: ScanResult | None) -> Scan:
    """Message 2 peeked at (with `verdict`, if any, in) and then asked for by the client."""
    scan = peeked_ahead(script)
    if verdict is not None:
        script.event(ScanDone(verdict, scan.token))
    script.client(b"RETR 2\r\n")
    assert script.took_server() == b"RETR 2\r\n"  # the server sees the client's own RETR
    return scan


def test_a_peeked_message_goes_on_as_the_server_sends_it_once_its_verdict_is_in() -> None:
    script = Script(scanning=True, scan_ahead="top")
    peeked_then_asked(script, CLEAN)
    response = retr_response(SECOND)
    script.server(response[:40])
    early = script.took_client()
    assert early and response.startswith(early)  # as it comes, before the end
    script.server(response[40:])
    assert early + script.took_client() == response
    assert not any(isinstance(c, Scan) for c in script.took())  # no second scan
    assert script.took_server() == b"TOP 3 %d\r\n" % THIRD_SIZE


def test_a_peeked_message_arrives_whole_and_byte_for_byte() -> None:
    script = Script(scanning=True, scan_ahead="top")
    peeked_then_asked(script, CLEAN)
    script.server(retr_response(SECOND), piece=3)
    assert script.took_client() == retr_response(SECOND)


def test_a_peeked_verdict_that_comes_during_the_transfer_starts_the_relay_there() -> None:
    script = Script(scanning=True, scan_ahead="top")
    scan = peeked_then_asked(script, None)
    response = retr_response(SECOND)
    script.server(response[:30])
    assert script.took_client() == b""  # no verdict yet: nothing
    script.event(ScanDone(CLEAN, scan.token))
    early = script.took_client()  # at once, not at the server's next bytes
    assert early == response[:30]
    script.server(response[30:], piece=5)
    assert early + script.took_client() == response
    assert script.took() == []


def test_a_peeked_relay_stops_reading_the_server_while_the_client_does_not_read() -> None:
    script = Script(scanning=True, scan_ahead="top", client_timeout=60.0)
    peeked_then_asked(script, CLEAN)
    script.server(retr_response(SECOND)[:40])
    assert script.took_client()
    script.event(ClientPaused())
    assert script.layer.forwarding  # the driver stops reading the server
    script.at(59.0)
    assert script.closed is None
    script.at(60.0)
    close = script.closed
    assert close is not None and close.error == "the client stopped reading"


def test_a_peeked_virus_is_replaced_once_the_servers_copy_matched() -> None:
    script = Script(scanning=True, scan_ahead="top")
    peeked_then_asked(script, VIRUS)
    script.server(retr_response(SECOND))
    assert script.took_client() == b""
    (stored,) = script.took()
    assert isinstance(stored, Quarantine) and stored.content == SECOND
    script.event(QuarantineDone("q-9"))
    got = script.took_client()
    assert got.startswith(b"+OK") and b"q-9" in got and b".dotted" not in got


def test_a_retr_that_differs_from_the_peeked_copy_is_scanned_itself() -> None:
    script = Script(scanning=True, scan_ahead="top")
    peeked = peeked_then_asked(script, None)
    other = message("second", b"two\r\nsomething else\r\n")
    script.server(retr_response(other))
    cancel, scan = script.took()
    assert cancel == CancelScan(peeked.token)
    assert isinstance(scan, Scan) and scan.content == other
    script.event(ScanDone(CLEAN, scan.token))
    assert script.took_client() == retr_response(other)
    assert script.layer.setup.no_peek == {("198.51.100.20", 110)}
    assert script.took_server() == b""  # not peeked at again


def test_a_retr_that_differs_after_a_clean_prefix_went_out_gets_the_rest_if_clean() -> None:
    script = Script(scanning=True, scan_ahead="top")
    peeked_then_asked(script, CLEAN)
    other = SECOND[:-5] + b"XXXXX" + b"more\r\n"
    response = retr_response(other)
    script.server(response[:25])
    sent = script.took_client()
    assert sent and response.startswith(sent)
    script.server(response[25:])
    (rescan,) = script.took()  # the copy's scan was done: nothing to cancel
    assert isinstance(rescan, Scan) and rescan.content == other
    script.event(ScanDone(CLEAN, rescan.token))
    assert sent + script.took_client() == response


def test_a_retr_that_differs_after_a_prefix_went_out_is_cut_off_if_not_clean() -> None:
    script = Script(scanning=True, scan_ahead="top")
    peeked_then_asked(script, CLEAN)
    response = retr_response(SECOND[:-5] + b"EICAR\r\n")
    script.server(response[:25])
    assert script.took_client()
    script.server(response[25:])
    (rescan,) = script.took()
    assert isinstance(rescan, Scan)
    script.event(ScanDone(VIRUS, rescan.token))
    assert not script.took_client().endswith(b".\r\n")
    close = script.closed
    assert close is not None and close.reply is None  # no final ".": a failed download
    assert "differed" in (close.error or "")


def test_a_peeked_message_waiting_for_its_verdict_is_kept_alive_like_any_other() -> None:
    script = Script(scanning=True, scan_ahead="top", keepalive_after=10.0,
                    keepalive_interval=10.0, scan_timeout=300.0)
    scan = peeked_then_asked(script, None)
    script.server(retr_response(SECOND))  # the same bytes; the verdict is not in yet
    for when in (10.0, 20.0, 30.0):
        script.at(when)
    early = script.took_client()
    assert early == b"+OK %d octets\r\n" % len(SECOND) + SECOND[:3]  # status and a byte, a byte
    script.event(ScanDone(CLEAN, scan.token))
    assert early + script.took_client() == retr_response(SECOND)


def test_a_differing_retr_past_max_scan_size_is_oversize_as_any_other() -> None:
    script = Script(scanning=True, scan_ahead="top", max_scan_size=1200)  # oversize: pass
    peeked = peeked_then_asked(script, None)
    other = SECOND + (b"y" * 70 + b"\r\n") * 20
    script.server(retr_response(other))
    assert CancelScan(peeked.token) in script.took()
    assert script.layer.setup.no_peek == {("198.51.100.20", 110)}
    assert script.took_client() == retr_response(other)  # relayed unscanned, as configured
    assert script.closed is None


def test_a_peeked_message_the_server_then_refuses_is_let_go() -> None:
    script = Script(scanning=True, scan_ahead="top")
    peeked = peeked_then_asked(script, None)
    script.server(b"-ERR no such message\r\n")
    assert script.took_client() == b"-ERR no such message\r\n"
    assert script.took() == [CancelScan(peeked.token)]
    script.event(ScanDone(CLEAN, peeked.token))  # late: kept by nobody
    assert script.layer._serving is None and script.layer._ahead is None


@pytest.mark.parametrize("reply", [b"-ERR [SYS/TEMP] busy\r\n", b"-ERR [in-use] locked\r\n"])
def test_a_transient_top_failure_does_not_end_peeking(reply: bytes) -> None:
    script = Script(scanning=True, scan_ahead="top")
    after_first_retr(script)
    script.server(MAILBOX)
    script.took_server()
    script.server(reply)
    assert script.layer.setup.no_peek == set()


def test_a_server_whose_top_fails_is_not_peeked_at_again() -> None:
    script = Script(scanning=True, scan_ahead="top")
    after_first_retr(script)
    script.server(MAILBOX)
    assert script.took_server() == b"TOP 2 %d\r\n" % len(SECOND)
    script.server(b"-ERR unknown command\r\n")
    assert script.layer.setup.no_peek == {("198.51.100.20", 110)}
    retrieved_unscanned_ahead(script)
    assert script.took_server() == b""


def test_a_message_longer_than_its_listed_size_is_not_kept_ahead() -> None:
    script = Script(scanning=True, scan_ahead="retr", max_scan_size=1000)
    after_first_retr(script)
    script.server(listing(len(FIRST), 500))
    assert script.took_server() == b"RETR 2\r\n"
    script.server(retr_response(message("long", (b"y" * 70 + b"\r\n") * 30)))
    assert script.took() == []  # nothing scanned, nothing kept
    script.client(b"RETR 2\r\n")
    assert script.took_server() == b"RETR 2\r\n"  # asked again


def test_a_copy_whose_scan_failed_is_scanned_again_when_the_client_asks() -> None:
    """A scanner that failed while the copy was scanned ahead (clamd restarting) gets the
    chance the RETR's own scan would have had: the client gets the message, not -ERR."""
    for mode in ("retr", "top"):
        script = Script(scanning=True, scan_ahead=mode)
        scan = scanned_ahead(script, b"RETR 2\r\n" if mode == "retr"
                             else b"TOP 2 %d\r\n" % len(SECOND))
        script.event(ScanDone(FAILED, scan.token))
        script.client(b"RETR 2\r\n")
        if mode == "top":
            assert script.took_server() == b"RETR 2\r\n"
            script.server(retr_response(SECOND))
        (again,) = [c for c in script.took() if isinstance(c, Scan)]
        assert again.content == SECOND and again.token != scan.token
        assert script.took_client() == b""
        script.event(ScanDone(CLEAN, again.token))
        assert script.took_client() == retr_response(SECOND), mode


def test_a_copy_whose_scan_timed_out_is_not_scanned_again() -> None:
    script = Script(scanning=True, scan_ahead="retr")
    scan = scanned_ahead(script)
    script.event(ScanDone(ScanResult("failed", reason="scan timed out", timed_out=True),
                          scan.token))
    script.client(b"RETR 2\r\n")
    assert not any(isinstance(c, Scan) for c in script.took())
    assert script.took_client().startswith(b"-ERR [SYS/TEMP]")


def test_the_second_scan_of_a_copy_ends_within_scan_timeout_of_the_client_s_retr() -> None:
    """A copy's scan that fails late (a scanner that refused at once beside one that took
    its time) leaves its second scan only what is left of scan_timeout since the client's
    RETR: the client never waits two timeouts. A failure at the deadline gets none."""
    script = Script(scanning=True, scan_ahead="retr")  # scan_timeout 120 s
    scan = scanned_ahead(script)
    script.client(b"RETR 2\r\n")  # at 0 s, while the copy is still being scanned
    script.at(119.0)
    script.took_client()  # the keep-alive's
    script.event(ScanDone(FAILED, scan.token))
    (again,) = [c for c in script.took() if isinstance(c, Scan)]
    script.at(120.0)
    assert CancelScan(again.token) in script.took()
    assert script.layer.finished  # past the status line: cut off, the message stays

    late = Script(scanning=True, scan_ahead="retr")
    scan = scanned_ahead(late)
    late.client(b"RETR 2\r\n")
    late.now = 120.0  # the failure comes just as the time is up
    late.event(ScanDone(FAILED, scan.token))
    assert not any(isinstance(c, Scan) for c in late.took())


def test_a_copy_scanned_again_that_fails_again_is_not_scanned_a_third_time() -> None:
    script = Script(scanning=True, scan_ahead="retr")
    scan = scanned_ahead(script)
    script.event(ScanDone(FAILED, scan.token))
    script.client(b"RETR 2\r\n")
    (again,) = [c for c in script.took() if isinstance(c, Scan)]
    script.event(ScanDone(FAILED, again.token))
    assert not any(isinstance(c, Scan) for c in script.took())
    assert script.took_client().startswith(b"-ERR [SYS/TEMP]")
