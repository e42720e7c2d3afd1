"""Fuzzing the SMTP server core (proxies.smtp.servercore) with hostile clients.

What must hold for any bytes a client sends: the core never raises (bad input becomes
`Refused`, whose reply it chose; `LocalProtocolError` would mean our driver misused it, and
the driver below only ever sends the core's own replies or legal refusals); every reply is
one well-formed SMTP reply without internal text; how the bytes are cut into reads changes
nothing; a message handed over is within the limits; the session either stays usable (a
QUIT after the garbage gets its 221) or has closed cleanly (a 421 was sent); the buffer of an
endless line stays bounded.
"""

from __future__ import annotations

import dataclasses
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, target
from hypothesis import strategies as st

from proxies.smtp.dataframe import check_line_length, find_bare_line_endings, find_nul
from proxies.smtp.servercore import (
    NEED_DATA,
    CloseConnection,
    Command,
    DataStart,
    Ehlo,
    Helo,
    Help,
    Mail,
    MessageReceived,
    Rcpt,
    Refused,
    Reply,
    ServerCore,
    ServerLimits,
    StartTlsRequest,
    TlsHandshake,
    Vrfy,
)
from tests.fuzz import inputs
from tests.fuzz.harness import (
    EXAMPLES,
    bounded,
    check_smtp_reply,
    corpus,
    every,
    fuzz_settings,
    split_at,
)

TARGET = "smtp_server"
# For the campaign (bench/fuzz.py): the sources whose arcs it traces, and its mutation tokens.
COVERS = ("proxies/smtp/servercore.py", "proxies/smtp/dataframe.py", "proxies/smtp/addresses.py")
TOKENS = (b"EHLO x\r\n", b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n",
          b"DATA\r\n", b"\r\n.\r\n", b"STARTTLS\r\n", b"BDAT 5 LAST\r\n", b" SIZE=10",
          b" BODY=8BITMIME", b" SMTPUTF8", b"RSET\r\n", b"QUIT\r\n", b"xn--")
HOST = "mx.example"
QUEUED = Reply(250, "2.0.0", "Ok: queued as 1")
# Legal refusals a policy may give each refusable command (RFC 5321 4.3.2), one of them
# multi-line and one without an enhanced code (the core adds its default).
REFUSALS = (Reply(450, "4.2.0", "Mailbox busy"), Reply(554, "5.7.1", "Rejected by policy"),
            Reply(451, None, "Local error"), Reply(550, "5.7.1", "Not here\nNor there"))
REFUSABLE = (Ehlo, Helo, Mail, Rcpt, DataStart, Vrfy, Help, StartTlsRequest, MessageReceived)
# Small limits, so that short inputs reach the branches behind them.
SMALL = ServerLimits(max_command_line=64, max_text_line=80, max_recipients=3,
                     max_message_size=400, max_unknown_commands=3, max_errors=6)


@dataclass
class Policy:
    """The driver's answers, by the index of the event: 0 accept, 1 refuse, 2 shut down with
    421, 3 accept with keywords left out (EHLO: STARTTLS and PIPELINING not offered)."""

    plan: Sequence[int] = (0,)
    refusal: int = 0
    index: int = 0

    def answer(self, event: Command | MessageReceived) -> Reply:
        choice = self.plan[self.index % len(self.plan)] if self.plan else 0
        self.index += 1
        if isinstance(event, Refused) and choice != 2:
            return event.reply        # the only legal answer but a 421
        if choice == 1 and isinstance(event, REFUSABLE):
            self.refusal += 1
            return REFUSALS[self.refusal % len(REFUSALS)]
        if choice == 2:
            return Reply(421, "4.3.2", f"{HOST} Service shutting down")
        if isinstance(event, MessageReceived):
            return QUEUED
        if choice == 3 and isinstance(event, Ehlo):
            lines = [line for line in event.reply.lines
                     if line not in ("STARTTLS", "PIPELINING")]
            return dataclasses.replace(event.reply, text="\n".join(lines))
        return event.reply


@dataclass
class Transcript:
    written: list[bytes] = field(default_factory=list)
    messages: list[MessageReceived] = field(default_factory=list)
    closed: bool = False
    tls: int = 0


def drain(core: ServerCore, policy: Policy, transcript: Transcript, budget: int) -> int:
    """Answers every event until the core needs data; returns the budget left. Every event
    consumes input (a line, the end of data) except TlsHandshake, so a budget of events per
    octet received catches a core that loops."""
    while not transcript.closed:
        budget -= 1
        assert budget > 0, "the core returns events without consuming input"
        event = core.next_event()
        if event is NEED_DATA:
            return budget
        if isinstance(event, CloseConnection):
            transcript.closed = True
            assert core.next_event() == event     # and on every call from then on
            return budget
        if isinstance(event, TlsHandshake):
            # The driver upgrades the transport; what follows is what came over TLS.
            core.tls_established()
            transcript.tls += 1
            continue
        assert isinstance(event, Command | MessageReceived)
        if isinstance(event, MessageReceived):
            check_message(core.limits, event)
            transcript.messages.append(event)
        reply = policy.answer(event)
        wire = core.send(reply)
        code = check_smtp_reply(wire)
        assert code == reply.code
        transcript.written.append(wire)
    return budget


