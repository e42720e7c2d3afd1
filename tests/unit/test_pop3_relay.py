"""The relay of plain commands' responses, sans-I/O: the server's bytes in, the client's bytes
and what the session learns out. No sockets: each case is a table of server bytes, split
anywhere, and what must come of them."""

from __future__ import annotations

import base64

import pytest

from proxies.pop3.codec import ClientReader, Command, ServerReader, Status
from proxies.pop3.relay import (
    MAX_LEARNT,
    AuthExchange,
    RelayFailed,
    ResponseRelay,
    SessionFacts,
    client_capabilities,
    route,
)
from proxies.pop3.states import SessionState


def command(line: bytes) -> Command:
    reader = ClientReader()
    reader.receive_data(line)
    event = reader.next_event()
    assert isinstance(event, Command)
    return event


def connected() -> ServerReader:
    server = ServerReader()
    server.receive_data(b"+OK ready\r\n")
    server.next_event()
    return server


def started(line: bytes, facts: SessionFacts | None = None
            ) -> tuple[ServerReader, ResponseRelay]:
    """The server's reader and the relay, once `line` has gone to the server."""
    server = connected()
    cmd = command(line)
    server.expect(cmd)
    return server, ResponseRelay(cmd, server, facts or SessionFacts(SessionState.TRANSACTION))


def relay(line: bytes, response: bytes, facts: SessionFacts, chunk: int
          ) -> tuple[bytes, list[bool]]:
    """Feed `response` in pieces of `chunk` bytes; what went to the client, and `done` per
    step."""
    server, relaying = started(line, facts)
    out, dones = b"", []
    for start in range(0, len(response), chunk):
        server.receive_data(response[start:start + chunk])
        step = relaying.step()
        out += step.out
        dones.append(step.done)
    return out, dones


LISTING = b"+OK 3 messages\r\n1 120\r\n2 5000\r\n..3 dotted\r\n.\r\n"
UIDL = b"+OK\r\n1 uid-one\r\n2 uid-two\r\n3 uid-three\r\n.\r\n"


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_a_listing_passes_unchanged_and_is_done_only_at_its_end(chunk: int) -> None:
    facts = SessionFacts(SessionState.TRANSACTION)
    out, dones = relay(b"LIST\r\n", LISTING, facts, chunk)
    assert out == LISTING  # stuffed lines stay stuffed: the client unstuffs them
    assert dones[-1] and not any(dones[:-1])
    assert facts.state is SessionState.TRANSACTION


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_uidl_listing_is_learnt_across_any_split(chunk: int) -> None:
    facts = SessionFacts(SessionState.TRANSACTION)
    out, _ = relay(b"UIDL\r\n", UIDL, facts, chunk)
    assert out == UIDL
    assert facts.uidls == {b"1": b"uid-one", b"2": b"uid-two", b"3": b"uid-three"}


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_a_list_listing_teaches_every_size(chunk: int) -> None:
    facts = SessionFacts(SessionState.TRANSACTION)
    relay(b"LIST\r\n", b"+OK 2 messages\r\n1 120\r\n2 5000\r\n.\r\n", facts, chunk)
    assert facts.sizes == {b"1": 120, b"2": 5000} and facts.listed


def test_listings_teach_canonical_numbers_and_at_most_max_learnt() -> None:
    facts = SessionFacts(SessionState.TRANSACTION)
    lines = b"".join(b"%d 100\r\n" % n for n in range(1, MAX_LEARNT + 2))
    relay(b"LIST\r\n", b"+OK\r\n" + lines + b".\r\n", facts, 4096)
    assert len(facts.sizes) == MAX_LEARNT and not facts.listed  # the rest: one by one
    relay(b"UIDL 007\r\n", b"+OK 007 uid-seven\r\n", facts, 100)
    assert facts.uidls == {b"7": b"uid-seven"}


