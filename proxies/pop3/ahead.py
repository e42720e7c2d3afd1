"""[pop3] scan_ahead, the layer's part that fetches message n+1 while the client reads n
(see `ScanningAhead._scan_ahead`), and checks a peeked copy against the client's RETR.
Its settings are the session's `Pop3Config` (`self.config`, from `Conversing`)."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from proxies import logs, metrics
from proxies.mail.headers import parse_header
from proxies.pop3 import rewrite, states
from proxies.pop3.cache import CacheKey
from proxies.pop3.codec import BodyData, BodyEnd, Command, NeedData, ServerEvent
from proxies.pop3.conversation import (
    CHUNK,
    SERVER_LATE_MIDWAY,
    Abort,
    Conversation,
    Conversing,
    Held,
    Wait,
    command_line,
    where,
)
from proxies.pop3.events import CancelScan, ClientWritable, Scan, ScanDone
from proxies.pop3.policy import decide
from proxies.pop3.relay import SERVER_GONE, message_number
from proxies.pop3.spool import Spool
from proxies.scan.api import ScanResult

__all__ = ["Ahead", "ScanningAhead"]

SCAN_AHEAD_MAX = 2 * 1024 * 1024  # the largest message scanned ahead (kept until it is asked)
NO_PEEK_MAX = 4096  # servers remembered as not to be scanned ahead with TOP
MAX_LISTING = 1 << 20  # the longest LIST listing kept for scan_ahead (some 80,000 messages)
# RFC 2449 8 and RFC 3206: response codes of a failure that may not happen again.
TRANSIENT_CODES = (b"[SYS/TEMP]", b"[IN-USE]", b"[LOGIN-DELAY]")


class ScanningAhead(Conversing):
    """The layer's scan-ahead steps and state (set up by Pop3Layer.__init__)."""

    _ahead: Ahead | None
    _serving: Ahead | None  # the one taken for the RETR being answered
    _listing_tried: bool  # a whole LIST was asked for once
    _peek_reading: bool  # in _read_peeked: the copy's verdict resumes a server wait

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
        key = number.encode()  # as listings spell it
        cache, uid = self.setup.cache, self.facts.uidls.get(key)
        if (cache.enabled and uid is not None and self.user is not None and cache.get(
                CacheKey(self.setup.destination, self.user, uid, "RETR")) is not None):
            return  # its verdict is known
        limit = min(SCAN_AHEAD_MAX, self.config.max_scan_size)
        size = yield from self._size(key)
        if size is None or size > limit:
            return
        # A body has fewer lines than the message has octets.
        fetch = f"TOP {number} {size}" if mode == "top" else f"RETR {number}"
        status = yield from self._ask_server(command_line(fetch), unstuff=True)
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
        self._ahead = Ahead(key, content, token, self.now, status.raw,
                             peeked=mode == "top")

    def _size(self, number: bytes) -> Generator[Wait, Any, int | None]:
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
            status = yield from self._ask_server(command_line("LIST"))
            if status.ok and self.server.state == "body":
                listing = yield from self._body_within(MAX_LISTING, read_on=True)
                if listing is not None:
                    for line in listing.split(b"\r\n"):
                        facts.learn_size(line, listing=True)
                    facts.learnt_listing()
        if facts.listed:
            return facts.sizes.get(number)
        status = yield from self._ask_server(command_line(f"LIST {number.decode()}"))
        if status.ok:
            facts.learn_size(status.text)
        return facts.sizes.get(number) if status.ok else None

    def _read_peeked(self, held: Held, spool: Spool,
                     ahead: Ahead) -> Generator[Wait, Any, Peeked]:
        """The server's response to the client's RETR of a message peeked at with TOP, read
        and compared with the copy that was scanned.

        While the two agree and that copy's verdict passes the original, the response goes
        on to the client as it comes, so the client's read overlaps the server's transfer;
        otherwise it waits for the end, with the keep-alive sending of the trace fields only
        what the response has matched so far. A response that differs is kept in `spool`
        (what the client already has of it included), to be scanned itself; one that
        passes max_scan_size meanwhile is handed back unread (`Peeked.oversize`). Either way
        the copy is let go and the server not peeked at again (`_peek_differs`).
        """
        self._peek_reading = True
        try:
            return (yield from self._compare_peeked(held, spool, ahead))
        finally:
            self._peek_reading = False

    def _compare_peeked(self, held: Held, spool: Spool,
                        ahead: Ahead) -> Generator[Wait, Any, Peeked]:
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
                self._forward(held, content[sent:matched])
                held.forwarded = matched
                unflushed += matched - sent
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
                    self._peek_differs(ahead)
                    return Peeked(same=False, delivered=False, oversize=data)
                spool.write(data)
            elif isinstance(event, BodyEnd):
                break
            else:
                raise Abort("the server closed the connection mid-message", SERVER_GONE)
        same = same and matched == len(content)
        if same and forwarding:
            self._forward(held, content[max(held.forwarded, held.keepalive.sent):], end=True)
            return Peeked(same=True, delivered=True)
        if same:
            spool.write(content)
            return Peeked(same=True, delivered=False)
        if not spool.size:
            spool.write(content[:matched])  # a response shorter than the copy
        self._peek_differs(ahead)
        return Peeked(same=False, delivered=False)

    def _forward(self, held: Held, piece: bytes, *, end: bool = False) -> None:
        """Verified content of a peeked message to the client (the held status line first)."""
        out = [held.stuffer.send(piece), held.stuffer.end() if end else b""]
        if not held.keepalive.status_sent:
            out.insert(0, held.status)
            held.keepalive.status_sent = True
        self._to_client(b"".join(out))

    def _peeked_event(self, held: Held) -> Generator[Wait, Any, ServerEvent | None]:
        """The server's next event for `_read_peeked`, or None if the copy's verdict comes
        first. Until content has gone out the keep-alive runs; after, nothing more may be
        sent early, and the wait stalls with the client, as a relayed response's does."""
        deadline = self.now + self.config.server_timeout
        while True:
            event = self._next_server_event()
            if not isinstance(event, NeedData):
                return event
            if held.forwarded:
                got = yield Wait("server", deadline, SERVER_LATE_MIDWAY, stalls=True)
                if isinstance(got, ClientWritable):
                    deadline = self.now + self.config.server_timeout  # it waited for the client
            else:
                got = yield from self._held_wait(held, deadline)
            if isinstance(got, ScanDone):
                return None

    def _peek_differs(self, ahead: Ahead) -> None:
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
                     server=where(self.setup.destination), detail=why)

    def _take_ahead(self, command: Command) -> Ahead | None:
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

    def _cancel(self, ahead: Ahead) -> None:
        if ahead.result is None:
            self._emit(CancelScan(ahead.token))


@dataclass
class Ahead:
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
class Peeked:
    """How the server's RETR of a peeked message compared with the copy: the same bytes
    (and then whether it has gone to the client already)."""

    same: bool
    delivered: bool
    oversize: bytes | None = None  # the piece that took a differing response past max_scan_size


def _transient(text: bytes) -> bool:
    return text[:16].upper().startswith(TRANSIENT_CODES)

