"""The SMTP proxy's policy, as an aiosmtpd-style handler: relay control per recipient, limits,
smuggling checks, a Received: header, the filter hook, and the queue, whose fsync comes before
the `250`.

It speaks aiosmtpd's handler API (`handle_EHLO`, `handle_MAIL`, `handle_RCPT`, `handle_DATA`
with aiosmtpd's `Envelope` and `Session`), so the same handler runs under our own front end
(`proxies.smtp.frontend`, the sans-I/O core on an asyncio.BufferedProtocol) and, unchanged, under
aiosmtpd's own SMTP class (`proxies.smtp.reference`), which the differential tests compare it
with. It asks nothing of the front end but `server.hostname`, `server.transport` and, when the
front end provides it, `session.mailgate_client`.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import Envelope, Session

from proxies import logs, metrics
from proxies.config import SmtpConfig
from proxies.filtering import FilterInput, MessageFilter

# The connection limits in one process (answered with `421 4.7.0`, RFC 5321 3.8) are the ones
# POP3 uses; imported here because the front ends' builders (run.py) take them from here.
from proxies.mail.limits import ConnectionGate as ConnectionGate
from proxies.queue import Envelope as QueueEnvelope
from proxies.queue import Queue, QueueFullError, QueueWriteError
from proxies.smtp.addresses import RelayPolicy
from proxies.smtp.dataframe import (
    count_received_headers,
    find_bare_line_endings,
    find_nul,
    normalise_line_endings,
)
from proxies.smtp.verify import NOT_VERIFIED_OFF, RecipientVerifier
from proxies.transparent import accepted

_NOT_LOOKED = object()

# RFC 5321 6.3 suggests 100 hops; Postfix's hopcount_limit is 50, which the issue asks for.
MAX_RECEIVED_HEADERS = 50
# A refused RCPT's enhanced status (addresses.RelayPolicy) as a metrics label.
_RCPT_REFUSALS = {"5.7.1": "relay_denied", "5.1.3": "bad_address", "5.5.2": "not_fqdn"}
# What the filter's verdict means for mailgate_smtp_messages_total's result label.
_FILTER_RESULTS = {"reject": "rejected", "tempfail": "tempfailed"}


@dataclass
class ClientInfo:
    """What the listener learnt about one connection before the greeting."""

    client_address: str
    client_port: int
    # The address the client was trying to reach; None when it connected to us directly.
    original_destination: tuple[str, int] | None
    # Unique across the worker processes: "pid.sequence".
    connection_id: str


def plain_ip(address: str) -> str:
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
    return address[7:] if address.startswith("::ffff:") and "." in address else address


def format_hostport(hostport: tuple[str, int] | None) -> str:
    if hostport is None:
        return "-"
    host, port = hostport
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GatewayHandler:
    """aiosmtpd handler hooks: the proxy's policy for each command."""

    def __init__(self, config: SmtpConfig, queue: Queue, message_filter: MessageFilter,
                 on_queued: Callable[[str], None] | None = None,
                 verifier: RecipientVerifier | None = None) -> None:
        self.config = config
        # Recipient verification (proxies.smtp.verify); None: [smtp] verify_recipients = false.
        self.verifier = verifier
        self.queue = queue
        self.filter = message_filter
        self.on_queued = on_queued
        self.relay = RelayPolicy(
            relay_domains=config.relay_domains,
            relay_networks=config.relay_networks,
            transport_domains=[domain for domain, _hop in config.transport],
        )

    def _client(self, server: Any, session: Session) -> ClientInfo:
        client: ClientInfo | None = getattr(session, "mailgate_client", None)
        if client is None:
            # A front end that knows nothing of us (aiosmtpd's own): learn it once, from the
            # transport, as our front end does before its greeting. The port we listen on,
            # not the socket's: under TPROXY that is the client's destination port (25).
            info = accepted(server.transport, self.config.listen_port)
            client = ClientInfo(*info.client, info.onward, f"{id(server):x}")
            session.mailgate_client = client  # type: ignore[attr-defined]
        return client

    async def handle_EHLO(self, server: Any, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        # aiosmtpd's list: "250-name", SIZE, 8BITMIME, SMTPUTF8, STARTTLS, AUTH, "250 HELP".
        # AUTH is dropped (we relay by network, not by login) and so is HELP.
        keywords = [r[4:] for r in responses[1:] if not r[4:].startswith(("AUTH", "HELP"))]
        wanted = ["PIPELINING"]
        # Only a front end whose every reply carries one may offer them (RFC 2034 3).
        if getattr(server, "enhanced_status_codes", False):
            wanted.append("ENHANCEDSTATUSCODES")
        keywords += [k for k in wanted if k not in keywords]
        lines = [responses[0]] + [f"250-{k}" for k in keywords[:-1]] + [f"250 {keywords[-1]}"]
        return lines

    async def handle_HELO(self, server: Any, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: Any, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        # aiosmtpd hands the null reverse-path (RFC 5321 4.5.5, used by bounces) as "<>".
        verdict = self.relay.check_sender(address)
        if not verdict.accepted:
            return verdict.reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        client = self._client(server, session)
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            metrics.current.smtp_recipient_refused("too_many_recipients")
            return "452 4.5.3 Error: too many recipients"
        verdict = self.relay.check_recipient(address, client.client_address)
        if not verdict.accepted:
            metrics.current.smtp_recipient_refused(_RCPT_REFUSALS.get(verdict.enhanced, "other"))
            logs.event("smtp_rcpt_rejected", conn=client.connection_id,
                       client=client.client_address, rcpt=address, reply=verdict.reply)
            return verdict.reply
        verifier = self.verifier
        how = NOT_VERIFIED_OFF
        if verifier is not None and verdict.address is not None:
            skipped = verifier.not_verified(verdict.address, client.client_address)
            if skipped is not None:
                how = skipped
            else:
                # Before the 250: a recipient the server refuses is refused here, in the
                # session, so that we never have to bounce it to a (most likely forged) sender.
                checked = await verifier.verify(verdict.address, client.original_destination,
                                                client.client_address, client.connection_id)
                if not checked.accepted:
                    metrics.current.smtp_recipient_refused(
                        "unknown_recipient" if checked.status == "refused" else "unverified")
                    logs.event("smtp_rcpt_rejected", conn=client.connection_id,
                               client=client.client_address, rcpt=address, reply=checked.reply)
                    return checked.reply
                how = checked.verification
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        # Kept with the message, so that `mailgate queue` can say whether the server had
        # agreed to take each recipient (what decides whether a refusal later means a bounce).
        verification: dict[str, str] | None = getattr(envelope, "mailgate_verification", None)
        if verification is None:
            verification = envelope.mailgate_verification = {}  # type: ignore[attr-defined]
        verification.setdefault(address, how)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        client = self._client(server, session)
        content = envelope.original_content
        assert isinstance(content, bytes)
        # Smuggling too: a server that drops NULs reads "CRLF NUL . CRLF" as the end of data.
        # No message may hold a NUL (RFC 5322 3.5, RFC 2045 2.8), so refuse, never normalise.
        if find_nul(content) is not None:
            logs.warning("smtp_nul_in_data", conn=client.connection_id,
                         client=client.client_address)
            metrics.current.smtp_message("rejected", "nul")
            return "550 5.6.0 Message contains NUL characters"
        # SMTP smuggling (CVE-2023-51764): a bare LF or CR is how a client hides a second
        # message that another server would see end at "\n.\n"; only CRLF is a line end.
        # Our front end's reader found them already; aiosmtpd's did not look.
        bare = getattr(envelope, "mailgate_bare_line_ending", _NOT_LOOKED)
        if bare is _NOT_LOOKED:
            bare = find_bare_line_endings(content)
        if bare is not None:
            if self.config.bare_line_endings == "reject":
                logs.warning("smtp_bare_line_ending", conn=client.connection_id,
                             client=client.client_address)
                metrics.current.smtp_message("rejected", "bare_line_ending")
                return "550 5.5.2 Bare <CR> or <LF> in message data is not allowed"
            content = normalise_line_endings(content)
        if count_received_headers(content) > MAX_RECEIVED_HEADERS:
            logs.warning("smtp_mail_loop", conn=client.connection_id)
            metrics.current.smtp_message("rejected", "loop")
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
                        body_8bit="BODY=8BITMIME" in envelope.mail_options,
                        received_by=self.config.hostname), content)
        if verdict.action in ("reject", "tempfail"):
            reply = verdict.reply or (
                "554 5.7.1 Message rejected" if verdict.action == "reject"
                else "451 4.7.1 Message cannot be checked now, try again later")
            logs.event("smtp_filter_" + verdict.action, conn=client.connection_id,
                       reason=verdict.reason, reply=reply)
            # Which verdict: mailgate_smtp_filter_verdicts_total (proxies.scan.filter).
            metrics.current.smtp_message(_FILTER_RESULTS[verdict.action], "filter")
            return reply
        if verdict.action == "quarantine":
            # (content filtering) the filter has stored the message durably; not delivered.
            logs.event("smtp_quarantined", conn=client.connection_id, reason=verdict.reason,
                       sender=sender, rcpts=",".join(recipients))
            metrics.current.smtp_message("quarantined", "filter")
            return verdict.reply or "250 2.0.0 Ok"
        if verdict.action == "drop":
            logs.event("smtp_dropped", conn=client.connection_id, reason=verdict.reason,
                       sender=sender, rcpts=",".join(recipients))
            metrics.current.smtp_message("dropped", "filter")
            return "250 2.0.0 Ok"
        if verdict.content is not None:
            # Changed by the filter (tags, Authentication-Results): the queue promises
            # delivery CRLF-only content (ClientSession canonical), whoever wrote the lines.
            content = normalise_line_endings(verdict.content)
        tls = session.ssl is not None
        protocol = ("ESMTPS" if tls else "ESMTP") if session.extended_smtp else "SMTP"
        queue_id = self.queue.new_id()
        content = self._received_header(client, helo, protocol, queue_id, recipients) + content
        verification: dict[str, str] = getattr(envelope, "mailgate_verification", None) or {}
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
            verification=tuple(verification.items()),
            # Spam or a virus let through (tagged or not) never gets a notification
            # (store._bounce): its sender is most likely forged.
            verdict=verdict.verdict,
            # Bare CR and LF were refused or normalised above, the filter's changes too.
            crlf_only=True,
        )
        try:
            await self.queue.accept(queued, content, queue_id=queue_id)
        except QueueFullError:
            logs.error("queue_full", conn=client.connection_id)
            metrics.current.smtp_message("tempfailed", "queue_full")
            return "452 4.3.1 Insufficient system storage"
        except QueueWriteError as exc:
            logs.error("queue_write_failed", conn=client.connection_id, error=str(exc))
            metrics.current.smtp_message("tempfailed", "queue_write")
            return "451 4.3.0 Error: queue file write error"
        logs.event("smtp_accepted", qid=queue_id, conn=client.connection_id,
                   client=client.client_address, sender=sender or "<>",
                   rcpts=",".join(recipients),
                   verify=",".join(verification.get(r, "-") for r in recipients),
                   size=len(content), destination=format_hostport(client.original_destination))
        metrics.current.smtp_message("accepted", "queued")
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

