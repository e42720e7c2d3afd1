"""Onward delivery: the scheduler that takes due messages from the queue, and the asyncio
driver that runs the sans-I/O SMTP client over a (possibly source-spoofed) connection.

The scheduler is the only place that decides when a message is tried; the queue decides what
an attempt's replies mean (delivered, deferred with backoff, bounced).

Between rounds the scheduler sleeps until the queue's next due time (at most
queue_scan_interval, the safety net for changes it was not told of). The queue tells it of every
due time it sets (`Queue.on_schedule`), and one earlier than the planned wake-up wakes it: a
deferral after retry_min = 2s is retried 2 s later, not at the next scan. (Postfix's qmgr(8)
looks at deferred mail only every queue_run_delay; the in-memory schedule lets us be exact.)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Mapping

from proxies import logs, metrics
from proxies.config import SmtpConfig
from proxies.queue import ClaimedMessage, DeliveryResult, Queue
from proxies.smtp import client as smtp_client
from proxies.smtp.nexthop import NextHop, NoRoute, resolve_next_hop
from proxies.transparent import TransparentError, open_onward

# Postfix's smtp_connection_cache_time_limit: how long an idle onward connection is kept for
# the next message to the same next hop (and, when spoofing, from the same client address),
# and smtp_connection_reuse_time_limit: how long one connection goes on being reused.
CONNECTION_IDLE_LIMIT = 2.0
CONNECTION_REUSE_LIMIT = 300.0
# Session stages before the transaction: a failure there is the server's state, not the
# message's, so the next address of the hop is tried.
_BEFORE_MAIL = frozenset({"greeting", "ehlo", "helo"})


class _Connection:
    """An onward SMTP connection and the session on it, between transactions."""

    def __init__(self, session: smtp_client.ClientSession, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.session = session
        self.reader = reader
        self.writer = writer
        self.opened = time.monotonic()
        self.idle_timer: asyncio.TimerHandle | None = None
        self.failed_stage: str | None = None  # where its last transaction failed, if it did

    async def close(self) -> None:
        """QUIT if the session is still in a clean state, then close."""
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        with contextlib.suppress(Exception):
            if self.session.reusable:
                self.session.quit()
                self.writer.write(self.session.data_to_send())
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


# (relay address, spoofed source address or None)
_CacheKey = tuple[tuple[str, int], str | None]


class DeliveryAgent:
    def __init__(self, config: SmtpConfig, queue: Queue, *, spoof_source: bool,
                 tls_context: ssl.SSLContext | None) -> None:
        self.config = config
        self.queue = queue
        self.spoof_source = spoof_source
        self.tls_context = tls_context
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(config.delivery_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: set[str] = set()
        self._stopping = False
        # Idle onward connections, newest last (cf. Postfix's scache).
        self._idle: dict[_CacheKey, list[_Connection]] = defaultdict(list)
        self._closing: set[asyncio.Task[None]] = set()
        # When the sleeping scheduler means to look at the queue again (queue clock); inf
        # while it is awake, so any change then is looked at in the next round.
        self.next_wakeup = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def wake(self, queue_id: str | None = None) -> None:
        """Called when a message was queued or the queue changed on disk (flush, release)."""
        self._wake.set()

    def _scheduled(self, when: float) -> None:
        """`Queue.on_schedule`: a message is due at `when`. Called from any thread (claims and
        attempt records run in worker threads), so it only reads and posts to the loop."""
        loop = self._loop
        if loop is None or when >= self.next_wakeup:
            return  # not running, or woken by then anyway
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to wake
                loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.queue.on_schedule = self._scheduled
        try:
            await self._run()
        finally:
            self.queue.on_schedule = None
            self._loop = None
            self.next_wakeup = math.inf

    async def _run(self) -> None:
        while not self._stopping:
            # Order matters: next_wakeup is inf before the event is cleared and until the new
            # one is set below, so a due time set at any moment in between wakes the next wait.
            self.next_wakeup = math.inf
            self._wake.clear()
            for queue_id in self.queue.due():
                if self._stopping:
                    break
                if queue_id in self._in_flight:
                    continue
                await self._slots.acquire()
                # claim() is a rename and a read of a file just written (in the page cache):
                # cheaper here than the thread hand-off, whose GIL traffic measured as the
                # largest cost per message (futex calls by the hundred).
                claimed = self.queue.claim(queue_id)
                if claimed is None:
                    self._slots.release()
                    continue
                self._in_flight.add(queue_id)
                task = asyncio.create_task(self._deliver(claimed), name=f"deliver-{queue_id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            next_due = self.queue.next_due_time()
            now = self.queue.clock()
            wakeup = now + self.config.queue_scan_interval
            if next_due is not None:
                wakeup = min(wakeup, next_due)
            self.next_wakeup = wakeup
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, wakeup - now))

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking messages; let attempts under way finish for `grace` seconds. A message
        whose attempt is cut off stays in the queue (recovery puts it back)."""
        self._stopping = True
        self._wake.set()
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle.clear()
        await asyncio.gather(*(conn.close() for conn in idle), return_exceptions=True)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=5)

    # --- the connection cache -----------------------------------------------------------------

    def _take_idle(self, key: _CacheKey) -> _Connection | None:
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if not conn.writer.is_closing() and not conn.reader.at_eof():
                return conn
            self._close_later(conn)
        return None

    def _keep_idle(self, key: _CacheKey, conn: _Connection) -> None:
        if (self._stopping or not conn.session.reusable
                or time.monotonic() - conn.opened > CONNECTION_REUSE_LIMIT):
            self._close_later(conn)
            return
        conns = self._idle[key]
        conns.append(conn)

        def expire() -> None:
            conn.idle_timer = None
            with contextlib.suppress(ValueError):
                self._idle[key].remove(conn)
                self._close_later(conn)

        conn.idle_timer = asyncio.get_running_loop().call_later(CONNECTION_IDLE_LIMIT, expire)

    def _close_later(self, conn: _Connection) -> None:
        task = asyncio.create_task(conn.close(), name="delivery-connection-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _deliver(self, claimed: ClaimedMessage) -> None:
        queue_id = claimed.queue_id
        try:
            results = await self._attempt(claimed)
            if set(results) >= set(claimed.pending) and all(
                    200 <= r.code < 300 for r in results.values()):
                # All delivered: only the file to remove, no fsync, no parse; inline.
                outcome = self.queue.record_delivered(queue_id, tuple(results))
            else:  # a state record to fsync, perhaps a bounce to queue: off the loop
                outcome = await asyncio.to_thread(self.queue.record_attempt, queue_id, results)
            logs.event("delivery_attempt_done", qid=queue_id, outcome=str(outcome))
            metrics.current.deliveries(len(outcome.delivered), len(outcome.deferred),
                                       len(outcome.bounced))
            if outcome.bounced:
                logs.event("bounced", qid=queue_id, rcpts=",".join(outcome.bounced),
                           dsn=outcome.dsn_id or f"none ({outcome.no_dsn})")
        except asyncio.CancelledError:
            self.queue.release_claim(queue_id)
            raise
        except Exception as exc:  # a bug: keep the message, log, and try again later
            logs.error("delivery_internal_error", qid=queue_id, exc_info=True, error=repr(exc))
            outcome = await asyncio.to_thread(self.queue.record_attempt, queue_id, {
                rcpt: DeliveryResult(451, f"4.3.0 internal error: {exc!r}")
                for rcpt in claimed.pending})
            metrics.current.deliveries(len(outcome.delivered), len(outcome.deferred),
                                       len(outcome.bounced))
        finally:
            self._in_flight.discard(queue_id)
            self._slots.release()

    async def _attempt(self, claimed: ClaimedMessage) -> dict[str, DeliveryResult]:
        envelope = claimed.envelope
        by_domain: dict[str, list[str]] = defaultdict(list)
        for rcpt in claimed.pending:
            by_domain[rcpt.rpartition("@")[2].lower()].append(rcpt)
        results: dict[str, DeliveryResult] = {}
        # An intercepted message has one destination, whatever its recipients' domains.
        groups: Mapping[str, list[str]] = (
            {"": list(claimed.pending)} if envelope.original_destination else by_domain)
        for domain, rcpts in groups.items():
            try:
                hop = await resolve_next_hop(self.config, domain, envelope.original_destination,
                                             envelope.client_address, self.spoof_source)
            except NoRoute as exc:
                for rcpt in rcpts:
                    results[rcpt] = DeliveryResult(exc.code, f"{exc.status} {exc}",
                                                   connected=False)
                continue
            results.update(await self._send_to_hop(claimed, hop, rcpts))
        return results

    async def _send_to_hop(self, claimed: ClaimedMessage, hop: NextHop,
                           rcpts: list[str]) -> dict[str, DeliveryResult]:
        last_error = "no address to try"
        # A server that failed before MAIL (its greeting, EHLO/HELO, or the connection) says
        # nothing about the message: the next address is tried, as RFC 5321 5.1 asks and
        # Postfix's smtp(8) does (smtp_skip_5xx_greeting). Its answer is kept in case it was
        # the last one.
        unready: dict[str, DeliveryResult] | None = None
        for address in hop.addresses:
            key: _CacheKey = (address, hop.spoof_source)
            cached = self._take_idle(key)
            if cached is not None:
                try:
                    results = await self._run_session(claimed, hop, address, rcpts, cached)
                except BaseException:
                    cached.session.reusable = False
                    self._close_later(cached)
                    raise
                if results is not None:
                    self._keep_idle(key, cached)
                    return results
                # The cached connection went stale (closed, RSET refused): not the message's
                # fault; try a fresh connection, as Postfix does.
                logs.debug("delivery_cached_connection_stale", qid=claimed.queue_id,
                           relay=hostport(address))
                self._close_later(cached)
            try:
                reader, writer = await open_onward(
                    address, source=hop.spoof_source, timeout=self.config.connect_timeout)
            except OSError as exc:
                last_error = f"connect to {hostport(address)}: {os_error_text(exc)}"
                logs.event("delivery_connect_failed", qid=claimed.queue_id,
                           relay=hostport(address), error=last_error)
                continue
            envelope = claimed.envelope
            conn = None
            try:
                conn = _Connection(smtp_client.ClientSession(
                    self.config.hostname, envelope.sender, rcpts, len(claimed.read_content()),
                    eight_bit=envelope.body_8bit, smtputf8=envelope.smtputf8,
                    tls="opportunistic" if self.tls_context is not None else "never",
                    keep_open=True,
                ), reader, writer)
                results = await self._run_session(claimed, hop, address, rcpts, conn)
                assert results is not None
            except BaseException:
                if conn is None:
                    writer.close()
                else:
                    conn.session.reusable = False
                    self._close_later(conn)
                raise
            if conn.session.stage in _BEFORE_MAIL or conn.failed_stage in _BEFORE_MAIL:
                conn.session.reusable = False
                self._close_later(conn)
                unready = results
                continue
            self._keep_idle(key, conn)
            return results
        if unready is not None:
            return unready
        return {rcpt: DeliveryResult(451, f"4.4.1 {last_error}", connected=False)
                for rcpt in rcpts}

    async def _run_session(self, claimed: ClaimedMessage, hop: NextHop,
                           address: tuple[str, int], rcpts: list[str],
                           conn: _Connection) -> dict[str, DeliveryResult] | None:
        """One transaction over `conn`: a new one, or a cached one (reusable), which gets
        RSET first. None: a cached connection failed before the message was sent."""
        envelope = claimed.envelope
        content = claimed.read_content()
        session, reader, writer = conn.session, conn.reader, conn.writer
        reused = session.reusable
        if reused:
            session.next_transaction(envelope.sender, rcpts, len(content),
                                     eight_bit=envelope.body_8bit, smtputf8=envelope.smtputf8)
        # Content our handler queued is CRLF-only already; anything else is checked as sent.
        session.canonical = envelope.crlf_only
        relay = hostport(address)
        timeout = self.config.delivery_timeout
        loop = asyncio.get_running_loop()
        try:
            # One timeout context, moved on before every wait (each step gets `timeout`):
            # asyncio.wait_for made a task per read and per drain, a measurable share of the
            # delivery process's time per message.
            async with asyncio.timeout(timeout) as step:
                while True:
                    # The session decides what to send while it digests replies, so ask for an
                    # event first and flush what it queued before waiting (this also sends QUIT
                    # after the final event).
                    event = session.next_event()
                    outgoing = session.data_to_send()
                    if outgoing:
                        writer.write(outgoing)
                        step.reschedule(loop.time() + timeout)
                        await writer.drain()
                    if isinstance(event, smtp_client.NeedData):
                        step.reschedule(loop.time() + timeout)
                        session.receive_data(await reader.read(65536))
                    elif isinstance(event, smtp_client.ReadyForContent):
                        session.send_content(content)
                    elif isinstance(event, smtp_client.StartTls):
                        assert self.tls_context is not None
                        step.reschedule(loop.time() + timeout)
                        await writer.start_tls(self.tls_context)
                        session.tls_established()
                    elif isinstance(event, smtp_client.Finished):
                        out = {}
                        for rcpt, reply in event.results.items():
                            out[rcpt] = DeliveryResult(reply.code, str(reply)[4:], connected=True)
                            logs.event("delivery", qid=claimed.queue_id, rcpt=rcpt, relay=relay,
                                       via=hop.source, reply=str(reply),
                                       spoofed=hop.spoof_source or "-")
                        return out
                    elif isinstance(event, smtp_client.Failed):
                        if reused and event.stage == "rset":
                            return None
                        conn.failed_stage = event.stage
                        logs.event("delivery_failed", qid=claimed.queue_id, relay=relay,
                                   stage=event.stage, reply=str(event.reply))
                        return {rcpt: DeliveryResult(event.reply.code, str(event.reply)[4:],
                                                     connected=True) for rcpt in rcpts}
        except (TimeoutError, ConnectionError, OSError, ssl.SSLError) as exc:
            session.reusable = False
            if reused and session.stage == "rset":
                return None
            text = "timeout" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            logs.event("delivery_connection_lost", qid=claimed.queue_id, relay=relay, error=text)
            return {rcpt: DeliveryResult(451, f"4.4.2 {relay}: {text}", connected=True)
                    for rcpt in rcpts}


def os_error_text(exc: OSError) -> str:
    """Why a connect failed, as an administrator reading the queue wants it."""
    # asyncio's sock_connect puts "Connect call failed ('198.51.100.25', 25)" in strerror;
    # an administrator reading the queue wants the kernel's reason: "Connection refused".
    if isinstance(exc, TransparentError | TimeoutError):
        return exc.strerror or str(exc)  # already says what happened and what to do
    if exc.errno:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or repr(exc)


def hostport(address: tuple[str, int]) -> str:
    """`host:port`, with an IPv6 address in brackets."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
