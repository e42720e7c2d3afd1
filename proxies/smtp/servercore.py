"""A sans-I/O SMTP server core: the front end's protocol, with no sockets and no asyncio.

RFC 5321 (SMTP), 1869 (EHLO), 1870 (SIZE), 2034 (enhanced status codes), 2920 (PIPELINING),
3207 (STARTTLS), 6152 (8BITMIME), 6531 (SMTPUTF8). Built like h11 and like our client core
(`proxies.smtp.client`): `receive_data(bytes)` only buffers, `next_event()` returns one event,
`send(reply)` returns the bytes to write. Policy (relay control, filtering, the queue) is not
here: the core turns commands into events, the driver answers each one, and the core checks
that the answer is a legal reply to that command. The reply decides the transition: MAIL
starts a transaction only if the reply to it is 2xx, a recipient counts only on 2xx, DATA
reads content only once a 354 has been sent.

    core = ServerCore("mx.example", limits=ServerLimits(...), tls_available=True)
    write(core.send(core.greeting_reply))        # or a 421 to refuse the connection
    on bytes: core.receive_data(data)            # b"" when the client closed
    out = []
    while True:
        event = core.next_event()
        if event is NEED_DATA:        break      # flush point: write b"".join(out), read more
        elif TlsHandshake:            write out, upgrade the transport, core.tls_established()
        elif CloseConnection:         write out, close
        elif MessageReceived:         out.append(core.send(policy's reply: 250 only after fsync))
        else (a Command):             out.append(core.send(policy's reply or event.reply))

Every `Command` event carries `reply`, the core's own answer: the positive reply for a valid
command (the EHLO keyword list, "250 2.1.0 Ok", "354 ..."), or, for `Refused`, the protocol
error it must be answered with. `next_event()` raises `LocalProtocolError` if the previous
event's reply has not been sent: commands are answered strictly in order (RFC 2920 3.1), and
the state after each depends on its reply. Nothing the client sends raises: bad input becomes
`Refused`, whose reply the core chose (see `_Refusal`). `LocalProtocolError` always means the
driver misused the core (a wrong reply, a call in the wrong state).

PIPELINING (RFC 2920 3.2): the client may send a group of commands in one packet; the core
hands them out one by one and the driver collects the replies. `NEED_DATA` means no complete
command is buffered: that is the moment to write everything collected, in one write, before
waiting for input (the server must not block on reading with replies unsent).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from proxies.smtp.addresses import Address, AddressSyntaxError, parse_path
from proxies.smtp.dataframe import MAX_LINE_LENGTH, DataReader, check_line_length, find_nul
from proxies.smtp.errors import LocalProtocolError, RemoteProtocolError
from proxies.smtp.events import NEED_DATA, DataComplete, NeedData
from proxies.smtp.reply import MAX_REPLY_LINE, Reply

__all__ = [
    "NEED_DATA",
    "CloseConnection",
    "Command",
    "DataStart",
    "Ehlo",
    "Helo",
    "Help",
    "LocalProtocolError",
    "Mail",
    "MessageReceived",
    "NeedData",
    "Noop",
    "Quit",
    "Rcpt",
    "Refused",
    "RemoteProtocolError",
    "Reply",
    "Rset",
    "ServerCore",
    "ServerEvent",
    "ServerLimits",
    "StartTlsRequest",
    "TlsHandshake",
    "Vrfy",
]

# RFC 5321 4.5.3.1.4: "The maximum total length of a command line including the command word
# and the <CRLF> is 512 octets." RFC 1870 6 adds 26 to MAIL for SIZE=, RFC 6531 3.4 adds 10
# for SMTPUTF8 (aiosmtpd and Postfix allow the same).
MAX_COMMAND_LINE: Final = 512
_SIZE_EXTRA: Final = 26
_SMTPUTF8_EXTRA: Final = 10


@dataclass(frozen=True)
class ServerLimits:
    """The limits of one SMTP session; each bad input beyond them gets its standard reply.

    `max_command_line`: octets per command line with its CRLF (RFC 5321 4.5.3.1.4); longer
    lines are discarded as they arrive and answered `500 5.5.2`. `max_text_line`: octets per
    line of message content (4.5.3.1.6), `500 5.5.2` at the end of data. `max_recipients`:
    per transaction (4.5.3.1.8 asks for at least 100; Postfix's smtpd_recipient_limit is
    1000), `452 4.5.3` for each one more (4.5.3.1.10). `max_message_size`: octets as SIZE
    counts them, None for no limit; `552 5.3.4`. `max_unknown_commands`: unrecognised verbs
    answered with 500 before the next one ends the session with 421 (aiosmtpd: 5). `max_errors`:
    protocol errors of any kind before the next ends the session with 421 (Postfix's
    smtpd_hard_error_limit, 20); a delivered message resets the count, as in Postfix.
    """

    max_command_line: int = MAX_COMMAND_LINE
    max_text_line: int = MAX_LINE_LENGTH
    max_recipients: int = 1000
    max_message_size: int | None = 10 * 1024 * 1024
    max_unknown_commands: int = 5
    max_errors: int = 20

    def __post_init__(self) -> None:
        problems = []
        if self.max_command_line < 64:
            problems.append("max_command_line must be at least 64")
        if self.max_text_line < 3:
            problems.append("max_text_line must be at least 3")
        if self.max_recipients < 1:
            problems.append("max_recipients must be at least 1")
        if self.max_message_size is not None and self.max_message_size < 1:
            # RFC 1870 4: "SIZE 0" would mean no limit; None says that.
            problems.append("max_message_size must be at least 1, or None for no limit")
        if self.max_unknown_commands < 0 or self.max_errors < 0:
            problems.append("max_unknown_commands and max_errors must not be negative")
        if problems:
            raise ValueError("; ".join(problems))


# --- events -------------------------------------------------------------------------------------
# All fields are keyword-only, so the tables in the tests read as what they mean.

@dataclass(frozen=True, kw_only=True)
class Command:
    """A command from the client that needs exactly one reply through `send()`.

    `reply` is the core's answer: what to send when policy has nothing to add. For `Refused`
    it is the only legal answer (besides a 421).
    """

    reply: Reply


@dataclass(frozen=True, kw_only=True)
class Ehlo(Command):
    """EHLO (RFC 5321 4.1.1.1). `reply` lists the extensions the core implements; the driver
    may send it with keywords removed (they are then not offered), never with others added."""

    name: str


@dataclass(frozen=True, kw_only=True)
class Helo(Command):
    name: str


@dataclass(frozen=True, kw_only=True)
class Mail(Command):
    """MAIL FROM (RFC 5321 4.1.1.2), syntax and parameters already checked.

    `path` is the mailbox as the client wrote it, without angle brackets ("" for the null
    path); `address` its strict parse (a source route, if any, is in `address.route`: refusing
    it is policy). `options` are the parameters upper-cased, as aiosmtpd hands them to
    handle_MAIL; `size`, `body` and `smtputf8` their checked values.
    """

    path: str
    address: Address
    options: tuple[str, ...] = ()
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False


@dataclass(frozen=True, kw_only=True)
class Rcpt(Command):
    """RCPT TO (RFC 5321 4.1.1.3): syntax checked, the recipient limit not yet reached."""

    path: str
    address: Address
    options: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class DataStart(Command):
    """DATA with at least one accepted recipient; `reply` is the 354. Content is read only
    after a 354 is sent; any other reply leaves the transaction as it was."""


@dataclass(frozen=True, kw_only=True)
class Rset(Command):
    pass


@dataclass(frozen=True, kw_only=True)
class Noop(Command):
    argument: str = ""


@dataclass(frozen=True, kw_only=True)
class Vrfy(Command):
    """VRFY (RFC 5321 3.5.3): `reply` is 252, which promises nothing (we never verify)."""

    argument: str


@dataclass(frozen=True, kw_only=True)
class Help(Command):
    topic: str = ""


@dataclass(frozen=True, kw_only=True)
class Quit(Command):
    pass


@dataclass(frozen=True, kw_only=True)
class StartTlsRequest(Command):
    """STARTTLS, offered and allowed here; `reply` is the 220. After sending it, the next
    event is `TlsHandshake`."""


@dataclass(frozen=True, kw_only=True)
class Refused(Command):
    """A command the core refuses by itself: bad syntax, wrong sequence, unknown verb, a
    parameter not offered, a limit. `reply` is the protocol error's reply and must be sent
    as it is. `command` is the verb ("" when there was none), `reason` a line for the log.
    When the error limits are exceeded, `reply` is a 421 and the session ends after it."""

    command: str
    reason: str


@dataclass(frozen=True)
class MessageReceived:
    """The content of one transaction, ended by CRLF.CRLF, within the size and line limits
    and without NUL. Reply with `send()`: 250 only once it is durably queued (4xx/5xx
    otherwise); the transaction ends whatever the reply (RFC 5321 4.1.1.4).

    `content` is unstuffed with CRLF line ends as sent; `size` the octets as SIZE counts them.
    A non-None `bare_line_ending` is the offset of the first CR or LF not in a CRLF: reject or
    normalise it (SMTP smuggling, CVE-2023-51764); that is policy, as today. `mail` and
    `recipients` are the accepted MAIL and RCPT commands.
    """

    content: bytes
    size: int
    bare_line_ending: int | None
    mail: Mail
    recipients: tuple[Rcpt, ...]


@dataclass(frozen=True)
class TlsHandshake:
    """The 220 to STARTTLS has been sent: write it, upgrade the transport (read nothing into
    the core meanwhile), then call `tls_established()`. Returned on every call until then.

    `discarded` counts the plain-text octets the client sent after STARTTLS and before our
    220, which were thrown away (log it as a probable injection attempt, CVE-2011-0411).
    """

    discarded: int = 0


@dataclass(frozen=True)
class CloseConnection:
    """Write what is collected, then close. `reason`: "quit" (after the 221), "shutdown" (a
    421 was sent), "peer closed" (the client closed first; nothing to say to it). Returned on
    every call from then on."""

    reason: str


ServerEvent = NeedData | Command | MessageReceived | TlsHandshake | CloseConnection
"""What `next_event()` returns. A `Command` is one of Ehlo, Helo, Mail, Rcpt, DataStart, Rset,
Noop, Vrfy, Help, Quit, StartTlsRequest or Refused."""


# --- the state machine --------------------------------------------------------------------------

class _State(enum.Enum):
    START = "start"            # connected, greeting not sent
    GREETED = "greeted"        # 220 sent (or TLS just established): EHLO/HELO needed
    READY = "ready"            # hello done, no transaction
    MAIL = "mail"              # MAIL accepted
    RCPT = "rcpt"              # at least one RCPT accepted
    DATA = "data"              # 354 sent: reading content, then its reply
    TLS = "tls"                # 220 to STARTTLS sent: the driver upgrades the transport
    CLOSED = "closed"          # 221 or 421 sent, or the peer closed


class _Kind(enum.Enum):
    """What a reply answers (and, for TLS_DONE, the one input that is not a reply)."""

    GREETING = "greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    END_OF_DATA = "end of data"
    RSET = "RSET"
    NOOP = "NOOP"
    VRFY = "VRFY"
    HELP = "HELP"
    QUIT = "QUIT"
    STARTTLS = "STARTTLS"
    REFUSED = "refused"        # a command the core refused itself
    TLS_DONE = "tls established"


@dataclass(frozen=True)
class _Move:
    """Where the state goes when the reply is positive (`accepted`) or a refusal."""

    accepted: _State
    refused: _State


def _stay(state: _State) -> _Move:
    return _Move(state, state)


_NEED_HELO: Final = Reply(503, "5.5.1", "Error: send HELO first")
_NEED_EHLO: Final = Reply(503, "5.5.1", "Error: send EHLO first")
_NEED_MAIL: Final = Reply(503, "5.5.1", "Error: need MAIL command")
_NEED_RCPT: Final = Reply(503, "5.5.1", "Error: need RCPT command")
_NESTED_MAIL: Final = Reply(503, "5.5.1", "Error: nested MAIL command")
# RFC 3207 4: STARTTLS is not for the middle of a transaction (Postfix's text).
_IN_TRANSACTION: Final = Reply(503, "5.5.1", "Error: MAIL transaction in progress")

_S, _K = _State, _Kind

# Every legal move of the session, in one place (cf. h11/_state.py). A row is a state; a cell
# is either the move the reply to that command makes, or the 503 that answers the command
# out of sequence (RFC 5321 4.3.2 / 3.3: bad sequence of commands). A command with no cell in
# a row cannot be parsed in that state (DATA reads content, TLS and CLOSED read nothing).
# One rule covers every row: a 421 reply, to anything, closes the session (RFC 5321 3.8).
# EHLO and HELO accepted in a transaction reset it, exactly as RSET (RFC 5321 4.1.4).
_TRANSITIONS: Final[Mapping[_State, Mapping[_Kind, _Move | Reply]]] = {
    _S.START: {
        _K.GREETING: _Move(_S.GREETED, _S.CLOSED),
    },
    _S.GREETED: {
        _K.EHLO: _Move(_S.READY, _S.GREETED),
        _K.HELO: _Move(_S.READY, _S.GREETED),
        _K.MAIL: _NEED_HELO,
        _K.RCPT: _NEED_HELO,
        _K.DATA: _NEED_HELO,
        _K.STARTTLS: _NEED_EHLO,
        _K.RSET: _stay(_S.GREETED),
        _K.NOOP: _stay(_S.GREETED),
        _K.VRFY: _stay(_S.GREETED),
        _K.HELP: _stay(_S.GREETED),
        _K.QUIT: _Move(_S.CLOSED, _S.GREETED),
        _K.REFUSED: _stay(_S.GREETED),
    },
    _S.READY: {
        _K.EHLO: _stay(_S.READY),
        _K.HELO: _stay(_S.READY),
        _K.MAIL: _Move(_S.MAIL, _S.READY),
        _K.RCPT: _NEED_MAIL,
        _K.DATA: _NEED_RCPT,
        _K.STARTTLS: _Move(_S.TLS, _S.READY),
        _K.RSET: _stay(_S.READY),
        _K.NOOP: _stay(_S.READY),
        _K.VRFY: _stay(_S.READY),
        _K.HELP: _stay(_S.READY),
        _K.QUIT: _Move(_S.CLOSED, _S.READY),
        _K.REFUSED: _stay(_S.READY),
    },
    _S.MAIL: {
        _K.EHLO: _Move(_S.READY, _S.MAIL),
        _K.HELO: _Move(_S.READY, _S.MAIL),
        _K.MAIL: _NESTED_MAIL,
        _K.RCPT: _Move(_S.RCPT, _S.MAIL),
        _K.DATA: _NEED_RCPT,
        _K.STARTTLS: _IN_TRANSACTION,
        _K.RSET: _Move(_S.READY, _S.MAIL),
        _K.NOOP: _stay(_S.MAIL),
        _K.VRFY: _stay(_S.MAIL),
        _K.HELP: _stay(_S.MAIL),
        _K.QUIT: _Move(_S.CLOSED, _S.MAIL),
        _K.REFUSED: _stay(_S.MAIL),
    },
    _S.RCPT: {
        _K.EHLO: _Move(_S.READY, _S.RCPT),
        _K.HELO: _Move(_S.READY, _S.RCPT),
        _K.MAIL: _NESTED_MAIL,
        _K.RCPT: _stay(_S.RCPT),
        # Refused DATA (policy's 4xx/5xx) leaves the transaction as it was; the client may
        # RSET or try again.
        _K.DATA: _Move(_S.DATA, _S.RCPT),
        _K.STARTTLS: _IN_TRANSACTION,
        _K.RSET: _Move(_S.READY, _S.RCPT),
        _K.NOOP: _stay(_S.RCPT),
        _K.VRFY: _stay(_S.RCPT),
        _K.HELP: _stay(_S.RCPT),
        _K.QUIT: _Move(_S.CLOSED, _S.RCPT),
        _K.REFUSED: _stay(_S.RCPT),
    },
    _S.DATA: {
        # The end-of-data reply ends the transaction whatever it says (RFC 5321 4.1.1.4).
        _K.END_OF_DATA: _Move(_S.READY, _S.READY),
    },
    _S.TLS: {
        # RFC 3207 4.2: after the handshake the session is as after the greeting.
        _K.TLS_DONE: _stay(_S.GREETED),
    },
    _S.CLOSED: {},
}

# RFC 5321 4.3.2: the positive replies each command may get. A command listed in
# _MAY_REFUSE may also get any 4xx/5xx; every command may get 421 (3.8).
_POSITIVE: Final[Mapping[_Kind, frozenset[int]]] = {
    _K.GREETING: frozenset({220}),
    _K.EHLO: frozenset({250}),
    _K.HELO: frozenset({250}),
    _K.MAIL: frozenset({250}),
    _K.RCPT: frozenset({250, 251}),
    _K.DATA: frozenset({354}),
    _K.END_OF_DATA: frozenset({250}),
    _K.RSET: frozenset({250}),
    _K.NOOP: frozenset({250}),
    _K.VRFY: frozenset({250, 251, 252}),
    _K.HELP: frozenset({211, 214, 250}),
    _K.QUIT: frozenset({221}),
    _K.STARTTLS: frozenset({220}),
    _K.REFUSED: frozenset(),
}
# RSET, NOOP and QUIT have no failure reply in RFC 5321 4.3.2 but 421; the greeting is 220,
# or 421 to refuse the connection (the 554-and-wait-for-QUIT greeting is not implemented).
_MAY_REFUSE: Final = frozenset({_K.EHLO, _K.HELO, _K.MAIL, _K.RCPT, _K.DATA, _K.END_OF_DATA,
                                _K.VRFY, _K.HELP, _K.STARTTLS, _K.REFUSED})

# RFC 2034 3: enhanced status codes on every reply except the greeting and the replies to
# HELO and EHLO; 3xx replies have none (RFC 3463 classes are 2, 4 and 5). A reply the driver
# sends without one gets the code Postfix gives for the same situation (as the aiosmtpd front
# end does today), or class.0.0.
_DEFAULT_ENHANCED: Final[Mapping[int, str]] = {
    221: "2.0.0", 250: "2.0.0", 251: "2.1.5", 252: "2.0.0",
    421: "4.7.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 550: "5.0.0", 552: "5.3.4", 553: "5.1.3", 554: "5.5.0", 555: "5.5.4",
}
_NO_ENHANCED_POSITIVE: Final = frozenset({_K.GREETING, _K.EHLO, _K.HELO})


# --- what the core answers by itself ------------------------------------------------------------
# The texts are those the aiosmtpd front end gives today (with its enhanced codes), so the
# differential test of issue 10 item 4 finds few differences; each deliberate one is marked
# "Differs from today" where it is made.

_BAD_SYNTAX: Final = Reply(500, "5.5.2", "Error: bad syntax")
_LINE_TOO_LONG: Final = Reply(500, "5.5.2", "Command line too long")
_TOO_MANY_RECIPIENTS: Final = Reply(452, "4.5.3", "Error: too many recipients")
_SIZE_EXCEEDED: Final = Reply(552, "5.3.4",
                              "Error: message size exceeds fixed maximum message size")
_TOO_MUCH_DATA: Final = Reply(552, "5.3.4", "Error: Too much mail data")
# Issue 10: a receiver that drops NULs may see "CRLF NUL . CRLF" as the end of data, so a NUL
# anywhere in the content is refused (see proxies.smtp.dataframe); the aiosmtpd front end's
# handler gives the same reply. RFC 3463 5.6.0: other or undefined media error.
_NUL_IN_DATA: Final = Reply(550, "5.6.0", "Message contains NUL characters")
_DATA_LINE_TOO_LONG: Final = Reply(500, "5.5.2", "Line too long (see RFC5321 4.5.3.1.6)")
# RFC 3463 5.1.7: bad sender's mailbox syntax; 5.1.3: bad destination mailbox syntax. The
# texts are RelayPolicy's. Differs from aiosmtpd (stricter), which accepts a path with an
# unclosed "<" or invalid UTF-8 (tests/unit/test_smtp_differential.py lists each case).
_BAD_SENDER: Final = Reply(501, "5.1.7", "Bad sender address syntax")
_BAD_RECIPIENT: Final = Reply(501, "5.1.3", "Bad recipient address syntax")
# Differs from today (stricter): RFC 6531 3.4, a UTF-8 address needs SMTPUTF8 on MAIL
# (Postfix's text); aiosmtpd accepts one without it.
_NEED_SMTPUTF8: Final = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
# RFC 5321 4.1.1.11 / 4.2.3: 555 for parameters not recognised or not offered.
_MAIL_PARAMS: Final = Reply(555, "5.5.4", "MAIL FROM parameters not recognized or not implemented")
_RCPT_PARAMS: Final = Reply(555, "5.5.4", "RCPT TO parameters not recognized or not implemented")
_BAD_BODY: Final = Reply(501, "5.5.4", "Error: BODY can only be one of 7BIT, 8BITMIME")
_SMTPUTF8_VALUE: Final = Reply(501, "5.5.4", "Error: SMTPUTF8 takes no arguments")
_TLS_ACTIVE: Final = Reply(554, "5.5.1", "Error: TLS already active")
_TLS_UNAVAILABLE: Final = Reply(454, "4.7.0", "TLS not available")

_OK: Final = Reply(250, "2.0.0", "OK")
_MAIL_OK: Final = Reply(250, "2.1.0", "Ok")
_RCPT_OK: Final = Reply(250, "2.1.5", "Ok")
_GO_AHEAD: Final = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
_BYE: Final = Reply(221, "2.0.0", "Bye")
_CANNOT_VRFY: Final = Reply(252, "2.0.0",
                            "Cannot VRFY user, but will accept message and attempt delivery")
_READY_FOR_TLS: Final = Reply(220, "2.0.0", "Ready to start TLS")

# Verbs we know and do not offer: 502 (RFC 5321 4.2.4: not implemented), counted as errors but
# not as unknown. BDAT (RFC 3030) is among them, CHUNKING not being offered; what a client
# sends as a chunk after it is read as commands, which are its own commands all the same.
# Differs from today: aiosmtpd answers BDAT 500 (unknown) and AUTH 538 or 504 (it has AUTH).
_NOT_IMPLEMENTED: Final = frozenset({"AUTH", "BDAT", "ETRN", "EXPN", "TURN", "ATRN"})

# Syntax lines for HELP and for the 501s (aiosmtpd's).
_SYNTAX: Final[Mapping[str, str]] = {
    "EHLO": "EHLO hostname", "HELO": "HELO hostname", "MAIL": "MAIL FROM: <address>",
    "RCPT": "RCPT TO: <address>", "DATA": "DATA", "RSET": "RSET", "NOOP": "NOOP [ignored]",
    "VRFY": "VRFY <address>", "HELP": "HELP [command]", "QUIT": "QUIT", "STARTTLS": "STARTTLS",
}
_EXTENDED_SYNTAX: Final = " [SP <mail-parameters>]"

# Octets that never belong in a command line (RFC 5321 4.1.1: commands are text): C0 controls
# but HT, and DEL. A CR or LF inside a line (it was split at LF) is one of them. Differs from
# today: aiosmtpd passes them on in arguments (NOOP ignores them, EHLO keeps them).
_CONTROL_BYTES: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL_TEXT: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 5321 4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"),
# esmtp-value = 1*(%d33-60 / %d62-126).
_PARAM: Final = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")
_ENHANCED: Final = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_SIZE_VALUE: Final = re.compile(r"[0-9]{1,20}")


# Replies already checked and rendered, by (reply, whether positive replies go without an
# enhanced code): see ServerCore._rendered.
_RENDERED: dict[tuple[Reply, bool], tuple[Reply, bytes]] = {}
_RENDERED_MAX = 1024


class _Refusal(RemoteProtocolError):
    """The client broke the protocol; `reply` answers it. `counted`: it counts towards
    max_errors (a limit reached in good faith, like too many recipients, does not)."""

    def __init__(self, reply: Reply, reason: str, *, counted: bool = True,
                 unknown: bool = False) -> None:
        super().__init__(reason, reply)
        self.counted = counted
        self.unknown = unknown


@dataclass(frozen=True)
class _Pending:
    kind: _Kind
    event: Command | MessageReceived | None = None
    required: Reply | None = None


class _TooLong:
    pass


_TOO_LONG: Final = _TooLong()


class ServerCore:
    """One SMTP server session (RFC 5321 4.1, 4.3.2), sans I/O.

    `hostname` goes into the greeting, the EHLO reply and 421s. `tls_available`: a
    certificate is loaded, so STARTTLS is offered until TLS is active. `ident` follows the
    hostname in the greeting ("ESMTP" there tells old clients to try EHLO).
    """

    def __init__(self, hostname: str, *, limits: ServerLimits | None = None,
                 tls_available: bool = False, ident: str = "ESMTP mailgate") -> None:
        if not hostname or not hostname.isprintable() or " " in hostname:
            raise LocalProtocolError(f"bad hostname {hostname!r}")
        self.hostname = hostname
        self.ident = ident
        self.limits = limits or ServerLimits()
        self.tls_available = tls_available
        self.tls_active = False
        # What the client said of itself: the EHLO/HELO name, None before (and after TLS).
        self.hello_name: str | None = None
        self.extended = False                     # EHLO (not HELO) accepted
        self.offered: frozenset[str] = frozenset()  # EHLO keywords in the reply sent
        # True if the client sent anything before the greeting (Postfix postscreen's
        # "pregreet": bots that do not wait). Policy may use it; the core does not.
        self.spoke_before_greeting = False

        self._state = _State.START
        self._pending: _Pending | None = None
        self._buffer = bytearray()
        self._pos = 0                 # start of the unread part of _buffer
        self._skipping = False        # inside a command line already known to be too long
        self._eof = False
        self._errors = 0
        self._unknown = 0
        self._close_reason = ""
        self._discarded = 0
        # The transaction.
        self._mail: Mail | None = None
        self._rcpts: list[Rcpt] = []
        # DATA.
        self._reader: DataReader | None = None

    # --- what the driver reads ---------------------------------------------------------------

    @property
    def state(self) -> str:
        """Where the session is, for logs: one of the _State values."""
        return self._state.value

    @property
    def greeting_reply(self) -> Reply:
        """The 220 banner (RFC 5321 4.3.1, 3.1): "220 <hostname> ESMTP mailgate"."""
        return Reply(220, None, f"{self.hostname} {self.ident}".rstrip())

    @property
    def timeout_reply(self) -> Reply:
        """For `shutdown()` on an idle client (RFC 5321 3.8, 4.5.3.2): 421 4.4.2, today's."""
        return Reply(421, "4.4.2", f"{self.hostname} Error: timeout exceeded")

    @property
    def sender(self) -> Address | None:
        """The accepted MAIL FROM of the current transaction."""
        return None if self._mail is None else self._mail.address

    @property
    def recipients(self) -> tuple[Address, ...]:
        """The accepted recipients of the current transaction."""
        return tuple(r.address for r in self._rcpts)

    @property
    def buffered(self) -> int:
        """Octets received and not yet consumed: a driver can pause reading when it grows."""
        return len(self._buffer) - self._pos

    # --- the driver's calls -------------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview) -> None:
        """Bytes from the client; b"" when it closed its side."""
        if self._state is _State.CLOSED:
            return
        if self._state is _State.TLS:
            # Between the 220 and the handshake the bytes are the TLS layer's, never ours.
            raise LocalProtocolError("bytes received during the TLS handshake; "
                                     "call tls_established() first")
        if not data:
            if self._eof:
                return
            self._eof = True
            if self._reader is not None:
                self._reader.receive_data(b"")
            return
        if self._eof:
            raise LocalProtocolError("data received after the end of the stream")
        if self._state is _State.START:
            self.spoke_before_greeting = True
        if self._reader is not None:
            self._reader.receive_data(data)
        else:
            self._buffer += data

    def next_event(self) -> ServerEvent:
        """The next event; `NEED_DATA` when no complete command (or content) is buffered,
        which is the moment to write the replies collected so far."""
        if self._pending is not None:
            raise LocalProtocolError(
                f"send() the reply to {self._pending.kind.value} before the next event")
        state = self._state
        if state is _State.START:
            raise LocalProtocolError("send() the greeting first")
        if state is _State.CLOSED:
            return CloseConnection(self._close_reason)
        if state is _State.TLS:
            return TlsHandshake(self._discarded)
        if state is _State.DATA:
            return self._next_content_event()
        return self._next_command_event()

    def send(self, reply: Reply) -> bytes:
        """The reply to the pending command (or the greeting) as bytes for the wire, in one
        piece however many lines it has. A 421 may be sent at any time and ends the session.
        Raises `LocalProtocolError` for a reply that is malformed or not legal here."""
        if self._state is _State.CLOSED:
            raise LocalProtocolError("send() after the session ended")
        if self._state is _State.TLS:
            raise LocalProtocolError("send() during the TLS handshake")
        pending = self._pending
        if pending is None:
            if self._state is _State.START:
                pending = _Pending(_K.GREETING)
            elif reply.code == 421:
                return self.shutdown(reply)
            else:
                raise LocalProtocolError(f"no command awaits a reply (sending {reply})")
        kind = pending.kind
        reply, data = self._rendered(reply, kind)
        if reply.code != 421:
            if pending.required is not None and reply != pending.required:
                raise LocalProtocolError(
                    f"{kind.value} must be answered {pending.required}, not {reply}")
            positive = reply.code in _POSITIVE[kind]
            if not positive and not (kind in _MAY_REFUSE and reply.code >= 400):
                raise LocalProtocolError(f"{reply.code} is not a reply to {kind.value}")
        else:
            positive = False
        move = _TRANSITIONS[self._state].get(kind)
        if not isinstance(move, _Move):
            raise LocalProtocolError(f"{kind.value} has no reply in state {self._state.value}")
        self._pending = None
        if reply.code == 421:
            self._close("shutdown")
        else:
            self._moved(kind, pending, reply, move.accepted if positive else move.refused)
        return data

    def shutdown(self, reply: Reply | None = None) -> bytes:
        """End the session with a 421 (RFC 5321 3.8), e.g. on a timeout (`timeout_reply`) or
        when the service stops; it answers a pending command too. Returns b"" during the TLS
        handshake or once closed (nothing can be said in plain text then)."""
        if reply is None:
            reply = Reply(421, "4.3.2",
                          f"{self.hostname} Service not available, closing transmission channel")
        if reply.code != 421:
            raise LocalProtocolError(f"shutdown() needs a 421, not {reply}")
        if self._state in (_State.CLOSED, _State.TLS):
            self._close(self._close_reason or "shutdown")
            return b""
        reply = self._checked(reply, _K.REFUSED)
        self._pending = None
        self._close("shutdown")
        return reply.wire().encode("utf-8") + b"\r\n"

    def tls_established(self) -> None:
        """The TLS handshake succeeded: the session starts again as after the greeting, and
        everything learnt in plain text is forgotten (RFC 3207 4.2): the EHLO name and its
        extensions; STARTTLS is no longer offered. The client must say EHLO again."""
        move = _TRANSITIONS[self._state].get(_K.TLS_DONE)
        if not isinstance(move, _Move):
            raise LocalProtocolError(f"tls_established() in state {self._state.value}")
        self.tls_active = True
        self._forget_hello()
        self._discarded = 0
        self._state = move.accepted

    # --- internals: transitions ---------------------------------------------------------------

    def _rendered(self, reply: Reply, kind: _Kind) -> tuple[Reply, bytes]:
        """`_checked` and the wire bytes, remembered: a session sends the same few replies
        over and over ("250 2.1.5 Ok"), and checking and rendering each was a tenth of the
        front end's time. Bounded: replies that carry a queue id are all different."""
        key = (reply, kind in _NO_ENHANCED_POSITIVE)
        found = _RENDERED.get(key)
        if found is None:
            checked = self._checked(reply, kind)
            found = (checked, checked.wire().encode("utf-8") + b"\r\n")
            if len(_RENDERED) >= _RENDERED_MAX:
                _RENDERED.clear()
            _RENDERED[key] = found
        return found

    def _checked(self, reply: Reply, kind: _Kind) -> Reply:
        """The reply if it can go on the wire, with an enhanced code added where RFC 2034
        wants one; LocalProtocolError otherwise (text with CR, LF or NUL would let a policy
        string inject replies)."""
        if not 200 <= reply.code <= 599:
            raise LocalProtocolError(f"bad reply code {reply.code}")
        if reply.enhanced is not None:
            if not _ENHANCED.fullmatch(reply.enhanced) or reply.enhanced[0] != str(reply.code)[0]:
                raise LocalProtocolError(f"bad enhanced code in {reply}")
        elif reply.code >= 400 or (reply.code < 300 and kind not in _NO_ENHANCED_POSITIVE):
            enhanced = _DEFAULT_ENHANCED.get(reply.code, f"{reply.code // 100}.0.0")
            reply = dataclasses.replace(reply, enhanced=enhanced)
        for line in reply.wire().split("\r\n"):
            if _CONTROL_TEXT.search(line):
                raise LocalProtocolError(f"control character in reply {reply}")
            # RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
            if len(line.encode("utf-8")) + 2 > MAX_REPLY_LINE:
                raise LocalProtocolError(f"reply line longer than 512 octets: {line[:60]!r}")
        return reply

    def _moved(self, kind: _Kind, pending: _Pending, reply: Reply, state: _State) -> None:
        """The side effects of a reply that was sent, and the move the table decided."""
        positive = reply.code in _POSITIVE[kind]
        event = pending.event
        if positive and kind is _K.EHLO:
            assert isinstance(event, Ehlo)
            self.offered = self._offered_in(reply)
            self.extended = True
            self.hello_name = event.name
            self._reset_transaction()
        elif positive and kind is _K.HELO:
            assert isinstance(event, Helo)
            self.offered = frozenset()
            self.extended = False
            self.hello_name = event.name
            self._reset_transaction()
        elif positive and kind is _K.MAIL:
            assert isinstance(event, Mail)
            self._mail = event
            self._rcpts = []
        elif positive and kind is _K.RCPT:
            assert isinstance(event, Rcpt)
            self._rcpts.append(event)
        elif kind is _K.END_OF_DATA:
            self._reset_transaction()
            if positive:
                self._errors = 0      # Postfix: the error limit is for clients that deliver nothing
        elif positive and kind is _K.RSET:
            self._reset_transaction()
        self._state = state
        if state is _State.CLOSED:
            self._close("quit")
        elif positive and kind is _K.DATA:
            self._start_content()
        elif positive and kind is _K.STARTTLS:
            # RFC 3207 4 and 6, CVE-2011-0411: the client must wait for this 220 before it
            # starts TLS, so whatever it sent after STARTTLS was sent in plain text by someone
            # who did not wait, possibly injected on the path to be read as if it came over
            # TLS. We discard it (as Postfix does since that CVE) and report the count in
            # TlsHandshake rather than refuse: refusing would let an on-path attacker deny a
            # good client its TLS with one injected byte, while discarding leaves the honest
            # client's session intact and gives the injection no effect.
            self._discarded = self.buffered
            self._buffer = bytearray()
            self._pos = 0
            self._skipping = False

    def _offered_in(self, reply: Reply) -> frozenset[str]:
        """The keywords of an EHLO reply the driver sent: only extensions the core enforces,
        with the SIZE it enforces (RFC 1869 4.3: the first line is the greeting)."""
        supported = self._ehlo_keywords()
        offered = set()
        for line in reply.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            keyword = keyword.upper()
            if keyword not in supported or params.strip() != supported[keyword]:
                raise LocalProtocolError(f"EHLO keyword {line!r} is not one the core offers")
            offered.add(keyword)
        return frozenset(offered)

    def _ehlo_keywords(self) -> dict[str, str]:
        # The order is the reply's; today's front end sends the same list.
        limit = self.limits.max_message_size
        keywords = {"SIZE": str(limit) if limit else "", "8BITMIME": "", "SMTPUTF8": ""}
        if self.tls_available and not self.tls_active:
            keywords["STARTTLS"] = ""
        # PIPELINING changes nothing here: commands are always taken in order from the buffer.
        keywords["PIPELINING"] = ""
        keywords["ENHANCEDSTATUSCODES"] = ""
        return keywords

    def _reset_transaction(self) -> None:
        self._mail = None
        self._rcpts = []

    def _forget_hello(self) -> None:
        self.hello_name = None
        self.extended = False
        self.offered = frozenset()
        self._reset_transaction()

    def _close(self, reason: str) -> None:
        self._state = _State.CLOSED
        self._close_reason = self._close_reason or reason
        self._buffer = bytearray()
        self._pos = 0
        self._reader = None

    # --- internals: commands ------------------------------------------------------------------

    def _take_line(self) -> bytes | _TooLong | None:
        """The next command line without its line end, _TOO_LONG for one over every limit
        (its octets discarded as they came), or None if no line is complete.

        A bare LF ends a command line as CRLF does, as aiosmtpd and Postfix accept: a command
        line is never passed on, so this opens no smuggling hole (content is framed by the
        strict DataReader). Other control characters in a line are refused later.
        """
        buffer = self._buffer
        # Longer than any verb may have: its octets need not be kept to be refused.
        hard_limit = self.limits.max_command_line + _SIZE_EXTRA + _SMTPUTF8_EXTRA
        end = buffer.find(b"\n", self._pos)
        if self._skipping:
            if end < 0:
                self._buffer = bytearray()
                self._pos = 0
                return None
            self._skipping = False
            self._pos = end + 1
            return _TOO_LONG
        if end < 0:
            if self._pos:
                del buffer[:self._pos]
                self._pos = 0
            if len(buffer) >= hard_limit:
                self._skipping = True
                self._buffer = bytearray()
            return None
        start = self._pos
        self._pos = end + 1
        if self._pos - start > hard_limit:
            return _TOO_LONG
        line = bytes(buffer[start:end])
        # The buffer is consumed by offset (a del per line would be quadratic for a large
        # pipelined group) and compacted now and then.
        if self._pos >= len(buffer):
            buffer.clear()
            self._pos = 0
        elif self._pos > 65536:
            del buffer[:self._pos]
            self._pos = 0
        return line[:-1] if line.endswith(b"\r") else line

    def _next_command_event(self) -> ServerEvent:
        line = self._take_line()
        if line is None:
            if self._eof:
                # A partial line at the end is not a command; the client is gone.
                self._close("peer closed")
                return CloseConnection(self._close_reason)
            return NEED_DATA
        verb = ""
        try:
            if isinstance(line, _TooLong):
                raise _Refusal(_LINE_TOO_LONG, "command line too long")
            verb_bytes, _, argument = line.partition(b" ")
            # bytes.isalpha() is ASCII letters only.
            verb = verb_bytes.decode("ascii").upper() if verb_bytes.isalpha() else ""
            if len(line) + 2 > self._line_limit(verb):
                raise _Refusal(_LINE_TOO_LONG, "command line too long")
            if not verb or _CONTROL_BYTES.search(line):
                raise _Refusal(_BAD_SYNTAX, f"bad command line {line[:60]!r}")
            return self._command(verb, argument.strip(b" \t"))
        except _Refusal as refusal:
            return self._refused(verb, refusal)

    def _line_limit(self, verb: str) -> int:
        limit = self.limits.max_command_line
        if verb == "MAIL":
            limit += _SIZE_EXTRA if "SIZE" in self.offered else 0
            limit += _SMTPUTF8_EXTRA if "SMTPUTF8" in self.offered else 0
        return limit

    def _command(self, verb: str, argument: bytes) -> Command:
        kind = _KIND_OF_VERB.get(verb)
        if kind is None:
            if verb in _NOT_IMPLEMENTED:
                raise _Refusal(Reply(502, "5.5.1", f"{verb} not implemented"),
                               f"{verb} not implemented")
            raise _Refusal(Reply(500, "5.5.2", f'Error: command "{verb[:20]}" not recognized'),
                           f"unknown command {verb[:20]}", unknown=True)
        cell = _TRANSITIONS[self._state].get(kind)
        if isinstance(cell, Reply):
            raise _Refusal(cell, f"{verb} out of sequence in state {self._state.value}")
        if cell is None:
            raise LocalProtocolError(f"{verb} parsed in state {self._state.value}")
        try:
            text = argument.decode("utf-8")
        except UnicodeDecodeError:
            if kind in (_K.MAIL, _K.RCPT):
                reply = _BAD_SENDER if kind is _K.MAIL else _BAD_RECIPIENT
                raise _Refusal(reply, f"{verb}: invalid UTF-8") from None
            if kind is not _K.NOOP:   # RFC 5321 4.1.1.9: NOOP's argument is ignored
                raise _Refusal(_BAD_SYNTAX, f"{verb}: invalid UTF-8") from None
            text = ""
        event = _PARSERS[kind](self, text)
        self._pending = _Pending(kind, event)
        return event

    def _refused(self, verb: str, refusal: _Refusal) -> Refused:
        reply = refusal.reply
        assert reply is not None
        if refusal.counted:
            self._errors += 1
        if refusal.unknown:
            self._unknown += 1
        # The command past a limit gets the 421 instead of its own reply (aiosmtpd's way:
        # one reply per command, so a lock-step client stays in step to the end). Differs
        # from today: aiosmtpd says "502 5.5.1 Too many unrecognized commands" on the 5th
        # unknown verb; RFC 5321 3.8 makes 421 the reply that announces a close, and Postfix
        # also counts every error (smtpd_hard_error_limit), which aiosmtpd does not.
        if self._unknown > self.limits.max_unknown_commands:
            reply = Reply(421, "4.7.0", f"{self.hostname} Error: too many unrecognized commands")
        elif self._errors > self.limits.max_errors:
            reply = Reply(421, "4.7.0", f"{self.hostname} Error: too many errors")
        event = Refused(reply=reply, command=verb, reason=refusal.message)
        self._pending = _Pending(_K.REFUSED, event, required=reply)
        return event

    def _syntax(self, verb: str) -> Reply:
        extended = _EXTENDED_SYNTAX if self.extended and verb in ("MAIL", "RCPT") else ""
        return Reply(501, "5.5.4", f"Syntax: {_SYNTAX[verb]}{extended}")

    def _no_argument(self, verb: str, text: str) -> None:
        if text:
            raise _Refusal(self._syntax(verb), f"{verb} takes no argument")

    def _parse_ehlo(self, text: str) -> Command:
        if not text:
            raise _Refusal(self._syntax("EHLO"), "EHLO without a name")
        keywords = self._ehlo_keywords()
        lines = [self.hostname] + [f"{k} {v}" if v else k for k, v in keywords.items()]
        return Ehlo(name=text, reply=Reply(250, None, "\n".join(lines)))

    def _parse_helo(self, text: str) -> Command:
        if not text:
            raise _Refusal(self._syntax("HELO"), "HELO without a name")
        return Helo(name=text, reply=Reply(250, None, self.hostname))

    def _parse_mail(self, text: str) -> Command:
        path, address, params = self._path_and_params(text, "MAIL", "FROM:")
        options = tuple(p.upper() for p in params)
        values: dict[str, str | None] = {}
        for param in params:
            match = _PARAM.fullmatch(param)
            if match is None or match.group(1).upper() in values:
                raise _Refusal(self._syntax("MAIL"), f"bad MAIL parameter {param[:40]!r}")
            values[match.group(1).upper()] = match.group(2)
        # The checks in aiosmtpd's order: BODY, SMTPUTF8, SIZE, then whatever is left.
        body: str | None = None
        if "8BITMIME" in self.offered and "BODY" in values:
            body = values.pop("BODY")
            if body is None or body.upper() not in ("7BIT", "8BITMIME"):
                raise _Refusal(_BAD_BODY, f"BODY={(body or '')[:20]}")
        smtputf8 = False
        if "SMTPUTF8" in self.offered and "SMTPUTF8" in values:
            if values.pop("SMTPUTF8") is not None:
                raise _Refusal(_SMTPUTF8_VALUE, "SMTPUTF8 with a value")
            smtputf8 = True
        size: int | None = None
        if "SIZE" in self.offered and "SIZE" in values:
            value = values.pop("SIZE")
            if value is None or not _SIZE_VALUE.fullmatch(value):
                raise _Refusal(self._syntax("MAIL"), "bad SIZE value")
            size = int(value)
            limit = self.limits.max_message_size
            if limit is not None and size > limit:
                # RFC 1870 6.1: refused at MAIL, before any data is sent.
                raise _Refusal(_SIZE_EXCEEDED, f"SIZE={size} over {limit}", counted=False)
        if values:
            raise _Refusal(_MAIL_PARAMS, f"MAIL parameters {sorted(values)} not offered")
        self._check_utf8(address, smtputf8)
        return Mail(reply=_MAIL_OK, path=path, address=address, options=options, size=size,
                    body=body.upper() if body else None, smtputf8=smtputf8)

    def _parse_rcpt(self, text: str) -> Command:
        path, address, params = self._path_and_params(text, "RCPT", "TO:")
        for param in params:
            if _PARAM.fullmatch(param) is None:
                raise _Refusal(self._syntax("RCPT"), f"bad RCPT parameter {param[:40]!r}")
        if params:
            # No RCPT parameter is offered (DSN's NOTIFY/ORCPT are not).
            raise _Refusal(_RCPT_PARAMS, "RCPT parameters not offered")
        assert self._mail is not None
        self._check_utf8(address, self._mail.smtputf8)
        if len(self._rcpts) >= self.limits.max_recipients:
            # RFC 5321 4.5.3.1.10: 452, and the client sends the rest in another transaction.
            raise _Refusal(_TOO_MANY_RECIPIENTS, "too many recipients", counted=False)
        return Rcpt(reply=_RCPT_OK, path=path, address=address,
                    options=tuple(p.upper() for p in params))

    def _path_and_params(self, text: str, verb: str, keyword: str
                         ) -> tuple[str, Address, list[str]]:
        """`FROM:<path> params` (or TO:). Spaces after the colon and a path without angle
        brackets are accepted, as aiosmtpd and Postfix (strict_rfc821_envelopes=no) do."""
        if text[:len(keyword)].upper() != keyword:
            raise _Refusal(self._syntax(verb), f"{verb} without {keyword}")
        rest = text[len(keyword):].lstrip(" ")
        if not rest:
            raise _Refusal(self._syntax(verb), f"{verb} without a path")
        bad = _BAD_SENDER if verb == "MAIL" else _BAD_RECIPIENT
        end = _path_end(rest)
        if end is None:
            raise _Refusal(bad, f"{verb}: unterminated path")
        path_text, params_text = rest[:end], rest[end:]
        if params_text and params_text[0] != " ":
            raise _Refusal(self._syntax(verb), f"{verb}: text after the path")
        if params_text.strip() and not self.extended:
            # RFC 5321 4.1.1.2: parameters only after EHLO (aiosmtpd: syntax error).
            raise _Refusal(self._syntax(verb), f"{verb} parameters after HELO")
        try:
            address = parse_path(path_text, null_ok=verb == "MAIL")
        except AddressSyntaxError as exc:
            raise _Refusal(bad, f"{verb}: {exc.message}") from None
        inner = path_text[1:-1] if path_text.startswith("<") else path_text
        return inner, address, params_text.split()

    @staticmethod
    def _check_utf8(address: Address, smtputf8: bool) -> None:
        if not smtputf8 and not address.raw.isascii():
            raise _Refusal(_NEED_SMTPUTF8, "UTF-8 address without SMTPUTF8")

    def _parse_data(self, text: str) -> Command:
        self._no_argument("DATA", text)
        return DataStart(reply=_GO_AHEAD)

    def _parse_rset(self, text: str) -> Command:
        self._no_argument("RSET", text)
        return Rset(reply=_OK)

    def _parse_noop(self, text: str) -> Command:
        return Noop(reply=_OK, argument=text)

    def _parse_vrfy(self, text: str) -> Command:
        if not text:
            raise _Refusal(self._syntax("VRFY"), "VRFY without an argument")
        return Vrfy(reply=_CANNOT_VRFY, argument=text)

    def _parse_help(self, text: str) -> Command:
        topic = text.upper()
        commands = sorted(v for v in _SYNTAX
                          if v != "STARTTLS" or "STARTTLS" in self._ehlo_keywords())
        if topic in commands:
            extended = _EXTENDED_SYNTAX if self.extended and topic in ("MAIL", "RCPT") else ""
            reply = Reply(250, "2.0.0", f"Syntax: {_SYNTAX[topic]}{extended}")
        else:
            code, enhanced = (501, "5.5.4") if topic else (250, "2.0.0")
            reply = Reply(code, enhanced, "Supported commands: " + " ".join(commands))
        return Help(reply=reply, topic=text)

    def _parse_quit(self, text: str) -> Command:
        self._no_argument("QUIT", text)
        return Quit(reply=_BYE)

    def _parse_starttls(self, text: str) -> Command:
        self._no_argument("STARTTLS", text)
        if self.tls_active:
            raise _Refusal(_TLS_ACTIVE, "STARTTLS with TLS active")
        if "STARTTLS" not in self.offered:
            # Not configured, or not offered in this session (HELO, or the driver left it out).
            raise _Refusal(_TLS_UNAVAILABLE, "STARTTLS not offered", counted=False)
        return StartTlsRequest(reply=_READY_FOR_TLS)

    # --- internals: content ---------------------------------------------------------------------

    def _start_content(self) -> None:
        """The 354 is sent: what is buffered after DATA is content (a client that did not
        wait for the 354 breaks RFC 2920 3.1, but its bytes are still content, never
        commands), and so is everything that follows, to the end of data."""
        reader = self._reader = DataReader(max_size=self.limits.max_message_size)
        early = bytes(self._buffer[self._pos:])
        self._buffer = bytearray()
        self._pos = 0
        self._skipping = False
        if early:
            reader.receive_data(early)
        if self._eof:
            reader.receive_data(b"")

    def _next_content_event(self) -> ServerEvent:
        reader = self._reader
        if reader is None:
            raise LocalProtocolError("the end of data awaits its reply")
        try:
            complete = reader.next_event()
        except RemoteProtocolError:
            # The client closed in the middle of the message: nothing to deliver, nobody to
            # tell (its 421 4.4.2 would go nowhere).
            self._close("peer closed")
            return CloseConnection(self._close_reason)
        if not isinstance(complete, DataComplete):
            return NEED_DATA
        self._reader = None
        # Pipelined commands after the final dot (RFC 2920 3.1) go back to the command buffer.
        self._buffer = bytearray(complete.leftover)
        self._pos = 0
        mail = self._mail
        assert mail is not None
        refusal: Reply | None = None
        # Size first, then line length, then NUL (for content over both limits aiosmtpd names
        # the line length instead: a listed difference). Only the content is looked at: a
        # NUL in commands pipelined after the end of data is theirs to answer.
        if complete.too_big:
            # RFC 5321 4.2.5 / 4.5.3.1.7: the reply waits for the end of data.
            refusal = _TOO_MUCH_DATA
        elif check_line_length(complete.content, self.limits.max_text_line) is not None:
            refusal = _DATA_LINE_TOO_LONG
        elif find_nul(complete.content) is not None:
            refusal = _NUL_IN_DATA
        if refusal is not None:
            event = Refused(reply=refusal, command="DATA", reason=refusal.text)
            self._pending = _Pending(_K.END_OF_DATA, event, required=refusal)
            return event
        message = MessageReceived(content=complete.content, size=complete.size,
                                  bare_line_ending=complete.bare_line_ending, mail=mail,
                                  recipients=tuple(self._rcpts))
        self._pending = _Pending(_K.END_OF_DATA, message)
        return message