def check_message(limits: ServerLimits, message: MessageReceived) -> None:
    """A message the core hands over is within every limit it enforces."""
    if limits.max_message_size is not None:
        assert message.size <= limits.max_message_size
    assert check_line_length(message.content, limits.max_text_line) is None
    assert find_nul(message.content) is None
    assert message.bare_line_ending == find_bare_line_endings(message.content)
    assert message.content == b"" or message.content.endswith(b"\r\n")
    assert message.recipients and len(message.recipients) <= limits.max_recipients


def converse(chunks: Sequence[bytes], *, limits: ServerLimits | None = None, tls: bool = False,
             policy: Policy | None = None) -> Transcript:
    """A whole session: greeting, the client's chunks, then QUIT and the client's close."""
    core = ServerCore(HOST, limits=limits, tls_available=tls)
    policy = policy or Policy()
    transcript = Transcript()
    check_smtp_reply(core.send(core.greeting_reply))
    budget = 2 * sum(len(c) for c in chunks) + 100
    for chunk in chunks:
        if transcript.closed:
            break
        if not chunk:
            continue          # b"" would be the client's close
        core.receive_data(chunk)
        budget = drain(core, policy, transcript, budget)
    if not transcript.closed:
        # Usable after anything: end a message or line in progress, then say goodbye.
        policy.plan = (0,)
        handshakes = transcript.tls
        core.receive_data(b"\r\n.\r\nQUIT\r\n")
        budget = drain(core, policy, transcript, budget)
        if not transcript.closed and transcript.tls > handshakes:
            # That ended a STARTTLS, so the QUIT after it in the same read was discarded
            # (CVE-2011-0411): say it again, as over TLS.
            core.receive_data(b"QUIT\r\n")
            budget = drain(core, policy, transcript, budget + 2)
        assert transcript.closed, "no close after QUIT"
        assert transcript.written[-1].startswith((b"221 ", b"421 ")), transcript.written[-1]
    core.receive_data(b"")
    drain(core, policy, transcript, budget + 2)
    assert transcript.closed
    # A 421 is the last thing a session says (RFC 5321 3.8).
    shutdowns = [i for i, w in enumerate(transcript.written) if w.startswith(b"421")]
    assert shutdowns in ([], [len(transcript.written) - 1])
    return transcript


def run(data: bytes) -> None:
    """The harness: one client byte stream, in three configurations."""
    EXAMPLES[TARGET] += 1
    # TLS offered, small limits, the stream in one read.
    converse([data], limits=SMALL, tls=True)
    # Default limits and a policy that refuses now and then: one read or many must give
    # the same conversation (no STARTTLS here, whose discarding depends on the reads).
    plan = (0, 0, 1, 0, 3, 0, 0, 1)
    whole = converse([data], policy=Policy(plan))
    pieces = converse(every(data, 1 if len(data) < 300 else 13), policy=Policy(plan))
    assert pieces.written == whole.written


# --- hostile clients ------------------------------------------------------------------------------

VERBS = (b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"VRFY", b"HELP",
         b"QUIT", b"STARTTLS", b"BDAT", b"AUTH", b"EXPN", b"ETRN", b"TURN", b"XCLIENT", b"LHLO")
PARAMS = (b"SIZE=100", b"SIZE=0", b"SIZE=99999999999999999999999", b"SIZE=", b"SIZE=-1",
          b"BODY=8BITMIME", b"BODY=7bit", b"BODY=BINARYMIME", b"BODY", b"SMTPUTF8",
          b"SMTPUTF8=yes", b"NOTIFY=NEVER", b"ORCPT=rfc822;a@b", b"AUTH=<>", b"=x",
          b"SIZE=1 SIZE=2")


