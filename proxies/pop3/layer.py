"""One intercepted POP3 connection as a sans-I/O layer: events in, commands out, no asyncio.

The driver (`proxies.pop3.session`) owns the sockets, the tasks and the one timer. It puts
each side's bytes into the layer's readers (`client`, `server`: the codec's), tells the layer
what happened (`handle(event, now)`) and carries out the commands that come back, in order:
send to the client or the server, connect, start TLS, scan, quarantine, pass the encrypted
bytes through, close (both plain data, in `proxies.pop3.events`). `wake_at` is when the layer
next needs a `Tick`. Tests drive the layer the same way with scripted bytes and times, both
peers played by the test.

The conversation itself reads top to bottom (`_session`): it is a generator that yields what
it waits for (`_Wait`: a side's bytes, the client's transport draining, a result) with the
deadline after which the wait fails, and is resumed by `handle`. Nothing in it does I/O.

What the layer does (RFC 1939, 2449, 2595, 5034): most commands and responses are relayed as
they are; the proxy steps in for

- RETR and TOP (TOP unless scan_top = false): the message is taken whole from the server
  (`Spool`: memory, then a temporary file), scanned, and the client gets the original, a tagged
  copy, a notice, or -ERR [SYS/TEMP] (`policy.decide`); `Keepalive` keeps a slow one alive;
- CAPA: STLS is shown or hidden by the TLS mode; the rest is the server's list;
- STLS: "terminate" answers it here and does TLS with the gateway's certificate, the server
  connection having been upgraded right after its greeting when it offers STLS;
  "passthrough" relays it and then the encrypted bytes, unscanned (logged); "strip" hides it;
- commands a state does not allow (`states.check`): answered here with -ERR.

A client that pipelines (RFC 2449 6.6) is served in order: the next command is taken only once
the response before it is complete. Whatever goes wrong on one side, the other gets a -ERR when
one can still be sent, or a closed connection; the proxy never sends QUIT for a client (RFC
1939 6: only the client's QUIT deletes messages) and never logs credentials.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from proxies import logs, metrics
from proxies.mail.headers import Header, parse_header
from proxies.pop3 import rewrite, states
from proxies.pop3.cache import CachedScan, CacheKey, ScanCache
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
    multiline,
)
from proxies.pop3.config import Pop3Config
from proxies.pop3.errors import RemoteProtocolError, err
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
from proxies.pop3.keepalive import Keepalive
from proxies.pop3.policy import decide
from proxies.pop3.relay import (
    SERVER_GONE,
    SERVER_INVALID,
    AuthExchange,
    RelayFailed,
    ResponseRelay,
    SessionFacts,
    client_capabilities,
    message_number,
    route,
)
from proxies.pop3.spool import Spool
from proxies.scan.api import ScanResult
from proxies.transparent import Address

__all__ = ["CHUNK", "LayerSetup", "Pop3Layer"]

CHUNK = 1 << 20  # content written to the client between two waits for its transport to drain
MAX_UNKNOWN_COMMANDS = 20
MAX_CAPA_SIZE = 64 * 1024
SCAN_AHEAD_MAX = 2 * 1024 * 1024  # the largest message scanned ahead (kept until it is asked)
NO_PEEK_MAX = 4096  # servers remembered as not to be scanned ahead with TOP
MAX_LISTING = 1 << 20  # the longest LIST listing kept for scan_ahead (some 80,000 messages)
# RFC 2449 8 and RFC 3206: response codes of a failure that may not happen again.
TRANSIENT_CODES = (b"[SYS/TEMP]", b"[IN-USE]", b"[LOGIN-DELAY]")

SERVER_SILENT = err("[SYS/TEMP] the mail server did not answer in time")

# Why a wait fails at its deadline, and what the client is told (made once: a wait is made at
# every step, its failure rarely).
Failure = tuple[str, bytes | None]
STOPPED_READING: Failure = ("the client stopped reading", None)
AUTOLOGOUT: Failure = ("client idle: autologout", err("[SYS/TEMP] autologout: idle for too long"))
SERVER_LATE: Failure = ("the server did not answer in time", SERVER_SILENT)
SERVER_LATE_MIDWAY: Failure = ("the server did not answer in time", None)
UNREACHABLE = err("[SYS/TEMP] cannot reach the mail server")
TLS_FAILED = err("[SYS/TEMP] TLS with the mail server failed")


class _Abort(Exception):
    """End the session: `reply` (if any) goes to the client first."""

    def __init__(self, reason: str, reply: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


class _Timeout:
    """What a wait with no `abort` gets when its deadline comes."""


TIMEOUT = _Timeout()

WaitKind = Literal["client", "server", "writable", "flush", "connect", "tls", "scan",
                   "quarantine"]
_RESULTS: dict[type, WaitKind] = {Connected: "connect", ConnectFailed: "connect",
                                  TlsDone: "tls", QuarantineDone: "quarantine"}


@dataclass(frozen=True)
class _Wait:
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


Conversation = Generator[_Wait, Any, None]


def _command(line: str) -> Command:
    verb, _, argument = line.partition(" ")
    return Command(verb, argument.encode(), line.encode() + b"\r\n")


@dataclass
class _Held:
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


class Pop3Layer:
    def __init__(self, setup: LayerSetup, client: ClientReader | None = None) -> None:
        self.setup = setup
        self.config = setup.config
        self.client = client if client is not None else ClientReader()
        self.server = ServerReader()
        self.facts = SessionFacts()  # state, user and UIDLs, learnt from what is relayed
        self.now = 0.0  # loop time, as of the event being handled
        self.client_tls = False
        self.server_offers_stls = False
        self.passthrough = False
        self.client_paused = False
        self.paused_since = 0.0
        self.messages = 0
        self.unknown_commands = 0
        self.scanned = frozenset(({"RETR", "TOP"} if self.config.scan_top else {"RETR"})
                                 if setup.scanning else ())
        self.finished = False
        self._ahead: _Ahead | None = None
        self._serving: _Ahead | None = None  # the one taken for the RETR being answered
        self._listing_tried = False  # scan_ahead asked for a whole LIST once
        self._peek_reading = False  # in _read_peeked: the copy's verdict resumes a server wait
        self._tokens = itertools.count(1)
        self._out: list[Command_] = []
        self._wait: _Wait | None = None
        self._conversation = self._session()

    # --- the driver's side ----------------------------------------------------------------------

    def start(self, now: float) -> list[Command_]:
        self.now = self.paused_since = now
        self._out = []
        self._resume(None)
        return self._out

    def handle(self, event: Event, now: float) -> list[Command_]:
        self.now = now
        out = self._out = []
        wait = self._wait
        if wait is None:
            return out
        if isinstance(event, ScanDone):
            for ahead in (self._ahead, self._serving):
                if ahead is not None and event.token == ahead.token:
                    ahead.result = event.result
            if wait.kind == "scan" and wait.token == event.token:
                self._resume(event)
            elif (wait.kind == "server" and self._peek_reading and self._serving is not None
                  and event.token == self._serving.token):
                self._resume(event)  # the peeked RETR's relay may start now
            return out
        kind = _RESULTS.get(type(event))
        if kind is not None:
            # Asked for by the last step, so awaited now; anything else is stale (a scan the
            # layer gave up on) and must not pass for a later one's result.
            if wait.kind == kind:
                self._resume(event)
            return out
        if isinstance(event, ServerReadable):
            if wait.kind == "server":
                self._resume(event)
            elif self.server.state == "idle" and self.server.buffered:
                # Nothing was asked: a server talking out of turn is broken or hostile, and
                # its bytes must not pass for the answer to the client's next command.
                self._throw(_Abort("the server sent data nobody asked for", SERVER_INVALID))
        elif isinstance(event, ClientReadable):
            if wait.kind == "client":
                self._resume(event)
        elif isinstance(event, ClientPaused):
            if not self.client_paused:
                self.client_paused = True
                self.paused_since = now
        elif isinstance(event, ClientWritable):
            self.client_paused = False
            if wait.kind in ("writable", "flush") or wait.stalls:
                self._resume(event)
        elif isinstance(event, ClientLost):
            if wait.kind == "client":
                self._resume(event)  # the reader has the EOF
            else:
                self._throw(_Abort("the client closed the connection"))
        elif isinstance(event, Tick):
            deadline, abort = self._deadline(wait)
            if deadline is not None and now >= deadline:
                if abort is not None:
                    self._throw(_Abort(*abort))
                else:
                    self._resume(TIMEOUT)
        return out

    @property
    def wake_at(self) -> float | None:
        wait = self._wait
        return None if wait is None else self._deadline(wait)[0]

    @property
    def forwarding(self) -> bool:
        """The server's bytes go on to the client as they come (a relayed response): while
        the client does not read, neither should the driver read the server."""
        return self._wait is not None and self._wait.stalls

    @property
    def waiting(self) -> WaitKind | None:
        return None if self._wait is None else self._wait.kind

    @property
    def state(self) -> states.SessionState:
        return self.facts.state

    @property
    def user(self) -> str | None:
        return self.facts.user

    def close(self) -> None:
        """The session is over however it ended: release what the conversation holds."""
        self._conversation.close()
        self._wait = None

    # --- running the conversation ---------------------------------------------------------------

    def _deadline(self, wait: _Wait) -> tuple[float | None, Failure | None]:
        if wait.stalls and self.client_paused:
            return self.paused_since + self.config.client_timeout, STOPPED_READING
        return wait.deadline, wait.abort

    def _resume(self, value: object) -> None:
        self._step(self._conversation.send, value)

    def _throw(self, abort: _Abort) -> None:
        self._step(self._conversation.throw, abort)

    def _step(self, how: Callable[[Any], _Wait], value: object) -> None:
        try:
            self._wait = how(value)
        except StopIteration:
            self._end(None, None)
        except _Abort as exc:
            self._end(exc.reason, exc.reply)
        except Exception:  # a bug: log it with the session id, end only this session
            logs.error("pop3_session_crashed", id=self.setup.ident, exc_info=True)
            self._end("internal error", None)

    def _end(self, error: str | None, reply: bytes | None) -> None:
        self._wait = None
        self.finished = True
        if not self.passthrough or error is not None:
            self._out.append(Close(error, reply))

    def _emit(self, command: Command_) -> None:
        self._out.append(command)

    def _to_client(self, data: bytes) -> None:
        self._out.append(SendClient(data))

    # --- waiting --------------------------------------------------------------------------------

    def _flush(self) -> Conversation:
        """Until the client's transport has taken what was sent (bounded memory)."""
        yield _Wait("flush", self.now + self.config.client_timeout, STOPPED_READING)

    def _client_event(self) -> Generator[_Wait, Any, Command | SaslLine | Closed]:
        # RFC 1939 3's autologout counts from our last response: a command trickling in a
        # byte at a time does not restart it.
        idle_since = self.now
        while True:
            if self.client_paused:  # not reading: no new command until it does
                yield _Wait("writable", self.paused_since + self.config.client_timeout,
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
            yield _Wait("client", idle_since + self.config.client_timeout, AUTOLOGOUT)

    def _server_event(self, held: _Held | None = None) -> Generator[_Wait, Any, ServerEvent]:
        deadline = self.now + self.config.server_timeout
        while True:
            event = self._next_server_event()
            if not isinstance(event, NeedData):
                return event
            if held is None:
                yield _Wait("server", deadline, SERVER_LATE)
            else:
                yield from self._held_wait(held, deadline)

    def _next_server_event(self) -> ServerEvent | NeedData:
        try:
            return self.server.next_event()
        except RemoteProtocolError as exc:
            raise _Abort(exc.message, exc.reply or SERVER_INVALID) from None

    def _held_wait(self, held: _Held, deadline: float) -> Generator[_Wait, Any, object]:
        """A wait for the server while a response is held back: the keep-alive meanwhile."""
        got = yield _Wait("server", min(deadline, held.keepalive.next_due))
        if got is TIMEOUT:
            if self.now >= deadline:
                raise _Abort("the server did not answer in time", SERVER_SILENT)
            self._keepalive_tick(held)
        return got

    def _server_status(self) -> Generator[_Wait, Any, Status]:
        event = yield from self._server_event()
        if isinstance(event, Closed):
            raise _Abort("the server closed the connection", SERVER_GONE)
        if not isinstance(event, Status):
            raise _Abort("the server sent content where a status line belongs", SERVER_INVALID)
        return event

    def _ask_server(self, command: Command, *,
                    unstuff: bool = False) -> Generator[_Wait, Any, Status]:
        self.server.expect(command, unstuff=unstuff)
        self._emit(SendServer(command.raw))
        return (yield from self._server_status())

    def _server_body(self, limit: int) -> Generator[_Wait, Any, bytes]:
        """A (small) multi-line response body; a longer one ends the session."""
        body = yield from self._body_within(limit, read_on=False)
        assert body is not None
        return body

    def _body_within(self, limit: int, *, read_on: bool) -> Generator[_Wait, Any, bytes | None]:
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
                    raise _Abort("the server's response is too long", SERVER_INVALID)
            elif isinstance(event, BodyEnd):
                return b"".join(pieces) if size <= limit else None
            else:
                raise _Abort("the server closed the connection mid-response", SERVER_GONE)

    # --- the conversation -------------------------------------------------------------------------

    def _session(self) -> Conversation:
        self._emit(Connect())
        connected = yield _Wait("connect")
        if isinstance(connected, ConnectFailed):
            raise _Abort(f"connecting to the server: {connected.reason}", UNREACHABLE)
        greeting = yield from self._server_status()
        if not greeting.ok:
            self._to_client(greeting.raw)
            raise _Abort("the server refused the session")
        if self.config.tls in ("terminate", "strip"):
            yield from self._upgrade_server()
        self._to_client(greeting.raw)
        while self.state is not states.SessionState.CLOSED:
            event = yield from self._client_event()
            if isinstance(event, Closed):
                return
            if isinstance(event, SaslLine):  # cannot happen outside AUTH; be safe
                continue
            yield from self._command(event)
            if self.passthrough:
                logs.warning("pop3_tls_passthrough", id=self.setup.ident,
                             server=_where(self.setup.destination),
                             detail="TLS relayed end to end: this session's mail is not scanned")
                self._emit(Passthrough())
                return

    def _command(self, command: Command) -> Conversation:
        decision = route(command, self.state, self.scanned)
        if decision.unknown:
            self.unknown_commands += 1
            if self.unknown_commands > MAX_UNKNOWN_COMMANDS:
                raise _Abort("too many unknown commands", err("too many unknown commands"))
        if decision.action == "reply":
            self._to_client(decision.reply)
        elif decision.action == "stls":
            yield from self._stls(command)
        elif decision.action == "auth":
            yield from self._auth(command)
        elif decision.action == "fetch":
            yield from self._fetch(command)
            yield from self._scan_ahead(command)
        elif decision.action == "capa":
            yield from self._capa(command)
        else:
            yield from self._relay(command)

    def _relay(self, command: Command) -> Conversation:
        """The response, passed on as its bytes come: one write per step, so a small response
        leaves in one segment."""
        self.server.expect(command)
        self._emit(SendServer(command.raw))
        relaying = ResponseRelay(command, self.server, self.facts)
        active = self.now
        while True:
            try:
                step = relaying.step()
            except RelayFailed as exc:
                raise _Abort(exc.reason, exc.reply) from None
            if step.out:
                self._to_client(step.out)
                active = self.now
            if step.done:
                return
            got = yield _Wait("server", active + self.config.server_timeout,
                              SERVER_LATE_MIDWAY if relaying.started else SERVER_LATE,
                              stalls=True)
            if isinstance(got, ClientWritable):
                active = self.now  # the server waited for the client, not the other way

    def _capa(self, command: Command) -> Conversation:
        status = yield from self._ask_server(command)
        self.facts.state = states.next_state(self.state, command.verb, status.ok)
        if not (status.ok and self.server.state == "body"):
            self._to_client(status.raw)
            return
        body = yield from self._server_body(MAX_CAPA_SIZE)
        offer_stls = (self.config.tls == "terminate" and not self.client_tls
                      and self.server_offers_stls and self.setup.our_certificate)
        self._to_client(multiline(status.raw, client_capabilities(
            body, self.config.tls, offer_stls)))

    # --- TLS ----------------------------------------------------------------------------------

    def _upgrade_server(self) -> Conversation:
        """STLS towards the server right after its greeting, when it offers it (RFC 2595 4).

        A server that offers STLS and then fails it ends the session: going on in plain text
        would be the silent downgrade the TLS modes exist to prevent.
        """
        status = yield from self._ask_server(_command("CAPA"))
        if not status.ok:
            return  # no CAPA (RFC 1939-only server): no STLS either
        body = yield from self._server_body(MAX_CAPA_SIZE)
        capabilities = {line.split()[0].upper() for line in body.split(b"\r\n") if line.split()}
        if b"STLS" not in capabilities:
            logs.event("pop3_server_without_tls", id=self.setup.ident,
                       server=_where(self.setup.destination))
            return
        self.server_offers_stls = True
        status = yield from self._ask_server(_command("STLS"))
        if not status.ok:
            raise _Abort("the server offered STLS and then refused it", TLS_FAILED)
        if self.server.take_buffer():
            raise _Abort("the server sent plaintext after STLS", SERVER_INVALID)
        self._emit(StartTls("server"))
        done: TlsDone = yield _Wait("tls")
        if done.error is not None:
            raise _Abort(f"TLS with the server failed: {done.error}", TLS_FAILED)

    def _stls(self, command: Command) -> Conversation:
        mode = self.config.tls
        if mode == "passthrough":
            status = yield from self._ask_server(command)
            self._to_client(status.raw)
            if status.ok:
                self.passthrough = True
            return
        if (mode == "strip" or self.client_tls or not self.server_offers_stls
                or not self.setup.our_certificate):
            self._to_client(err("STLS not available" if not self.client_tls
                                else "already using TLS"))
            return
        if self.client.buffered:
            # RFC 2595 4: nothing may follow STLS before the handshake; plaintext that does
            # would be read as if it came over TLS (command injection).
            raise _Abort("the client sent data after STLS before the TLS handshake",
                         err("nothing may follow STLS before the TLS handshake"))
        self._to_client(b"+OK Begin TLS negotiation now\r\n")
        self._emit(StartTls("client"))
        done: TlsDone = yield _Wait("tls")
        if done.error is not None:
            raise _Abort(f"TLS with the client failed: {done.error}")
        self.client_tls = True

    # --- AUTH -----------------------------------------------------------------------------------

    def _auth(self, command: Command) -> Conversation:
        """A SASL exchange (RFC 5034), relayed line by line; the lines are never logged."""
        exchange = AuthExchange(command, self.facts)
        status = yield from self._ask_server(command)
        while status.kind == "continue":
            self._to_client(status.raw)
            self.client.expect_sasl()
            event = yield from self._client_event()
            if not isinstance(event, SaslLine):
                raise _Abort("the client left during AUTH")
            exchange.client_line(event.data)
            self._emit(SendServer(event.raw))
            status = yield from self._server_status()
        exchange.finished(status)
        self._to_client(status.raw)

    # --- RETR and TOP -----------------------------------------------------------------------------

    def _cache_key(self, command: Command) -> Generator[_Wait, Any, CacheKey | None]:
        arguments = command.arguments
        if not self.setup.cache.enabled or self.user is None or not arguments:
            return None
        number = message_number(arguments[0])
        if number is None:
            return None
        if number not in self.facts.uidls:
            status = yield from self._ask_server(_command(f"UIDL {number.decode()}"))
            if not status.ok:
                return None
            self.facts.learn_uidl(status.text)
            if number not in self.facts.uidls:
                return None
        scope = "RETR" if command.verb == "RETR" else "TOP " + b" ".join(arguments[1:]).decode()
        return CacheKey(self.setup.destination, self.user, self.facts.uidls[number], scope)

    def _fetch(self, command: Command) -> Conversation:
        key = yield from self._cache_key(command)
        ahead = self._take_ahead(command)
        if ahead is not None and not ahead.peeked:
            status_raw = ahead.status
        else:
            # A message peeked at with TOP is still asked for: the server sees the client's
            # RETR as the client sent it, and its answer is checked against what was scanned.
            status = yield from self._ask_server(command, unstuff=True)
            if not (status.ok and self.server.state == "body"):
                if ahead is not None:
                    self._cancel(ahead)
                    self._serving = None
                self._to_client(status.raw)
                return
            status_raw = status.raw
        started = self.now
        held = _Held(status_raw, Keepalive(started, self.config.keepalive_after,
                                           self.config.keepalive_interval), DotStuffer())
        spool = Spool(self.config.spool_threshold, self.config.spool_dir)
        try:
            yield from self._fetch_spooled(command, key, held, spool, started, ahead)
        except _Abort as exc:
            if held.keepalive.status_sent:
                # Too late for -ERR: end without the final "." (an incomplete download).
                raise _Abort(exc.reason) from None
            raise
        finally:
            self._end_stream(held)  # the message was not finished, or its verdict was known
            self._serving = None
            spool.close()

    def _end_stream(self, held: _Held) -> None:
        if held.stream is not None:
            self._emit(CancelScan(held.stream))
            held.stream = None

    def _fetch_spooled(self, command: Command, key: CacheKey | None, held: _Held,
                       spool: Spool, started: float, ahead: _Ahead | None) -> Conversation:
        header: Header | None = None
        # Streamed from its second piece on: a message that comes in one read gains nothing
        # from it, and would pay for a second scan task.
        may_stream = (ahead is None and self.setup.streaming
                      and not (key is not None and self.setup.cache.get(key)))
        if ahead is not None and ahead.peeked:
            peeked = yield from self._read_peeked(held, spool, ahead)
            if peeked.oversize is not None:
                self._peek_differs(ahead)
                yield from self._oversize(command, held, spool, peeked.oversize, started)
                return
            if peeked.delivered:
                assert ahead.result is not None
                self._record(command, key, None, ahead.result, "deliver", ahead=True,
                             size=len(ahead.content), spooled=False, started=started)
                return
            if not peeked.same:
                self._peek_differs(ahead)
                ahead = None
        elif ahead is not None:
            spool.write(ahead.content)
        else:
            while True:
                event = yield from self._server_event(held)
                if isinstance(event, BodyData):
                    if spool.size + len(event.data) > self.config.max_scan_size:
                        # It will not be scanned whatever comes, so nothing more need wait,
                        # and the spool (and the disk under it) never holds more than
                        # max_scan_size, even if the response never ends, as a hostile
                        # server's may not.
                        self._end_stream(held)
                        yield from self._oversize(command, held, spool, event.data, started)
                        return
                    if may_stream and spool.size:
                        may_stream = False
                        held.stream = next(self._tokens)
                        self._emit(StreamScan(held.stream))
                        self._emit(ScanData(held.stream, spool.head(spool.size)))
                    spool.write(event.data)
                    if held.stream is not None:
                        self._emit(ScanData(held.stream, event.data))
                    if header is None and spool.size - len(event.data) < rewrite.HEADER_LIMIT:
                        header = parse_header(spool.head(rewrite.HEADER_LIMIT), False)
                        if header is not None:
                            held.keepalive.offer(header.data[:rewrite.trace_length(header)])
                elif isinstance(event, BodyEnd):
                    break
                else:
                    raise _Abort("the server closed the connection mid-message", SERVER_GONE)
        if header is None:
            header = parse_header(spool.head(rewrite.HEADER_LIMIT),
                                  spool.size <= rewrite.HEADER_LIMIT)
        if header is None:
            header = Header(b"", 0, b"\r\n", ())
        cache = self.setup.cache
        cached = cache.get(key) if key is not None else None
        quarantine_id = cached.quarantine_id if cached else None
        if cached is not None:  # and what was started for it is not needed
            self._end_stream(held)
            if ahead is not None:
                self._cancel(ahead)
            result: ScanResult | None = cached.result
        elif ahead is not None:
            result = ahead.result or (
                yield from self._scan_result(ahead.token, ahead.started, held))
        else:
            token, held.stream = held.stream, None
            result = yield from self._scan(spool.getvalue(), held, token)
        outcome = decide(result, self.config)
        tempfail_reason = ("message too large to scan" if result is None or result.oversize
                           else "content scanner failed")
        if outcome != "deliver" and held.forwarded:
            # What went out was the start of a peeked copy whose RETR then differed: only the
            # original can follow it.
            outcome, tempfail_reason = "tempfail", "the server's RETR differed from its TOP"
        if outcome == "replace" and quarantine_id is None and self.setup.quarantining:
            assert result is not None
            self._emit(Quarantine(spool.getvalue(), result, self._origin(command)))
            stored: QuarantineDone = yield _Wait("quarantine")
            if stored.quarantine_id is None:
                # As SMTP answers 451: a notice would tell the client the message is gone
                # while its original is nowhere, so the message stays on the server instead.
                outcome, tempfail_reason = "tempfail", "quarantine write failed"
            quarantine_id = stored.quarantine_id
        self._record(command, key, cached, result, outcome, ahead=ahead is not None,
                     size=spool.size, spooled=spool.on_disk, started=started,
                     quarantine_id=quarantine_id)
        if outcome == "tempfail":
            if held.keepalive.status_sent:
                # Too late for -ERR: an incomplete download instead.
                raise _Abort(tempfail_reason)
            # The whole response was read, so the session goes on; the message stays.
            self._to_client(err(f"[SYS/TEMP] message temporarily unavailable "
                                f"({tempfail_reason}), try again later"))
            return
        pieces = rewrite.retrieved(outcome, header, result, spool,
                                   subject_prefix=self.config.subject_prefix,
                                   sent_early=held.keepalive.sent,
                                   quarantine_id=quarantine_id, hostname=self.setup.hostname)
        yield from self._deliver(held, pieces)

    def _record(self, command: Command, key: CacheKey | None, cached: CachedScan | None,
                result: ScanResult | None, outcome: str, *, ahead: bool, size: int,
                spooled: bool, started: float, quarantine_id: str | None = None) -> None:
        """A retrieval decided: its verdict cached, logged and counted."""
        if key is not None and result is not None and cached is None:
            self.setup.cache.put(key, result, quarantine_id)
        self.messages += 1
        fields: dict[str, Any] = {
            "id": self.setup.ident, "command": command.loggable(), "size": size,
            "verdict": "oversize" if result is None else result.verdict, "action": outcome,
            "cached": cached is not None, "ahead": ahead, "spooled": spooled,
            "seconds": round(self.now - started, 3)}
        if result is not None and result.virus:
            fields["virus"] = result.virus
        if result is not None and result.reason:
            fields["reason"] = result.reason
        if quarantine_id:
            fields["quarantine"] = quarantine_id
        logs.event("pop3_message", **fields)
        metrics.current.pop3_retrieval(outcome, fields["verdict"])

    def _origin(self, command: Command) -> dict[str, str]:
        client, server = self.setup.client, self.setup.destination
        return {"client_address": client[0], "client_port": str(client[1]),
                "server_host": server[0], "server_port": str(server[1]),
                "user": self.user or "", "command": command.loggable()}

    def _oversize(self, command: Command, held: _Held, spool: Spool, pending: bytes,
                  started: float) -> Conversation:
        """The message passed max_scan_size while it arrived: [pop3] oversize_action, now.

        `pending`: the piece that did not fit. "pass": what is spooled and `pending` go to the
        client and the rest is relayed as it comes, so the proxy holds at most max_scan_size
        of it. "tempfail": -ERR [SYS/TEMP] (or, after an early status line, a close without
        the final "."), and the session ends: the rest of the response would have to be read
        to go on, and it may never end. The client never sent QUIT, so the message stays on
        the server either way.
        """
        outcome = decide(None, self.config)
        fields: dict[str, Any] = {
            "id": self.setup.ident, "command": command.loggable(), "verdict": "oversize",
            "action": outcome, "cached": False, "spooled": spool.on_disk}
        if outcome == "tempfail":
            self.messages += 1
            logs.event("pop3_message", size=spool.size + len(pending), **fields,
                       seconds=round(self.now - started, 3))
            metrics.current.pop3_retrieval(outcome, "oversize")
            raise _Abort("message too large to scan", err(
                "[SYS/TEMP] message temporarily unavailable (message too large to scan), "
                "try again later"))
        size = spool.size + len(pending)
        yield from self._deliver(held, itertools.chain(spool.chunks(), [pending]), end=False)
        spool.close()
        out: list[bytes] = []
        buffered = 0
        while True:
            try:
                event = self.server.next_event()
            except RemoteProtocolError as exc:
                raise _Abort(exc.message) from None
            if isinstance(event, NeedData):
                if out:
                    self._to_client(b"".join(out))
                    out.clear()
                    buffered = 0
                yield _Wait("server", self.now + self.config.server_timeout,
                            SERVER_LATE_MIDWAY, stalls=True)
                continue
            if isinstance(event, BodyData):
                size += len(event.data)
                out.append(held.stuffer.send(event.data))
                buffered += len(event.data)
                if buffered >= CHUNK:
                    self._to_client(b"".join(out))
                    out.clear()
                    buffered = 0
                    yield from self._flush()
            elif isinstance(event, BodyEnd):
                break
            else:
                # The status line has gone: a close without the final "." is all that is left.
                raise _Abort("the server closed the connection mid-message")
        out.append(held.stuffer.end())
        self._to_client(b"".join(out))
        self.messages += 1
        logs.event("pop3_message", size=size, **fields, seconds=round(self.now - started, 3))
        metrics.current.pop3_retrieval(outcome, "oversize")

    def _deliver(self, held: _Held, pieces: Iterable[bytes], *, end: bool = True) -> Conversation:
        out = [] if held.keepalive.status_sent else [held.status]
        size = 0
        # Sent early: by the keep-alive (every outcome starts with them), or forwarded from a
        # peeked copy (only the original follows those); the one may include the other.
        skip = max(held.keepalive.sent, held.forwarded)
        for piece in pieces:
            if skip:
                cut = min(skip, len(piece))
                piece, skip = piece[cut:], skip - cut
            if piece:
                out.append(held.stuffer.send(piece))
                size += len(piece)
                if size >= CHUNK:
                    self._to_client(b"".join(out))
                    out.clear()
                    size = 0
                    held.keepalive.status_sent = True
                    yield from self._flush()
        if end:
            out.append(held.stuffer.end())
        self._to_client(b"".join(out))
        held.keepalive.status_sent = True  # what follows is past any -ERR

    def _keepalive_tick(self, held: _Held) -> None:
        step = held.keepalive.due(self.now)
        if step is None:
            return
        if step.send_status:
            self._to_client(held.status)
            logs.event("pop3_keepalive", id=self.setup.ident, detail="status line sent early")
        if step.content:
            self._to_client(held.stuffer.send(step.content))

    def _scan(self, content: bytes, held: _Held,
              token: int | None = None) -> Generator[_Wait, Any, ScanResult]:
        """The verdict on `content`: a new scan, or the end of the stream `token`."""
        if token is None:
            token = next(self._tokens)
        self._emit(Scan(content, token))
        return (yield from self._scan_result(token, self.now, held))

    def _scan_result(self, token: int, started: float,
                     held: _Held) -> Generator[_Wait, Any, ScanResult]:
        deadline = started + self.config.scan_timeout
        while True:
            got = yield _Wait("scan", min(deadline, held.keepalive.next_due), token=token)
            if isinstance(got, ScanDone):
                return got.result
            if self.now >= deadline:
                self._emit(CancelScan(token))
                return ScanResult("failed", reason="scan timed out", timed_out=True)
            self._keepalive_tick(held)

    # --- scanning ahead ---------------------------------------------------------------------------

    def _scan_ahead(self, command: Command) -> Conversation:
        """[pop3] scan_ahead: after a scanned RETR n, while the client reads it, fetch message
        n+1 and start its scan, so that a client downloading its mailbox, which asks for n+1
        next, need not wait for the scan.

        "top" fetches it with TOP n+1 (as many lines as it has octets: all of it), which
        changes nothing on the server; the client's RETR n+1 then still goes to the server,
        and its response goes on to the client as it arrives, checked against the scanned
        copy (`_read_peeked`). "retr" fetches it with RETR n+1 and answers the client's RETR
        from that with no second transfer, but the server sees RETR n+1 before the client
        asks: a client that stops before n+1 leaves it marked as retrieved where the server
        keeps such a mark (Dovecot's \\Seen, at QUIT). Any other command waits for that
        response, then takes its turn; another fetch drops what was fetched ahead.

        Only for messages up to SCAN_AHEAD_MAX (kept in memory until asked for), and only when
        the client's next command is not already here.
        """
        mode, arguments = self.config.scan_ahead, command.arguments
        if (mode not in ("top", "retr") or command.verb != "RETR"
                or len(arguments) != 1 or not arguments[0].isdigit() or self.client.has_line
                or self.state is not states.SessionState.TRANSACTION
                or (mode == "top" and self.setup.destination in self.setup.no_peek)):
            return
        number = str(int(arguments[0]) + 1)
        cache, uid = self.setup.cache, self.facts.uidls.get(number.encode())
        if (cache.enabled and uid is not None and self.user is not None and cache.get(
                CacheKey(self.setup.destination, self.user, uid, "RETR")) is not None):
            return  # its verdict is known
        limit = min(SCAN_AHEAD_MAX, self.config.max_scan_size)
        size = yield from self._size(number.encode())
        if size is None or size > limit:
            return
        # A body has fewer lines than the message has octets.
        fetch = f"TOP {number} {size}" if mode == "top" else f"RETR {number}"
        status = yield from self._ask_server(_command(fetch), unstuff=True)
        if not (status.ok and self.server.state == "body"):
            if mode == "top" and not _transient(status.text):
                # LIST has just found the message: it is TOP the server cannot do.
                self._no_peek(f"TOP failed: {status.text[:80].decode(errors='replace')}")
            return
        content = yield from self._body_within(limit, read_on=True)
        if content is None:  # longer than its LIST size said: nothing kept
            return
        token = next(self._tokens)
        self._emit(Scan(content, token))
        self._ahead = _Ahead(number.encode(), content, token, self.now, status.raw,
                             peeked=mode == "top")

    def _size(self, number: bytes) -> Generator[_Wait, Any, int | None]:
        """Message `number`'s size, or None if it is not there. The first time, a whole LIST
        (unless the client had one relayed) gives them all, and then no message to be
        fetched ahead costs a LIST of its own; a listing longer than MAX_LISTING does not
        count, and each message is then LISTed alone."""
        facts = self.facts
        if number in facts.deleted:
            return None
        if number in facts.sizes:
            return facts.sizes[number]
        if not facts.listed and not self._listing_tried:
            self._listing_tried = True
            status = yield from self._ask_server(_command("LIST"))
            if status.ok and self.server.state == "body":
                listing = yield from self._body_within(MAX_LISTING, read_on=True)
                if listing is not None:
                    for line in listing.split(b"\r\n"):
                        facts.learn_size(line, listing=True)
                    facts.listed = not facts.sizes_full
        if facts.listed:
            return facts.sizes.get(number)
        status = yield from self._ask_server(_command(f"LIST {number.decode()}"))
        if status.ok:
            facts.learn_size(status.text)
        return facts.sizes.get(number) if status.ok else None

    def _read_peeked(self, held: _Held, spool: Spool,
                     ahead: _Ahead) -> Generator[_Wait, Any, _Peeked]:
        """The server's response to the client's RETR of a message peeked at with TOP, read
        and compared with the copy that was scanned.

        While the two agree and that copy's verdict passes the original, the response goes
        on to the client as it comes, so the client's read overlaps the server's transfer;
        otherwise it waits for the end, with the keep-alive sending of the trace fields only
        what the response has matched so far. A response that differs is kept in `spool`
        (what the client already has of it included), to be scanned itself; one that
        passes max_scan_size meanwhile is handed back unread (`_Peeked.oversize`).
        """
        self._peek_reading = True
        try:
            return (yield from self._compare_peeked(held, spool, ahead))
        finally:
            self._peek_reading = False

    def _compare_peeked(self, held: _Held, spool: Spool,
                        ahead: _Ahead) -> Generator[_Wait, Any, _Peeked]:
        content = ahead.content
        view = memoryview(content)
        header = parse_header(content[:rewrite.HEADER_LIMIT], len(content) <= rewrite.HEADER_LIMIT)
        trace = content[:rewrite.trace_length(header)] if header is not None else b""
        matched = 0  # octets of the response equal to the copy's
        same = True
        forwarding = False  # the copy's verdict is "deliver": matched octets go on at once
        unflushed = 0
        while True:
            if same and not forwarding and ahead.result is not None:
                forwarding = decide(ahead.result, self.config) == "deliver"
            sent = max(held.forwarded, held.keepalive.sent)
            if forwarding and sent < matched:
                piece = content[sent:matched]
                self._to_client(held.stuffer.send(piece) if held.keepalive.status_sent
                                else held.status + held.stuffer.send(piece))
                held.keepalive.status_sent = True
                held.forwarded = matched
                unflushed += len(piece)
                if unflushed >= CHUNK:
                    unflushed = 0
                    yield from self._flush()
            event = yield from self._peeked_event(held)
            if event is None:  # the copy's verdict came first: it may start the relay
                continue
            if isinstance(event, BodyData):
                data = event.data
                if same:
                    if view[matched:matched + len(data)] == data:
                        matched += len(data)
                        if matched - len(data) < len(trace):
                            held.keepalive.offer(trace[:matched])
                        continue
                    same = False
                    spool.write(content[:matched])
                if spool.size + len(data) > self.config.max_scan_size:
                    return _Peeked(same=False, delivered=False, oversize=data)
                spool.write(data)
            elif isinstance(event, BodyEnd):
                break
            else:
                raise _Abort("the server closed the connection mid-message", SERVER_GONE)
        same = same and matched == len(content)
        if same and forwarding:
            sent = max(held.forwarded, held.keepalive.sent)
            self._to_client((b"" if held.keepalive.status_sent else held.status)
                            + held.stuffer.send(content[sent:]) + held.stuffer.end())
            held.keepalive.status_sent = True
            return _Peeked(same=True, delivered=True)
        if same:
            spool.write(content)
        elif not spool.size:
            spool.write(content[:matched])  # a response shorter than the copy
        return _Peeked(same=same, delivered=False)

    def _peeked_event(self, held: _Held) -> Generator[_Wait, Any, ServerEvent | None]:
        """The server's next event for `_read_peeked`, or None if the copy's verdict comes
        first. Until content has gone out the keep-alive runs; after, nothing more may be
        sent early, and the wait stalls with the client, as a relayed response's does."""
        deadline = self.now + self.config.server_timeout
        while True:
            event = self._next_server_event()
            if not isinstance(event, NeedData):
                return event
            if held.forwarded:
                got = yield _Wait("server", deadline, SERVER_LATE_MIDWAY, stalls=True)
                if isinstance(got, ClientWritable):
                    deadline = self.now + self.config.server_timeout  # it waited for the client
            else:
                got = yield from self._held_wait(held, deadline)
            if isinstance(got, ScanDone):
                return None

    def _peek_differs(self, ahead: _Ahead) -> None:
        self._cancel(ahead)
        metrics.current.pop3_scan_ahead("differed")
        self._no_peek("its RETR of a message differed from its TOP")

    def _no_peek(self, why: str) -> None:
        """This server is not scanned ahead with TOP again (by any session of this proxy)."""
        no_peek = self.setup.no_peek
        if len(no_peek) >= NO_PEEK_MAX:  # bounded: any server may be intercepted
            no_peek.pop()
        no_peek.add(self.setup.destination)
        logs.warning("pop3_scan_ahead_off", id=self.setup.ident,
                     server=_where(self.setup.destination), detail=why)

    def _take_ahead(self, command: Command) -> _Ahead | None:
        """The message retrieved ahead if `command` is its RETR (else it is dropped)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        arguments = command.arguments
        if (command.verb == "RETR" and len(arguments) == 1
                and message_number(arguments[0]) == ahead.number
                and ahead.number not in self.facts.deleted):  # the server would refuse it
            metrics.current.pop3_scan_ahead("used")
            self._serving = ahead
            return ahead
        metrics.current.pop3_scan_ahead("dropped")
        self._cancel(ahead)
        return None

    def _cancel(self, ahead: _Ahead) -> None:
        if ahead.result is None:
            self._emit(CancelScan(ahead.token))


@dataclass
class _Ahead:
    """A message retrieved and scanned ahead: its number, the server's response (status
    line, content unstuffed), the scan."""

    number: bytes
    content: bytes
    token: int
    started: float
    status: bytes
    peeked: bool = False  # fetched with TOP: the server has not seen a RETR of it
    result: ScanResult | None = None


@dataclass(frozen=True)
class _Peeked:
    """How the server's RETR of a peeked message compared with the copy: the same bytes
    (and then whether it has gone to the client already)."""

    same: bool
    delivered: bool
    oversize: bytes | None = None  # the piece that took a differing response past max_scan_size


def _transient(text: bytes) -> bool:
    return text[:16].upper().startswith(TRANSIENT_CODES)


def _where(address: Address) -> str:
    return f"[{address[0]}]:{address[1]}"
