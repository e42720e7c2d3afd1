"""The sans-I/O POP3 codec: tables of bytes <-> events, and hypothesis for what no table covers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxies.pop3 import states
from proxies.pop3.codec import (
    NEED_DATA,
    BodyData,
    BodyEnd,
    ClientReader,
    Closed,
    Command,
    DotStuffer,
    SaslLine,
    ServerReader,
    Status,
    dot_stuff,
    dot_unstuff,
    is_multiline,
    multiline,
)
from proxies.pop3.errors import LocalProtocolError, RemoteProtocolError


def client_events(data: bytes, chunk: int | None = None) -> list[object]:
    reader = ClientReader()
    events: list[object] = []
    pieces = [data] if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    for piece in [*pieces, b""]:
        reader.receive_data(piece)
        while True:
            try:
                event = reader.next_event()
            except RemoteProtocolError as exc:
                events.append(exc.reply)
                continue
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, Closed):
                return events
    return events


def server_events(data: bytes, command: bytes | None, unstuff: bool = False,
                  chunk: int | None = None) -> list[object]:
    """Events for a greeting, then (if `command`) the response to it."""
    reader = ServerReader()
    events: list[object] = []
    pieces = [data] if chunk is None else [data[i:i + chunk] for i in range(0, len(data), chunk)]
    expected = False
    for piece in [*pieces, b""]:
        reader.receive_data(piece)
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, Closed):
                return events
            if isinstance(event, Status) and event.greeting and command and not expected:
                verb, _, arg = command.partition(b" ")
                reader.expect(Command(verb.decode().upper(), arg, command + b"\r\n"),
                              unstuff=unstuff)
                expected = True
    return events


def merged(events: list[object]) -> list[object]:
    """Adjacent BodyData joined (how content is split depends on chunking, not on meaning)."""
    out: list[object] = []
    for event in events:
        if isinstance(event, BodyData) and out and isinstance(out[-1], BodyData):
            out[-1] = BodyData(out[-1].data + event.data)
        else:
            out.append(event)
    return out


GREETING = b"+OK POP3 ready <1896.697170952@dbc.mtview.ca.us>\r\n"


# --- client side -------------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "expected"), [
    (b"USER bob\r\n", [Command("USER", b"bob", b"USER bob\r\n")]),
    (b"user bob\n", [Command("USER", b"bob", b"user bob\n")]),
    (b"RETR 1\r\nDELE 1\r\nQUIT\r\n", [Command("RETR", b"1", b"RETR 1\r\n"),
                                        Command("DELE", b"1", b"DELE 1\r\n"),
                                        Command("QUIT", b"", b"QUIT\r\n")]),
    (b"\r\n", [Command("", b"", b"\r\n")]),
    (b"\x00\xff junk\r\n", [Command("?", b"junk", b"\x00\xff junk\r\n")]),
    (b"XTND XMIT\r\n", [Command("XTND", b"XMIT", b"XTND XMIT\r\n")]),
    (b"QUIT", []),  # half a line, then EOF: nothing to answer
])
def test_client_commands(data: bytes, expected: list[object]) -> None:
    assert client_events(data) == [*expected, Closed()]
    assert client_events(data, chunk=1) == [*expected, Closed()]


def test_client_line_too_long_is_answered_and_skipped() -> None:
    events = client_events(b"NOOP " + b"x" * 9000 + b"\r\nQUIT\r\n", chunk=1000)
    assert isinstance(events[0], bytes) and events[0].startswith(b"-ERR line too long")
    assert events[1:] == [Command("QUIT", b"", b"QUIT\r\n"), Closed()]


def test_sasl_lines_are_not_commands() -> None:
    reader = ClientReader()
    reader.receive_data(b"dGVzdAB0ZXN0AHRlc3Q=\r\nQUIT\r\n")
    reader.expect_sasl()
    assert reader.next_event() == SaslLine(b"dGVzdAB0ZXN0AHRlc3Q=\r\n")
    assert reader.next_event() == Command("QUIT", b"", b"QUIT\r\n")


def test_credentials_are_not_loggable() -> None:
    for line in (b"PASS hunter2", b"USER bob", b"APOP bob c4c9334bac560ecc979e58001b3e22fb",
                 b"AUTH PLAIN AGJvYgBodW50ZXIy"):
        verb, _, arg = line.partition(b" ")
        text = Command(verb.decode(), arg, line + b"\r\n").loggable()
        assert arg.split()[-1].decode() not in text, text
    assert Command("RETR", b"1", b"RETR 1\r\n").loggable() == "RETR 1"


# --- server side -------------------------------------------------------------------------------

def test_greeting_with_apop_timestamp() -> None:
    (greeting, closed) = server_events(GREETING, None)
    assert isinstance(greeting, Status) and greeting.ok and greeting.greeting
    assert greeting.timestamp == b"<1896.697170952@dbc.mtview.ca.us>"
    assert closed == Closed()


@pytest.mark.parametrize(("command", "response", "unstuff", "expected"), [
    (b"STAT", b"+OK 2 320\r\n", False, [Status("ok", b"2 320", b"+OK 2 320\r\n")]),
    (b"LIST 9", b"-ERR no such message\r\n", False,
     [Status("err", b"no such message", b"-ERR no such message\r\n")]),
    (b"LIST", b"+OK 2 messages\r\n1 120\r\n2 200\r\n.\r\n", False,
     [Status("ok", b"2 messages", b"+OK 2 messages\r\n"), BodyData(b"1 120\r\n2 200\r\n"),
      BodyEnd()]),
    (b"UIDL", b"+OK\r\n.\r\n", False, [Status("ok", b"", b"+OK\r\n"), BodyEnd()]),
    (b"RETR 1", b"+OK\r\nA: b\r\n\r\n..dot\r\n...two\r\n.\r\n", True,
     [Status("ok", b"", b"+OK\r\n"), BodyData(b"A: b\r\n\r\n.dot\r\n..two\r\n"), BodyEnd()]),
    (b"RETR 1", b"+OK\r\nA: b\r\n\r\n..dot\r\n.\r\n", False,
     [Status("ok", b"", b"+OK\r\n"), BodyData(b"A: b\r\n\r\n..dot\r\n"), BodyEnd()]),
    (b"RETR 1", b"+OK\r\n..first\r\n.\r\n", True,
     [Status("ok", b"", b"+OK\r\n"), BodyData(b".first\r\n"), BodyEnd()]),
    (b"TOP 1 0", b"+OK\r\nA: b\r\n\r\n.\r\n", True,
     [Status("ok", b"", b"+OK\r\n"), BodyData(b"A: b\r\n\r\n"), BodyEnd()]),
    (b"CAPA", b"+OK\r\nTOP\r\nSTLS\r\n.\r\n", False,
     [Status("ok", b"", b"+OK\r\n"), BodyData(b"TOP\r\nSTLS\r\n"), BodyEnd()]),
    (b"AUTH PLAIN", b"+ \r\n", False, [Status("continue", b"", b"+ \r\n")]),
    (b"AUTH", b"+OK\r\nPLAIN\r\n.\r\n", False,
     [Status("ok", b"", b"+OK\r\n"), BodyData(b"PLAIN\r\n"), BodyEnd()]),
    (b"FOO", b"+OK whatever\r\n", False, [Status("ok", b"whatever", b"+OK whatever\r\n")]),
])
def test_server_responses(command: bytes, response: bytes, unstuff: bool,
                          expected: list[object]) -> None:
    for chunk in (None, 1, 3):
        events = merged(server_events(GREETING + response, command, unstuff, chunk))
        assert events[1:] == [*expected, Closed()], chunk


def test_server_garbage_is_a_remote_error_with_a_reply() -> None:
    reader = ServerReader()
    reader.receive_data(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_event()
    assert info.value.reply is not None and info.value.reply.startswith(b"-ERR [SYS/TEMP]")


def test_server_closing_mid_body_is_closed_not_end() -> None:
    events = merged(server_events(GREETING + b"+OK\r\nA: b\r\n\r\nhalf", b"RETR 1", True))
    assert events[-2:] == [BodyData(b"A: b\r\n\r\nhalf"), Closed()]
    assert BodyEnd() not in events


def test_server_talking_out_of_turn() -> None:
    reader = ServerReader()
    reader.receive_data(GREETING + b"+OK unasked\r\n")
    assert isinstance(reader.next_event(), Status)
    with pytest.raises(RemoteProtocolError):
        reader.next_event()


def test_expect_in_the_middle_of_a_body_is_a_local_error() -> None:
    reader = ServerReader()
    reader.receive_data(GREETING + b"+OK\r\npartial")
    reader.next_event()
    reader.expect(Command("RETR", b"1", b"RETR 1\r\n"))
    reader.next_event()
    with pytest.raises(LocalProtocolError):
        reader.expect(Command("NOOP", b"", b"NOOP\r\n"))


@pytest.mark.parametrize(("verb", "has_argument", "multi"), [
    ("RETR", True, True), ("TOP", True, True), ("CAPA", False, True), ("LIST", False, True),
    ("LIST", True, False), ("UIDL", False, True), ("UIDL", True, False), ("AUTH", False, True),
    ("AUTH", True, False), ("STAT", False, False), ("XYZZY", False, False),
])
def test_multiline_table(verb: str, has_argument: bool, multi: bool) -> None:
    assert is_multiline(verb, has_argument) is multi


# --- states ------------------------------------------------------------------------------------

def test_state_table() -> None:
    A, T, C = (states.SessionState.AUTHORIZATION, states.SessionState.TRANSACTION,
               states.SessionState.CLOSED)
    assert states.next_state(A, "PASS", True) is T
    assert states.next_state(A, "PASS", False) is A
    assert states.next_state(A, "USER", True) is A
    assert states.next_state(T, "QUIT", False) is C
    states.check(T, "RETR")
    states.check(A, "XTND")  # unknown: relayed
    with pytest.raises(RemoteProtocolError) as info:
        states.check(A, "RETR")
    assert info.value.reply == b"-ERR RETR is not valid in the AUTHORIZATION state\r\n"
    with pytest.raises(RemoteProtocolError):
        states.check(T, "STLS")


# --- dot-stuffing ------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "wire"), [
    (b"", b".\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
    (b"no end", b"no end\r\n.\r\n"),
])
def test_multiline_writing(content: bytes, wire: bytes) -> None:
    assert multiline(b"", content) == wire


contents = st.lists(st.sampled_from([b".", b"..", b"\r\n", b"\n", b"\r", b"a", b"x.y", b".\r\n",
                                     b"\r\n.\r\n"]), max_size=30).map(b"".join)


@given(contents, st.integers(1, 7))
@settings(max_examples=300, deadline=None)
def test_dot_stuffing_round_trips(content: bytes, chunk: int) -> None:
    """Content with CRLF line ends, stuffed and framed, reads back exactly (in any chunking)."""
    content = content.replace(b"\r", b"").replace(b"\n", b"\r\n")
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    assert dot_unstuff(dot_stuff(content)) == content
    stuffer = DotStuffer()
    wire = b"".join(stuffer.send(content[i:i + chunk]) for i in range(0, len(content), chunk))
    wire += stuffer.end()
    assert wire == dot_stuff(content) + b".\r\n"
    for unstuff in (True, False):
        events = merged(server_events(GREETING + b"+OK\r\n" + wire, b"RETR 1", unstuff, chunk))
        body = b"".join(e.data for e in events if isinstance(e, BodyData))
        assert body == (content if unstuff else dot_stuff(content))
        assert events[-2:] == [BodyEnd(), Closed()]


@given(st.binary(max_size=300), st.integers(1, 50))
@settings(max_examples=300, deadline=None)
def test_arbitrary_server_bytes_never_crash(data: bytes, chunk: int) -> None:
    for command in (b"RETR 1", b"AUTH PLAIN", b"CAPA", b"STAT"):
        reader = ServerReader()
        expected = False
        for piece in [data[i:i + chunk] for i in range(0, len(data), chunk)] + [b""]:
            reader.receive_data(piece)
            try:
                while (event := reader.next_event()) is not NEED_DATA:
                    if isinstance(event, Closed):
                        break
                    if isinstance(event, Status) and event.greeting and not expected:
                        verb, _, arg = command.partition(b" ")
                        reader.expect(Command(verb.decode(), arg, command + b"\r\n"))
                        expected = True
            except RemoteProtocolError as exc:
                assert exc.reply is not None and exc.reply.startswith(b"-ERR")
                break


@given(st.binary(max_size=300), st.integers(1, 50))
@settings(max_examples=300, deadline=None)
def test_arbitrary_client_bytes_never_crash(data: bytes, chunk: int) -> None:
    for event in client_events(data, chunk):
        assert isinstance(event, Command | SaslLine | Closed | bytes)
