"""RETR and TOP, the layer's part that holds a message back until its verdict: fetched
whole into a `Spool` (or streamed into the scanner as it arrives), scanned, and the client
given the original, a tagged copy, a notice or -ERR (`policy.decide`); the keep-alive
meanwhile; messages past max_scan_size; and a message fetched ahead (`ScanningAhead`).
Its settings are the session's `Pop3Config` (`self.config`, from `Conversing`)."""

from __future__ import annotations

import itertools
from collections.abc import Generator, Iterable
from typing import Any

from proxies import logs, metrics
from proxies.mail.headers import Header, parse_header
from proxies.pop3 import rewrite
from proxies.pop3.ahead import Ahead, ScanningAhead
from proxies.pop3.cache import CachedScan, CacheKey
from proxies.pop3.codec import BodyData, BodyEnd, Command, DotStuffer, NeedData
from proxies.pop3.conversation import (
    CHUNK,
    SERVER_LATE_MIDWAY,
    Abort,
    Conversation,
    Held,
    Wait,
    command_line,
)
from proxies.pop3.errors import RemoteProtocolError, err
from proxies.pop3.events import (
    CancelScan,
    Quarantine,
    QuarantineDone,
    Scan,
    ScanData,
    ScanDone,
    StreamScan,
)
from proxies.pop3.keepalive import Keepalive
from proxies.pop3.policy import decide
from proxies.pop3.relay import SERVER_GONE, message_number
from proxies.pop3.spool import Spool
from proxies.scan.api import ScanResult

__all__ = ["Fetching"]


class Fetching(ScanningAhead):

    def _cache_key(self, command: Command) -> Generator[Wait, Any, CacheKey | None]:
        arguments = command.arguments
        if not self.setup.cache.enabled or self.user is None or not arguments:
            return None
        number = message_number(arguments[0])
        if number is None:
            return None
        if number not in self.facts.uidls:
            status = yield from self._ask_server(command_line(f"UIDL {number.decode()}"))
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
        held = Held(status_raw, Keepalive(started, self.config.keepalive_after,
                                           self.config.keepalive_interval), DotStuffer())
        spool = Spool(self.config.spool_threshold, self.config.spool_dir)
        try:
            yield from self._fetch_spooled(command, key, held, spool, started, ahead)
        except Abort as exc:
            if held.keepalive.status_sent:
                # Too late for -ERR: end without the final "." (an incomplete download).
                raise Abort(exc.reason) from None
            raise
        finally:
            self._end_stream(held)  # the message was not finished, or its verdict was known
            self._serving = None
            spool.close()

    def _end_stream(self, held: Held) -> None:
        if held.stream is not None:
            self._emit(CancelScan(held.stream))
            held.stream = None

    def _fetch_spooled(self, command: Command, key: CacheKey | None, held: Held,
                       spool: Spool, started: float, ahead: Ahead | None) -> Conversation:
        header: Header | None = None
        # Streamed from its second piece on: a message that comes in one read gains nothing
        # from it, and would pay for a second scan task.
        may_stream = (ahead is None and self.setup.streaming
                      and not (key is not None and self.setup.cache.get(key)))
        if ahead is not None and ahead.peeked:
            peeked = yield from self._read_peeked(held, spool, ahead)
            if peeked.oversize is not None:
                yield from self._oversize(command, held, spool, peeked.oversize, started)
                return
            if peeked.delivered:
                assert ahead.result is not None
                self._record(command, key, None, ahead.result, "deliver", ahead=True,
                             size=len(ahead.content), spooled=False, started=started)
                return
            if not peeked.same:
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
                    raise Abort("the server closed the connection mid-message", SERVER_GONE)
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
            if (result.verdict == "failed" and not (result.timed_out or result.oversize)
                    and self.now < started + self.config.scan_timeout):
                # The copy was scanned before the client asked, so a scanner that failed then
                # (restarting, refusing a connection) gets the same second chance the RETR's
                # own scan would have had now, within what is left of that scan's time from
                # the client's RETR: never a second scan_timeout. Not after a timeout, nor for
                # a message too large to scan, which stays too large.
                logs.event("pop3_scan_again", id=self.setup.ident, command=command.loggable(),
                           reason=result.reason)
                result = yield from self._scan(spool.getvalue(), held, since=started)
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
            stored: QuarantineDone = yield Wait("quarantine")
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
                raise Abort(tempfail_reason)
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

    def _oversize(self, command: Command, held: Held, spool: Spool, pending: bytes,
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
            raise Abort("message too large to scan", err(
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
                raise Abort(exc.message) from None
            if isinstance(event, NeedData):
                if out:
                    self._to_client(b"".join(out))
                    out.clear()
                    buffered = 0
                yield Wait("server", self.now + self.config.server_timeout,
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
                raise Abort("the server closed the connection mid-message")
        out.append(held.stuffer.end())
        self._to_client(b"".join(out))
        self.messages += 1
        logs.event("pop3_message", size=size, **fields, seconds=round(self.now - started, 3))
        metrics.current.pop3_retrieval(outcome, "oversize")

    def _deliver(self, held: Held, pieces: Iterable[bytes], *, end: bool = True) -> Conversation:
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

    def _scan(self, content: bytes, held: Held, token: int | None = None,
              since: float | None = None) -> Generator[Wait, Any, ScanResult]:
        """The verdict on `content`: a new scan, or the end of the stream `token`, within
        scan_timeout of `since` (now if None)."""
        if token is None:
            token = next(self._tokens)
        self._emit(Scan(content, token))
        return (yield from self._scan_result(token, self.now if since is None else since, held))

    def _scan_result(self, token: int, started: float,
                     held: Held) -> Generator[Wait, Any, ScanResult]:
        deadline = started + self.config.scan_timeout
        while True:
            got = yield Wait("scan", min(deadline, held.keepalive.next_due), token=token)
            if isinstance(got, ScanDone):
                return got.result
            if self.now >= deadline:
                self._emit(CancelScan(token))
                return ScanResult("failed", reason="scan timed out", timed_out=True)
            self._keepalive_tick(held)