def test_dele_and_rset_teach_what_is_deleted() -> None:
    facts = SessionFacts(SessionState.TRANSACTION)
    relay(b"LIST 2\r\n", b"+OK 2 5000\r\n", facts, 100)
    assert facts.sizes == {b"2": 5000} and not facts.listed
    relay(b"DELE 02\r\n", b"+OK marked\r\n", facts, 100)
    relay(b"DELE 9\r\n", b"-ERR no such message\r\n", facts, 100)
    assert facts.deleted == {b"2"}
    relay(b"RSET\r\n", b"+OK\r\n", facts, 100)
    assert facts.deleted == set()


def test_a_single_uidl_is_learnt_from_its_status_line() -> None:
    facts = SessionFacts(SessionState.TRANSACTION)
    relay(b"UIDL 2\r\n", b"+OK 2 uid-two\r\n", facts, 100)
    assert facts.uidls == {b"2": b"uid-two"}


def test_user_and_pass_make_the_user_and_the_transaction_state() -> None:
    facts = SessionFacts()
    relay(b"USER alice\r\n", b"+OK\r\n", facts, 100)
    assert facts.user is None and facts.pending_user == "alice"
    relay(b"PASS wrong\r\n", b"-ERR [AUTH] no\r\n", facts, 100)
    assert facts.user is None and facts.state is SessionState.AUTHORIZATION
    relay(b"PASS secret\r\n", b"+OK logged in\r\n", facts, 100)
    assert facts.user == "alice" and facts.state is SessionState.TRANSACTION


def test_quit_closes_whatever_the_server_says() -> None:
    facts = SessionFacts(SessionState.TRANSACTION)
    out, dones = relay(b"QUIT\r\n", b"-ERR some deleted messages not removed\r\n", facts, 100)
    assert dones == [True] and out.startswith(b"-ERR")
    assert facts.state is SessionState.CLOSED


@pytest.mark.parametrize(("line", "data", "reply"), [
    # closed before anything was relayed; not a status line
    (b"LIST\r\n", b"", b"-ERR [SYS/TEMP] the mail server closed the connection\r\n"),
    (b"STAT\r\n", b"HTTP/1.1 400 Bad Request\r\n",
     b"-ERR [SYS/TEMP] the mail server sent an invalid reply\r\n"),
], ids=["gone", "garbage"])
def test_a_server_failing_before_anything_was_relayed_gets_the_client_an_err(
        line: bytes, data: bytes, reply: bytes) -> None:
    server, relaying = started(line)
    server.receive_data(data)
    with pytest.raises(RelayFailed) as caught:
        relaying.step()
    assert caught.value.reply == reply


def test_a_server_gone_mid_listing_ends_with_no_reply_and_no_final_dot() -> None:
    # Once part of the response is the client's, a -ERR would read as more listing: all it
    # can get is a closed connection without the final ".".
    server, relaying = started(b"LIST\r\n")
    server.receive_data(b"+OK\r\n1 120\r\n")
    assert relaying.step().out == b"+OK\r\n1 120\r\n"
    server.receive_data(b"")
    with pytest.raises(RelayFailed) as caught:
        relaying.step()
    assert caught.value.reply is None


# --- what becomes of a client's command -------------------------------------------------------

A, T = SessionState.AUTHORIZATION, SessionState.TRANSACTION
SCANNED = frozenset({"RETR"})


@pytest.mark.parametrize(("state", "line", "action", "unknown"), [
    (A, b"USER alice\r\n", "relay", False),
    (A, b"CAPA\r\n", "capa", False),
    (A, b"STLS\r\n", "stls", False),
    (A, b"AUTH PLAIN\r\n", "auth", False),
    (A, b"AUTH\r\n", "relay", False),  # the mechanism list
    (A, b"QUIT\r\n", "relay", False),
    (A, b"RETR 1\r\n", "reply", False),  # not before authentication
    (T, b"RETR 1\r\n", "fetch", False),  # scanned
    (T, b"TOP 1 10\r\n", "relay", False),  # not scanned unless scan_top
    (T, b"LIST\r\n", "relay", False),
    (T, b"STLS\r\n", "reply", False),  # RFC 2595 4: only before authentication
    (T, b"XTND XMIT\r\n", "relay", True),  # an extension: relayed, counted
    (T, b"?\r\n", "relay", True),
])
def test_each_command_has_one_route(state: SessionState, line: bytes, action: str,
                                    unknown: bool) -> None:
    decision = route(command(line), state, SCANNED)
    assert (decision.action, decision.unknown) == (action, unknown)
    if action == "reply":
        assert decision.reply.startswith(b"-ERR ")


