"""Fuzzing the POP3 codec (proxies.pop3.codec) in both directions, and the state checks
(proxies.pop3.states).

What must hold for any bytes a client sends: only `Command`, `SaslLine`, `Closed` or
NEED_DATA come out, or the documented RemoteProtocolError whose reply is one well-formed
-ERR line, after which reading goes on; the lines handed out are exactly the lines sent
(overlong ones dropped whole), however the bytes are cut into reads; an endless line costs a
bounded buffer. For any bytes a server sends: only `Status`, `BodyData`, `BodyEnd` and
`Closed`, or RemoteProtocolError with an -ERR reply; a multi-line body is handed out exactly
as sent (or unstuffed) up to the first line ".", however the reads fall. Stuffing and
unstuffing are inverse for any content.
"""

from __future__ import annotations

import re
import tracemalloc
from dataclasses import dataclass

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxies.pop3 import states
from proxies.pop3.codec import (
    NEED_DATA,
    SECRET_VERBS,
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
    multiline,
)
from proxies.pop3.errors import RemoteProtocolError
from tests.fuzz import inputs
from tests.fuzz.harness import (
    EXAMPLES,
    bounded,
    check_pop3_reply,
    corpus,
    every,
    fuzz_settings,
    split_at,
)

TARGET = "pop3_codec"
# For the campaign (bench/fuzz.py): the sources whose arcs it traces, and its mutation tokens.
COVERS = ("proxies/pop3/codec.py", "proxies/pop3/states.py")
TOKENS = (b"+OK ", b"-ERR ", b"+ ", b".\r\n", b"\r\n..", b"RETR 1\r\n", b"AUTH PLAIN\r\n",
          b"USER a\r\n", b"CAPA\r\n", b"<1.2@h>")
SMALL_LINE = 64
_VERB = re.compile(r"[A-Z][A-Z0-9-]{0,39}|\?|")


# --- the client side ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TooLong:
    """A RemoteProtocolError the reader raised (its reply checked)."""


def client_events(pieces: list[bytes], max_line: int) -> list[Command | SaslLine | TooLong]:
    reader = ClientReader(max_line)
    events: list[Command | SaslLine | TooLong] = []
    # An event per line and a NEED_DATA per read at most.
    budget = sum(len(p) for p in pieces) + len(pieces) + 10
    for piece in [*pieces, b""]:
        reader.receive_data(piece)
        while True:
            budget -= 1
            assert budget > 0, "events without input"
            try:
                event = reader.next_event()
            except RemoteProtocolError as exc:
                check_pop3_reply(exc.reply)
                events.append(TooLong())
                continue
            if event is NEED_DATA:
                assert reader.buffered < max_line
                break
            if isinstance(event, Closed):
                assert piece == b"", "Closed before the client closed"
                assert isinstance(reader.next_event(), Closed)
                return events
            assert isinstance(event, Command | SaslLine), event
            if isinstance(event, Command):
                check_command(event)
                if event.verb == "AUTH" and event.argument.strip():
                    reader.expect_sasl()    # the server's "+ " continuation came
            events.append(event)
    raise AssertionError("no Closed after the client closed")


def check_command(command: Command) -> None:
    assert _VERB.fullmatch(command.verb), command.verb
    assert command.raw.endswith(b"\n")
    if command.verb not in ("", "?"):
        assert command.raw[:len(command.verb)].upper() == command.verb.encode()
    # The log line never shows credentials.
    shown = command.loggable()
    if command.verb in SECRET_VERBS:
        assert shown.endswith("[hidden]"), shown
    for state in states.SessionState:
        try:
            states.check(state, command.verb)
        except RemoteProtocolError as exc:
            check_pop3_reply(exc.reply)
        for ok in (True, False):
            assert states.next_state(state, command.verb, ok) in states.SessionState


def lf_lines(data: bytes) -> list[bytes]:
    """`data` cut after each LF (bytes.splitlines would cut at a bare CR too)."""
    return [line for line in re.split(rb"(?<=\n)", data) if line]


def reference_lines(data: bytes, max_line: int) -> list[bytes | TooLong]:
    """What a client sent, line by line: each complete line, or TooLong for one longer than
    `max_line` octets with its LF, or unended at `max_line` octets (the rest is dropped)."""
    out: list[bytes | TooLong] = []
    for line in lf_lines(data):
        if not line.endswith(b"\n"):
            if len(line) >= max_line:
                out.append(TooLong())
            break                           # a last line without LF is never a command
        out.append(TooLong() if len(line) > max_line else line)
    return out


