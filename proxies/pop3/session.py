"""One intercepted POP3 connection, from accept to close: the asyncio edge around the codec.

The session reads one client command at a time and finishes its response before it takes the
next, so a client that pipelines (RFC 2449 6.6, PIPELINING) is served correctly: its commands
wait in the client reader's buffer and are answered in order. Most commands and responses are
relayed byte for byte; the proxy steps in for:

- RETR and TOP (TOP unless scan_top = false): the message is taken whole from the server
  (`Spool`: memory, then a temporary file), scanned, and the client gets the original, a tagged
  copy, a notice, or -ERR [SYS/TEMP] (`policy.decide`). `Keepalive` keeps a slow one alive.
- CAPA: STLS is shown or hidden by the TLS mode; the rest is the server's list.
- STLS (RFC 2595): "terminate" answers it here and does TLS with the gateway's certificate,
  the server connection having been upgraded with STLS right after its greeting, when it
  offers it; "passthrough" relays it and then relays the encrypted bytes unscanned (logged);
  "strip" hides it from the client (the server connection is still upgraded).
- Commands a state does not allow (`states.check`) are answered here with -ERR.

Whatever goes wrong on one side, the other side gets a -ERR when one can still be sent, or a
closed connection, within the configured timeouts; the proxy never sends QUIT for a client
(RFC 1939 6: only the client's QUIT deletes messages) and never logs credentials.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxies import logs, metrics
from proxies.mail.headers import Header, parse_header
from proxies.pop3 import rewrite, states
from proxies.pop3.cache import CacheKey, ScanCache
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
from proxies.pop3.keepalive import Keepalive
from proxies.pop3.policy import decide
from proxies.pop3.spool import Spool
from proxies.scan.api import ContentScanner, ScanResult
from proxies.transparent import Address, ConnectionInfo, open_onward

__all__ = ["Pop3Session", "QuarantineStore", "SessionContext", "set_nodelay"]

CHUNK = 1 << 20
MAX_UNKNOWN_COMMANDS = 20
MAX_CAPA_SIZE = 64 * 1024
TLS_HANDSHAKE_TIMEOUT = 30.0

SERVER_GONE = err("[SYS/TEMP] the mail server closed the connection")
SERVER_SILENT = err("[SYS/TEMP] the mail server did not answer in time")
SERVER_INVALID = err("[SYS/TEMP] the mail server sent an invalid reply")


def set_nodelay(sock: socket.socket | None) -> None:
    """TCP_NODELAY on a proxied socket.

    asyncio sets it only on sockets whose `proto` is IPPROTO_TCP, and the transparent sockets
    are made with proto 0. Without it, a response written in pieces (status line, content,
    final ".") meets the client's delayed ACK: Nagle holds the second piece for about 40 ms,
    which capped small RETRs at about 40 messages/s.
    """
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class QuarantineStore(Protocol):
    """Where replaced originals go; returns the id the notice names."""

    def store(self, content: bytes, result: ScanResult, origin: dict[str, str]) -> str: ...


@dataclass
class SessionContext:
    """What every session of one proxy shares."""

    config: Pop3Config
    scanner: ContentScanner | None
    quarantine: QuarantineStore | None
    cache: ScanCache
    hostname: str
    tls_server: ssl.SSLContext | None  # our certificate, for terminate mode
    tls_client: ssl.SSLContext | None  # towards servers
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coroutine: object, name: str) -> asyncio.Task[None]:
        """A named task the proxy keeps a reference to until it ends."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            coroutine, name=name)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


