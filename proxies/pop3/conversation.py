"""The pieces of the POP3 layer's conversation that all its parts share (sans-I/O, as the
layer: `proxies.pop3.layer` says how it runs): what a step waits for (`Wait`) and how a
session ends (`Abort`), the held-back response of a RETR/TOP (`Held`), the session's setup
(`LayerSetup`), and `Conversing`, the base of the layer's classes: its readers, its commands
out, and the waits for the server's and the client's bytes."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from proxies import logs
from proxies.pop3 import states
from proxies.pop3.cache import ScanCache
from proxies.pop3.codec import (
    BodyData,
    BodyEnd,
    ClientReader,
    Closed,
    Command,
    DotStuffer,
    NeedData,
    SaslLine,
    ServerEvent,
    ServerReader,
    Status,
)
from proxies.pop3.config import Pop3Config
from proxies.pop3.errors import RemoteProtocolError, err
from proxies.pop3.events import Command_, SendClient, SendServer
from proxies.pop3.keepalive import Keepalive
from proxies.pop3.relay import SERVER_GONE, SERVER_INVALID, SessionFacts
from proxies.transparent import Address

__all__ = ["CHUNK", "Abort", "Conversation", "Conversing", "Held", "LayerSetup", "Wait"]

CHUNK = 1 << 20  # content written to the client between two waits for its transport to drain

SERVER_SILENT = err("[SYS/TEMP] the mail server did not answer in time")

# Why a wait fails at its deadline, and what the client is told (made once: a wait is made at
# every step, its failure rarely).
Failure = tuple[str, bytes | None]
STOPPED_READING: Failure = ("the client stopped reading", None)
AUTOLOGOUT: Failure = ("client idle: autologout", err("[SYS/TEMP] autologout: idle for too long"))
SERVER_LATE: Failure = ("the server did not answer in time", SERVER_SILENT)
SERVER_LATE_MIDWAY: Failure = ("the server did not answer in time", None)


class Abort(Exception):
    """End the session: `reply` (if any) goes to the client first."""

    def __init__(self, reason: str, reply: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


class Timeout:
    """What a wait with no `abort` gets when its deadline comes."""


TIMEOUT = Timeout()

WaitKind = Literal["client", "server", "writable", "flush", "connect", "tls", "scan",
                   "quarantine"]


@dataclass(frozen=True)
class Wait:
    """What the conversation waits for, until `deadline` (loop time; None: no limit). At the
    deadline `abort` (why, and the client's reply) ends the session, or, if None, the
    conversation gets TIMEOUT. `stalls`: a wait for the server's bytes that the client's pause
    holds up (the driver stops reading the server while the client does not read), so the
    client's timeout applies meanwhile."""

    kind: WaitKind
    deadline: float | None = None
    abort: Failure | None = None
    stalls: bool = False
    token: int = 0  # the scan waited for


Conversation = Generator[Wait, Any, None]


def command_line(line: str) -> Command:
    verb, _, argument = line.partition(" ")
    return Command(verb, argument.encode(), line.encode() + b"\r\n")


@dataclass
class Held:
    """A RETR/TOP response being held back: the server's status line, the keep-alive clock,
    and the stuffer that keeps the client's byte stream consistent across both."""

    status: bytes
    keepalive: Keepalive
    stuffer: DotStuffer
    # The token of the scan fed as the message arrives (StreamScan), until its verdict is in.
    stream: int | None = None
    # Octets of a peeked message the client has (sent as the RETR matched the TOP copy).
    forwarded: int = 0


@dataclass(frozen=True)
class LayerSetup:
    """What one session's layer is given: the proxy's settings and this connection's facts."""

    config: Pop3Config
    ident: int
    client: Address
    destination: Address
    cache: ScanCache
    hostname: str
    scanning: bool  # a scanner is configured
    quarantining: bool  # replaced originals are kept
    our_certificate: bool  # terminate mode has a certificate to offer STLS with
    streaming: bool = False  # the scanner can take a message while it arrives (StreamScan)
    # Servers not scanned ahead with TOP (shared by the proxy's sessions): their TOP failed,
    # or gave other bytes than their RETR of the same message.
    no_peek: set[Address] = field(default_factory=set)


class Conversing:
    """The state every part of the conversation reads and the steps they all take. The
    attributes are set up by Pop3Layer.__init__."""

    setup: LayerSetup
    config: Pop3Config
    client: ClientReader
    server: ServerReader
    facts: SessionFacts
    now: float
    client_paused: bool
    paused_since: float
    messages: int
    _out: list[Command_]
    _tokens: Iterator[int]

    @property
    def state(self) -> states.SessionState:
        return self.facts.state

    @property
    def user(self) -> str | None:
        return self.facts.user

    def _emit(self, command: Command_) -> None:
        self._out.append(command)

    def _to_client(self, data: bytes) -> None:
        self._out.append(SendClient(data))

    # --- waiting --------------------------------------------------------------------------------

    def _flush(self) -> Conversation:
        """Until the client's transport has taken what was sent (bounded memory)."""
        yield Wait("flush", self.now + self.config.client_timeout, STOPPED_READING)

    def _client_event(self) -> Generator[Wait, Any, Command | SaslLine | Closed]:
        # RFC 1939 3's autologout counts from our last response: a command trickling in a
        # byte at a time does not restart it.
        idle_since = self.now
        while True:
            if self.client_paused:  # not reading: no new command until it does
                yield Wait("writable", self.paused_since + self.config.client_timeout,
                            STOPPED_READING)
                continue
            try:
                event = self.client.next_event()
            except RemoteProtocolError as exc:
                if exc.reply:
                    self._to_client(exc.reply)
                    idle_since = self.now
                continue
            if not isinstance(event, NeedData):
                return event
            yield Wait("client", idle_since + self.config.client_timeout, AUTOLOGOUT)

    def _server_event(self, held: Held | None = None) -> Generator[Wait, Any, ServerEvent]:
        deadline = self.now + self.config.server_timeout
        while True:
            event = self._next_server_event()
            if not isinstance(event, NeedData):
                return event
            if held is None:
                yield Wait("server", deadline, SERVER_LATE)
            else:
                yield from self._held_wait(held, deadline)

    def _next_server_event(self) -> ServerEvent | NeedData:
        try:
            return self.server.next_event()
        except RemoteProtocolError as exc:
            raise Abort(exc.message, exc.reply or SERVER_INVALID) from None

    def _held_wait(self, held: Held, deadline: float) -> Generator[Wait, Any, object]:
        """A wait for the server while a response is held back: the keep-alive meanwhile."""
        got = yield Wait("server", min(deadline, held.keepalive.next_due))
        if got is TIMEOUT:
            if self.now >= deadline:
                raise Abort("the server did not answer in time", SERVER_SILENT)
            self._keepalive_tick(held)
        return got

    def _server_status(self) -> Generator[Wait, Any, Status]:
        event = yield from self._server_event()
        if isinstance(event, Closed):
            raise Abort("the server closed the connection", SERVER_GONE)
        if not isinstance(event, Status):
            raise Abort("the server sent content where a status line belongs", SERVER_INVALID)
        return event

    def _ask_server(self, command: Command, *,
                    unstuff: bool = False) -> Generator[Wait, Any, Status]:
        self.server.expect(command, unstuff=unstuff)
        self._emit(SendServer(command.raw))
        return (yield from self._server_status())

    def _server_body(self, limit: int) -> Generator[Wait, Any, bytes]:
        """A (small) multi-line response body; a longer one ends the session."""
        body = yield from self._body_within(limit, read_on=False)
        assert body is not None
        return body

    def _body_within(self, limit: int, *, read_on: bool) -> Generator[Wait, Any, bytes | None]:
        """A multi-line response body of at most `limit` octets. Past it: an invalid reply
        that ends the session, or (`read_on`) None once the rest has been read and dropped."""
        pieces: list[bytes] = []
        size = 0
        while True:
            event = yield from self._server_event()
            if isinstance(event, BodyData):
                size += len(event.data)
                if size <= limit:
                    pieces.append(event.data)
                elif not read_on:
                    raise Abort("the server's response is too long", SERVER_INVALID)
            elif isinstance(event, BodyEnd):
                return b"".join(pieces) if size <= limit else None
            else:
                raise Abort("the server closed the connection mid-response", SERVER_GONE)

    def _keepalive_tick(self, held: Held) -> None:
        step = held.keepalive.due(self.now)
        if step is None:
            return
        if step.send_status:
            self._to_client(held.status)
            logs.event("pop3_keepalive", id=self.setup.ident, detail="status line sent early")
        if step.content:
            self._to_client(held.stuffer.send(step.content))


def where(address: Address) -> str:
    return f"[{address[0]}]:{address[1]}"