def _path_end(text: str) -> int | None:
    """Where the path at the start of `text` ends: after its ">" (outside a quoted local
    part, RFC 5321 4.1.2 Quoted-string may hold ">" and "\\>"), or at the first space for a
    path without brackets. None for a "<" never closed."""
    if not text.startswith("<"):
        space = text.find(" ")
        return len(text) if space < 0 else space
    quoted = False
    index = 1
    while index < len(text):
        char = text[index]
        if quoted and char == "\\":
            index += 2
            continue
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index + 1
        index += 1
    return None


_KIND_OF_VERB: Final[Mapping[str, _Kind]] = {
    "EHLO": _K.EHLO, "HELO": _K.HELO, "MAIL": _K.MAIL, "RCPT": _K.RCPT, "DATA": _K.DATA,
    "RSET": _K.RSET, "NOOP": _K.NOOP, "VRFY": _K.VRFY, "HELP": _K.HELP, "QUIT": _K.QUIT,
    "STARTTLS": _K.STARTTLS,
}

_PARSERS: Final[Mapping[_Kind, Callable[[ServerCore, str], Command]]] = {
    _K.EHLO: ServerCore._parse_ehlo,
    _K.HELO: ServerCore._parse_helo,
    _K.MAIL: ServerCore._parse_mail,
    _K.RCPT: ServerCore._parse_rcpt,
    _K.DATA: ServerCore._parse_data,
    _K.RSET: ServerCore._parse_rset,
    _K.NOOP: ServerCore._parse_noop,
    _K.VRFY: ServerCore._parse_vrfy,
    _K.HELP: ServerCore._parse_help,
    _K.QUIT: ServerCore._parse_quit,
    _K.STARTTLS: ServerCore._parse_starttls,
}