class _Abort(Exception):
    """End the session: `reply` (if any) goes to the client first."""

    def __init__(self, reason: str, reply: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


def _command(line: str) -> Command:
    verb, _, argument = line.partition(" ")
    return Command(verb, argument.encode(), line.encode() + b"\r\n")


def _sasl_user(mechanism: bytes, response: bytes, step: int) -> str | None:
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


class Pop3Session:
    def __init__(self, context: SessionContext, ident: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, info: ConnectionInfo, destination: Address,
                 source: str | None) -> None:
        self.context = context
        self.config = context.config
        self.ident = ident
        self.info = info
        self.destination = destination
        self.source = source
        self.client_reader = reader
        self.client_writer = writer
        self.server_reader: asyncio.StreamReader | None = None
        self.server_writer: asyncio.StreamWriter | None = None
        self.client = ClientReader()
        self.server = ServerReader()
        self.state = states.SessionState.AUTHORIZATION
        self.client_tls = False
        self.server_tls = False
        self.server_offers_stls = False
        self.passthrough = False
        self.user: str | None = None
        self._pending_user: str | None = None
        self.uidls: dict[bytes, bytes] = {}
        self.unknown_commands = 0
        self.messages = 0
        self.error: str | None = None
        self.started = time.monotonic()

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        logs.event("pop3_connect", id=self.ident, client=f"[{self.info.client[0]}]:"
                   f"{self.info.client[1]}", server=f"[{self.destination[0]}]:"
                   f"{self.destination[1]}", how=self.info.how, spoof=self.source is not None)
        try:
            await self._session()
        except _Abort as exc:
            self.error = exc.reason
            if exc.reply is not None:
                with contextlib.suppress(OSError, TimeoutError, ssl.SSLError, RuntimeError):
                    self.client_writer.write(exc.reply)
                    async with asyncio.timeout(5):
                        await self.client_writer.drain()
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            self.error = "proxy stopping"
            raise
        except Exception:  # a bug: log it with the session id, end only this session
            self.error = "internal error"
            logs.error("pop3_session_crashed", id=self.ident, exc_info=True)
        finally:
            await self._close()
            fields: dict[str, Any] = {
                "id": self.ident, "messages": self.messages,
                "seconds": round(time.monotonic() - self.started, 3)}
            if self.error:
                fields["error"] = self.error
            logs.event("pop3_close", **fields)

    async def _close(self) -> None:
        for writer in (self.server_writer, self.client_writer):
            if writer is None:
                continue
            with contextlib.suppress(Exception):
                writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await writer.wait_closed()

    # --- I/O helpers ----------------------------------------------------------------------------

    def _to_client(self, data: bytes) -> None:
        self.client_writer.write(data)

    async def _flush_client(self) -> None:
        try:
            async with asyncio.timeout(self.config.client_timeout):
                await self.client_writer.drain()
        except TimeoutError:
            raise _Abort("the client stopped reading") from None

    async def _send_client(self, data: bytes) -> None:
        self._to_client(data)
        await self._flush_client()

    async def _send_server(self, data: bytes) -> None:
        assert self.server_writer is not None
        self.server_writer.write(data)
        try:
            async with asyncio.timeout(self.config.server_timeout):
                await self.server_writer.drain()
        except TimeoutError:
            raise _Abort("the server stopped reading", SERVER_SILENT) from None
        except OSError as exc:
            raise _Abort(f"writing to the server: {exc}", SERVER_GONE) from None

    async def _client_event(self) -> Command | SaslLine | Closed:
        # RFC 1939 3's autologout timer runs from our last response, and a command that
        # trickles in a byte every few seconds (slowloris) does not restart it: the whole
        # command must arrive within client_timeout.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.client_timeout
        while True:
            try:
                event = self.client.next_event()
            except RemoteProtocolError as exc:
                if exc.reply:
                    await self._send_client(exc.reply)
                    deadline = loop.time() + self.config.client_timeout
                continue
            if not isinstance(event, NeedData):
                return event
            try:
                async with asyncio.timeout_at(deadline):
                    data = await self.client_reader.read(CHUNK)
            except TimeoutError:
                # RFC 1939 3: the autologout timer; no QUIT goes to the server, so nothing is
                # deleted.
                raise _Abort("client idle: autologout",
                             err("[SYS/TEMP] autologout: idle for too long")) from None
            except (ConnectionError, ssl.SSLError) as exc:
                raise _Abort(f"client: {exc}") from None
            self.client.receive_data(data)

    async def _server_read(self, timeout_at: float) -> bytes:
        assert self.server_reader is not None
        try:
            async with asyncio.timeout_at(timeout_at):
                return await self.server_reader.read(CHUNK)
        except (ConnectionError, ssl.SSLError) as exc:
            raise _Abort(f"server: {exc}", SERVER_GONE) from None

    async def _server_event(self, keepalive: _Held | None = None) -> ServerEvent:
        loop = asyncio.get_running_loop()
        while True:
            try:
                event = self.server.next_event()
            except RemoteProtocolError as exc:
                raise _Abort(exc.message, exc.reply or SERVER_INVALID) from None
            if not isinstance(event, NeedData):
                return event
            deadline = loop.time() + self.config.server_timeout
            while True:
                wake = deadline if keepalive is None else min(deadline,
                                                              keepalive.keepalive.next_due)
                try:
                    data = await self._server_read(wake)
                    break
                except TimeoutError:
                    if loop.time() >= deadline:
                        raise _Abort("the server did not answer in time", SERVER_SILENT) from None
                    assert keepalive is not None
                    await self._keepalive_tick(keepalive)
            self.server.receive_data(data)

    def _buffered_server_event(self) -> ServerEvent | None:
        """The next server event if it needs no I/O, else None."""
        try:
            event = self.server.next_event()
        except RemoteProtocolError as exc:
            raise _Abort(exc.message, exc.reply or SERVER_INVALID) from None
        return None if isinstance(event, NeedData) else event

    async def _server_status(self) -> Status:
        event = await self._server_event()
        if isinstance(event, Closed):
            raise _Abort("the server closed the connection", SERVER_GONE)
        if not isinstance(event, Status):
            raise _Abort("the server sent content where a status line belongs", SERVER_INVALID)
        return event

    async def _ask_server(self, command: Command, *, unstuff: bool = False) -> Status:
        self.server.expect(command, unstuff=unstuff)
        await self._send_server(command.raw)
        return await self._server_status()

    async def _server_body(self, limit: int) -> bytes:
        """A (small) multi-line response body, raw."""
        pieces: list[bytes] = []
        size = 0
        while True:
            event = await self._server_event()
            if isinstance(event, BodyData):
                size += len(event.data)
                if size > limit:
                    raise _Abort("the server's response is too long", SERVER_INVALID)
                pieces.append(event.data)
            elif isinstance(event, BodyEnd):
                return b"".join(pieces)
            else:
                raise _Abort("the server closed the connection mid-response", SERVER_GONE)

    # --- the session ------------------------------------------------------------------------------

    async def _session(self) -> None:
        try:
            self.server_reader, self.server_writer = await open_onward(
                self.destination, source=self.source, timeout=self.config.connect_timeout,
                limit=CHUNK)
        except OSError as exc:
            raise _Abort(f"connecting to the server: {exc}",
                         err("[SYS/TEMP] cannot reach the mail server")) from None
        set_nodelay(self.server_writer.get_extra_info("socket"))
        greeting = await self._server_status()
        if not greeting.ok:
            await self._send_client(greeting.raw)
            raise _Abort("the server refused the session")
        if self.config.tls in ("terminate", "strip"):
            await self._upgrade_server()
        await self._send_client(greeting.raw)
        while self.state is not states.SessionState.CLOSED:
            event = await self._client_event()
            if isinstance(event, Closed):
                return
            if isinstance(event, SaslLine):  # cannot happen outside AUTH; be safe
                continue
            await self._command(event)
            if self.passthrough:
                await self._relay_encrypted()
                return

    async def _command(self, command: Command) -> None:
        verb = command.verb
        if verb in ("", "?") or verb not in states.KNOWN_VERBS:
            if verb == "":
                await self._send_client(err("empty command"))
                return
            self.unknown_commands += 1
            if self.unknown_commands > MAX_UNKNOWN_COMMANDS:
                raise _Abort("too many unknown commands", err("too many unknown commands"))
        try:
            states.check(self.state, verb)
        except RemoteProtocolError as exc:
            assert exc.reply is not None
            await self._send_client(exc.reply)
            return
        if verb == "STLS":
            await self._stls(command)
        elif verb == "AUTH" and command.argument.strip():
            await self._auth(command)
        elif verb in ("RETR", "TOP") and self._scans(verb):
            await self._fetch(command)
        else:
            await self._relay(command)

    def _scans(self, verb: str) -> bool:
        if self.context.scanner is None:
            return False
        return verb == "RETR" or self.config.scan_top

    async def _relay(self, command: Command) -> None:
        """Send the command on and the response back; learn what the cache key needs."""
        status = await self._ask_server(command)
        verb = command.verb
        self.state = states.next_state(self.state, verb, status.ok)
        if status.ok:
            if verb == "USER":
                self._pending_user = command.argument.decode("utf-8", "replace").strip()
            elif verb == "PASS":
                self.user = self._pending_user
            elif verb == "APOP" and command.arguments:
                self.user = command.arguments[0].decode("utf-8", "replace")
            elif verb == "UIDL" and len(command.arguments) == 1:
                self._learn_uidls(status.text)
        if not (status.ok and self.server.state == "body"):
            await self._send_client(status.raw)
            return
        if verb == "CAPA":
            body = await self._server_body(MAX_CAPA_SIZE)
            await self._send_client(multiline(status.raw, self._client_capabilities(body)))
            return
        # A multi-line response relayed as it comes (LIST, UIDL, unscanned RETR/TOP, ...).
        # What is already buffered goes out in one write: a small response is one segment.
        out = [status.raw]
        learn = verb == "UIDL"
        tail = b""
        while True:
            event = self._buffered_server_event()
            if event is None:
                self._to_client(b"".join(out))
                out.clear()
                await self._flush_client()
                event = await self._server_event()
            if isinstance(event, BodyData):
                out.append(event.data)
                if learn:
                    lines = (tail + event.data).split(b"\n")
                    tail = lines.pop()
                    for line in lines:
                        self._learn_uidls(line)
            elif isinstance(event, BodyEnd):
                out.append(b".\r\n")
                await self._send_client(b"".join(out))
                return
            else:
                # The status line has gone: all the client can get now is a closed connection
                # (no final ".", so it knows the response is incomplete).
                raise _Abort("the server closed the connection mid-response")

    def _learn_uidls(self, line: bytes) -> None:
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            self.uidls[parts[0]] = parts[1]

    def _client_capabilities(self, body: bytes) -> bytes:
        """The server's CAPA list as the client should see it (RFC 2449 5, RFC 2595 4)."""
        lines = [line for line in body.split(b"\r\n") if line.strip()]
        if self.config.tls == "passthrough":
            return body
        lines = [line for line in lines if line.split()[0].upper() != b"STLS"]
        if (self.config.tls == "terminate" and not self.client_tls and self.server_offers_stls
                and self.context.tls_server is not None):
            lines.append(b"STLS")
        return b"".join(line + b"\r\n" for line in lines)

    # --- TLS ----------------------------------------------------------------------------------

    async def _upgrade_server(self) -> None:
        """STLS towards the server right after its greeting, when it offers it (RFC 2595 4).

        A server that offers STLS and then fails it ends the session: going on in plain text
        would be the silent downgrade the TLS modes exist to prevent.
        """
        status = await self._ask_server(_command("CAPA"))
        if not status.ok:
            return  # no CAPA (RFC 1939-only server): no STLS either
        body = await self._server_body(MAX_CAPA_SIZE)
        capabilities = {line.split()[0].upper() for line in body.split(b"\r\n") if line.split()}
        if b"STLS" not in capabilities:
            logs.event("pop3_server_without_tls", id=self.ident,
                       server=f"[{self.destination[0]}]:{self.destination[1]}")
            return
        self.server_offers_stls = True
        status = await self._ask_server(_command("STLS"))
        if not status.ok:
            raise _Abort("the server offered STLS and then refused it",
                         err("[SYS/TEMP] TLS with the mail server failed"))
        if self.server.take_buffer():
            raise _Abort("the server sent plaintext after STLS", SERVER_INVALID)
        assert self.server_writer is not None
        try:
            await self.server_writer.start_tls(
                self.context.tls_client or ssl.create_default_context(),
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise _Abort(f"TLS with the server failed: {exc}",
                         err("[SYS/TEMP] TLS with the mail server failed")) from None
        self.server_tls = True

    async def _stls(self, command: Command) -> None:
        mode = self.config.tls
        if mode == "passthrough":
            status = await self._ask_server(command)
            await self._send_client(status.raw)
            if status.ok:
                self.passthrough = True
            return
        if (mode == "strip" or self.client_tls or not self.server_offers_stls
                or self.context.tls_server is None):
            await self._send_client(err("STLS not available" if not self.client_tls
                                        else "already using TLS"))
            return
        if self.client.buffered or self._stream_buffered(self.client_reader):
            # RFC 2595 4: nothing may follow STLS before the handshake; plaintext that does
            # would be read as if it came over TLS (command injection).
            raise _Abort("the client sent data after STLS before the TLS handshake",
                         err("nothing may follow STLS before the TLS handshake"))
        await self._send_client(b"+OK Begin TLS negotiation now\r\n")
        try:
            await self.client_writer.start_tls(self.context.tls_server,
                                               ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise _Abort(f"TLS with the client failed: {exc}") from None
        self.client_tls = True

    @staticmethod
    def _stream_buffered(reader: asyncio.StreamReader) -> int:
        return len(getattr(reader, "_buffer", b""))

    async def _relay_encrypted(self) -> None:
        """After a passed-through STLS: bytes both ways, unscanned, until both sides end."""
        logs.warning("pop3_tls_passthrough", id=self.ident,
                     server=f"[{self.destination[0]}]:{self.destination[1]}",
                     detail="TLS relayed end to end: this session's mail is not scanned")
        assert self.server_reader is not None and self.server_writer is not None
        pumps = [
            self.context.spawn(self._pump(self.client_reader, self.server_writer,
                                          self.client.discard_buffer()),
                               f"pop3-{self.ident}-tls-to-server"),
            self.context.spawn(self._pump(self.server_reader, self.client_writer,
                                          self.server.take_buffer()),
                               f"pop3-{self.ident}-tls-to-client"),
        ]
        try:
            done, _pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    self.error = f"passthrough: {task.exception()}"
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    first: bytes) -> None:
        if first:
            writer.write(first)
        while True:
            async with asyncio.timeout(self.config.client_timeout):
                data = await reader.read(CHUNK)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

    # --- AUTH -----------------------------------------------------------------------------------

    async def _auth(self, command: Command) -> None:
        """A SASL exchange (RFC 5034), relayed line by line; the lines are never logged."""
        arguments = command.arguments
        mechanism = arguments[0]
        user = _sasl_user(mechanism, arguments[1], 0) if len(arguments) > 1 else None
        step = 1 if len(arguments) > 1 else 0
        status = await self._ask_server(command)
        while status.kind == "continue":
            await self._send_client(status.raw)
            self.client.expect_sasl()
            event = await self._client_event()
            if not isinstance(event, SaslLine):
                raise _Abort("the client left during AUTH")
            if user is None:
                user = _sasl_user(mechanism, event.data, step)
            step += 1
            await self._send_server(event.raw)
            status = await self._server_status()
        self.state = states.next_state(self.state, "AUTH", status.ok)
        if status.ok:
            self.user = user
        await self._send_client(status.raw)

    # --- RETR and TOP -----------------------------------------------------------------------------

    async def _cache_key(self, command: Command) -> CacheKey | None:
        arguments = command.arguments
        if not self.context.cache.enabled or self.user is None or not arguments:
            return None
        number = arguments[0]
        if not number.isdigit():
            return None
        if number not in self.uidls:
            status = await self._ask_server(_command(f"UIDL {number.decode()}"))
            if not status.ok:
                return None
            self._learn_uidls(status.text)
            if number not in self.uidls:
                return None
        scope = "RETR" if command.verb == "RETR" else "TOP " + b" ".join(arguments[1:]).decode()
        return CacheKey(self.destination, self.user, self.uidls[number], scope)

    async def _fetch(self, command: Command) -> None:
        key = await self._cache_key(command)
        status = await self._ask_server(command, unstuff=True)
        if not (status.ok and self.server.state == "body"):
            await self._send_client(status.raw)
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        held = _Held(status.raw, Keepalive(started, self.config.keepalive_after,
                                           self.config.keepalive_interval), DotStuffer())
        spool = Spool(self.config.spool_threshold, self.config.spool_dir)
        try:
            await self._fetch_spooled(command, key, held, spool, started)
        except _Abort as exc:
            if held.keepalive.status_sent:
                # Too late for -ERR: end without the final "." (an incomplete download).
                raise _Abort(exc.reason) from None
            raise
        finally:
            spool.close()

    async def _fetch_spooled(self, command: Command, key: CacheKey | None, held: _Held,
                             spool: Spool, started: float) -> None:
        header: Header | None = None
        while True:
            event = await self._server_event(held)
            if isinstance(event, BodyData):
                spool.write(event.data)
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
        cached = self.context.cache.get(key) if key is not None else None
        quarantine_id = cached.quarantine_id if cached else None
        if cached is not None:
            result: ScanResult | None = cached.result
        elif spool.size > self.config.max_scan_size:
            result = None
        else:
            result = await self._scan(spool.getvalue(), held)
        outcome = decide(result, self.config)
        tempfail_reason = ("message too large to scan" if result is None or result.oversize
                           else "content scanner failed")
        if outcome == "replace" and quarantine_id is None:
            assert result is not None
            try:
                quarantine_id = await self._quarantine(spool, result, command)
            except _QuarantineFailed:
                # As SMTP answers 451: a notice would tell the client the message is gone
                # while its original is nowhere, so the message stays on the server instead.
                outcome, tempfail_reason = "tempfail", "quarantine write failed"
        if key is not None and result is not None and cached is None:
            self.context.cache.put(key, result, quarantine_id)
        self.messages += 1
        fields: dict[str, Any] = {
            "id": self.ident, "command": command.loggable(), "size": spool.size,
            "verdict": "oversize" if result is None else result.verdict, "action": outcome,
            "cached": cached is not None, "spooled": spool.on_disk,
            "seconds": round(asyncio.get_running_loop().time() - started, 3)}
        if result is not None and result.virus:
            fields["virus"] = result.virus
        if result is not None and result.reason:
            fields["reason"] = result.reason
        if quarantine_id:
            fields["quarantine"] = quarantine_id
        logs.event("pop3_message", **fields)
        metrics.current.pop3_retrieval(outcome, fields["verdict"])
        if outcome == "tempfail":
            if held.keepalive.status_sent:
                # Too late for -ERR: an incomplete download instead.
                raise _Abort(tempfail_reason)
            # The whole response was read, so the session goes on; the message stays.
            await self._send_client(err(f"[SYS/TEMP] message temporarily unavailable "
                                        f"({tempfail_reason}), try again later"))
            return
        assert result is not None or outcome == "deliver"
        pieces: Iterable[bytes]
        rest = spool.chunks(len(header.data))
        if outcome == "deliver":
            pieces = spool.chunks()
        elif outcome == "tag":
            assert result is not None
            pieces = _chain([rewrite.tag_spam(header, result, self.config.subject_prefix,
                                              held.keepalive.sent)], rest)
        elif outcome == "unscanned":
            assert result is not None
            pieces = _chain([rewrite.unscanned(header, result.reason or "scanner failed",
                                               held.keepalive.sent)], rest)
        else:
            assert result is not None
            pieces = [rewrite.build_notice(header, result, size=spool.size,
                                           quarantine_id=quarantine_id,
                                           hostname=self.context.hostname)]
        await self._deliver(held, pieces)

    async def _deliver(self, held: _Held, pieces: Iterable[bytes]) -> None:
        out = [] if held.keepalive.status_sent else [held.status]
        skip = held.keepalive.sent  # sent early; every outcome starts with these bytes
        for piece in pieces:
            if skip:
                cut = min(skip, len(piece))
                piece, skip = piece[cut:], skip - cut
            if piece:
                out.append(held.stuffer.send(piece))
                if sum(map(len, out)) >= CHUNK:
                    self._to_client(b"".join(out))
                    out.clear()
                    await self._flush_client()
        out.append(held.stuffer.end())
        await self._send_client(b"".join(out))

    async def _keepalive_tick(self, held: _Held) -> None:
        step = held.keepalive.due(asyncio.get_running_loop().time())
        if step is None:
            return
        if step.send_status:
            self._to_client(held.status)
            logs.event("pop3_keepalive", id=self.ident, detail="status line sent early")
        if step.content:
            self._to_client(held.stuffer.send(step.content))
        await self._flush_client()

    async def _scan(self, content: bytes, held: _Held) -> ScanResult:
        scanner = self.context.scanner
        assert scanner is not None
        task = self.context.spawn(_scan_into(scanner, content, box := _Box()),
                                  f"pop3-{self.ident}-scan")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.scan_timeout
        try:
            while not task.done():
                wake = min(deadline, held.keepalive.next_due)
                await asyncio.wait({task}, timeout=max(0.0, wake - loop.time()))
                if task.done():
                    break
                if loop.time() >= deadline:
                    return ScanResult("failed", reason="scan timed out", timed_out=True)
                await self._keepalive_tick(held)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return box.result or ScanResult("failed", reason="scanner gave no result")

    async def _quarantine(self, spool: Spool, result: ScanResult,
                          command: Command) -> str | None:
        """The quarantine id of the original, None when the proxy runs without a quarantine;
        `_QuarantineFailed` when it could not be stored."""
        store = self.context.quarantine
        if store is None:
            return None
        origin = {"client_address": self.info.client[0],
                  "client_port": str(self.info.client[1]),
                  "server_host": self.destination[0], "server_port": str(self.destination[1]),
                  "user": self.user or "", "command": command.loggable()}
        content = spool.getvalue()
        try:
            return await asyncio.to_thread(store.store, content, result, origin)
        except Exception as exc:  # OSError from the disk, or whatever the store raises
            logs.error("pop3_quarantine_failed", id=self.ident, exc_info=True)
            raise _QuarantineFailed from exc


class _QuarantineFailed(Exception):
    """The original of a message to be replaced could not be stored in the quarantine."""


@dataclass
class _Held:
    """A RETR/TOP response being held back: the server's status line, the keep-alive clock,
    and the stuffer that keeps the client's byte stream consistent across both."""

    status: bytes
    keepalive: Keepalive
    stuffer: DotStuffer


@dataclass
class _Box:
    result: ScanResult | None = None


async def _scan_into(scanner: ContentScanner, content: bytes, box: _Box) -> None:
    try:
        box.result = await scanner.scan(content)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a scanner bug or outage is a failed scan, not a dead session
        box.result = ScanResult("failed", reason=f"scanner error: {type(exc).__name__}")


def _chain(first: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from first
    yield from rest
