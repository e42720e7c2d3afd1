"""Recipient verification: answer RCPT with what the real server would say, so that mail for
a recipient the server refuses is refused in the session and never bounced by us.

A gateway that accepts everything and bounces what the server refuses later mails its
bounces to the forged senders of spam ("backscatter"). Postfix's reject_unverified_recipient
asks the next hop first (verify(8)); mailgate does the same, before it answers RCPT:

1. `RecipientVerifier.applies`: only recipients in our domains (relay_domains and the
   transport table), and not for clients in relay_networks unless verify_relay_networks.
2. The result cache (`VerifyCache`, per next hop and recipient): a fresh entry answers at once.
3. Otherwise a probe (proxies.smtp.probe) to the hop the message would go to, from the same
   source address (spoof_source): MAIL FROM:<>, RCPT TO:<x>, QUIT. Concurrent RCPTs for the
   same key in one process wait for one probe; the probe's result is cached.
4. `decide`: ok -> 250; refused -> 550 5.1.1 with the server's text; tempfail (server
   unreachable, 4xx) -> 450 4.1.1, or accept with verify_unreachable = "accept";
   unverifiable (the server refuses the null sender) -> accept, as if not verified.

Why a probe and a cache rather than mirroring RCPT over an onward session held open during the
client's: the message is queued and delivered later anyway, so a mirrored session would be
thrown away (one extra connection per client connection, for every recipient, always), it ties
the client's pace to the server's, and it cannot answer from memory. The probe costs one short
connection per new recipient and nothing for the next thousand messages. Delivery's own
connection cache lives in the master process and SMTP sessions in the workers, so probes use
their own connections and never hold up a delivery.

Why sqlite (stdlib) in WAL mode in the queue directory: the workers are separate processes
and the results must survive a restart; WAL lets them all read while one writes, each
statement is a local page-cache operation (microseconds, done on the loop), and with
synchronous=NORMAL a commit costs no fsync (a crash of the machine may lose the newest
entries, which only costs a probe again: a cache, not a queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import sqlite3
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from proxies import logs
from proxies.config import SmtpConfig
from proxies.smtp.addresses import Address, RelayPolicy
from proxies.smtp.delivery import hostport, os_error_text
from proxies.smtp.events import NeedData, StartTls
from proxies.smtp.nexthop import NoRoute, resolve_next_hop
from proxies.smtp.probe import BEFORE_MAIL, COMMAND_NAMES, ProbeDone, ProbeSession, ProbeStatus
from proxies.smtp.reply import Reply
from proxies.transparent import open_onward

__all__ = ["VERIFICATION", "VERIFICATION_TEXT", "CacheEntry", "Decision", "RecipientVerifier",
           "VerifyCache", "decide", "hop_key"]

# How an accepted recipient was checked: what the queue keeps per recipient
# (proxies.queue.Envelope.verification) and the smtp_accepted log line and `mailgate queue` show.
VERIFIED_LIVE: Final = "live"  # a probe during this RCPT: the server takes it
VERIFIED_CACHE: Final = "cache"  # the cache's "the server takes it"
NOT_VERIFIED_OFF: Final = "off"  # [smtp] verify_recipients = false
NOT_VERIFIED_RELAY_CLIENT: Final = "relay-client"  # from relay_networks: our own users
NOT_VERIFIED_OUTBOUND: Final = "outbound"  # not our domain (a relay client's outgoing mail)
# The server could not be asked (down, 4xx, timeout) and verify_unreachable = "accept".
NOT_VERIFIED_UNREACHABLE: Final = "unreachable"
NOT_VERIFIED_UNVERIFIABLE: Final = "unverifiable"  # the server refuses MAIL FROM:<>
VERIFICATION: Final = (VERIFIED_LIVE, VERIFIED_CACHE, NOT_VERIFIED_OFF,
                       NOT_VERIFIED_RELAY_CLIENT, NOT_VERIFIED_OUTBOUND,
                       NOT_VERIFIED_UNREACHABLE, NOT_VERIFIED_UNVERIFIABLE)
# ... in words, for people (`mailgate queue`).
VERIFICATION_TEXT: Final = {
    VERIFIED_LIVE: "verified live",
    VERIFIED_CACHE: "verified from cache",
    NOT_VERIFIED_OFF: "not verified: smtp.verify_recipients is off",
    NOT_VERIFIED_RELAY_CLIENT: "not verified: client in smtp.relay_networks",
    NOT_VERIFIED_OUTBOUND: "not verified: not one of our domains",
    NOT_VERIFIED_UNREACHABLE: "not verified: server unreachable, accepted "
                              "(smtp.verify_unreachable)",
    NOT_VERIFIED_UNVERIFIABLE: "not verified: the server refuses the null sender",
}
_SHOWN: Final[dict[str, str]] = {"tempfail": NOT_VERIFIED_UNREACHABLE,
                                 "unverifiable": NOT_VERIFIED_UNVERIFIABLE}

CACHE_FILE = "verify.db"
# Bounded: a dictionary attack (random local parts) must not grow the file without end. Past
# this many entries, expired ones go first, then the oldest checked.
MAX_ENTRIES: Final = 100_000
# How often (puts) the cache looks at its size; counting rows is a full index scan.
_PRUNE_EVERY: Final = 500
# A process keeps what it read or wrote this long in memory in front of the shared file: the
# file is read once per recipient a minute instead of at every RCPT (a warm RCPT was a query,
# ~0.1 ms of latency). Another process's newer answer is seen at the latest this much later.
_MEMO_SECONDS: Final = 60.0
_MEMO_ENTRIES: Final = 10_000
# Probes at once per process: beyond this RCPTs wait (within verify_timeout) for a slot.
PROBE_CONCURRENCY: Final = 20
# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
_MAX_REPLY_TEXT: Final = 450


@dataclass(frozen=True)
class CacheEntry:
    """What a probe found for (hop, recipient): its status and, for people, what the server
    said ("host 198.51.100.25 said: 550 5.1.1 ... (in reply to RCPT TO command)")."""

    status: ProbeStatus
    detail: str
    checked: float
    expires: float


class VerifyCache:
    """Probe results per (next hop, recipient), shared by every process through one sqlite
    file. Times are wall-clock (they must mean the same after a restart)."""

    def __init__(self, path: Path, *, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_entries = max_entries
        self.clock = clock
        self._puts = 0
        self._memo: dict[tuple[str, str], tuple[float, CacheEntry]] = {}
        # isolation_level=None: autocommit, every statement its own short transaction.
        # timeout: another process holds the write lock only for one statement.
        self._db = sqlite3.connect(path, timeout=0.5, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS verify (hop TEXT NOT NULL, rcpt TEXT NOT NULL, "
            "status TEXT NOT NULL, detail TEXT NOT NULL, checked REAL NOT NULL, "
            "expires REAL NOT NULL, PRIMARY KEY (hop, rcpt)) WITHOUT ROWID")
        self._db.execute("CREATE INDEX IF NOT EXISTS verify_checked ON verify (checked)")
        self.prune()

    def get(self, hop: str, rcpt: str) -> CacheEntry | None:
        """The entry if it has not expired."""
        now = self.clock()
        memo = self._memo.get((hop, rcpt))
        if memo is not None and memo[0] > now:
            return memo[1]
        row = self._db.execute(
            "SELECT status, detail, checked, expires FROM verify WHERE hop = ? AND rcpt = ? "
            "AND expires > ?", (hop, rcpt, now)).fetchone()
        if not row:
            self._memo.pop((hop, rcpt), None)
            return None
        entry = CacheEntry(*row)
        self._remember(hop, rcpt, entry, now)
        return entry

    def _remember(self, hop: str, rcpt: str, entry: CacheEntry, now: float) -> None:
        if len(self._memo) >= _MEMO_ENTRIES:
            self._memo.clear()  # rare (that many recipients a minute): start afresh
        self._memo[(hop, rcpt)] = (min(entry.expires, now + _MEMO_SECONDS), entry)

    def put(self, hop: str, rcpt: str, status: ProbeStatus, detail: str, ttl: float) -> None:
        """Record a probe's result for `ttl` seconds (0: do not record). A tempfail never
        replaces an unexpired ok or refused entry (another process's probe may have got
        through meanwhile): like Postfix's verify(8), a definite answer outlives a failure to
        ask again."""
        if ttl <= 0:
            return
        now = self.clock()
        try:
            self._db.execute(
                "INSERT INTO verify (hop, rcpt, status, detail, checked, expires) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hop, rcpt) DO UPDATE SET "
                "status = excluded.status, detail = excluded.detail, "
                "checked = excluded.checked, expires = excluded.expires "
                "WHERE excluded.status NOT IN ('tempfail', 'unverifiable') "
                "OR verify.status IN ('tempfail', 'unverifiable') OR verify.expires <= ?",
                (hop, rcpt, status, detail, now, now + ttl, now))
        except sqlite3.OperationalError as exc:  # locked past the timeout, disk full...
            logs.warning("verify_cache_write_failed", path=str(self.path), error=str(exc))
            return
        # What the file holds now (the update may have kept a definite answer over a tempfail).
        self._memo.pop((hop, rcpt), None)
        self._puts += 1
        if self._puts % _PRUNE_EVERY == 0:
            self.prune()

    def prune(self) -> None:
        """Drop expired entries, then the oldest checked beyond max_entries (to 90 %, so that
        the next prune is not due at the next put)."""
        try:
            self._db.execute("DELETE FROM verify WHERE expires <= ?", (self.clock(),))
            (count,) = self._db.execute("SELECT count(*) FROM verify").fetchone()
            if count > self.max_entries:
                self._db.execute(
                    "DELETE FROM verify WHERE (hop, rcpt) IN (SELECT hop, rcpt FROM verify "
                    "ORDER BY checked LIMIT ?)", (count - self.max_entries * 9 // 10,))
        except sqlite3.OperationalError as exc:
            logs.warning("verify_cache_prune_failed", path=str(self.path), error=str(exc))

    def __len__(self) -> int:
        (count,) = self._db.execute("SELECT count(*) FROM verify").fetchone()
        return int(count)

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class Decision:
    """The answer to one RCPT: `reply` is what the client gets when `accepted` is False."""

    accepted: bool
    reply: str
    status: ProbeStatus
    cached: bool

    @property
    def verification(self) -> str:
        """How an accepted recipient was checked (VERIFICATION); "refused" otherwise."""
        if self.status == "ok":
            return VERIFIED_CACHE if self.cached else VERIFIED_LIVE
        return _SHOWN.get(self.status, self.status)


def _reply_safe(text: str) -> str:
    # The server's text goes to our client: printable ASCII only (the client may not speak
    # SMTPUTF8), and short enough for one reply line.
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean if len(clean) <= _MAX_REPLY_TEXT else clean[:_MAX_REPLY_TEXT - 3] + "..."


def decide(config: SmtpConfig, rcpt: str, entry: CacheEntry, *, cached: bool) -> Decision:
    """What a probe result (fresh or cached) means for RCPT TO:<rcpt>; texts as Postfix's
    reject_unverified_recipient gives them."""
    status = entry.status
    if status == "refused":
        return Decision(False, _reply_safe(
            f"550 5.1.1 <{rcpt}>: Recipient address rejected: undeliverable address: "
            f"{entry.detail}"), status, cached)
    if status == "tempfail" and config.verify_unreachable == "tempfail":
        return Decision(False, _reply_safe(
            f"450 4.1.1 <{rcpt}>: Recipient address rejected: unverified address: "
            f"{entry.detail}"), status, cached)
    return Decision(True, "250 2.1.5 Ok", status, cached)


def hop_key(config: SmtpConfig, domain: str, original_destination: tuple[str, int] | None
            ) -> str:
    """Which server a recipient's answer belongs to, without a DNS lookup (the key is needed
    for every RCPT, a cache hit included): the intercepted destination, else the transport or
    next_hop entry as configured, else the domain's MX."""
    if original_destination is not None:
        return hostport(original_destination)
    hop = config.transport_for(domain) or config.next_hop
    if hop is not None:
        return hostport(hop)
    return f"mx:{domain}"


