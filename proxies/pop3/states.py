"""The POP3 session states and every transition between them, as data (RFC 1939 3).

A session starts in AUTHORIZATION; a successful PASS, APOP or AUTH moves it to TRANSACTION;
QUIT ends it (from TRANSACTION through UPDATE, where the server deletes what DELE marked; the
proxy never sends QUIT on a client's behalf, so a client that vanishes deletes nothing). STLS
(RFC 2595 4) is valid only in AUTHORIZATION, before any authentication.

`ALLOWED` says which commands we know are valid in which state. A known command in the wrong
state is answered by the proxy with the `-ERR` of `check()` and never reaches the server;
commands we do not know (extensions) are relayed in any state and answered on one line.
"""

from __future__ import annotations

import enum
from typing import Final

from proxies.pop3.errors import RemoteProtocolError, err

__all__ = ["ALLOWED", "KNOWN_VERBS", "TRANSITIONS", "SessionState", "check", "next_state"]


class SessionState(enum.Enum):
    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    CLOSED = "closed"


_A, _T, _C = SessionState.AUTHORIZATION, SessionState.TRANSACTION, SessionState.CLOSED

ALLOWED: Final[dict[SessionState, frozenset[str]]] = {
    # RFC 1939 4 and 7, RFC 2449 5 (CAPA in both states), RFC 2595 4 (STLS), RFC 5034 (AUTH).
    _A: frozenset({"USER", "PASS", "APOP", "AUTH", "CAPA", "STLS", "QUIT"}),
    # RFC 1939 5 and 7.
    _T: frozenset({"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "CAPA",
                   "QUIT"}),
    _C: frozenset(),
}
KNOWN_VERBS: Final = frozenset().union(*ALLOWED.values())

# (state, verb) -> state after a +OK. Anything not listed leaves the state as it is; a -ERR
# never changes it, except that QUIT ends the session whatever the server said.
TRANSITIONS: Final[dict[tuple[SessionState, str], SessionState]] = {
    (_A, "PASS"): _T,
    (_A, "APOP"): _T,
    (_A, "AUTH"): _T,
    (_A, "QUIT"): _C,
    (_T, "QUIT"): _C,
}


def check(state: SessionState, verb: str) -> None:
    """Raise RemoteProtocolError (with the reply) if `verb` is known and invalid in `state`."""
    if verb in KNOWN_VERBS and verb not in ALLOWED[state]:
        raise RemoteProtocolError(
            f"{verb} in the {state.value} state",
            err(f"{verb} is not valid in the {state.value.upper()} state"))


def next_state(state: SessionState, verb: str, ok: bool) -> SessionState:
    if verb == "QUIT":
        return _C
    if not ok:
        return state
    return TRANSITIONS.get((state, verb), state)