def test_an_empty_line_is_answered_by_the_proxy() -> None:
    assert route(command(b"\r\n"), T, SCANNED).reply == b"-ERR empty command\r\n"


def test_top_is_fetched_when_it_is_scanned_too() -> None:
    assert route(command(b"TOP 1 10\r\n"), T, frozenset({"RETR", "TOP"})).action == "fetch"


# --- the CAPA list the client sees ------------------------------------------------------------

SERVER_CAPA = b"TOP\r\nUIDL\r\nSTLS\r\nSASL PLAIN\r\nPIPELINING\r\n"


@pytest.mark.parametrize(("mode", "offer", "want"), [
    ("passthrough", False, SERVER_CAPA),  # end-to-end TLS: the server's own list
    ("terminate", True, b"TOP\r\nUIDL\r\nSASL PLAIN\r\nPIPELINING\r\nSTLS\r\n"),
    ("terminate", False, b"TOP\r\nUIDL\r\nSASL PLAIN\r\nPIPELINING\r\n"),  # e.g. after STLS
    ("strip", False, b"TOP\r\nUIDL\r\nSASL PLAIN\r\nPIPELINING\r\n"),
])
def test_capa_offers_stls_only_where_the_proxy_can_keep_the_promise(
        mode: str, offer: bool, want: bytes) -> None:
    assert client_capabilities(SERVER_CAPA, mode, offer) == want


def test_capa_drops_blank_lines_and_any_spelling_of_stls() -> None:
    assert client_capabilities(b"USER\r\n\r\nstls\r\n  \r\nTOP\r\n", "strip", False) == \
        b"USER\r\nTOP\r\n"


# --- AUTH ---------------------------------------------------------------------------------------


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def status(line: bytes) -> Status:
    server = connected()
    server.expect(command(b"AUTH PLAIN\r\n"))
    server.receive_data(line)
    event = server.next_event()
    assert isinstance(event, Status)
    return event


@pytest.mark.parametrize(("line", "responses", "user"), [
    (b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n", [], "alice"),  # initial response
    (b"AUTH PLAIN\r\n", [b64(b"admin\0alice\0secret")], "alice"),  # the authcid, not authzid
    (b"AUTH LOGIN\r\n", [b64(b"alice"), b64(b"secret")], "alice"),  # the first response only
    (b"AUTH CRAM-MD5\r\n", [b64(b"alice 0123456789abcdef")], None),  # nothing we can read
    (b"AUTH PLAIN\r\n", [b"not base64!"], None),
])
def test_auth_learns_the_user_once_the_server_says_ok(line: bytes, responses: list[bytes],
                                                      user: str | None) -> None:
    facts = SessionFacts()
    exchange = AuthExchange(command(line), facts)
    for response in responses:
        exchange.client_line(response)
    assert facts.user is None  # nothing is believed before the server's +OK
    exchange.finished(status(b"+OK logged in\r\n"))
    assert facts.user == user and facts.state is SessionState.TRANSACTION


def test_failed_auth_teaches_nothing() -> None:
    facts = SessionFacts()
    exchange = AuthExchange(command(b"AUTH PLAIN " + b64(b"\0alice\0wrong") + b"\r\n"), facts)
    exchange.finished(status(b"-ERR [AUTH] authentication failed\r\n"))
    assert facts.user is None and facts.state is SessionState.AUTHORIZATION