def ttl_for(config: SmtpConfig, status: ProbeStatus) -> float:
    """How long a result is believed (Postfix: address_verify_positive_expire_time,
    address_verify_negative_expire_time). A result that says nothing about the recipient (the
    server unreachable, a 4xx, the null sender refused) is kept only briefly: long enough that
    a server that is down costs one probe timeout per verify_tempfail_ttl rather than one per
    RCPT, short enough that mail flows again soon after it is back."""
    if status == "ok":
        return config.verify_positive_ttl
    if status == "refused":
        return config.verify_negative_ttl
    return config.verify_tempfail_ttl


Prober = Callable[[str, tuple[str, int] | None, str], Awaitable[ProbeDone]]


class RecipientVerifier:
    """The per-process front of verification: cache, probe coalescing, decision.

    `prober` (rcpt, original_destination, client_address) -> ProbeDone runs one probe; by
    default `_probe` over the network. Tests give their own.
    """

    def __init__(self, config: SmtpConfig, cache: VerifyCache, *, spoof_source: bool,
                 tls_context: ssl.SSLContext | None, prober: Prober | None = None) -> None:
        self.config = config
        self.cache = cache
        self.spoof_source = spoof_source
        self.tls_context = tls_context
        self._prober: Prober = prober or self._probe
        self.relay = RelayPolicy(
            relay_domains=config.relay_domains,
            relay_networks=config.relay_networks,
            transport_domains=[domain for domain, _hop in config.transport],
        )
        self._in_flight: dict[tuple[str, str], asyncio.Task[CacheEntry]] = {}
        self._slots = asyncio.Semaphore(PROBE_CONCURRENCY)

    @classmethod
    def open(cls, config: SmtpConfig, *, spoof_source: bool,
             tls_context: ssl.SSLContext | None) -> RecipientVerifier:
        return cls(config, VerifyCache(config.queue_dir / CACHE_FILE),
                   spoof_source=spoof_source, tls_context=tls_context)

    def applies(self, address: Address, client_address: str) -> bool:
        """Whether RCPT TO:<address> from this client is verified: mail towards our domains;
        a client in relay_networks (our own users) only with verify_relay_networks."""
        return self.not_verified(address, client_address) is None

    def not_verified(self, address: Address, client_address: str) -> str | None:
        """Why RCPT TO:<address> from this client is not verified (NOT_VERIFIED_OUTBOUND,
        NOT_VERIFIED_RELAY_CLIENT); None: it is."""
        if not self.relay.is_our_domain(address.domain):
            return NOT_VERIFIED_OUTBOUND
        if not self.config.verify_relay_networks and self.relay.is_relay_client(
                client_address):
            return NOT_VERIFIED_RELAY_CLIENT
        return None

    async def verify(self, address: Address, original_destination: tuple[str, int] | None,
                     client_address: str, conn: str = "-") -> Decision:
        rcpt = address.normalised
        hop = hop_key(self.config, address.domain, original_destination)
        entry = self.cache.get(hop, rcpt)
        cached = entry is not None
        if entry is None:
            key = (hop, rcpt)
            task = self._in_flight.get(key)
            if task is None:
                # Its own task, so that a client that goes away mid-probe does not cancel the
                # probe the other RCPTs for this recipient wait for.
                task = asyncio.create_task(
                    self._probe_and_record(hop, rcpt, original_destination, client_address),
                    name=f"verify-{rcpt}")
                self._in_flight[key] = task
                task.add_done_callback(functools.partial(self._probe_done, key))
            entry = await asyncio.shield(task)
        decision = decide(self.config, rcpt, entry, cached=cached)
        logs.event("smtp_rcpt_verified", conn=conn, rcpt=rcpt, hop=hop, status=entry.status,
                   cached="yes" if cached else "no", verify=decision.verification,
                   detail=entry.detail, reply=decision.reply)
        return decision

    def _probe_done(self, key: tuple[str, str], _task: asyncio.Task[CacheEntry]) -> None:
        self._in_flight.pop(key, None)

    async def _probe_and_record(self, hop: str, rcpt: str,
                                original_destination: tuple[str, int] | None,
                                client_address: str) -> CacheEntry:
        try:
            async with asyncio.timeout(self.config.verify_timeout):
                async with self._slots:
                    done = await self._prober(rcpt, original_destination, client_address)
        except TimeoutError:
            done = ProbeDone("tempfail", Reply(451, "4.4.2", "probe timed out"), "timeout")
        except Exception as exc:  # a bug: never cached, never more than a tempfail
            logs.error("verify_internal_error", exc_info=True, rcpt=rcpt, error=repr(exc))
            now = time.time()
            return CacheEntry("tempfail", "internal error", now, now)
        detail = _detail(done)
        ttl = ttl_for(self.config, done.status)
        self.cache.put(hop, rcpt, done.status, detail, ttl)
        now = self.cache.clock()
        return CacheEntry(done.status, detail, now, now + ttl)

    # --- the probe over the network ---------------------------------------------------------

    async def _probe(self, rcpt: str, original_destination: tuple[str, int] | None,
                     client_address: str) -> ProbeDone:
        """Ask the hop the message would go to, from the address the delivery would use: with
        spoof_source the client's own (the server's policy may depend on who asks, and an
        invisible bridge has no address of its own to ask from)."""
        domain = rcpt.rpartition("@")[2]
        try:
            hop = await resolve_next_hop(self.config, domain, original_destination,
                                         client_address, self.spoof_source)
        except NoRoute as exc:
            status: ProbeStatus = "refused" if exc.permanent else "tempfail"
            return ProbeDone(status, Reply(exc.code, exc.status, str(exc)), "route")
        done = ProbeDone("tempfail", Reply(451, "4.4.1", "no address to try"), "connect")
        for address in hop.addresses:
            done = await self._probe_address(rcpt, address, hop.spoof_source)
            if done.status != "tempfail" or done.stage not in BEFORE_MAIL:
                return done
        return done

    async def _probe_address(self, rcpt: str, address: tuple[str, int],
                             source: str | None) -> ProbeDone:
        relay = hostport(address)
        try:
            reader, writer = await open_onward(address, source=source,
                                               timeout=self.config.connect_timeout)
        except OSError as exc:
            return ProbeDone("tempfail", Reply(451, "4.4.1",
                                               f"connect to {relay}: {os_error_text(exc)}"),
                             "connect")
        session = ProbeSession(self.config.hostname, rcpt, tls=self.tls_context is not None)
        try:
            while True:
                event = session.next_event()
                outgoing = session.data_to_send()
                if outgoing:
                    writer.write(outgoing)
                    await writer.drain()
                if isinstance(event, NeedData):
                    session.receive_data(await reader.read(65536))
                elif isinstance(event, StartTls):
                    assert self.tls_context is not None
                    await writer.start_tls(self.tls_context)
                    session.tls_established()
                else:
                    return dataclasses.replace(event, host=address[0])
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            stage = "tls" if isinstance(exc, ssl.SSLError) else "connection"
            return ProbeDone("tempfail", Reply(451, "4.4.2", f"{relay}: {exc}"), stage)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1)


def _detail(done: ProbeDone) -> str:
    text = f"host {done.host} said: {done.reply}" if done.host else str(done.reply)
    command = COMMAND_NAMES.get(done.stage)
    return f"{text} (in reply to {command})" if command else text