def check_client(data: bytes) -> None:
    for max_line in (SMALL_LINE, 8192):
        expected = reference_lines(data, max_line)
        for pieces in ([data], every(data, 1 if len(data) < 512 else 61)):
            events = client_events(pieces, max_line)
            got = [e if isinstance(e, TooLong) else e.raw for e in events]
            assert got == expected


# --- the server side ------------------------------------------------------------------------------

# What the driver sends, in order, and whether it asks for the body unstuffed.
COMMANDS = (b"CAPA", b"USER alice", b"PASS secret", b"STAT", b"LIST", b"RETR 1", b"TOP 1 0",
            b"UIDL 1", b"AUTH PLAIN", b"AUTH", b"XTND XMIT", b"RETR 2", b"QUIT")


def command(line: bytes) -> Command:
    verb, _, argument = line.partition(b" ")
    return Command(verb.decode(), argument, line + b"\r\n")


Event = Status | BodyData | BodyEnd | Closed | str


def server_events(pieces: list[bytes], commands: tuple[bytes, ...] = COMMANDS,
                  unstuff: bool = False) -> list[Event]:
    """The events for a greeting and the responses to `commands`, BodyData merged; a
    protocol error ends the list with its message."""
    reader = ServerReader()
    events: list[Event] = []
    queue = list(commands)
    budget = sum(len(p) for p in pieces) + len(pieces) + 20
    for piece in [*pieces, b""]:
        reader.receive_data(piece)
        while True:
            budget -= 1
            assert budget > 0, "events without input"
            try:
                event = reader.next_event()
            except RemoteProtocolError as exc:
                check_pop3_reply(exc.reply)
                events.append(exc.message)
                return events
            if event is NEED_DATA:
                break
            assert isinstance(event, Status | BodyData | BodyEnd | Closed), event
            if isinstance(event, BodyData) and events and isinstance(events[-1], BodyData):
                events[-1] = BodyData(events[-1].data + event.data)
            else:
                events.append(event)
            if isinstance(event, Closed):
                assert isinstance(reader.next_event(), Closed)
                return events
            if isinstance(event, Status):
                assert event.raw.endswith(b"\n") or piece == b""
                assert event.timestamp is None or event.greeting
            if reader.state == "idle" and queue:
                reader.expect(command(queue.pop(0)), unstuff=unstuff)
    raise AssertionError("no Closed after the server closed")


def reference_body(data: bytes) -> tuple[bytes, bool]:
    """The body of a multi-line response as sent (stuffed), up to the first line ".CRLF", and
    whether that terminator came (RFC 1939 3)."""
    body: list[bytes] = []
    for line in lf_lines(data):
        if line == b".\r\n":
            return b"".join(body), True
        body.append(line)
    return b"".join(body), False


def check_body(data: bytes) -> None:
    """`data` as what follows "+OK" to RETR: the body is handed out exactly."""
    stuffed, ended = reference_body(data)
    unstuffed = dot_unstuff(stuffed)
    tail = lf_lines(stuffed)[-1:]
    if not ended and tail in ([b"."], [b".\r"]):
        # Cut off by the close where the terminator may have begun: handed out as it came.
        unstuffed = dot_unstuff(stuffed[:-len(tail[0])]) + tail[0]
    wire = b"+OK ready\r\n+OK 3 octets\r\n" + data
    for unstuff in (False, True):
        for pieces in ([wire], every(wire, 1 if len(wire) < 512 else 61)):
            events = server_events(pieces, (b"RETR 1",), unstuff)
            assert isinstance(events[0], Status) and events[0].greeting
            assert isinstance(events[1], Status) and events[1].ok
            body = b"".join(e.data for e in events if isinstance(e, BodyData))
            assert body == (unstuffed if unstuff else stuffed)
            assert (BodyEnd() in events) == ended


def check_server(data: bytes) -> None:
    for unstuff in (False, True):
        whole = server_events([data], unstuff=unstuff)
        assert server_events(every(data, 1 if len(data) < 512 else 61), unstuff=unstuff) == whole


