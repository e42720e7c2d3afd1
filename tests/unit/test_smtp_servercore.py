"""The sans-I/O SMTP server core: tables of bytes <-> replies and events, scripted
conversations, and properties. No sockets: a tiny driver below answers every event."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxies.smtp.addresses import parse_path
from proxies.smtp.dataframe import dot_stuff, find_bare_line_endings
from proxies.smtp.reply import ReplyReader
from proxies.smtp.servercore import (
    NEED_DATA,
    CloseConnection,
    Command,
    DataStart,
    Ehlo,
    Help,
    LocalProtocolError,
    Mail,
    MessageReceived,
    Noop,
    Quit,
    Rcpt,
    Refused,
    Reply,
    Rset,
    ServerCore,
    ServerEvent,
    ServerLimits,
    StartTlsRequest,
    TlsHandshake,
    Vrfy,
)

CI = settings(max_examples=200, deadline=None)

HOST = "mx.example"
LIMIT = 102400
QUEUED = Reply(250, "2.0.0", "Ok: queued as 1")
EHLO_REPLY = (b"250-mx.example\r\n250-SIZE 102400\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
              b"250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
EHLO_TLS_REPLY = (b"250-mx.example\r\n250-SIZE 102400\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                  b"250-STARTTLS\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n")
GREETING = b"220 mx.example ESMTP mailgate\r\n"
MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
OK = b"250 2.0.0 OK\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED_WIRE = b"250 2.0.0 Ok: queued as 1\r\n"
SYNTAX_MAIL = b"501 5.5.4 Syntax: MAIL FROM: <address> [SP <mail-parameters>]\r\n"
SYNTAX_RCPT = b"501 5.5.4 Syntax: RCPT TO: <address> [SP <mail-parameters>]\r\n"
BAD_SENDER = b"501 5.1.7 Bad sender address syntax\r\n"
BAD_RECIPIENT = b"501 5.1.3 Bad recipient address syntax\r\n"
BAD_SYNTAX = b"500 5.5.2 Error: bad syntax\r\n"
TOO_LONG = b"500 5.5.2 Command line too long\r\n"
NEED_HELO = b"503 5.5.1 Error: send HELO first\r\n"
NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
NEED_RCPT = b"503 5.5.1 Error: need RCPT command\r\n"


# --- a driver that answers everything ------------------------------------------------------------

Answer = Callable[[Command | MessageReceived], Reply]


def default_answer(event: Command | MessageReceived) -> Reply:
    return QUEUED if isinstance(event, MessageReceived) else event.reply


@dataclass
class Transcript:
    written: list[bytes] = field(default_factory=list)     # one entry per send()
    events: list[ServerEvent] = field(default_factory=list)  # without NEED_DATA

    @property
    def wire(self) -> bytes:
        return b"".join(self.written)

    @property
    def last(self) -> ServerEvent:
        return self.events[-1]


def talk(core: ServerCore, data: bytes | Sequence[bytes], answer: Answer = default_answer,
         transcript: Transcript | None = None) -> Transcript:
    """Feed `data` (one chunk, or the chunks given) and answer every event until the core
    needs more; stops at TlsHandshake and CloseConnection."""
    transcript = transcript or Transcript()
    chunks = [data] if isinstance(data, bytes) else data
    for chunk in chunks:
        core.receive_data(chunk)
        while True:
            event = core.next_event()
            if event is NEED_DATA:
                break
            transcript.events.append(event)
            if isinstance(event, TlsHandshake | CloseConnection):
                return transcript
            assert isinstance(event, Command | MessageReceived)
            transcript.written.append(core.send(answer(event)))
    return transcript


def limits(**changes: int | None) -> ServerLimits:
    values: dict[str, int | None] = {"max_message_size": LIMIT, **changes}
    return ServerLimits(**values)  # type: ignore[arg-type]


def greeted(tls: bool = False, /, **changes: int | None) -> ServerCore:
    core = ServerCore(HOST, limits=limits(**changes), tls_available=tls)
    assert core.send(core.greeting_reply) == GREETING
    return core


def ready(tls: bool = False, /, **changes: int | None) -> ServerCore:
    core = greeted(tls, **changes)
    expected = EHLO_TLS_REPLY if tls else EHLO_REPLY
    size = changes.get("max_message_size", LIMIT)
    expected = expected.replace(b"SIZE 102400", b"SIZE %d" % size if size else b"SIZE")
    assert talk(core, b"EHLO client.example\r\n").wire == expected
    return core


def in_mail(**changes: int | None) -> ServerCore:
    core = ready(**changes)
    assert talk(core, b"MAIL FROM:<a@sender.example>\r\n").wire == MAIL_OK
    return core


def in_rcpt(**changes: int | None) -> ServerCore:
    core = in_mail(**changes)
    assert talk(core, b"RCPT TO:<alice@example.com>\r\n").wire == RCPT_OK
    return core


def replies(wire: bytes) -> list[Reply]:
    reader = ReplyReader()
    reader.receive_data(wire)
    out = []
    while (reply := reader.next_reply()) is not None:
        out.append(reply)
    assert not reader.has_data
    return out


# --- one command, one reply: tables --------------------------------------------------------------

# Before EHLO/HELO.
GREETED_TABLE = [
    (b"MAIL FROM:<a@sender.example>", NEED_HELO),
    (b"RCPT TO:<alice@example.com>", NEED_HELO),
    (b"DATA", NEED_HELO),
    (b"STARTTLS", b"503 5.5.1 Error: send EHLO first\r\n"),
    (b"NOOP", OK),
    (b"RSET", OK),
    (b"EHLO", b"501 5.5.4 Syntax: EHLO hostname\r\n"),
    (b"HELO", b"501 5.5.4 Syntax: HELO hostname\r\n"),
    (b"HELO client.example", b"250 mx.example\r\n"),
    (b"QUIT", b"221 2.0.0 Bye\r\n"),
]

# After EHLO, no transaction: the lab's junk list (tests/lab/test_smtp_policy.py) and more.
READY_TABLE = [
    (b"FOO", b'500 5.5.2 Error: command "FOO" not recognized\r\n'),
    (b"MAIL FROM:<a@sender.example", BAD_SENDER),
    (b"RCPT TO:<alice@example.com>", NEED_MAIL),
    (b"DATA", NEED_RCPT),
    (b"DATA now", NEED_RCPT),                       # sequence before syntax
    (b"MAIL FROM:<a@sender.example> BODY=BINARYMIME",
     b"501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME\r\n"),
    (b"MAIL FROM:<a@sender.example> BODY",
     b"501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME\r\n"),
    (b"MAIL FROM:<a@sender.example> SIZE=lots", SYNTAX_MAIL),
    (b"MAIL FROM:<a@sender.example> SIZE", SYNTAX_MAIL),
    (b"MAIL FROM:<a@sender.example> SIZE=1 SIZE=2", SYNTAX_MAIL),
    (b"MAIL FROM:<a@sender.example> =x", SYNTAX_MAIL),
    (b"MAIL FROM:<a@sender.example>SIZE=1", SYNTAX_MAIL),
    (b"MAIL FROM:<a@sender.example> FOO=BAR",
     b"555 5.5.4 MAIL FROM parameters not recognized or not implemented\r\n"),
    (b"MAIL FROM:<a@sender.example> SMTPUTF8=yes",
     b"501 5.5.4 Error: SMTPUTF8 takes no arguments\r\n"),
    (b"MAIL FROM:<a@sender.example> SIZE=200000",
     b"552 5.3.4 Error: message size exceeds fixed maximum message size\r\n"),
    (b"MAIL TO:<a@sender.example>", SYNTAX_MAIL),
    (b"MAIL", SYNTAX_MAIL),
    (b"MAIL FROM:", SYNTAX_MAIL),
    (b"MAIL FROM:<a@@sender.example>", BAD_SENDER),
    (b"MAIL FROM:<a@sender.example.>", BAD_SENDER),
    (b"MAIL FROM:<\xc3\x28@sender.example>", BAD_SENDER),
    ("MAIL FROM:<ü@sender.example>".encode(),
     b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n"),
    (b"HELO", b"501 5.5.4 Syntax: HELO hostname\r\n"),
    (b"EHLO", b"501 5.5.4 Syntax: EHLO hostname\r\n"),
    (b"\xff\xfe\x00\x01", BAD_SYNTAX),
    (b"", BAD_SYNTAX),
    (b"NOOP\x00", BAD_SYNTAX),
    (b"NOOP \x1b[2J", BAD_SYNTAX),
    (b"MAIL\tFROM:<a@sender.example>", BAD_SYNTAX),
    (b"AUTH PLAIN AGFkbWluAHNlY3JldA==", b"502 5.5.1 AUTH not implemented\r\n"),
    (b"BDAT 10 LAST", b"502 5.5.1 BDAT not implemented\r\n"),
    (b"EXPN staff", b"502 5.5.1 EXPN not implemented\r\n"),
    (b"STARTTLS now", b"501 5.5.4 Syntax: STARTTLS\r\n"),
    (b"STARTTLS", b"454 4.7.0 TLS not available\r\n"),       # no certificate
    (b"VRFY", b"501 5.5.4 Syntax: VRFY <address>\r\n"),
    (b"VRFY alice@example.com",
     b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"),
    (b"RCPT TO:", NEED_MAIL),
    (b"RSET now", b"501 5.5.4 Syntax: RSET\r\n"),
    (b"QUIT now", b"501 5.5.4 Syntax: QUIT\r\n"),
    (b"NOOP", OK),
    (b"noop with an ignored argument", OK),
    (b"RSET", OK),
    (b"HELP", b"250 2.0.0 Supported commands: DATA EHLO HELO HELP MAIL NOOP QUIT RCPT RSET "
              b"VRFY\r\n"),
    (b"HELP rcpt", b"250 2.0.0 Syntax: RCPT TO: <address> [SP <mail-parameters>]\r\n"),
    (b"HELP nosuch", b"501 5.5.4 Supported commands: DATA EHLO HELO HELP MAIL NOOP QUIT RCPT "
                     b"RSET VRFY\r\n"),
    (b"NOOP " + b"x" * 600, TOO_LONG),
    (b"MAIL FROM:<" + b"a" * 600 + b"@sender.example>", TOO_LONG),
    (b"MAIL FROM:<>", MAIL_OK),
    (b"mail from: <a@sender.example>", MAIL_OK),
    (b"MAIL FROM:a@sender.example", MAIL_OK),
    (b"MAIL FROM:<@relay.example:a@sender.example>", MAIL_OK),  # routes are policy's call
    (b"MAIL FROM:<a@sender.example> size=10 body=8bitmime", MAIL_OK),
    ("MAIL FROM:<ü@sender.example> SMTPUTF8".encode(), MAIL_OK),
    (b'MAIL FROM:<"a> b"@sender.example> SIZE=10', MAIL_OK),
]

# In a transaction (MAIL accepted).
MAIL_TABLE = [
    (b"MAIL FROM:<b@sender.example>", b"503 5.5.1 Error: nested MAIL command\r\n"),
    (b"STARTTLS", b"503 5.5.1 Error: MAIL transaction in progress\r\n"),
    (b"DATA", NEED_RCPT),
    (b"RCPT TO:<>", BAD_RECIPIENT),
    (b"RCPT TO:<alice@example.com", BAD_RECIPIENT),
    (b"RCPT TO:<alice@exa mple.com>", BAD_RECIPIENT),
    (b"RCPT TO:", SYNTAX_RCPT),
    (b"RCPT FROM:<alice@example.com>", SYNTAX_RCPT),
    (b"RCPT TO:<alice@example.com> NOTIFY=NEVER",
     b"555 5.5.4 RCPT TO parameters not recognized or not implemented\r\n"),
    (b"RCPT TO:<alice@example.com> =x", SYNTAX_RCPT),
    ("RCPT TO:<ü@example.com>".encode(),
     b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n"),
    (b"RCPT TO:<alice@example.com>", RCPT_OK),
    (b"RCPT TO:<Postmaster>", RCPT_OK),            # policy answers 504 for it
    (b"RCPT TO:<@relay.example:alice@example.com>", RCPT_OK),
]


@pytest.mark.parametrize(("line", "expected"), GREETED_TABLE)
def test_before_hello(line: bytes, expected: bytes) -> None:
    assert talk(greeted(), line + b"\r\n").wire == expected


@pytest.mark.parametrize(("line", "expected"), READY_TABLE)
def test_after_ehlo(line: bytes, expected: bytes) -> None:
    core = ready()
    assert talk(core, line + b"\r\n").wire == expected
    # Still in step: the next command gets its own reply.
    assert talk(core, b"NOOP\r\n").wire == OK


@pytest.mark.parametrize(("line", "expected"), MAIL_TABLE)
def test_in_transaction(line: bytes, expected: bytes) -> None:
    core = in_mail()
    assert talk(core, line + b"\r\n").wire == expected


def test_the_lab_junk_list_gets_5xx_with_enhanced_codes_and_the_session_goes_on() -> None:
    # tests/lab/test_smtp_policy.py's JUNK, each followed by NOOP, within the default limits.
    junk = [b"FOO", b"MAIL FROM:<a@sender.example", b"RCPT TO:<alice@example.com>", b"DATA",
            b"MAIL FROM:<a@sender.example> BODY=BINARYMIME",
            b"MAIL FROM:<a@sender.example> SIZE=lots", b"MAIL FROM:<a@sender.example> FOO=BAR",
            b"MAIL TO:<a@sender.example>", b"HELO", b"EHLO", b"\xff\xfe\x00\x01", b"",
            b"AUTH PLAIN AGFkbWluAHNlY3JldA==", b"STARTTLS now", b"VRFY",
            b"MAIL FROM:<\xc3\x28@sender.example>", b"RCPT TO:"]
    core = ServerCore(HOST, limits=ServerLimits(max_message_size=LIMIT))
    core.send(core.greeting_reply)
    talk(core, b"EHLO client.example\r\n")
    for line in junk:
        wire = talk(core, line + b"\r\n").wire
        assert re.match(rb"^5\d\d 5\.\d+\.\d+ ", wire), (line, wire)
        assert talk(core, b"NOOP\r\n").wire == OK, line
    assert talk(core, b"QUIT\r\n").wire == b"221 2.0.0 Bye\r\n"


def test_enhanced_codes_on_every_reply_but_greeting_and_hello() -> None:
    # RFC 2034 3, and the lab's test_ehlo_and_enhanced_status_codes.
    core = ready()
    commands = [b"NOOP", b"RSET", b"VRFY alice@example.com", b"HELP",
                b"MAIL FROM:<a@sender.example>", b"RCPT TO:<alice@example.com>", b"RSET",
                b"EXPN staff", b"QUIT"]
    wire = talk(core, b"".join(c + b"\r\n" for c in commands)).wire
    for line in wire.split(b"\r\n")[:-1]:
        match = re.match(rb"^(\d)\d\d[ -](\d)\.\d{1,3}\.\d{1,3} ", line)
        assert match and match.group(1) == match.group(2), line


# --- events --------------------------------------------------------------------------------------

EVENT_TABLE: list[tuple[bytes, ServerEvent]] = [
    (b"NOOP hello there", Noop(reply=Reply(250, "2.0.0", "OK"), argument="hello there")),
    (b"RSET", Rset(reply=Reply(250, "2.0.0", "OK"))),
    (b"VRFY alice", Vrfy(reply=Reply(252, "2.0.0", "Cannot VRFY user, but will accept message "
                                                   "and attempt delivery"), argument="alice")),
    (b"HELP mail", Help(reply=Reply(250, "2.0.0", "Syntax: MAIL FROM: <address> "
                                                  "[SP <mail-parameters>]"), topic="mail")),
    (b"QUIT", Quit(reply=Reply(221, "2.0.0", "Bye"))),
    (b"MAIL FROM:<a@Sender.Example> SIZE=100 BODY=8bitmime SMTPUTF8",
     Mail(reply=Reply(250, "2.1.0", "Ok"), path="a@Sender.Example",
          address=parse_path("<a@Sender.Example>"),
          options=("SIZE=100", "BODY=8BITMIME", "SMTPUTF8"), size=100, body="8BITMIME",
          smtputf8=True)),
    (b"MAIL FROM:<>", Mail(reply=Reply(250, "2.1.0", "Ok"), path="",
                           address=parse_path("<>", null_ok=True))),
    (b"MAIL FROM: a@sender.example",
     Mail(reply=Reply(250, "2.1.0", "Ok"), path="a@sender.example",
          address=parse_path("a@sender.example"))),
    (b"FOO bar", Refused(reply=Reply(500, "5.5.2", 'Error: command "FOO" not recognized'),
                         command="FOO", reason="unknown command FOO")),
    (b"RCPT TO:<alice@example.com>",
     Refused(reply=Reply(503, "5.5.1", "Error: need MAIL command"), command="RCPT",
             reason="RCPT out of sequence in state ready")),
]


@pytest.mark.parametrize(("line", "expected"), EVENT_TABLE)
def test_events(line: bytes, expected: ServerEvent) -> None:
    core = ready()
    core.receive_data(line + b"\r\n")
    assert core.next_event() == expected


def test_ehlo_event_and_one_write_for_the_multi_line_reply() -> None:
    core = greeted()
    core.receive_data(b"EHLO client.example\r\n")
    event = core.next_event()
    assert isinstance(event, Ehlo) and event.name == "client.example"
    wire = core.send(event.reply)
    assert wire == EHLO_REPLY   # one bytes object: one write, one TCP segment
    (reply,) = replies(wire)
    assert reply.lines[1:] == ["SIZE 102400", "8BITMIME", "SMTPUTF8", "PIPELINING",
                               "ENHANCEDSTATUSCODES"]
    assert core.extended and core.hello_name == "client.example"
    assert core.offered == {"SIZE", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"}


def test_rcpt_event_and_the_transaction_it_builds() -> None:
    core = in_mail()
    core.receive_data(b"RCPT TO:<Alice@Example.COM>\r\n")
    event = core.next_event()
    assert event == Rcpt(reply=Reply(250, "2.1.5", "Ok"), path="Alice@Example.COM",
                         address=parse_path("<Alice@Example.COM>"))
    core.send(event.reply)
    assert core.sender == parse_path("<a@sender.example>")
    assert core.recipients == (parse_path("<Alice@Example.COM>"),)


# --- the reply decides the transition ------------------------------------------------------------

def refuse(code: int, enhanced: str | None, text: str, kinds: tuple[type, ...]) -> Answer:
    def answer(event: Command | MessageReceived) -> Reply:
        if isinstance(event, kinds):
            return Reply(code, enhanced, text)
        return default_answer(event)
    return answer


def test_mail_refused_starts_no_transaction() -> None:
    core = ready()
    answer = refuse(550, "5.7.1", "Sender rejected", (Mail,))
    wire = talk(core, b"MAIL FROM:<spam@sender.example>\r\nRCPT TO:<alice@example.com>\r\n",
                answer).wire
    assert wire == b"550 5.7.1 Sender rejected\r\n" + NEED_MAIL
    assert talk(core, b"MAIL FROM:<a@sender.example>\r\n").wire == MAIL_OK


def test_only_accepted_recipients_count_and_reach_the_message() -> None:
    core = in_mail()
    def answer(event: Command | MessageReceived) -> Reply:
        if isinstance(event, Rcpt) and event.address.domain != "example.com":
            return Reply(554, "5.7.1", f"<{event.path}>: Relay access denied")
        return default_answer(event)
    wire = talk(core, b"RCPT TO:<x@foreign.example>\r\nDATA\r\n", answer).wire
    assert wire == b"554 5.7.1 <x@foreign.example>: Relay access denied\r\n" + NEED_RCPT
    transcript = talk(core, b"RCPT TO:<alice@example.com>\r\nRCPT TO:<y@foreign.example>\r\n"
                            b"DATA\r\nhi\r\n.\r\n", answer)
    message = transcript.last
    assert isinstance(message, MessageReceived)
    assert [r.path for r in message.recipients] == ["alice@example.com"]
    assert message.mail.path == "a@sender.example" and message.content == b"hi\r\n"


def test_data_refused_reads_no_content_and_keeps_the_transaction() -> None:
    core = in_rcpt()
    answer = refuse(451, "4.3.0", "Try later", (DataStart,))
    transcript = talk(core, b"DATA\r\n", answer)
    assert transcript.wire == b"451 4.3.0 Try later\r\n"
    # Not content: a line after a refused DATA is a command again.
    assert talk(core, b"NOOP\r\nDATA\r\n").wire == OK + GO_AHEAD


def test_content_only_after_354_and_early_content_is_content() -> None:
    # The client sends its content before the 354 (against RFC 2920 3.1): still content.
    core = in_rcpt()
    core.receive_data(b"DATA\r\nMAIL FROM:<inner@example.com>\r\n.\r\nNOOP\r\n")
    event = core.next_event()
    assert isinstance(event, DataStart)
    with pytest.raises(LocalProtocolError):
        core.next_event()             # DATA's reply first
    assert core.send(event.reply) == GO_AHEAD
    message = core.next_event()
    assert isinstance(message, MessageReceived)
    assert message.content == b"MAIL FROM:<inner@example.com>\r\n"
    assert core.send(QUEUED) == QUEUED_WIRE
    assert isinstance(core.next_event(), Noop)


def test_end_of_data_reply_ends_the_transaction_whatever_it_says() -> None:
    for code, enhanced, text in ((250, "2.0.0", "Ok"), (554, "5.7.1", "Message rejected"),
                                 (451, "4.3.0", "Error: queue file write error")):
        core = in_rcpt()
        talk(core, b"DATA\r\nx\r\n.\r\n", refuse(code, enhanced, text, (MessageReceived,)))
        assert core.sender is None and core.recipients == ()
        assert talk(core, b"RCPT TO:<alice@example.com>\r\n").wire == NEED_MAIL


def test_ehlo_resets_a_transaction_only_when_accepted() -> None:
    core = in_rcpt()
    answer = refuse(550, "5.7.1", "Go away", (Ehlo,))
    assert talk(core, b"EHLO other.example\r\n", answer).wire == b"550 5.7.1 Go away\r\n"
    assert talk(core, b"RCPT TO:<bob@example.com>\r\n").wire == RCPT_OK
    talk(core, b"EHLO other.example\r\n")
    assert core.sender is None
    assert talk(core, b"RCPT TO:<bob@example.com>\r\n").wire == NEED_MAIL


def test_rset_resets_the_transaction_not_the_hello() -> None:
    core = in_rcpt()
    assert talk(core, b"RSET\r\nDATA\r\nMAIL FROM:<a@sender.example>\r\n").wire == \
        OK + NEED_RCPT + MAIL_OK
    assert core.hello_name == "client.example"


def test_helo_session_has_no_extensions() -> None:
    core = greeted()
    assert talk(core, b"HELO client.example\r\n").wire == b"250 mx.example\r\n"
    assert not core.extended and core.offered == frozenset()
    assert talk(core, b"MAIL FROM:<a@sender.example> SIZE=10\r\n").wire == \
        b"501 5.5.4 Syntax: MAIL FROM: <address>\r\n"
    assert talk(core, b"MAIL FROM:<a@sender.example>\r\n").wire == MAIL_OK


def test_extensions_left_out_of_the_ehlo_reply_are_not_offered() -> None:
    core = greeted()
    core.receive_data(b"EHLO client.example\r\n")
    event = core.next_event()
    assert isinstance(event, Ehlo)
    core.send(Reply(250, None, "mx.example\nPIPELINING\n8BITMIME"))
    assert core.offered == {"PIPELINING", "8BITMIME"}
    assert talk(core, b"MAIL FROM:<a@sender.example> SIZE=10\r\n").wire == \
        b"555 5.5.4 MAIL FROM parameters not recognized or not implemented\r\n"
    # Without SIZE offered, MAIL gets no extra 26 octets of line (RFC 1870 6).
    line = b"MAIL FROM:<a@sender.example> BODY=8BITMIME " + b"x" * 600
    assert talk(core, line + b"\r\n").wire == TOO_LONG


@pytest.mark.parametrize("ehlo", [
    "mx.example\nAUTH PLAIN",        # not implemented by the core
    "mx.example\nSIZE 999",          # not the limit the core enforces
    "mx.example\nSTARTTLS",          # no certificate
])
def test_ehlo_reply_may_not_offer_what_the_core_does_not_enforce(ehlo: str) -> None:
    core = greeted()
    core.receive_data(b"EHLO client.example\r\n")
    core.next_event()
    with pytest.raises(LocalProtocolError):
        core.send(Reply(250, None, ehlo))


# --- replies the driver may not send -------------------------------------------------------------

@pytest.mark.parametrize(("setup", "line", "reply"), [
    (ready, b"MAIL FROM:<a@sender.example>", Reply(354, None, "Go ahead")),
    (ready, b"MAIL FROM:<a@sender.example>", Reply(220, "2.0.0", "Hi")),
    (ready, b"RSET", Reply(550, "5.0.0", "No")),
    (ready, b"NOOP", Reply(252, "2.0.0", "Hmm")),
    (ready, b"QUIT", Reply(250, "2.0.0", "Stay")),
    (ready, b"FOO", Reply(250, "2.0.0", "Fine")),          # a Refused takes its own reply
    (ready, b"FOO", Reply(501, "5.5.4", "Another")),
    (in_rcpt, b"DATA", Reply(250, "2.0.0", "Ok")),
    (ready, b"NOOP", Reply(250, "2.0.0", "Ok\r\n250 injected")),   # CR/LF in text
    (ready, b"NOOP", Reply(250, "2.0.0", "nul\x00")),
    (ready, b"NOOP", Reply(250, "5.0.0", "Wrong class")),
    (ready, b"NOOP", Reply(250, "2.0", "Bad code")),
    (ready, b"NOOP", Reply(250, "2.0.0", "x" * 510)),               # line over 512 octets
    (ready, b"NOOP", Reply(199, None, "Too low")),
])
def test_illegal_replies_raise_local_protocol_error(
        setup: Callable[[], ServerCore], line: bytes, reply: Reply) -> None:
    core = setup()
    core.receive_data(line + b"\r\n")
    event = core.next_event()
    assert isinstance(event, Command)
    with pytest.raises(LocalProtocolError):
        core.send(reply)
    assert core.send(event.reply)    # the right one still goes


def test_misuse_raises_local_protocol_error() -> None:
    core = ServerCore(HOST)
    with pytest.raises(LocalProtocolError):
        core.next_event()                       # greeting first
    with pytest.raises(LocalProtocolError):
        core.send(Reply(250, "2.0.0", "Ok"))     # the greeting is 220 or 421
    core.send(core.greeting_reply)
    with pytest.raises(LocalProtocolError):
        core.send(Reply(250, "2.0.0", "Ok"))     # nothing to answer
    with pytest.raises(LocalProtocolError):
        core.tls_established()                  # no STARTTLS
    core.receive_data(b"NOOP\r\nNOOP\r\n")
    core.next_event()
    with pytest.raises(LocalProtocolError):
        core.next_event()                       # the first NOOP's reply first
    with pytest.raises(LocalProtocolError):
        ServerCore("bad host")
    with pytest.raises(ValueError, match="max_recipients"):
        ServerLimits(max_recipients=0)


def test_missing_enhanced_codes_are_added() -> None:
    core = in_mail()
    answer = refuse(550, None, "no such user", (Rcpt,))
    assert talk(core, b"RCPT TO:<x@example.com>\r\n", answer).wire == \
        b"550 5.0.0 no such user\r\n"
    core.receive_data(b"RCPT TO:<y@example.com>\r\n")
    core.next_event()
    assert core.send(Reply(250, None, "Ok")) == b"250 2.0.0 Ok\r\n"


# --- greeting, QUIT, 421 -------------------------------------------------------------------------

def test_quit_closes_and_what_follows_is_ignored() -> None:
    core = ready()
    transcript = talk(core, b"QUIT\r\nMAIL FROM:<a@sender.example>\r\n")
    assert transcript.wire == b"221 2.0.0 Bye\r\n"
    assert transcript.last == CloseConnection("quit")
    assert core.next_event() == CloseConnection("quit")
    core.receive_data(b"NOOP\r\n")              # ignored once closed
    with pytest.raises(LocalProtocolError):
        core.send(Reply(250, "2.0.0", "Ok"))


def test_greeting_421_refuses_the_connection() -> None:
    core = ServerCore(HOST)
    assert core.send(Reply(421, "4.7.0", "Too many connections, try again later")) == \
        b"421 4.7.0 Too many connections, try again later\r\n"
    assert core.next_event() == CloseConnection("shutdown")


def test_shutdown_at_any_time_and_the_timeout_reply() -> None:
    core = ready()
    assert core.shutdown(core.timeout_reply) == b"421 4.4.2 mx.example Error: timeout exceeded\r\n"
    assert core.next_event() == CloseConnection("shutdown")
    # During DATA, and as the answer to a pending command.
    core = in_rcpt()
    talk(core, b"DATA\r\npart of a message\r\n")
    assert core.shutdown() == \
        b"421 4.3.2 mx.example Service not available, closing transmission channel\r\n"
    core = ready()
    core.receive_data(b"NOOP\r\n")
    core.next_event()
    assert core.send(Reply(421, "4.3.2", "Shutting down")) == b"421 4.3.2 Shutting down\r\n"
    assert core.next_event() == CloseConnection("shutdown")


def test_client_talking_before_the_greeting_is_noted() -> None:
    core = ServerCore(HOST)
    core.receive_data(b"EHLO eager.example\r\n")
    core.send(core.greeting_reply)
    assert core.spoke_before_greeting
    assert isinstance(core.next_event(), Ehlo)


# --- limits --------------------------------------------------------------------------------------

def test_unknown_command_limit_ends_with_421() -> None:
    core = ready(max_unknown_commands=2)
    transcript = talk(core, b"FOO\r\nBAR\r\nNOOP\r\nBAZ\r\nNOOP\r\n")
    assert transcript.wire == (b'500 5.5.2 Error: command "FOO" not recognized\r\n'
                               b'500 5.5.2 Error: command "BAR" not recognized\r\n' + OK +
                               b"421 4.7.0 mx.example Error: too many unrecognized commands\r\n")
    assert transcript.last == CloseConnection("shutdown")


def test_error_limit_ends_with_421_and_a_delivered_message_resets_it() -> None:
    core = ready(max_errors=2)
    assert talk(core, b"DATA\r\nRCPT TO:<a@example.com>\r\n").wire == NEED_RCPT + NEED_MAIL
    talk(core, b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<alice@example.com>\r\n"
               b"DATA\r\nhi\r\n.\r\n")
    assert talk(core, b"VRFY\r\nVRFY\r\n").wire == b"501 5.5.4 Syntax: VRFY <address>\r\n" * 2
    transcript = talk(core, b"HELO\r\nNOOP\r\n")
    assert transcript.wire == b"421 4.7.0 mx.example Error: too many errors\r\n"
    assert transcript.last == CloseConnection("shutdown")


def test_recipient_limit_452_does_not_count_as_an_error() -> None:
    core = in_mail(max_recipients=2, max_errors=0)
    wire = talk(core, b"".join(b"RCPT TO:<u%d@example.com>\r\n" % i for i in range(4))).wire
    assert wire == RCPT_OK * 2 + b"452 4.5.3 Error: too many recipients\r\n" * 2
    assert talk(core, b"DATA\r\n").wire == GO_AHEAD


def test_command_line_limit_is_512_octets_with_crlf() -> None:
    core = ready()
    noop = b"NOOP " + b"x" * (512 - 7)
    assert talk(core, noop + b"\r\n").wire == OK
    assert talk(core, noop + b"x\r\n").wire == TOO_LONG
    assert talk(core, noop + b"\n").wire == OK       # a bare LF ends a command line too
    # MAIL with SIZE and SMTPUTF8 offered: 26 + 10 more (RFC 1870 6, RFC 6531 3.4).
    mail = b"MAIL FROM:<a@sender.example> SIZE=1 SMTPUTF8"
    padded = mail.replace(b"<a@", b"<" + b"a" * 40 + b"@")
    assert len(padded) + 2 < 548
    assert talk(core, padded + b"\r\n").wire == MAIL_OK


def test_an_endless_command_line_is_discarded_as_it_arrives() -> None:
    core = ready()
    transcript = talk(core, [b"NOOP "] + [b"x" * 4096] * 50)
    assert transcript.wire == b"" and core.buffered <= 512 + 36
    assert talk(core, b"xxx\r\nNOOP\r\n").wire == TOO_LONG + OK


def test_size_limit_while_streaming_swallows_the_rest_then_552() -> None:
    core = in_rcpt(max_message_size=1000)
    transcript = talk(core, [b"DATA\r\n"] + [b"z" * 78 + b"\r\n"] * 100 + [b".\r\nNOOP\r\n"])
    assert transcript.wire == GO_AHEAD + b"552 5.3.4 Error: Too much mail data\r\n" + OK
    assert not [e for e in transcript.events if isinstance(e, MessageReceived)]
    assert core.buffered == 0


def test_text_line_limit_at_the_end_of_data() -> None:
    core = in_rcpt()
    wire = talk(core, b"DATA\r\n" + b"y" * 1200 + b"\r\n.\r\n").wire
    assert wire == GO_AHEAD + b"500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)\r\n"


# --- DATA framing, NUL, smuggling ----------------------------------------------------------------

def test_data_unstuffs_and_counts_as_size_does() -> None:
    core = in_rcpt()
    transcript = talk(core, b"DATA\r\n..leading dot\r\nline\r\n.\r\n")
    message = transcript.last
    assert isinstance(message, MessageReceived)
    assert message.content == b".leading dot\r\nline\r\n"
    assert message.size == len(b"..leading dot\r\nline\r\n")
    assert message.bare_line_ending is None


@pytest.mark.parametrize("end", [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n"])
def test_smuggling_probe_is_one_message_with_its_bare_line_ending_reported(end: bytes) -> None:
    core = in_rcpt()
    inner = b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\ninner\r\n"
    transcript = talk(core, b"DATA\r\nouter" + end + inner + b".\r\nQUIT\r\n")
    kinds = [type(e) for e in transcript.events]
    assert kinds == [DataStart, MessageReceived, Quit, CloseConnection]
    message = transcript.events[1]
    assert isinstance(message, MessageReceived)
    # "CRLF ." starts a line, so its dot is unstuffed (RFC 5321 4.5.2); bare ends stay text.
    content = b"outer" + end.replace(b"\r\n.", b"\r\n") + inner
    assert message.content == content
    assert message.bare_line_ending is not None
    assert message.bare_line_ending == find_bare_line_endings(content)


@pytest.mark.parametrize("content", [b"\x00", b"a\x00b\r\n", b"line\r\n\x00.\r\nmore\r\n",
                                     (b"x" * 78 + b"\r\n") * 100 + b"\x00"])
def test_nul_in_data_is_refused_550_and_nothing_delivered(content: bytes) -> None:
    core = in_rcpt()
    transcript = talk(core, [b"DATA\r\n", content, b"\r\n.\r\n", b"NOOP\r\n"])
    assert transcript.wire == GO_AHEAD + b"550 5.6.0 Message contains NUL characters\r\n" + OK
    assert not [e for e in transcript.events if isinstance(e, MessageReceived)]
    assert core.sender is None


def test_too_big_and_too_long_lines_are_answered_before_nul() -> None:
    # The order of today's front end: size, then line length, then NUL.
    core = in_rcpt()
    wire = talk(core, b"DATA\r\n" + b"y" * 1200 + b"\x00\r\n.\r\n").wire
    assert wire == GO_AHEAD + b"500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)\r\n"


def test_nul_after_the_end_of_data_belongs_to_the_next_command() -> None:
    core = in_rcpt()
    transcript = talk(core, b"DATA\r\nclean\r\n.\r\nNOOP\x00\r\n")
    assert isinstance(transcript.events[1], MessageReceived)
    assert transcript.wire == GO_AHEAD + QUEUED_WIRE + BAD_SYNTAX


def test_client_closing_mid_data_delivers_nothing() -> None:
    core = in_rcpt()
    transcript = talk(core, [b"DATA\r\n", b"half a message\r\n", b""])
    assert transcript.last == CloseConnection("peer closed")
    assert not [e for e in transcript.events if isinstance(e, MessageReceived)]


def test_client_closing_between_commands_after_its_pipelined_ones() -> None:
    core = ready()
    transcript = talk(core, [b"NOOP\r\nRSET\r\nNOO", b""])
    assert transcript.wire == OK + OK
    assert transcript.last == CloseConnection("peer closed")


# --- PIPELINING ----------------------------------------------------------------------------------

def test_pipelined_group_is_handed_out_in_order_and_need_data_is_the_flush_point() -> None:
    core = ready()
    core.receive_data(b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<alice@example.com>\r\n"
                      b"RCPT TO:<bob@example.com>\r\nDATA\r\n")
    out = []
    kinds = []
    while (event := core.next_event()) is not NEED_DATA:
        assert isinstance(event, Command)
        kinds.append(type(event))
        out.append(core.send(event.reply))
    assert kinds == [Mail, Rcpt, Rcpt, DataStart]
    # The driver writes the group's replies in one write at NEED_DATA.
    assert b"".join(out) == MAIL_OK + RCPT_OK + RCPT_OK + GO_AHEAD
    assert [r.code for r in replies(b"".join(out))] == [250, 250, 250, 354]


def test_commands_pipelined_after_the_end_of_data() -> None:
    core = in_rcpt()
    transcript = talk(core, b"DATA\r\nfirst\r\n.\r\nMAIL FROM:<b@sender.example>\r\n"
                            b"RCPT TO:<bob@example.com>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n")
    messages = [e for e in transcript.events if isinstance(e, MessageReceived)]
    assert [m.content for m in messages] == [b"first\r\n", b"second\r\n"]
    assert [r.path for r in messages[1].recipients] == ["bob@example.com"]
    assert transcript.wire == (GO_AHEAD + QUEUED_WIRE + MAIL_OK + RCPT_OK + GO_AHEAD +
                               QUEUED_WIRE + b"221 2.0.0 Bye\r\n")


# --- STARTTLS ------------------------------------------------------------------------------------

def test_starttls_then_the_session_starts_over() -> None:
    core = ready(True)
    transcript = talk(core, b"STARTTLS\r\n")
    assert transcript.wire == b"220 2.0.0 Ready to start TLS\r\n"
    assert isinstance(transcript.events[0], StartTlsRequest)
    assert transcript.last == TlsHandshake(discarded=0)
    assert core.next_event() == TlsHandshake(discarded=0)
    with pytest.raises(LocalProtocolError):
        core.receive_data(b"\x16\x03\x01")      # the handshake's bytes are not ours
    with pytest.raises(LocalProtocolError):
        core.send(Reply(250, "2.0.0", "Ok"))
    core.tls_established()
    assert core.tls_active and core.hello_name is None and core.offered == frozenset()
    # RFC 3207 4.2: EHLO again, and STARTTLS is no longer offered.
    assert talk(core, b"MAIL FROM:<a@sender.example>\r\n").wire == NEED_HELO
    assert talk(core, b"EHLO client.example\r\n").wire == EHLO_REPLY
    assert talk(core, b"STARTTLS\r\n").wire == b"554 5.5.1 Error: TLS already active\r\n"
    assert talk(core, b"HELP\r\n").wire == (b"250 2.0.0 Supported commands: DATA EHLO HELO "
                                            b"HELP MAIL NOOP QUIT RCPT RSET VRFY\r\n")


def test_plain_text_pipelined_after_starttls_is_discarded() -> None:
    # CVE-2011-0411: an on-path attacker appends commands to the client's STARTTLS; they
    # must never run as if they came over TLS.
    core = ready(True)
    injected = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.com>\r\n"
    core.receive_data(b"STARTTLS\r\n" + injected[:20])
    event = core.next_event()
    assert isinstance(event, StartTlsRequest)
    core.receive_data(injected[20:])          # more arrives before the 220 goes out
    core.send(event.reply)
    assert core.next_event() == TlsHandshake(discarded=len(injected))
    core.tls_established()
    talk(core, b"EHLO client.example\r\n")
    assert talk(core, b"RCPT TO:<victim@example.com>\r\n").wire == NEED_MAIL


def test_starttls_refused_by_the_driver_stays_in_plain_text() -> None:
    core = ready(True)
    answer = refuse(454, "4.7.0", "TLS not available due to temporary reason",
                    (StartTlsRequest,))
    assert talk(core, b"STARTTLS\r\nNOOP\r\n", answer).wire == \
        b"454 4.7.0 TLS not available due to temporary reason\r\n" + OK
    assert not core.tls_active


# --- properties ----------------------------------------------------------------------------------

COMMAND_LINES = [
    b"EHLO client.example", b"HELO client.example", b"EHLO", b"MAIL FROM:<a@sender.example>",
    b"MAIL FROM:<>", b"MAIL FROM:<a@sender.example> SIZE=10", b"MAIL FROM:<bad",
    b"RCPT TO:<alice@example.com>", b"RCPT TO:<bob@example.com>", b"RCPT TO:<>", b"RSET",
    b"NOOP", b"VRFY x", b"HELP", b"FOO", b"", b"\x00", b"STARTTLS", b"EXPN x", b"DATA x",
    b"NOOP " + b"x" * 600, b"MAIL FROM:<a@sender.example> BODY=7BIT",
]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = []
    previous = 0
    for point in [*points, len(data)]:
        pieces.append(data[previous:point])
        previous = point
    return [p for p in pieces if p]


def session_script(draw: st.DrawFn) -> bytes:
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        choice = draw(st.integers(0, 9))
        if choice == 0:
            parts.append(draw(st.binary(max_size=30)))
        elif choice == 1:
            body = draw(st.binary(max_size=60))
            parts.append(b"DATA\r\n" + body + b"\r\n.\r\n")
        else:
            parts.append(draw(st.sampled_from(COMMAND_LINES)) +
                         draw(st.sampled_from([b"\r\n", b"\n"])))
    return b"".join(parts)


scripts = st.composite(session_script)()


@CI
@given(scripts, st.lists(st.integers(min_value=0), max_size=20))
def test_chunking_never_changes_what_is_said(script: bytes, cuts: list[int]) -> None:
    whole = talk(ready(), [script, b""])
    pieces = talk(ready(), [*split_at(script, cuts), b""])
    assert pieces.written == whole.written
    assert pieces.events == whole.events


@CI
@given(scripts)
def test_every_reply_is_one_well_formed_reply(script: bytes) -> None:
    transcript = talk(ready(True), [script, b""])
    for wire in transcript.written:
        (reply,) = replies(wire)
        for line in wire.split(b"\r\n")[:-1]:
            assert len(line) + 2 <= 512
        # RFC 2034 3: no enhanced code in the replies to EHLO and HELO, nor in 3xx.
        if reply.code != 354 and not wire.startswith((b"250-mx.example", b"250 mx.example")):
            assert reply.enhanced is not None and reply.enhanced[0] == str(reply.code)[0]
    assert isinstance(transcript.last, CloseConnection | TlsHandshake)


@CI
@given(st.lists(st.sampled_from([b"NOOP", b"RSET", b"HELP", b"VRFY a", b"FOO", b"",
                                 b"MAIL FROM:<a@sender.example>", b"RCPT TO:<b@example.com>",
                                 b"MAIL FROM:<x", b"EHLO c.example", b"\x7f"]), max_size=40))
def test_one_reply_per_command_line(lines: list[bytes]) -> None:
    core = ready(max_unknown_commands=1000, max_errors=1000)
    transcript = talk(core, b"".join(line + b"\r\n" for line in lines))
    assert len(transcript.written) == len(lines)
    assert len(replies(transcript.wire)) == len(lines)


text_lines = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"hello", b"Subject: x",
                                       b"\xc3\xa9t\xc3\xa9", b" ", b"\t"]), max_size=20)


@CI
@given(text_lines, st.booleans(), st.lists(st.integers(min_value=0), max_size=10))
def test_content_round_trips_through_dot_stuffing(lines: list[bytes], final_crlf: bool,
                                                  cuts: list[int]) -> None:
    content = b"\r\n".join(lines) + (b"\r\n" if final_crlf and lines else b"")
    core = in_rcpt()
    transcript = talk(core, [b"DATA\r\n", *split_at(dot_stuff(content), cuts)])
    message = transcript.last
    assert isinstance(message, MessageReceived)
    expected = content if not content or content.endswith(b"\r\n") else content + b"\r\n"
    assert message.content == expected
    assert message.bare_line_ending is None


@CI
@given(text_lines, st.integers(min_value=0), st.integers(min_value=0),
       st.lists(st.integers(min_value=0), max_size=10))
def test_nul_anywhere_in_content_is_refused(lines: list[bytes], which: int, where: int,
                                            cuts: list[int]) -> None:
    lines = lines or [b""]
    which %= len(lines)
    where %= len(lines[which]) + 1
    lines[which] = lines[which][:where] + b"\x00" + lines[which][where:]
    content = b"\r\n".join(lines)
    core = in_rcpt()
    transcript = talk(core, [b"DATA\r\n", *split_at(dot_stuff(content), cuts), b"NOOP\r\n"])
    assert not [e for e in transcript.events if isinstance(e, MessageReceived)]
    assert transcript.written[-2].startswith(b"550 5.6.0 ")
    assert transcript.written[-1] == OK


# A model of RFC 5321's sequence rules, checked against the core under a driver that accepts
# or refuses at random.
MODEL_LINES = [b"EHLO c.example", b"HELO c.example", b"MAIL FROM:<a@sender.example>",
               b"RCPT TO:<b@example.com>", b"DATA", b"RSET", b"NOOP"]


@CI
@given(st.lists(st.tuples(st.sampled_from(MODEL_LINES), st.booleans()), max_size=30))
def test_sequence_rules_follow_the_replies_sent(steps: list[tuple[bytes, bool]]) -> None:
    core = greeted(max_errors=1000)
    hello = mail = False
    rcpts = 0
    for line, accept in steps:
        core.receive_data(line + b"\r\n")
        event = core.next_event()
        verb = line.split()[0]
        if verb in (b"MAIL", b"RCPT", b"DATA") and not hello:
            expected_refusal = NEED_HELO
        elif verb == b"MAIL" and mail:
            expected_refusal = b"503 5.5.1 Error: nested MAIL command\r\n"
        elif verb == b"RCPT" and not mail:
            expected_refusal = NEED_MAIL
        elif verb == b"DATA" and not rcpts:
            expected_refusal = NEED_RCPT
        else:
            expected_refusal = b""
        if expected_refusal:
            assert isinstance(event, Refused)
            assert core.send(event.reply) == expected_refusal
            continue
        assert isinstance(event, Command) and not isinstance(event, Refused)
        refusable = isinstance(event, Ehlo | Mail | Rcpt | DataStart) or verb == b"HELO"
        if accept or not refusable:
            core.send(event.reply)
            if verb in (b"EHLO", b"HELO", b"RSET"):
                hello = hello or verb != b"RSET"
                mail, rcpts = False, 0
            elif verb == b"MAIL":
                mail = True
            elif verb == b"RCPT":
                rcpts += 1
            elif verb == b"DATA":
                message = talk(core, b"x\r\n.\r\n").last
                assert isinstance(message, MessageReceived)
                assert len(message.recipients) == rcpts
                mail, rcpts = False, 0
        else:
            core.send(Reply(550, "5.7.1", "Refused"))
        assert core.recipients == tuple(parse_path("<b@example.com>") for _ in range(rcpts))
        assert (core.sender is not None) == mail