@st.composite
def commands(draw: st.DrawFn) -> bytes:
    verb = draw(st.sampled_from(VERBS).flatmap(inputs.odd_case) | st.binary(max_size=8))
    kind = draw(st.integers(0, 5))
    if kind == 0:
        argument = b""
    elif kind == 1:
        keyword = draw(st.sampled_from([b"FROM:", b"TO:", b"from: ", b"FROM", b"TO :", b":"]))
        path = draw(inputs.paths()).encode("utf-8", "surrogatepass")
        params = draw(st.lists(st.sampled_from(PARAMS), max_size=3))
        argument = b" ".join([keyword + path, *params])
    elif kind == 2:
        argument = draw(st.sampled_from([b"client.example", b"[192.0.2.1]", b"x" * 80, b"\xff",
                                         b"a\x00b", b"\t", b"10 LAST", b"PLAIN AGFiYwBk"]))
    elif kind == 3:
        argument = draw(inputs.long_line())
    elif kind == 4:
        argument = draw(inputs.special_bytes)
    else:
        argument = draw(inputs.noise)
    space = draw(st.sampled_from([b" ", b" ", b"  ", b"\t", b""]))
    line = verb + (space + argument if argument else b"")
    return line + draw(inputs.line_ends)


@st.composite
def data_blocks(draw: st.DrawFn) -> bytes:
    """DATA, content with the smuggling probes, then (usually) the real end of data."""
    lines = draw(st.lists(st.sampled_from([b"Subject: x", b"", b".", b"..", b".x", b"\x00",
                                           b"x" * 120, b"a\nb", b"a\rb", b"\n.\n", b"\r.\r",
                                           b"\n.\r\n", b"\xc3\xa9"]) | inputs.noise,
                          max_size=8))
    end = draw(st.sampled_from([b"\r\n.\r\n", b"\r\n.\r\n", b"\n.\n", b"\r\n.\n", b"", b".\r\n"]))
    return b"DATA\r\n" + b"\r\n".join(lines) + end


@st.composite
def bdat(draw: st.DrawFn) -> bytes:
    # RFC 3030: BDAT is not offered; the chunk that follows is read as commands.
    chunk = draw(st.binary(max_size=20) | commands())
    return b"BDAT %d LAST\r\n" % len(chunk) + chunk


@st.composite
def sessions(draw: st.DrawFn) -> bytes:
    """A client session: mostly the usual opening, then a pipelined mix of the above."""
    parts = []
    if draw(st.booleans()):
        parts.append(b"EHLO client.example\r\n")
        if draw(st.booleans()):
            parts.append(b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<b@example.com>\r\n")
    pieces = st.one_of(commands(), commands(), commands(), data_blocks(), bdat(),
                       st.just(inputs.TLS_RECORD), st.just(b"STARTTLS\r\n"), inputs.noise)
    parts += draw(st.lists(pieces, max_size=14))
    return b"".join(parts)


@fuzz_settings(200)
@given(sessions())
@example(b"EHLO c\r\nMAIL FROM:<a@xn--a>\r\n")                 # once a UnicodeError
@example(b"EHLO c\nSTARTTLS")                                   # QUIT discarded after it
@example(b"EHLO c\r\nMAIL FROM:<a@b> SMTPUTF8\r\nRCPT TO:<x@xn--\xc3\x9f>\r\n")
def test_any_client_stream(script: bytes) -> None:
    run(script)
    # Aim hypothesis at sessions that get far: more distinct replies, deeper states.
    target(float(len(set(converse([script], tls=True).written))), label="distinct replies")


@fuzz_settings(100)
@given(sessions(), st.lists(st.integers(0, 3), min_size=1, max_size=12),
       st.lists(st.integers(min_value=0), max_size=12), st.booleans(),
       st.sampled_from([None, SMALL]))
def test_any_policy_and_any_reads(script: bytes, plan: list[int], cuts: list[int],
                                  tls: bool, limits: ServerLimits | None) -> None:
    EXAMPLES[TARGET] += 1
    transcript = converse(split_at(script, cuts), limits=limits, tls=tls, policy=Policy(plan))
    if not tls:
        assert converse([script], limits=limits, policy=Policy(plan)).written == \
            transcript.written


@pytest.mark.parametrize("data", corpus(TARGET))
def test_corpus(data: bytes) -> None:
    with bounded():
        run(data)


@pytest.mark.parametrize("line_end", [b"", b"\r"])
def test_an_endless_line_is_not_buffered(line_end: bytes) -> None:
    """A client that never ends its line costs the core a bounded buffer, in command and in
    DATA state (RFC 5321 4.5.3.1.4 and 4.5.3.1.7: the line and the message have limits)."""
    for prelude in (b"", b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"):
        core = ServerCore(HOST, limits=ServerLimits(max_message_size=100_000))
        core.send(core.greeting_reply)
        transcript = Transcript()
        core.receive_data(prelude)
        drain(core, Policy(), transcript, 100)
        tracemalloc.start()
        try:
            for _ in range(256):
                core.receive_data(b"x" * 16384 + line_end)
                drain(core, Policy(), transcript, 100)
                assert core.buffered < 2048
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1_000_000, f"{peak} octets for a 4 MiB line"
