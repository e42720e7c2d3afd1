"""The SMTP front end: aiosmtpd speaks the protocol, this module supplies the policy.

To every client the proxy is an ordinary MTA. aiosmtpd parses commands and DATA (it ends DATA
only on CRLF.CRLF); the handler below is kept thin: relay control per recipient, limits,
smuggling checks, a Received: header, the filter hook, and the queue, whose fsync comes
before the `250`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import mmap
import multiprocessing
import re
import socket
import ssl
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiosmtpd
import aiosmtpd.smtp as aiosmtpd_smtp
from aiosmtpd.smtp import SMTP, Envelope, Session

from proxies import logs
from proxies.config import SmtpConfig
from proxies.filtering import FilterInput, MessageFilter
from proxies.queue import Envelope as QueueEnvelope
from proxies.queue import Queue, QueueFullError, QueueWriteError
from proxies.smtp.addresses import RelayPolicy
from proxies.smtp.dataframe import (
    DataReader,
    check_line_length,
    count_received_headers,
    find_bare_line_endings,
    find_nul,
    normalise_line_endings,
)
from proxies.smtp.errors import RemoteProtocolError
from proxies.smtp.events import DataComplete
from proxies.transparent import original_destination

# RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF (after unstuffing).
MAX_TEXT_LINE = 1000
DATA_CHUNK = 256 * 1024

# RFC 5321 6.3 suggests 100 hops; Postfix's hopcount_limit is 50, which the issue asks for.
MAX_RECEIVED_HEADERS = 50

# RFC 2034: once ENHANCEDSTATUSCODES is offered, replies carry a class.subject.detail code.
# aiosmtpd's own replies do not; these are the codes Postfix gives for the same situations.
_ENHANCED_FOR_CODE = {
    221: "2.0.0", 250: "2.0.0", 251: "2.1.5", 252: "2.0.0",
    421: "4.7.0", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 550: "5.0.0", 552: "5.3.4", 553: "5.1.3", 554: "5.5.0", 555: "5.5.4",
}
# RFC 5321 4.1.2 Path = "<" Mailbox ">" with a Dot-string local part and a domain of dotted
# labels: the forms Python's get_angle_addr returns unchanged, as the same addr_spec.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")
_HAS_ENHANCED = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


@dataclass
class ClientInfo:
    """What the listener learnt about one connection before the greeting."""

    client_address: str
    client_port: int
    # The address the client was trying to reach; None when it connected to us directly.
    original_destination: tuple[str, int] | None
    connection_id: int


class ConnectionGate:
    """Connection limits: total and per client address (Postfix's
    smtpd_client_connection_count_limit), answered with `421 4.7.0` (RFC 5321 3.8)."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.by_client: Counter[str] = Counter()
        self.count = 0

    def admit(self, client: str) -> bool:
        if self.count >= self.total or self.by_client[client] >= self.per_client:
            return False
        self.count += 1
        self.by_client[client] += 1
        return True

    def release(self, client: str) -> None:
        self.count -= 1
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]


