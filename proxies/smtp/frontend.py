"""The SMTP front end: one asyncio.BufferedProtocol per connection driving the sans-I/O server core.

The core (`proxies.smtp.servercore`) holds the protocol; this module is the edge: it feeds the
core the bytes that arrive, answers each command event through the policy handler (the same
aiosmtpd-style handler that also runs under aiosmtpd's own SMTP class, `[smtp] frontend =
"aiosmtpd"`), and writes what the core returns. Three things it owns:

- Replies leave in one write per group. The core says NEED_DATA when no complete command is
  buffered: only then is everything collected written, in one `transport.write`. A client
  that sends one command and reads once gets exactly one complete reply (multi-line EHLO
  included); a pipelined group (RFC 2920 3.1) gets all its replies in one segment, as from
  Postfix.
- Time: the command timeout between commands, RFC 5321 4.5.3.2's longer data timeout while
  content arrives; on expiry a `421 4.4.2` and close. A command line must be complete within
  the command timeout of its first byte, however slowly it trickles in (slowloris).
- Fairness: a long pipelined burst yields to the other connections every BURST commands, and
  a client that does not read its replies is not answered further until it does.
- Containment: one connection's bug ends that connection only (logged with its id, which is
  unique across worker processes: pid.sequence), and the client gets a 421 without internals.

Why not streams: a StreamReader costs a coroutine wake-up per line and a drain per reply; here
a connection costs one task, woken once per round trip, and handler hooks that do not really
wait (MAIL, RCPT, EHLO) complete inside that wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import ssl
from collections.abc import Awaitable
from typing import Any, Protocol, cast

from aiosmtpd.smtp import Envelope, Session

from proxies import logs, metrics
from proxies.config import SmtpConfig
from proxies.receivebuffer import SharedBufferProtocol
from proxies.smtp.errors import RemoteProtocolError
from proxies.smtp.handler import ClientInfo, format_hostport
from proxies.smtp.reply import Reply, ReplyReader
from proxies.smtp.servercore import (
    NEED_DATA,
    CloseConnection,
    Command,
    DataStart,
    Ehlo,
    Helo,
    Mail,
    MessageReceived,
    Quit,
    Rcpt,
    Refused,
    Rset,
    ServerCore,
    ServerLimits,
    StartTlsRequest,
    TlsHandshake,
)
from proxies.transparent import accepted

# While a hook works (the filter, the queue's fsync) the client may keep sending; beyond this
# much buffered input we stop reading until the core has consumed it.
READ_PAUSE_THRESHOLD = 1024 * 1024
# Commands answered without waiting before the others on this loop get a turn: a megabyte of
# pipelined NOOPs is some 170,000 commands, seconds of CPU that would stall every other
# client of the worker. Far above any real pipelined group, which still leaves in one write.
BURST = 256
# After our close, how long a client that does not read what we still have to send keeps its
# connection (and its slot under the connection limits) before it is dropped.
CLOSE_GRACE = 10.0
# The core's refusals of message content, as the log names them.
_CONTENT_REFUSALS: dict[tuple[int, str | None], str] = {
    (550, "5.6.0"): "smtp_nul_in_data",
    (552, "5.3.4"): "smtp_message_too_big",
    (500, "5.5.2"): "smtp_data_line_too_long",
}
# ... and as the metrics name them (mailgate_smtp_messages_total{result="rejected",reason}).
_REFUSAL_REASONS = {"smtp_nul_in_data": "nul", "smtp_message_too_big": "too_big",
                    "smtp_data_line_too_long": "line_too_long"}
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")


class Gate(Protocol):
    """Connection limits with one owner (the worker's slot in the master's counts)."""

    def admit(self, client: str) -> bool: ...
    def release(self, client: str) -> None: ...


class Handler(Protocol):
    """The policy hooks we call (aiosmtpd's handler API, `proxies.smtp.server.GatewayHandler`)."""

    def handle_EHLO(self, server: Any, session: Session, envelope: Envelope, hostname: str,
                    responses: list[str]) -> Awaitable[list[str]]: ...
    def handle_HELO(self, server: Any, session: Session, envelope: Envelope,
                    hostname: str) -> Awaitable[str]: ...
    def handle_MAIL(self, server: Any, session: Session, envelope: Envelope, address: str,
                    mail_options: list[str]) -> Awaitable[str]: ...
    def handle_RCPT(self, server: Any, session: Session, envelope: Envelope, address: str,
                    rcpt_options: list[str]) -> Awaitable[str]: ...
    def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> Awaitable[str]: ...


@functools.lru_cache(maxsize=512)
def parse_reply(text: str) -> Reply:
    """A handler's reply string ("250 2.1.5 Ok", or CRLF-joined lines) as a Reply; the same
    few strings come back all the time, so they are parsed once."""
    reader = ReplyReader()
    reader.receive_data(text.encode("utf-8", "surrogateescape").rstrip(b"\r\n") + b"\r\n")
    try:
        reply = reader.next_reply()
    except RemoteProtocolError:
        reply = None
    if reply is None or reader.has_data:
        raise ValueError(f"not one SMTP reply: {text!r}")
    return reply


class SmtpConnection(SharedBufferProtocol):
    """One client: bytes to the core, events to the handler, replies back in one write.

    It reads into `proxies.receivebuffer`'s buffer, not a new 256 KiB one per read: the core
    and its DATA reader copy what they keep first."""

    def __init__(self, front: MailgateFrontEnd, connection_id: str) -> None:
        self.front = front
        self.config = front.config
        self.hostname = front.config.hostname  # the handler's `server.hostname`
        self.enhanced_status_codes = True  # every reply the core sends carries one
        self.connection_id = connection_id
        self.core = ServerCore(front.config.hostname, limits=front.limits,
                               tls_available=front.tls_context is not None)
        self.transport: asyncio.Transport | None = None
        self.client: ClientInfo | None = None
        self.session: Session | None = None
        self.envelope = Envelope()
        self._admitted = False
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._data_deadline = 0.0  # while content arrives: see _content_read
        self._paused = False
        self._write_paused = False  # the transport's buffer is full: the client is not reading
        self._abort_timer: asyncio.TimerHandle | None = None
        self._closed = False
        # STARTTLS: "requested" from our 220 until the handshake starts (plain text then is
        # an injection and dropped, RFC 3207 6), "handshake" while it runs (what arrives then
        # is already decrypted, the client's first command under TLS: kept for the core).
        self._tls_phase: str | None = None
        self._tls_early = bytearray()
        # Replies by class, told to the metrics once, when the connection ends: an increment
        # of a shared counter per reply would cost more than the rest of this bookkeeping.
        self.replies = metrics.new_reply_counts()

    # --- asyncio.BufferedProtocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not derive from asyncio's classes.
        transport = cast(asyncio.Transport, transport)
        if self.client is not None:  # start_tls hands the protocol to the new transport
            self.transport = transport
            return
        self.transport = transport
        info = accepted(transport, self.config.listen_port)
        self.client = ClientInfo(*info.client, info.onward, self.connection_id)
        if not self.front.gate.admit(self.client.client_address):
            logs.warning("smtp_connection_refused", conn=self.connection_id,
                         client=self.client.client_address, reason="connection limit")
            metrics.current.smtp_connection("refused")
            transport.write(self._shutdown(TOO_MANY_CONNECTIONS))
            self._closed = True
            transport.close()
            return
        self._admitted = True
        metrics.current.smtp_connection("accepted")
        self.session = Session(asyncio.get_running_loop())
        self.session.peer = transport.get_extra_info("peername")
        self.session.mailgate_client = self.client  # type: ignore[attr-defined]
        logs.event("smtp_connect", conn=self.connection_id, client=self.client.client_address,
                   destination=format_hostport(self.client.original_destination))
        transport.write(self._send(self.core.greeting_reply))
        self._arm(self.config.command_timeout)
        self._task = asyncio.get_running_loop().create_task(
            self._serve(), name=f"smtp-{self.connection_id}")
        self.front.tasks.add(self._task)
        self._task.add_done_callback(self.front.tasks.discard)

    def data_received(self, data: bytes | memoryview) -> None:
        """`data`: the shared buffer's (see the class)."""
        if self._closed or self._tls_phase == "requested":
            return
        if self._tls_phase == "handshake":
            self._tls_early += data
            return
        # Content moves the deadline with every read (RFC 5321 4.5.3.2.6 times each data
        # block; max_message_size bounds the whole). A command does not: like Postfix's
        # smtpd_per_record_deadline, a command line must be complete within command_timeout
        # of its first byte, or a client trickling a byte every few seconds (slowloris)
        # would hold its connection for ever.
        if self.core.state == "data":
            self._content_read(len(data))
        elif not self.core.buffered:
            self._arm(self.config.command_timeout)
        self.core.receive_data(data)
        if self.core.buffered > READ_PAUSE_THRESHOLD and not self._paused:
            self._paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        self._notify()

    def eof_received(self) -> bool | None:
        if not self._closed and self._tls_phase is None:
            self.core.receive_data(b"")
            self._notify()
        # Keep our side open until the core has said what it has to say. Not possible under
        # TLS, where asyncio closes anyway (and logs a warning if asked): so not from the
        # 220 to STARTTLS on, the handshake included (session.ssl is set only after it).
        return self._tls_phase is None and (self.session is None or self.session.ssl is None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._notify()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_timer()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        replies, self.replies = self.replies, metrics.new_reply_counts()
        metrics.current.smtp_replies(replies)
        if self._admitted and self.client is not None:
            self._admitted = False
            self.front.gate.release(self.client.client_address)
            logs.debug("smtp_disconnect", conn=self.connection_id)
        self._notify()

    # --- the session --------------------------------------------------------------------------

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _wait_input(self) -> None:
        if self._paused and self.core.buffered < READ_PAUSE_THRESHOLD // 2:
            self._paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        self._wake = asyncio.get_running_loop().create_future()
        await self._wake
        self._wake = None

    async def _serve(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            self._close()
            raise
        except Exception as exc:
            logs.error("smtp_internal_error", exc_info=True, conn=self.connection_id,
                       error=repr(exc))
            if not self._closed and self.transport is not None:
                with contextlib.suppress(Exception):
                    self.transport.write(self._shutdown(INTERNAL_ERROR))
            self._close()

    async def _drain(self) -> None:
        """Wait while the client does not read our replies: what it sends meanwhile stays in
        the core's buffer (reading stops at READ_PAUSE_THRESHOLD), so a client that pipelines
        without reading costs a bounded amount of memory, not its replies without end."""
        while self._write_paused and not self._closed:
            self._wake = asyncio.get_running_loop().create_future()
            await self._wake
            self._wake = None

    async def _loop(self) -> None:
        out: list[bytes] = []
        burst = 0
        while not self._closed:
            event = self.core.next_event()
            if event is NEED_DATA:
                self._write(out)
                burst = 0
                await self._drain()
                if not self.core.buffered and self.core.state != "data":
                    # Replied to all: the time between commands starts now (4.5.3.2.7).
                    self._arm(self.config.command_timeout)
                await self._wait_input()
            elif isinstance(event, Command):
                out.append(self._send(await self._answer(event)))
                burst += 1
                if burst >= BURST:
                    self._write(out)
                    burst = 0
                    await asyncio.sleep(0)
                    await self._drain()
            elif isinstance(event, MessageReceived):
                self._write(out)  # e.g. the 354's reply went out long ago; nothing waits
                out.append(self._send(await self._message(event)))
            elif isinstance(event, TlsHandshake):
                self._write(out)
                if not await self._start_tls(event):
                    return
            elif isinstance(event, CloseConnection):
                self._write(out)
                self._close()
                return

    def _send(self, reply: Reply) -> bytes:
        self.replies[reply.code // 100] += 1
        return self.core.send(reply)

    def _shutdown(self, reply: Reply) -> bytes:
        data = self.core.shutdown(reply)
        if data:
            self.replies[reply.code // 100] += 1
        return data

    def _write(self, out: list[bytes]) -> None:
        if out:
            if self.transport is not None and not self._closed:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _close(self) -> None:
        self._cancel_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
            # close() waits for our last replies to be read; a client that never reads them
            # would keep the transport, and its slot, for ever.
            self._abort_timer = asyncio.get_running_loop().call_later(
                CLOSE_GRACE, self.transport.abort)

    # --- answering ----------------------------------------------------------------------------

    async def _answer(self, event: Command) -> Reply:
        session, envelope, handler = self.session, self.envelope, self.front.handler
        assert session is not None
        if isinstance(event, Refused):
            content = None
            if self.core.state == "data":
                # The core refused the message content itself, which ends the transaction
                # (RFC 5321 4.1.1.4): so must it end here, or its recipients would go with
                # the next message.
                self.envelope = Envelope()
                content = _CONTENT_REFUSALS.get((event.reply.code, event.reply.enhanced))
            if content is not None:
                logs.warning(content, conn=self.connection_id,
                             client=self.client.client_address if self.client else "-")
                metrics.current.smtp_message("rejected", _REFUSAL_REASONS[content])
            else:
                logs.debug("smtp_refused", conn=self.connection_id, command=event.command,
                           reason=event.reason, reply=str(event.reply))
            return event.reply
        try:
            if isinstance(event, Mail):
                envelope.smtp_utf8 = event.smtputf8
                reply = await handler.handle_MAIL(self, session, envelope, event.path or "<>",
                                                  list(event.options))
                return parse_reply(reply)
            if isinstance(event, Rcpt):
                reply = await handler.handle_RCPT(self, session, envelope, event.path,
                                                  list(event.options))
                return parse_reply(reply)
            if isinstance(event, Ehlo):
                self.envelope = Envelope()
                session.extended_smtp = True
                lines = await handler.handle_EHLO(self, session, self.envelope, event.name,
                                                  _aiosmtpd_lines(event.reply))
                return parse_reply("\r\n".join(lines))
            if isinstance(event, Helo):
                self.envelope = Envelope()
                session.extended_smtp = False
                return parse_reply(await handler.handle_HELO(self, session, self.envelope,
                                                             event.name))
        except Exception as exc:
            logs.error("smtp_internal_error", exc_info=True, conn=self.connection_id,
                       error=repr(exc))
            return INTERNAL_ERROR
        if isinstance(event, Rset | Quit):
            self.envelope = Envelope()
        elif isinstance(event, DataStart):
            self._arm(self.config.data_timeout)
            self._data_deadline = self._deadline
        elif isinstance(event, StartTlsRequest):
            self._tls_phase = "requested"  # nothing more into the core until the handshake
        return event.reply

    async def _message(self, event: MessageReceived) -> Reply:
        assert self.session is not None
        envelope = self.envelope
        envelope.content = envelope.original_content = event.content
        # The core's reader has looked for bare CR/LF already: the handler need not again.
        envelope.mailgate_bare_line_ending = event.bare_line_ending  # type: ignore[attr-defined]
        self._arm(self.config.command_timeout)
        try:
            reply = parse_reply(await self.front.handler.handle_DATA(self, self.session,
                                                                      envelope))
        except Exception as exc:
            logs.error("smtp_internal_error", exc_info=True, conn=self.connection_id,
                       error=repr(exc))
            metrics.current.smtp_message("tempfailed", "internal_error")
            reply = INTERNAL_ERROR
        self.envelope = Envelope()
        return reply

    async def _start_tls(self, event: TlsHandshake) -> bool:
        if event.discarded:
            logs.warning("smtp_starttls_injection", conn=self.connection_id,
                         discarded=event.discarded)
        assert self.transport is not None and self.front.tls_context is not None
        loop = asyncio.get_running_loop()
        self._cancel_timer()
        # start_tls pauses the plain transport at once: from here on only decrypted data
        # reaches data_received.
        self._tls_phase = "handshake"
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(self.transport, self, self.front.tls_context, server_side=True),
                self.config.command_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            logs.event("smtp_tls_failed", conn=self.connection_id, error=str(exc) or repr(exc))
            self._tls_phase = None
            self._closed = True
            self._close()
            return False
        self._tls_phase = None
        if transport is None:
            self._closed = True
            return False
        self.transport = transport
        assert self.session is not None
        self.session.ssl = transport.get_extra_info("ssl_object")
        self.envelope = Envelope()
        self.core.tls_established()
        if self._tls_early:
            self.core.receive_data(bytes(self._tls_early))
            self._tls_early.clear()
        self._arm(self.config.command_timeout)
        return True

    # --- time ---------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        """The connection times out `seconds` from now. Every read moves the deadline, so
        the timer is not remade each time (a timer per read was a measurable share of the
        front end's time): it fires at the old deadline and sleeps on if there was activity."""
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + seconds
        if self._timer is not None and self._timer.when() <= self._deadline:
            return
        self._cancel_timer()
        self._timer = loop.call_at(self._deadline, self._timed_out)

    def _content_read(self, octets: int) -> None:
        """A read of message content: like Postfix's smtpd_min_data_rate, it earns
        octets/min_data_rate seconds on the deadline (never more than data_timeout from now),
        so the content must keep coming at that rate on average, not merely a byte within
        each data_timeout (which a trickling client could stretch for days)."""
        rate = self.config.min_data_rate
        if not rate:
            self._arm(self.config.data_timeout)
            return
        now = asyncio.get_running_loop().time()
        self._data_deadline = min(self._data_deadline + octets / rate,
                                  now + self.config.data_timeout)
        self._arm(self._data_deadline - now)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._timed_out)
            return
        if self._closed or self.transport is None or self.transport.is_closing():
            return
        logs.event("smtp_timeout", conn=self.connection_id,
                   client=self.client.client_address if self.client else "-",
                   during="data" if self.core.state == "data" else "commands")
        # RFC 5321 3.8: say 421 before closing, so the client knows it was not a crash.
        self.transport.write(self._shutdown(self.core.timeout_reply))
        self._closed = True
        self._close()
        if self._task is not None:
            self._task.cancel()


def _aiosmtpd_lines(reply: Reply) -> list[str]:
    """The core's EHLO reply as the list aiosmtpd hands handle_EHLO ("250-name", ...)."""
    lines = reply.lines
    return [f"250{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)]


class Listening:
    """What both front ends share: the listening sockets, a protocol per connection."""

    def __init__(self, config: SmtpConfig, tls_context: ssl.SSLContext | None,
                 gate: Gate) -> None:
        self.config = config
        self.tls_context = tls_context
        self.gate = gate
        self.servers: list[asyncio.base_events.Server] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def protocol(self) -> asyncio.BaseProtocol:
        raise NotImplementedError

    async def start(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets:
            self.servers.append(await loop.create_server(self.protocol, sock=sock))

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()


class MailgateFrontEnd(Listening):
    """Makes one SmtpConnection per accepted connection."""

    def __init__(self, config: SmtpConfig, handler: Handler,
                 tls_context: ssl.SSLContext | None, gate: Gate) -> None:
        super().__init__(config, tls_context, gate)
        self.handler = handler
        self.limits = ServerLimits(max_recipients=config.max_recipients,
                                   max_message_size=config.max_message_size)
        self._prefix = f"{os.getpid()}."
        self._next_id = 0

    def protocol(self) -> SmtpConnection:
        self._next_id += 1
        return SmtpConnection(self, f"{self._prefix}{self._next_id}")
