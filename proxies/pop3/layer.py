"""One intercepted POP3 connection as a sans-I/O layer: events in, commands out, no asyncio.

The driver (`proxies.pop3.session`) owns the sockets, the tasks and the one timer. It puts
each side's bytes into the layer's readers (`client`, `server`: the codec's), tells the layer
what happened (`handle(event, now)`) and carries out the commands that come back, in order:
send to the client or the server, connect, start TLS, scan, quarantine, pass the encrypted
bytes through, close (both plain data, in `proxies.pop3.events`). `wake_at` is when the layer
next needs a `Tick`. Tests drive the layer the same way with scripted bytes and times, both
peers played by the test.

The conversation itself reads top to bottom (`_session`): it is a generator that yields what
it waits for (`Wait`: a side's bytes, the client's transport draining, a result) with the
deadline after which the wait fails, and is resumed by `handle`. Nothing in it does I/O.
It is written in parts, each a class that Pop3Layer is built from: `conversation`
(`Conversing`: the waits and what every part reads), `ahead` (`ScanningAhead`: [pop3]
scan_ahead), `fetch` (`Fetching`: RETR and TOP), and this module (the session, relaying,
CAPA, STLS, AUTH, and the driver's side). Their settings are the session's `Pop3Config`.

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
from collections.abc import Callable
from typing import Any

from proxies import logs
from proxies.pop3 import states
from proxies.pop3.ahead import Ahead
from proxies.pop3.codec import ClientReader, Closed, Command, SaslLine, ServerReader, multiline
from proxies.pop3.conversation import (
    CHUNK,
    SERVER_LATE,
    SERVER_LATE_MIDWAY,
    STOPPED_READING,
    TIMEOUT,
    Abort,
    Conversation,
    Failure,
    LayerSetup,
    Wait,
    WaitKind,
    command_line,
    where,
)
from proxies.pop3.errors import err
from proxies.pop3.events import (
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
    QuarantineDone,
    ScanDone,
    SendServer,
    ServerReadable,
    StartTls,
    Tick,
    TlsDone,
)
from proxies.pop3.fetch import Fetching
from proxies.pop3.relay import (
    SERVER_INVALID,
    AuthExchange,
    RelayFailed,
    ResponseRelay,
    SessionFacts,
    client_capabilities,
    route,
)

__all__ = ["CHUNK", "LayerSetup", "Pop3Layer"]

MAX_UNKNOWN_COMMANDS = 20
MAX_CAPA_SIZE = 64 * 1024
UNREACHABLE = err("[SYS/TEMP] cannot reach the mail server")
TLS_FAILED = err("[SYS/TEMP] TLS with the mail server failed")
_RESULTS: dict[type, WaitKind] = {Connected: "connect", ConnectFailed: "connect",
                                  TlsDone: "tls", QuarantineDone: "quarantine"}


class Pop3Layer(Fetching):
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
        self._ahead: Ahead | None = None
        self._serving: Ahead | None = None  # the one taken for the RETR being answered
        self._listing_tried = False  # scan_ahead asked for a whole LIST once
        self._peek_reading = False  # in _read_peeked: the copy's verdict resumes a server wait
        self._tokens = itertools.count(1)
        self._out: list[Command_] = []
        self._wait: Wait | None = None
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
                self._throw(Abort("the server sent data nobody asked for", SERVER_INVALID))
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
                self._throw(Abort("the client closed the connection"))
        elif isinstance(event, Tick):
            deadline, abort = self._deadline(wait)
            if deadline is not None and now >= deadline:
                if abort is not None:
                    self._throw(Abort(*abort))
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

    def close(self) -> None:
        """The session is over however it ended: release what the conversation holds."""
        self._conversation.close()
        self._wait = None

    # --- running the conversation ---------------------------------------------------------------

    def _deadline(self, wait: Wait) -> tuple[float | None, Failure | None]:
        if wait.stalls and self.client_paused:
            return self.paused_since + self.config.client_timeout, STOPPED_READING
        return wait.deadline, wait.abort

    def _resume(self, value: object) -> None:
        self._step(self._conversation.send, value)

    def _throw(self, abort: Abort) -> None:
        self._step(self._conversation.throw, abort)

    def _step(self, how: Callable[[Any], Wait], value: object) -> None:
        try:
            self._wait = how(value)
        except StopIteration:
            self._end(None, None)
        except Abort as exc:
            self._end(exc.reason, exc.reply)
        except Exception:  # a bug: log it with the session id, end only this session
            logs.error("pop3_session_crashed", id=self.setup.ident, exc_info=True)
            self._end("internal error", None)

    def _end(self, error: str | None, reply: bytes | None) -> None:
        self._wait = None
        self.finished = True
        if not self.passthrough or error is not None:
            self._out.append(Close(error, reply))


    # --- the conversation -------------------------------------------------------------------------

    def _session(self) -> Conversation:
        self._emit(Connect())
        connected = yield Wait("connect")
        if isinstance(connected, ConnectFailed):
            raise Abort(f"connecting to the server: {connected.reason}", UNREACHABLE)
        greeting = yield from self._server_status()
        if not greeting.ok:
            self._to_client(greeting.raw)
            raise Abort("the server refused the session")
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
                             server=where(self.setup.destination),
                             detail="TLS relayed end to end: this session's mail is not scanned")
                self._emit(Passthrough())
                return

    def _command(self, command: Command) -> Conversation:
        decision = route(command, self.state, self.scanned)
        if decision.unknown:
            self.unknown_commands += 1
            if self.unknown_commands > MAX_UNKNOWN_COMMANDS:
                raise Abort("too many unknown commands", err("too many unknown commands"))
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
                raise Abort(exc.reason, exc.reply) from None
            if step.out:
                self._to_client(step.out)
                active = self.now
            if step.done:
                return
            got = yield Wait("server", active + self.config.server_timeout,
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
        status = yield from self._ask_server(command_line("CAPA"))
        if not status.ok:
            return  # no CAPA (RFC 1939-only server): no STLS either
        body = yield from self._server_body(MAX_CAPA_SIZE)
        capabilities = {line.split()[0].upper() for line in body.split(b"\r\n") if line.split()}
        if b"STLS" not in capabilities:
            logs.event("pop3_server_without_tls", id=self.setup.ident,
                       server=where(self.setup.destination))
            return
        self.server_offers_stls = True
        status = yield from self._ask_server(command_line("STLS"))
        if not status.ok:
            raise Abort("the server offered STLS and then refused it", TLS_FAILED)
        if self.server.take_buffer():
            raise Abort("the server sent plaintext after STLS", SERVER_INVALID)
        self._emit(StartTls("server"))
        done: TlsDone = yield Wait("tls")
        if done.error is not None:
            raise Abort(f"TLS with the server failed: {done.error}", TLS_FAILED)

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
            raise Abort("the client sent data after STLS before the TLS handshake",
                         err("nothing may follow STLS before the TLS handshake"))
        self._to_client(b"+OK Begin TLS negotiation now\r\n")
        self._emit(StartTls("client"))
        done: TlsDone = yield Wait("tls")
        if done.error is not None:
            raise Abort(f"TLS with the client failed: {done.error}")
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
                raise Abort("the client left during AUTH")
            exchange.client_line(event.data)
            self._emit(SendServer(event.raw))
            status = yield from self._server_status()
        exchange.finished(status)
        self._to_client(status.raw)