class SharedConnectionGate(ConnectionGate):
    """The same limits over every acceptor process (smtp.workers): SO_REUSEPORT spreads one
    client's connections over the workers, so per-process counts would let it have `workers`
    times its limit. Made before fork: the counts live in an anonymous shared mapping under
    one lock, as a table client address -> count with linear probing (backward-shift
    deletion keeps it exact). Live clients are at most `total`, the table twice that."""

    _KEY = 16  # a packed IPv6 address; IPv4 ones are mapped

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._size = 1 << max(8, (2 * total).bit_length())
        self._mask = self._size - 1
        self._memory = mmap.mmap(-1, 8 + self._size * (4 + self._KEY))  # MAP_SHARED
        self._total_count = memoryview(self._memory)[:8].cast("q")
        self._counts = memoryview(self._memory)[8:8 + 4 * self._size].cast("i")
        self._keys_at = 8 + 4 * self._size
        self._lock = multiprocessing.Lock()

    @property
    def count(self) -> int:  # type: ignore[override]
        return int(self._total_count[0])

    def _key(self, client: str) -> bytes:
        address = ipaddress.ip_address(client)
        if isinstance(address, ipaddress.IPv4Address):
            return bytes(10) + b"\xff\xff" + address.packed
        return address.packed

    def _get_key(self, slot: int) -> bytes:
        start = self._keys_at + slot * self._KEY
        return self._memory[start:start + self._KEY]

    def _set_key(self, slot: int, key: bytes) -> None:
        start = self._keys_at + slot * self._KEY
        self._memory[start:start + self._KEY] = key

    def _home(self, key: bytes) -> int:
        return zlib.crc32(key) & self._mask

    def _find(self, key: bytes) -> int:
        """The slot holding `key`, or the empty slot where it would go."""
        slot = self._home(key)
        while self._counts[slot] > 0 and self._get_key(slot) != key:
            slot = (slot + 1) & self._mask
        return slot

    def admit(self, client: str) -> bool:
        key = self._key(client)
        with self._lock:
            if self._total_count[0] >= self.total:
                return False
            slot = self._find(key)
            if self._counts[slot] >= self.per_client:
                return False
            if self._counts[slot] == 0:
                self._set_key(slot, key)
            self._counts[slot] += 1
            self._total_count[0] += 1
            return True

    def release(self, client: str) -> None:
        key = self._key(client)
        with self._lock:
            slot = self._find(key)
            if self._counts[slot] <= 0:
                return  # not ours to release (cannot happen: admit() came first)
            self._total_count[0] -= 1
            self._counts[slot] -= 1
            if self._counts[slot] == 0:
                self._close_gap(slot)

    def _close_gap(self, hole: int) -> None:
        # Knuth's algorithm R: move back each later entry of the run that may sit in the hole.
        slot = hole
        while True:
            slot = (slot + 1) & self._mask
            if self._counts[slot] == 0:
                return
            home = self._home(self._get_key(slot))
            if (home <= hole or home > slot) if hole <= slot else (home <= hole and home > slot):
                self._set_key(hole, self._get_key(slot))
                self._counts[hole] = self._counts[slot]
                self._counts[slot] = 0
                hole = slot


# (class, handler) -> the names aiosmtpd's __init__ finds by introspection, see below.
_METHOD_NAMES: dict[tuple[type, type], tuple[tuple[str, ...], tuple[str, ...],
                                            tuple[tuple[str, str, bool], ...]]] = {}


