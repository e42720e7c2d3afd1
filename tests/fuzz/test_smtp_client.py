"""Fuzzing the SMTP client core (proxies.smtp.client) with hostile servers.

What must hold for any bytes a server sends: `next_event()` never raises (a broken server is
`Failed`, 451 4.4.0); the outcome is `Finished` with a reply for every recipient, or `Failed`
with a 4xx/5xx reply on one line from a documented stage; once the server has closed, the
client never waits for more (no NEED_DATA after EOF); whatever the server says, the client
only ever sends whole commands of its own and, once per transaction at most, the content
dot-stuffed; the driver loop ends within a bounded number of steps.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, target
from hypothesis import strategies as st

from proxies.smtp.client import (
    NEED_DATA,
    ClientSession,
    Failed,
    Finished,
    ReadyForContent,
    StartTls,
)
from proxies.smtp.dataframe import dot_stuff
from tests.fuzz import inputs
from tests.fuzz.harness import EXAMPLES, bounded, corpus, every, fuzz_settings, split_at

TARGET = "smtp_client"
# For the campaign (bench/fuzz.py): the sources whose arcs it traces, and its mutation tokens.
COVERS = ("proxies/smtp/client.py", "proxies/smtp/reply.py", "proxies/smtp/dataframe.py")
TOKENS = (b"220 ", b"250 ", b"250-", b"354 ", b"421 ", b"451 ", b"550 ", b"250-PIPELINING\r\n",
          b"250-STARTTLS\r\n", b"250-SIZE 10\r\n", b"250 SMTPUTF8\r\n", b"2.0.0 ")
SENDER = "alice@src.example"
RECIPIENTS = ("bob@dst.example", "carol@dst.example", "bob@dst.example")
CONTENT = b"Subject: x\r\n\r\n.leading dot\r\n..\r\n.\r\nlast line\r\n"
STAGES = {"greeting", "ehlo", "helo", "starttls", "mail", "rcpt", "data", "content", "policy",
          "rset", "drain", "end-of-data", "envelope", "tls-handshake"}
# Everything the client may say on its own (RFC 5321 4.1.1, 3207, 1870, 6152, 6531); "." is
# the empty message that drains a 354 given in vain (RFC 2920 3.1).
COMMAND = re.compile(
    rb"EHLO gw\.example|HELO gw\.example|STARTTLS|RSET|QUIT|DATA|\."
    rb"|RCPT TO:<(?:bob|carol)@dst\.example>"
    rb"|MAIL FROM:<alice@src\.example>(?: SIZE=\d+)?(?: BODY=8BITMIME)?(?: SMTPUTF8)?")
# Our own reply texts must show no Python internals (the server's own text is its own).
INTERNAL = re.compile(r"Traceback|\w+(?:Error|Exception)\(|object at 0x")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class Options:
    tls: str = "opportunistic"
    keep_open: bool = False
    eight_bit: bool = False
    smtputf8: bool = False
    strict_8bitmime: bool = False
    content_chunk: int = 0          # 0: the content in one call


@dataclass
class Delivery:
    outcomes: list[Finished | Failed] = field(default_factory=list)
    commands: bytes = b""
    contents: int = 0


def deliver(chunks: Sequence[bytes], options: Options) -> Delivery:
    """The lead's driver loop against canned server bytes, up to three transactions over one
    connection (keep_open), checking every step."""
    session = ClientSession("gw.example", SENDER, RECIPIENTS, len(CONTENT),
                            eight_bit=options.eight_bit, smtputf8=options.smtputf8,
                            tls=options.tls,  # type: ignore[arg-type]
                            strict_8bitmime=options.strict_8bitmime,
                            keep_open=options.keep_open)
    delivery = Delivery()
    pending = [c for c in chunks if c] + [b""]
    sent: list[bytes] = []
    content_sent = False
    # Every step consumes a reply or ends a transaction; a step per octet is plenty.
    for _ in range(4 * sum(len(c) for c in chunks) + 100):
        sent.append(session.data_to_send())
        event = session.next_event()
        if event is NEED_DATA:
            assert pending, "waits for a server that has closed"
            session.receive_data(pending.pop(0))
        elif isinstance(event, StartTls):
            session.tls_established()
        elif isinstance(event, ReadyForContent):
            assert not content_sent, "content asked for twice in one transaction"
            content_sent = True
            delivery.contents += 1
            send_content(session, options.content_chunk)
            # Nothing else is queued while the server waits for the content.
            assert session.data_to_send() == dot_stuff(CONTENT)
        else:
            assert isinstance(event, Finished | Failed), event
            assert session.next_event() is event        # returned again on every call
            check_outcome(event)
            delivery.outcomes.append(event)
            sent.append(session.data_to_send())
            if not (session.reusable and len(delivery.outcomes) < 3):
                break
            content_sent = False
            session.next_transaction(SENDER, RECIPIENTS[:1], len(CONTENT),
                                     eight_bit=options.eight_bit, smtputf8=options.smtputf8)
    else:
        raise AssertionError("the driver loop did not end")
    delivery.commands = b"".join(sent)
    check_commands(delivery.commands)
    return delivery


def send_content(session: ClientSession, chunk: int) -> None:
    if not chunk:
        session.send_content(CONTENT)
        return
    for piece in every(CONTENT, chunk):
        session.send_content(piece, final=False)
    session.send_content(b"")


def check_outcome(event: Finished | Failed) -> None:
    if isinstance(event, Finished):
        assert set(event.results) <= set(RECIPIENTS) and event.results
        replies = list(event.results.values())
        if event.session_reply is not None:
            replies.append(event.session_reply)
    else:
        assert event.stage in STAGES, event.stage
        assert event.reply.code // 100 in (4, 5), event.reply
        replies = [event.reply]
    for reply in replies:
        assert 200 <= reply.code <= 599
        line = str(reply)
        # RFC 5321 4.2 textstring: HT and printable; ReplyReader replaces the rest.
        assert _CONTROL.search(line) is None, line
        assert INTERNAL.search(line) is None, line


def check_commands(commands: bytes) -> None:
    assert commands == b"" or commands.endswith(b"\r\n"), commands[-40:]
    for line in commands.split(b"\r\n")[:-1]:
        assert len(line) + 2 <= 512
        assert COMMAND.fullmatch(line), line


OPTIONS = (
    Options(),
    Options(tls="required", keep_open=True, eight_bit=True, smtputf8=True, strict_8bitmime=True,
            content_chunk=5),
    Options(tls="never", keep_open=True, content_chunk=1),
)


def lines(data: bytes) -> list[bytes]:
    """One read per line: a server that answers each command when it comes. (Bytes that
    arrive before the command they answer was sent are a protocol error to the client, so
    one read of the whole stream mostly tests that.)"""
    return data.splitlines(keepends=True)


def run(data: bytes) -> None:
    """The harness: one server byte stream, for each client configuration, a line per read,
    in one read and in small ones."""
    EXAMPLES[TARGET] += 1
    for options in OPTIONS:
        deliver(lines(data), options)
        deliver([data], options)
        deliver(every(data, 3), options)


# --- hostile servers ------------------------------------------------------------------------------

CODES = (b"220", b"250", b"250", b"251", b"354", b"221", b"421", b"450", b"451", b"452",
         b"454", b"500", b"502", b"503", b"550", b"552", b"554", b"199", b"600", b"999", b"25",
         b"2500")
KEYWORDS = (b"SIZE 100", b"SIZE", b"SIZE 0", b"SIZE -1", b"SIZE 99999999999999999999",
            b"SIZE 10", b"PIPELINING", b"STARTTLS", b"8BITMIME", b"SMTPUTF8", b"CHUNKING",
            b"ENHANCEDSTATUSCODES", b"pipelining", b"AUTH PLAIN", b"")


@st.composite
def replies(draw: st.DrawFn) -> bytes:
    code = draw(st.sampled_from(CODES))
    kind = draw(st.integers(0, 4))
    if kind == 0:          # an EHLO reply, keyword by keyword
        keywords = draw(st.lists(st.sampled_from(KEYWORDS), max_size=6))
        lines = [b"mx.example", *keywords]
        return b"".join(code + (b"-" if i < len(lines) - 1 else b" ") + text + b"\r\n"
                        for i, text in enumerate(lines))
    if kind == 1:          # a plain reply, maybe with an enhanced code of any class
        enhanced = draw(st.sampled_from([b"", b"2.0.0 ", b"4.4.2 ", b"5.7.1 ", b"9.9.9 ",
                                         b"2.1.5 "]))
        separator = draw(st.sampled_from([b" ", b" ", b"-", b"", b"x", b"  "]))
        text = draw(st.sampled_from([b"Ok", b"go ahead", b"\xff\xfe", b"a\x00b", b"",
                                     b"\x1b[31m", b"x" * 600]))
        return code + separator + enhanced + text + draw(inputs.line_ends)
    if kind == 2:          # too many lines
        return (code + b"-x\r\n") * draw(st.sampled_from([99, 100, 101])) + code + b" x\r\n"
    if kind == 3:
        return draw(st.sampled_from([inputs.TLS_RECORD, b"\r\n", b"\n", b"-", b" "]))
    return draw(inputs.noise)


# The replies of a good server to the commands of two transactions over one connection
# (EHLO's drawn below): hostile streams are this script with replies swapped, added, lost.
EHLO = b"EHLO"
SCRIPT = (b"220 mx.example ESMTP\r\n", EHLO, b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n",
          b"250 2.1.5 Ok\r\n", b"354 go ahead\r\n", b"250 2.0.0 queued\r\n",
          b"250 2.0.0 Ok\r\n", b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", b"354 go ahead\r\n",
          b"250 2.0.0 queued\r\n", b"221 2.0.0 Bye\r\n")


@st.composite
def ehlo_replies(draw: st.DrawFn) -> bytes:
    keywords = draw(st.lists(st.sampled_from(KEYWORDS), max_size=5))
    lines = [b"mx.example", *keywords]
    return b"".join(b"250" + (b"-" if i < len(lines) - 1 else b" ") + text + b"\r\n"
                    for i, text in enumerate(lines))


@st.composite
def servers(draw: st.DrawFn) -> bytes:
    """A server stream: the good script up to some point, each reply kept, swapped for a
    hostile one, preceded by one, or lost; then a few hostile replies."""
    parts = []
    for good in SCRIPT[:draw(st.integers(0, len(SCRIPT)))]:
        reply = draw(ehlo_replies()) if good is EHLO else good
        choice = draw(st.integers(0, 9))
        if choice < 7:
            parts.append(reply)
        elif choice == 7:
            parts.append(draw(replies()))
        elif choice == 8:
            parts += [draw(replies()), reply]
    parts += draw(st.lists(replies(), max_size=3))
    return b"".join(parts)


@fuzz_settings(150)
@given(servers())
@example(b"220 mx\r\n250-mx\r\n250 PIPELINING\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
@example(b"220 mx\r\n250 mx\r\n421 4.3.2 shutting down\r\n")
@example(b"220 mx\r\n250 mx\r\n550 5.1.1 No\tsuch user\r\n")
def test_any_server_stream(script: bytes) -> None:
    run(script)
    delivery = deliver(lines(script), Options(tls="never", keep_open=True))
    target(float(len(delivery.outcomes) * 10 + delivery.contents + len(delivery.commands) // 20),
           label="progress")


@fuzz_settings(100)
@given(servers(), st.lists(st.integers(min_value=0), max_size=10), st.sampled_from(OPTIONS))
def test_any_reads(script: bytes, cuts: list[int], options: Options) -> None:
    """However the server's bytes are cut into reads (which may decide whether a reply came
    too early), every check holds."""
    EXAMPLES[TARGET] += 1
    deliver(split_at(script, cuts), options)


@pytest.mark.parametrize("data", corpus(TARGET))
def test_corpus(data: bytes) -> None:
    with bounded():
        run(data)
