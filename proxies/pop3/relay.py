"""What the POP3 proxy relays without stepping in, sans-I/O: a plain command's response on its
way from the server to the client, and what the session learns from it.

The session (`proxies.pop3.session`) feeds the server's bytes to its `ServerReader` and asks
`ResponseRelay.step()` what to pass on; this module decides, the session does the I/O (and the
timers and flow control). `SessionFacts` is what the relayed exchanges teach: the POP3 state,
the user (part of the scan cache key) and the UIDLs the server listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxies.pop3 import states
from proxies.pop3.codec import BodyData, BodyEnd, Command, NeedData, ServerReader, Status
from proxies.pop3.errors import RemoteProtocolError, err

__all__ = ["RelayFailed", "RelayStep", "ResponseRelay", "SessionFacts"]

SERVER_GONE = err("[SYS/TEMP] the mail server closed the connection")
SERVER_INVALID = err("[SYS/TEMP] the mail server sent an invalid reply")


@dataclass
class SessionFacts:
    state: states.SessionState = states.SessionState.AUTHORIZATION
    user: str | None = None
    pending_user: str | None = None  # USER's argument, the user once PASS succeeds
    uidls: dict[bytes, bytes] = field(default_factory=dict)

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

    def learn_uidl(self, line: bytes) -> None:
        """One line of a UIDL listing (or a single UIDL's status text): `number uid`."""
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            self.uidls[parts[0]] = parts[1]


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
        self._learn = command.verb == "UIDL"
        self._tail = b""  # an unfinished line of a UIDL listing

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
                    if self._learn:
                        *lines, self._tail = (self._tail + event.data).split(b"\n")
                        for line in lines:
                            self.facts.learn_uidl(line)
                elif isinstance(event, BodyEnd):
                    out.append(b".\r\n")
                    done = True
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
