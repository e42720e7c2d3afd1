"""The POP3 proxy's decisions about what it relays, sans-I/O: what becomes of a client's
command (`route`), a plain command's response on its way from the server to the client
(`ResponseRelay`), and what the session learns from it (`SessionFacts`).

The session's layer (`proxies.pop3.layer`) asks `ResponseRelay.step()` what to pass on each
time the server's reader has new bytes. `SessionFacts` is what the relayed exchanges teach:
the POP3 state, the user (part of the scan cache key) and the UIDLs the server listed.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Literal

from proxies.pop3 import states
from proxies.pop3.codec import BodyData, BodyEnd, Command, NeedData, ServerReader, Status
from proxies.pop3.errors import RemoteProtocolError, err

__all__ = ["AuthExchange", "RelayFailed", "RelayStep", "ResponseRelay", "Route",
           "SessionFacts", "client_capabilities", "route", "sasl_user"]

SERVER_GONE = err("[SYS/TEMP] the mail server closed the connection")
SERVER_INVALID = err("[SYS/TEMP] the mail server sent an invalid reply")


@dataclass(frozen=True)
class Route:
    """What becomes of a client's command.

    `action`: "reply" (the proxy answers `reply` itself: an empty line, a known command in
    the wrong state), "relay" (to the server, its response back as it comes), or the
    exchanges the proxy steps into: "stls", "auth" (with an initial mechanism), "fetch" (a
    RETR or TOP to scan), "capa" (the list rewritten). `unknown`: a verb we do not know (an
    extension), relayed but counted.
    """

    action: Literal["reply", "relay", "stls", "auth", "fetch", "capa"]
    reply: bytes = b""
    unknown: bool = False


def route(command: Command, state: states.SessionState, scanned: frozenset[str]) -> Route:
    """`scanned`: the verbs whose responses are scanned (RETR, and TOP if so configured)."""
    verb = command.verb
    if verb == "":
        return Route("reply", err("empty command"))
    unknown = verb == "?" or verb not in states.KNOWN_VERBS
    try:
        states.check(state, verb)
    except RemoteProtocolError as exc:
        assert exc.reply is not None
        return Route("reply", exc.reply)
    if verb == "STLS":
        return Route("stls")
    if verb == "AUTH" and command.argument.strip():
        return Route("auth")
    if verb in scanned:
        return Route("fetch")
    if verb == "CAPA":
        return Route("capa")
    return Route("relay", unknown=unknown)


def client_capabilities(body: bytes, tls_mode: str, offer_stls: bool) -> bytes:
    """The server's CAPA list as the client should see it (RFC 2449 5, RFC 2595 4).

    "passthrough": as the server sent it (the TLS, if any, is end to end). Otherwise the
    server's STLS is ours to offer or not: `offer_stls` when we terminate TLS for a client
    still in plain text, with a server that offers it and a certificate of our own."""
    if tls_mode == "passthrough":
        return body
    lines = [line for line in body.split(b"\r\n")
             if line.strip() and line.split()[0].upper() != b"STLS"]
    if offer_stls:
        lines.append(b"STLS")
    return b"".join(line + b"\r\n" for line in lines)


MAX_LEARNT = 5000  # entries a listing teaches (a bigger mailbox's others are asked one by one)


def message_number(argument: bytes) -> bytes | None:
    """A message-number argument as the server's listings spell it ("02" is 2), or None."""
    return str(int(argument)).encode() if argument.isdigit() else None


@dataclass
class SessionFacts:
    state: states.SessionState = states.SessionState.AUTHORIZATION
    user: str | None = None
    pending_user: str | None = None  # USER's argument, the user once PASS succeeds
    uidls: dict[bytes, bytes] = field(default_factory=dict)
    sizes: dict[bytes, int] = field(default_factory=dict)  # message number: octets (LIST)
    listed: bool = False  # a whole LIST listing went by: `sizes` has every message
    sizes_full: bool = False  # a listing had more than MAX_LEARNT: `sizes` does not have all
    deleted: set[bytes] = field(default_factory=set)  # marked deleted (DELE, until RSET)

    def learn(self, command: Command, status: Status) -> None:
        """What a status line relayed in answer to `command` teaches."""
        verb = command.verb
        self.state = states.next_state(self.state, verb, status.ok)
        if not status.ok:
            return
        if verb == "USER":
            self.pending_user = command.argument.decode("utf-8", "replace").strip()
        elif verb == "PASS":
            self.user = self.pending_user
        elif verb == "APOP" and command.arguments:
            self.user = command.arguments[0].decode("utf-8", "replace")
        elif verb == "UIDL" and len(command.arguments) == 1:
            self.learn_uidl(status.text)
        elif verb == "LIST" and len(command.arguments) == 1:
            self.learn_size(status.text)
        elif verb == "DELE" and command.arguments:
            number = message_number(command.arguments[0])
            if number is not None:
                self.deleted.add(number)
        elif verb == "RSET":
            if self.deleted:
                # A listing leaves deleted messages out (RFC 1939 5): back, they are in none.
                self.listed = False
            self.deleted.clear()

    def learn_size(self, line: bytes, listing: bool = False) -> None:
        """One line of a LIST listing (`listing`: at most MAX_LEARNT of them are kept) or a
        single LIST's status text: `number octets`."""
        entry = _entry(line)
        if entry is None or not entry[1].isdigit():
            return
        if listing and len(self.sizes) >= MAX_LEARNT:
            self.sizes_full = True
            return
        self.sizes[entry[0]] = int(entry[1])

    def learn_uidl(self, line: bytes, listing: bool = False) -> None:
        """One line of a UIDL listing (`listing`: at most MAX_LEARNT of them are kept) or a
        single UIDL's status text: `number uid`."""
        entry = _entry(line)
        if entry is not None and not (listing and len(self.uidls) >= MAX_LEARNT):
            self.uidls[entry[0]] = entry[1]

    def learnt_listing(self) -> None:
        """A whole LIST listing has gone by (`learn_size` had each line)."""
        self.listed = not self.sizes_full