def check_stuffing(content: bytes, cuts: list[int]) -> None:
    assert dot_unstuff(dot_stuff(content)) == content
    stuffer = DotStuffer()
    wire = b"".join(stuffer.send(piece) for piece in split_at(content, cuts)) + stuffer.end()
    assert wire == multiline(b"", content)
    if content == b"" or content.endswith(b"\n"):
        # What a correct server sends reads back exactly.
        events = server_events([b"+OK\r\n+OK\r\n" + wire], (b"RETR 1",), unstuff=True)
        assert b"".join(e.data for e in events if isinstance(e, BodyData)) == content


def run(data: bytes) -> None:
    """The harness: `data` as a client's stream, as a server's, and as a message body."""
    EXAMPLES[TARGET] += 1
    check_client(data)
    check_server(data)
    check_body(data)
    check_stuffing(data, [1, 3, 7])


# --- hostile peers --------------------------------------------------------------------------------

CLIENT_LINES = (b"USER alice", b"PASS secret", b"APOP alice 0123456789abcdef", b"AUTH PLAIN",
                b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", b"*", b"STLS", b"CAPA", b"RETR 1",
                b"TOP 1 10", b"LIST", b"UIDL 1", b"DELE 1", b"QUIT", b"", b" ", b"1ABC",
                b"x" * 70, b"-ERR", b"\xff\xfe")
SERVER_LINES = (b"+OK POP3 ready <1896.697170952@dbc.mit.edu>", b"+OK", b"-ERR no",
                b"-ERR [SYS/TEMP] later", b"+ ", b"+", b"+ AGFi", b".", b"..", b".x", b"",
                b"+OK 2 messages", b"1 120", b"From: a", b"x" * 100, b"OK", b"+OKAY", b"\x00")


@st.composite
def client_streams(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 10))):
        line = draw(st.sampled_from(CLIENT_LINES).flatmap(inputs.odd_case) | inputs.noise
                    | inputs.long_line((63, 64, 65, 8191, 8192, 8193)))
        parts.append(line + draw(inputs.line_ends))
    return b"".join(parts)


@st.composite
def server_streams(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 14))):
        line = draw(st.sampled_from(SERVER_LINES) | inputs.noise
                    | st.just(inputs.TLS_RECORD) | inputs.long_line((8190, 8191, 8192)))
        parts.append(line + draw(inputs.line_ends))
    return b"".join(parts)


@fuzz_settings(150)
@given(client_streams())
@example(b"x" * 70 + b"\nNOOP\r\nSTAT\r\n")            # pipelined after an overlong line
def test_any_client_stream(data: bytes) -> None:
    EXAMPLES[TARGET] += 1
    check_client(data)


@fuzz_settings(150)
@given(server_streams())
@example(b"+OK hi\r\n+OK\r\n+OK\r\n+OK\r\n+OK 1 2\r\n+OK\r\n1 2\r\n.\r\n+OK\r\n..x\r\n.")
@example(b".\r")
def test_any_server_stream(data: bytes) -> None:
    EXAMPLES[TARGET] += 1
    check_server(data)
    check_body(data)


@fuzz_settings(150)
@given(server_streams() | st.binary(max_size=200), st.lists(st.integers(min_value=0),
                                                             max_size=10))
def test_stuffing_round_trips(content: bytes, cuts: list[int]) -> None:
    EXAMPLES[TARGET] += 1
    check_stuffing(content, cuts)


@pytest.mark.parametrize("data", corpus(TARGET))
def test_corpus(data: bytes) -> None:
    with bounded():
        run(data)


def test_an_endless_line_is_not_buffered() -> None:
    """A peer that never ends its line costs a bounded buffer on either side."""
    client, server = ClientReader(), ServerReader()
    errors = 0
    tracemalloc.start()
    try:
        for _ in range(256):
            client.receive_data(b"x" * 16384)
            try:
                while client.next_event() is not NEED_DATA:
                    pass
            except RemoteProtocolError:
                errors += 1
            assert client.next_event() is NEED_DATA and client.buffered == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} octets for a 4 MiB line"
    assert errors == 1          # one line, one error
    client.receive_data(b"\nNOOP\r\n")
    assert client.next_event() == Command("NOOP", b"", b"NOOP\r\n")
    server.receive_data(b"+OK" + b"x" * 16384)
    with pytest.raises(RemoteProtocolError):
        server.next_event()