class GatewaySMTP(SMTP):
    """aiosmtpd's protocol with the behaviour a public MTA needs on top."""

    def __init__(self, handler: GatewayHandler, *, gate: ConnectionGate, listen_port: int,
                 data_timeout: float, connection_id: int, **kwargs: Any) -> None:
        if (aiosmtpd.__version__ == "1.4.6" and set(kwargs) <= _FAST_INIT_ARGS
                and kwargs.get("command_call_limit") is None):
            self._fast_init(handler, **kwargs)
        else:
            super().__init__(handler, **kwargs)
        self.gate = gate
        self.listen_port = listen_port
        self.data_timeout = data_timeout
        self.connection_id = connection_id
        self.client: ClientInfo | None = None
        self._admitted = False
        self._refused = False
        self._in_ehlo = False

    def _fast_init(self, handler: GatewayHandler, *, hostname: str, ident: str,
                   data_size_limit: int | None, enable_SMTPUTF8: bool, decode_data: bool,
                   tls_context: ssl.SSLContext | None, timeout: float,
                   command_call_limit: None = None) -> None:
        """aiosmtpd 1.4.6's SMTP.__init__ for the arguments SmtpFrontEnd passes, with its
        introspection (inspect.getmembers and dir over the protocol and the handler, which
        reads every property: the largest cost of a new connection) done once per class and
        handler instead of on every connection. The tables it builds are the same."""
        self.__ident__ = ident
        self.loop = aiosmtpd_smtp.make_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=self.loop)
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = decode_data
        self.command_size_limits.clear()
        self.hostname = hostname
        self.tls_context = tls_context
        self.require_starttls = tls_context and False
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = aiosmtpd_smtp.login_always_fail
        self._auth_required = False
        key = (type(self), type(handler))
        names = _METHOD_NAMES.get(key)
        if names is None:
            import inspect

            auth = tuple(
                (getattr(mfunc, "__auth_mechanism_name__",
                         mname.replace("auth_", "").replace("__", "-")), mname, obj is self)
                for obj in (self, handler)
                for mname, mfunc in inspect.getmembers(obj)
                if mname.startswith("auth_"))
            names = (tuple(m for m in dir(handler) if m.startswith("handle_")),
                     tuple(m for m in dir(self) if m.startswith("smtp_")), auth)
            _METHOD_NAMES[key] = names
        hooks, methods, auth = names
        self._auth_methods = {
            mech: aiosmtpd_smtp._AuthMechAttr(getattr(self if own else handler, mname), own)
            for mech, mname, own in auth}
        self._handle_hooks = {m.replace("handle_", ""): getattr(handler, m) for m in hooks}
        self._ehlo_hook_ver = "new"  # GatewayHandler.handle_EHLO takes five arguments
        self._smtp_methods = {m.replace("smtp_", ""): getattr(self, m) for m in methods}
        self._enforce_call_limit = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.client is None:  # the first call; a second one comes after STARTTLS
            sock: socket.socket = transport.get_extra_info("socket")
            peer = transport.get_extra_info("peername")
            self.client = ClientInfo(
                client_address=_plain_ip(peer[0]),
                client_port=peer[1],
                original_destination=original_destination(sock, self.listen_port),
                connection_id=self.connection_id,
            )
            if not self.gate.admit(self.client.client_address):
                self._refused = True
                logs.warning("smtp_connection_refused", conn=self.connection_id,
                             client=self.client.client_address, reason="connection limit")
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
                transport.close()
                return
            self._admitted = True
            logs.event("smtp_connect", conn=self.connection_id,
                       client=self.client.client_address,
                       destination=_format_hostport(self.client.original_destination))
        super().connection_made(transport)
        if self.session is not None:
            self.session.mailgate_client = self.client  # type: ignore[attr-defined]

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._admitted and self.client is not None:
            self._admitted = False
            self.gate.release(self.client.client_address)
            logs.debug("smtp_disconnect", conn=self.connection_id)
        super().connection_lost(error)

    async def push(self, status: str | bytes) -> None:
        line = status.encode("utf-8", "surrogateescape") if isinstance(status, str) else status
        code = line[:3]
        if (
            # The EHLO reply lists keywords, not statuses; its errors still get a code.
            not (self._in_ehlo and code == b"250")
            and code.isdigit()
            and line[3:4] in (b" ", b"")
            and not _HAS_ENHANCED.match(line)
            and int(code) in _ENHANCED_FOR_CODE
        ):
            enhanced = _ENHANCED_FOR_CODE[int(code)].encode()
            line = code + b" " + enhanced + (b" " + line[4:] if line[4:] else b"")
        await super().push(line)

    async def smtp_EHLO(self, hostname: str) -> None:
        # EHLO's reply lists keywords; RFC 2034 puts no status code in front of them.
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # RFC 5321 4.1.1.3 lets a server ignore source routes; aiosmtpd silently strips them,
        # which would let `<@ours:user@elsewhere>` look like an address for us. Refuse them.
        path = arg.lstrip()
        if path.startswith("<@"):
            return None, None
        # Python's address parser, under aiosmtpd, forgives a missing ">" ("<a@example.org"):
        # a path is "<" ... ">" (RFC 5321 4.1.2), and a truncated one is refused.
        if path.startswith("<") and ">" not in path:
            return None, None
        # The usual path, <dot-atom@dot-atom>, needs no general parser (RFC 5322's, under
        # aiosmtpd, was a large share of a message's cost); anything else still goes to it.
        simple = _SIMPLE_PATH.match(arg)
        if simple is not None:
            rest = arg[simple.end():]
            if rest[:1] in (" ", "\t"):
                rest = rest.lstrip()  # the folding white space get_angle_addr drops
            if not rest.startswith("("):  # a comment: leave it to the general parser
                address = simple.group(1)
                limit = self.local_part_limit
                if limit and len(address.rpartition("@")[0]) > limit:
                    return None, None
                return address, rest
        return super()._getaddr(arg)

    async def smtp_DATA(self, arg: str) -> None:
        """DATA read in bulk by the strict sans-I/O DataReader instead of aiosmtpd's line by
        line loop (one coroutine step per line made it the front end's largest cost); the
        replies and checks are aiosmtpd's, in the same order."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        # aiosmtpd has one timeout for everything; the data phase gets RFC 5321's longer one,
        # and the wait for the next command the command timeout again.
        self._reset_timeout(self.data_timeout)
        reader = DataReader(max_size=self.data_size_limit)
        try:
            event = reader.next_event()
            while not isinstance(event, DataComplete):
                reader.receive_data(await self._reader.read(DATA_CHUNK))
                event = reader.next_event()
        except RemoteProtocolError:  # the client closed in the middle of the message
            assert self.transport is not None
            self.transport.close()
            return
        if event.leftover:
            # Commands pipelined after the final dot (RFC 2920) go back to the command reader.
            self._reader._buffer[:0] = event.leftover  # type: ignore[attr-defined]
        self._reset_timeout()
        if event.too_big:
            await self.push("552 Error: Too much mail data")
        elif check_line_length(event.content, MAX_TEXT_LINE) is not None:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
        else:
            self.envelope.content = self.envelope.original_content = event.content
            status = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            await self.push(status)
            return
        self._set_post_data_state()

    def _timeout_cb(self) -> None:
        # aiosmtpd just closes an idle connection; RFC 5321 3.8 wants a 421 first, so the
        # client knows it was a timeout and not a crash (4.4.2: "bad connection").
        if self.transport is not None and not self.transport.is_closing():
            assert isinstance(self.transport, asyncio.WriteTransport)
            self.transport.write(
                f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())
            logs.event("smtp_timeout", conn=self.connection_id,
                       client=self.client.client_address if self.client else "-")
        super()._timeout_cb()


_FAST_INIT_ARGS = frozenset({"hostname", "ident", "data_size_limit", "enable_SMTPUTF8",
                             "decode_data", "tls_context", "timeout", "command_call_limit"})


def _plain_ip(address: str) -> str:
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
    return address[7:] if address.startswith("::ffff:") and "." in address else address


def _format_hostport(hostport: tuple[str, int] | None) -> str:
    if hostport is None:
        return "-"
    host, port = hostport
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GatewayHandler:
    """aiosmtpd handler hooks: the proxy's policy for each command."""

    def __init__(self, config: SmtpConfig, queue: Queue, message_filter: MessageFilter,
                 on_queued: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.queue = queue
        self.filter = message_filter
        self.on_queued = on_queued
        self.relay = RelayPolicy(
            relay_domains=config.relay_domains,
            relay_networks=config.relay_networks,
            transport_domains=[domain for domain, _hop in config.transport],
        )

    @staticmethod
    def _client(session: Session) -> ClientInfo:
        client: ClientInfo = session.mailgate_client  # type: ignore[attr-defined]
        return client

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd's list: "250-name", SIZE, 8BITMIME, SMTPUTF8, STARTTLS, AUTH, "250 HELP".
        # AUTH is dropped (we relay by network, not by login) and so is HELP.
        keywords = [r[4:] for r in responses[1:] if not r[4:].startswith(("AUTH", "HELP"))]
        keywords += ["PIPELINING", "ENHANCEDSTATUSCODES"]
        lines = [responses[0]] + [f"250-{k}" for k in keywords[:-1]] + [f"250 {keywords[-1]}"]
        return lines

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        # aiosmtpd hands the null reverse-path (RFC 5321 4.5.5, used by bounces) as "<>".
        verdict = self.relay.check_sender(address)
        if not verdict.accepted:
            return verdict.reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        client = self._client(session)
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        verdict = self.relay.check_recipient(address, client.client_address)
        if not verdict.accepted:
            logs.event("smtp_rcpt_rejected", conn=client.connection_id,
                       client=client.client_address, rcpt=address, reply=verdict.reply)
            return verdict.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        client = self._client(session)
        content = envelope.original_content
        assert isinstance(content, bytes)
        # Smuggling too: a server that drops NULs reads "CRLF NUL . CRLF" as the end of data.
        # No message may hold a NUL (RFC 5322 3.5, RFC 2045 2.8), so refuse, never normalise.
        if find_nul(content) is not None:
            logs.warning("smtp_nul_in_data", conn=client.connection_id,
                         client=client.client_address)
            return "550 5.6.0 Message contains NUL characters"
        # SMTP smuggling (CVE-2023-51764): a bare LF or CR is how a client hides a second
        # message that another server would see end at "\n.\n"; only CRLF is a line end.
        if find_bare_line_endings(content) is not None:
            if self.config.bare_line_endings == "reject":
                logs.warning("smtp_bare_line_ending", conn=client.connection_id,
                             client=client.client_address)
                return "550 5.5.2 Bare <CR> or <LF> in message data is not allowed"
            content = normalise_line_endings(content)
        if count_received_headers(content) > MAX_RECEIVED_HEADERS:
            logs.warning("smtp_mail_loop", conn=client.connection_id)
            return "554 5.4.6 Too many hops (mail forwarding loop)"
        sender = "" if envelope.mail_from in ("<>", None) else envelope.mail_from
        recipients = tuple(envelope.rcpt_tos)
        helo = session.host_name or ""
        # (content filtering) the envelope fields the quarantine keeps for a release.
        verdict = await self.filter.check(
            FilterInput(sender, recipients, client.client_address, helo,
                        client_port=client.client_port,
                        original_destination=client.original_destination,
                        smtputf8=bool(envelope.smtp_utf8),
                        body_8bit="BODY=8BITMIME" in envelope.mail_options), content)
        if verdict.action in ("reject", "tempfail"):
            reply = verdict.reply or (
                "554 5.7.1 Message rejected" if verdict.action == "reject"
                else "451 4.7.1 Message cannot be checked now, try again later")
            logs.event("smtp_filter_" + verdict.action, conn=client.connection_id,
                       reason=verdict.reason, reply=reply)
            return reply
        if verdict.action == "quarantine":
            # (content filtering) the filter has stored the message durably; not delivered.
            logs.event("smtp_quarantined", conn=client.connection_id, reason=verdict.reason,
                       sender=sender, rcpts=",".join(recipients))
            return verdict.reply or "250 2.0.0 Ok"
        if verdict.action == "drop":
            logs.event("smtp_dropped", conn=client.connection_id, reason=verdict.reason,
                       sender=sender, rcpts=",".join(recipients))
            return "250 2.0.0 Ok"
        if verdict.content is not None:
            content = verdict.content
        tls = session.ssl is not None
        protocol = ("ESMTPS" if tls else "ESMTP") if session.extended_smtp else "SMTP"
        queue_id = self.queue.new_id()
        content = self._received_header(client, helo, protocol, queue_id, recipients) + content
        queued = QueueEnvelope(
            sender=sender,
            recipients=recipients,
            client_address=client.client_address,
            client_port=client.client_port,
            helo=helo,
            original_destination=client.original_destination,
            protocol=protocol,
            smtputf8=bool(envelope.smtp_utf8),
            body_8bit="BODY=8BITMIME" in envelope.mail_options,
            tls=tls,
        )
        try:
            await self.queue.accept(queued, content, queue_id=queue_id)
        except QueueFullError:
            logs.error("queue_full", conn=client.connection_id)
            return "452 4.3.1 Insufficient system storage"
        except QueueWriteError as exc:
            logs.error("queue_write_failed", conn=client.connection_id, error=str(exc))
            return "451 4.3.0 Error: queue file write error"
        logs.event("smtp_accepted", qid=queue_id, conn=client.connection_id,
                   client=client.client_address, sender=sender or "<>",
                   rcpts=",".join(recipients), size=len(content),
                   destination=_format_hostport(client.original_destination))
        if self.on_queued is not None:
            self.on_queued(queue_id)
        return f"250 2.0.0 Ok: queued as {queue_id}"

    def _received_header(self, client: ClientInfo, helo: str, protocol: str, queue_id: str,
                         recipients: tuple[str, ...]) -> bytes:
        # RFC 5321 4.4 trace information; the "for" clause only for a single recipient,
        # as Postfix does, so a message to many does not list them all to each.
        for_clause = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
        address = f"IPv6:{client.client_address}" if ":" in client.client_address \
            else client.client_address
        header = (
            f"Received: from {_sanitise(helo) or 'unknown'} ([{address}])\r\n"
            f"\tby {self.config.hostname} (mailgate) with {protocol} id {queue_id}"
            f"{for_clause};\r\n\t{email.utils.formatdate(time.time(), localtime=True)}\r\n"
        )
        return header.encode("utf-8", "surrogateescape")

    async def handle_exception(self, error: Exception) -> str:
        # Never show a client our internals (aiosmtpd's default would); log them instead.
        logs.error("smtp_internal_error", exc_info=True, error=repr(error))
        return "451 4.3.0 Internal error, try again later"


def _sanitise(text: str) -> str:
    return "".join(c for c in text if c.isprintable() and c not in "()\\")[:255]


class SmtpFrontEnd:
    """Owns the listening sockets and builds one GatewaySMTP per connection."""

    def __init__(self, config: SmtpConfig, handler: GatewayHandler,
                 tls_context: ssl.SSLContext | None, gate: ConnectionGate | None = None) -> None:
        self.config = config
        self.handler = handler
        self.tls_context = tls_context
        # Workers share one gate (SharedConnectionGate, made by the master before fork).
        self.gate = gate or ConnectionGate(config.max_connections,
                                           config.max_connections_per_client)
        self._next_id = 0
        self.servers: list[asyncio.base_events.Server] = []

    def protocol(self) -> GatewaySMTP:
        self._next_id += 1
        return GatewaySMTP(
            self.handler,
            gate=self.gate,
            listen_port=self.config.listen_port,
            data_timeout=self.config.data_timeout,
            connection_id=self._next_id,
            hostname=self.config.hostname,
            ident="ESMTP mailgate",
            data_size_limit=self.config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=self.tls_context,
            timeout=self.config.command_timeout,
            # aiosmtpd's defaults allow 20 unknown commands; RFC 5321 leaves it to us.
            command_call_limit=None,
        )

    async def start(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets:
            server = await loop.create_server(self.protocol, sock=sock)
            self.servers.append(server)

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