def _entry(line: bytes) -> tuple[bytes, bytes] | None:
    """A listing line's message number (as `message_number` spells it) and value."""
    parts = line.split()
    number = message_number(parts[0]) if len(parts) >= 2 else None
    return None if number is None else (number, parts[1])


class RelayFailed(Exception):
    """The response cannot be relayed on: `reply` for the client (None once part of the
    response went to it, when all it can get is a closed connection without the final ".",
    which tells it the response is incomplete)."""

    def __init__(self, reason: str, reply: bytes | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


@dataclass(frozen=True)
class RelayStep:
    out: bytes  # for the client, as the server sent it (b"": nothing yet)
    done: bool  # the response is complete


class ResponseRelay:
    """One relayed command's response. `step()` whenever the server's reader has new bytes:
    what it has of the response, in one piece (so a small response leaves in one write)."""

    def __init__(self, command: Command, server: ServerReader, facts: SessionFacts) -> None:
        self.command = command
        self.server = server
        self.facts = facts
        self.started = False  # part of the response went to the client
        # Listings teach each message's UIDL (the scan cache's key) or size (scan_ahead's).
        self._learn = {"UIDL": facts.learn_uidl, "LIST": facts.learn_size}.get(command.verb)
        self._tail = b""  # an unfinished line of the listing

    def step(self) -> RelayStep:
        out: list[bytes] = []
        done = False
        try:
            while True:
                event = self.server.next_event()
                if isinstance(event, NeedData):
                    break
                if isinstance(event, BodyData):
                    out.append(event.data)
                    if self._learn is not None:
                        *lines, self._tail = (self._tail + event.data).split(b"\n")
                        for line in lines:
                            self._learn(line, True)
                elif isinstance(event, BodyEnd):
                    out.append(b".\r\n")
                    done = True
                    if self.command.verb == "LIST":
                        self.facts.learnt_listing()
                    break
                elif isinstance(event, Status):
                    out.append(event.raw)
                    self.facts.learn(self.command, event)
                    if not (event.ok and self.server.state == "body"):
                        done = True
                        break
                else:
                    raise RelayFailed("the server closed the connection",
                                      None if self.started else SERVER_GONE)
        except RemoteProtocolError as exc:
            raise RelayFailed(exc.message, None if self.started or out
                              else exc.reply or SERVER_INVALID) from None
        if out:
            self.started = True
        return RelayStep(b"".join(out), done)


def sasl_user(mechanism: bytes, response: bytes, step: int) -> str | None:
    """The login name in a PLAIN (RFC 4616: authzid NUL authcid NUL passwd) or LOGIN (first
    response) exchange; None for other mechanisms. Only kept for the scan cache key."""
    try:
        decoded = base64.b64decode(response, validate=True)
    except (binascii.Error, ValueError):
        return None
    mech = mechanism.upper()
    if mech == b"PLAIN":
        parts = decoded.split(b"\0")
        return parts[1].decode("utf-8", "replace") if len(parts) == 3 else None
    if mech == b"LOGIN" and step == 0:
        return decoded.decode("utf-8", "replace")
    return None


class AuthExchange:
    """A SASL exchange (RFC 5034) the session relays line by line: what it learns of the user
    from the client's lines (never logged), and what the final status makes of the session."""

    def __init__(self, command: Command, facts: SessionFacts) -> None:
        arguments = command.arguments
        self.mechanism = arguments[0]
        self.facts = facts
        initial = arguments[1] if len(arguments) > 1 else None
        self.user = None if initial is None else sasl_user(self.mechanism, initial, 0)
        self.step = 0 if initial is None else 1

    def client_line(self, data: bytes) -> None:
        """A client's response to a "+" continuation."""
        if self.user is None:
            self.user = sasl_user(self.mechanism, data, self.step)
        self.step += 1

    def finished(self, status: Status) -> None:
        """The server's final status line (not a continuation)."""
        self.facts.state = states.next_state(self.facts.state, "AUTH", status.ok)
        if status.ok:
            self.facts.user = self.user
