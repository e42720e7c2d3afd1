"""Hostile peers for the lab: attacks on the SMTP and POP3 proxies, a hostile POP3 server, and
a reader of mailgate's log that says what the attacks made it write.

Each attack is an async function `attack(target, budget) -> Tally`: it opens sessions to
`target` (host, port) from `budget.source`, at most `budget.sessions` of them and for at most
`budget.seconds`, and counts what came back. What every attack checks in each reply, whatever
else it counts: that the reply is well-formed (an SMTP reply line, or a POP3 status line), and
that it carries no internal text (a Python exception name, a traceback, a file name). Replies
are tallied by code and enhanced code ("421 4.7.0"), so a test can say which limit answered.

The attacks run in one asyncio process inside a lab host (`python -m netsetup.lab.abuse attack
--plan JSON`, started with `Lab.spawn`, all attacks of a plan at once), so their CPU is not the
test's and its probe client's timing is not skewed by the attack's own work. They send only to
the addresses they are given and the lab has no route out, so nothing leaves the lab.

The hostile POP3 server (`python -m netsetup.lab.abuse pop3-server`) stands in for a broken or
malicious mail server: no real server produces these faults on demand. The USER name a client
sends picks the fault for that session (`POP3_FAULTS`); a second listener gets a broken greeting,
a different one on each connection (`GREETING_FAULTS`). It never sends more than
`endless_cap` bytes in one response, so a proxy that does not bound what it buffers cannot fill
the lab machine's disk.

`check_log(text)` parses mailgate's structured log (logfmt or JSON lines) and reports what must
not be there under attack: `level=error` lines (only our own bugs may log them), tracebacks,
lines that are not structured, asyncio's task warnings ("Task was destroyed but it is
pending!"), and client-caused warnings without the connection's id.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import random
import re
import socket
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ATTACKS",
    "GREETING_FAULTS",
    "POP3_FAULTS",
    "Budget",
    "LogReport",
    "Tally",
    "check_log",
    "connection_flood_plan",
    "run_plan",
]

Target = tuple[str, int]

# Replies that name our own internals: what a reply must never carry, whatever went wrong.
INTERNAL_TEXT = re.compile(
    rb"Traceback|Exception|Error\(|\w+Error\b|\.py\b|object at 0x|Errno|NoneType|asyncio|"
    rb"line \d+, in ")
SMTP_REPLY_LINE = re.compile(rb"^[2-5][0-9]{2}(?:[ -]|$)")
POP3_STATUS_LINE = re.compile(rb"^(?:\+OK|-ERR)(?: |$)")
HELO = b"abuse.lab.example"
SENDER = b"abuse@sender.example"
RECIPIENT = b"alice@example.com"


@dataclass(frozen=True)
class Budget:
    """How much of an attack: sessions at most, seconds at most, from which address, and how
    many sessions at a time (where an attack runs them one after the other in parallel)."""

    sessions: int
    seconds: float
    source: str | None = None
    concurrency: int = 4
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Tally:
    """What one attack did and what came back."""

    attack: str
    sessions: int = 0
    replies: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    malformed: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    accepted_ids: list[str] = field(default_factory=list)  # Message-IDs that got their 250
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    longest_session: float = 0.0
    # Connections admitted (greeted) and not yet given back, at most at once: this attack's
    # own, and those of every connection flood on the same target in this process.
    peak_open: int = 0
    peak_open_all: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["replies"] = dict(self.replies)
        data["outcomes"] = dict(self.outcomes)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        tally = cls(**{k: v for k, v in data.items() if k not in ("replies", "outcomes")})
        tally.replies = collections.Counter(data.get("replies", {}))
        tally.outcomes = collections.Counter(data.get("outcomes", {}))
        return tally

    def smtp_reply(self, lines: Sequence[bytes]) -> None:
        """Tally one SMTP reply (its lines, CRLF removed)."""
        for line in lines:
            if not SMTP_REPLY_LINE.match(line) and len(self.malformed) < 20:
                self.malformed.append(repr(line[:120]))
            if INTERNAL_TEXT.search(line) and len(self.leaks) < 20:
                self.leaks.append(repr(line[:200]))
        if lines:
            last = lines[-1]
            key = last[:3].decode("ascii", "replace")
            enhanced = last[4:9]
            if re.fullmatch(rb"[245]\.\d\.\d", enhanced):
                key += " " + enhanced.decode()
            self.replies[key] += 1

    def pop3_line(self, line: bytes, status: bool) -> None:
        """Tally a line from a POP3 proxy; `status` if it must be a status line."""
        if status:
            if not POP3_STATUS_LINE.match(line) and len(self.malformed) < 20:
                self.malformed.append(repr(line[:120]))
            word = line.split(b" ", 1)[0].decode("ascii", "replace")[:8]
            tag = re.match(rb"-ERR (\[[A-Z/-]+\])", line)
            self.replies[word + (" " + tag.group(1).decode() if tag else "")] += 1
        if INTERNAL_TEXT.search(line) and len(self.leaks) < 20:
            self.leaks.append(repr(line[:200]))


# --- connections -------------------------------------------------------------------------------


class Conn:
    """One client connection with the little an attack needs: send, read a reply, close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 tally: Tally) -> None:
        self.reader = reader
        self.writer = writer
        self.tally = tally
        # How `_attack` closes the connection once the session is over: with a reset (RST,
        # SO_LINGER 0) instead of a FIN, where the session decides so.
        self.reset_on_close = False

    @classmethod
    async def open(cls, target: Target, budget: Budget, tally: Tally,
                   timeout: float = 5.0) -> Conn:
        local = (budget.source, 0) if budget.source else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target[0], target[1], local_addr=local, limit=1 << 20),
            timeout)
        tally.sessions += 1
        return cls(reader, writer, tally)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        self.tally.bytes_sent += len(data)
        await self.writer.drain()

    async def raw_line(self, timeout: float) -> bytes | None:
        """One line with its line ending; b"" at EOF, None on timeout."""
        try:
            data = await asyncio.wait_for(self.reader.readline(), timeout)
        except TimeoutError:
            return None
        except ValueError:  # a line beyond the reader's limit: the peer sent garbage
            data = await self.reader.read(1 << 20)
        self.tally.bytes_received += len(data)
        return data

    async def line(self, timeout: float) -> bytes | None:
        """One line without its line ending; None at EOF or on timeout (`eof` tells)."""
        data = await self.raw_line(timeout)
        return data.rstrip(b"\r\n") if data else None

    @property
    def eof(self) -> bool:
        return self.reader.at_eof()

    async def reply(self, timeout: float = 5.0) -> list[bytes] | None:
        """One SMTP reply's lines (tallied); [] at EOF, None on timeout."""
        lines: list[bytes] = []
        while True:
            data = await self.raw_line(timeout)
            if data is None:
                return None
            if data == b"":
                if lines:
                    self.tally.smtp_reply(lines)
                return lines
            line = data.rstrip(b"\r\n")
            lines.append(line)
            if line[3:4] != b"-":
                self.tally.smtp_reply(lines)
                return lines

    async def closed(self, timeout: float) -> bool:
        """Read (and tally as SMTP replies) until the server closes; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            lines = await self.reply(left)
            if lines is None:
                return False
            if not lines:
                return True

    async def close(self, reset: bool = False) -> None:
        if reset:
            sock = self.writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


async def _sessions(budget: Budget, one: Callable[[int], Awaitable[None]],
                    tally: Tally) -> None:
    """Run `one(index)` for up to budget.sessions indexes, budget.concurrency at a time, until
    the budget's time is up (sessions still running then are cancelled); the longest session
    goes into the tally."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget.seconds
    counter = iter(range(budget.sessions))

    async def lane() -> None:
        for index in counter:
            if loop.time() >= deadline:
                return
            started = loop.time()
            await one(index)
            tally.longest_session = max(tally.longest_session, loop.time() - started)

    lanes = [asyncio.ensure_future(lane()) for _ in range(max(1, budget.concurrency))]
    # Each session bounds its own waits; this only stops a session the budget's end finds
    # still running (its reads are then cut, and so is the attack).
    _done, pending = await asyncio.wait(lanes, timeout=budget.seconds + 15)
    for task in pending:
        task.cancel()
    await asyncio.gather(*lanes, return_exceptions=True)


async def _all_at_once(budget: Budget, one: Callable[[int], Awaitable[None]],
                       tally: Tally) -> None:
    """Run `one(index)` for all budget.sessions indexes at once: for the attacks on a limit of
    connections at a time, where each session bounds its own time by budget.seconds."""
    await asyncio.gather(*(one(index) for index in range(budget.sessions)))


def _outcome(tally: Tally, exc: BaseException) -> None:
    tally.outcomes[f"client error {type(exc).__name__}"] += 1


Talk = Callable[[Conn, int], Awaitable[None]]
Schedule = Callable[[Budget, Callable[[int], Awaitable[None]], Tally], Awaitable[None]]


async def _attack(tally: Tally, target: Target, budget: Budget, talk: Talk,
                  schedule: Schedule = _sessions) -> Tally:
    """What every attack does around its own talk: each session connects, runs
    `talk(conn, index)` and closes (with a reset if the talk set `conn.reset_on_close`);
    `schedule` runs the sessions. A connection refused or cut is what the attack met, not a
    failure of it: it goes into the outcomes. The attack's whole time goes into the tally."""

    async def one(index: int) -> None:
        try:
            conn = await Conn.open(target, budget, tally)
        except (OSError, TimeoutError) as exc:
            _outcome(tally, exc)
            return
        try:
            await talk(conn, index)
        except (OSError, EOFError) as exc:
            _outcome(tally, exc)
        finally:
            await conn.close(reset=conn.reset_on_close)

    started = time.monotonic()
    await schedule(budget, one, tally)
    tally.seconds = time.monotonic() - started
    return tally


# --- SMTP attacks ------------------------------------------------------------------------------


def _session_script(rng: random.Random, tag: str) -> list[bytes]:
    lines = [b"EHLO " + HELO, b"MAIL FROM:<" + SENDER + b">", b"RCPT TO:<" + RECIPIENT + b">",
             b"DATA", b"Subject: mutant " + tag.encode(), b"Message-ID: <" + tag.encode()
             + b"@abuse.example>", b"", b"A mutated session.", b".", b"QUIT"]
    if rng.random() < 0.3:
        lines.insert(3, b"RCPT TO:<bob@example.com>")
    return lines


TOKENS = (b"\r\n", b"\n", b"\r", b"\x00", b".", b"\r\n.\r\n", b" ", b":", b"<", b">", b'"',
          b"\\", b"@", b"=", b"\xff", b"\xc3", b"\x80", b"\t", b"\x7f", b"SIZE=999999999999",
          b"BODY=8BITMIME", b"SMTPUTF8", b"STARTTLS", b"BDAT 10", b"AUTH PLAIN", b"%n%s",
          b"\x1b[2J", "\u00e9".encode(), b"<>", b"<@a,@b:c@d>")
VERBS = (b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"VRFY",
         b"HELP", b"QUIT", b"EXPN", b"XYZZY", b"BDAT", b"STARTTLS", b"AUTH")


def mutate(rng: random.Random, lines: list[bytes]) -> list[bytes]:
    """Between one and four mutations of a session's lines (bytes flipped, tokens put in,
    lines dropped, repeated, swapped, replaced, made huge)."""
    lines = list(lines)
    for _ in range(rng.randint(1, 4)):
        if not lines:
            lines.append(b"")
        index = rng.randrange(len(lines))
        line = bytearray(lines[index])
        kind = rng.randrange(10)
        if kind == 0 and line:
            line[rng.randrange(len(line))] = rng.randrange(256)
        elif kind == 1:
            at = rng.randint(0, len(line))
            line[at:at] = rng.choice(TOKENS)
        elif kind == 2:
            del lines[index]
            continue
        elif kind == 3:
            lines.insert(index, bytes(line))
        elif kind == 4:
            other = rng.randrange(len(lines))
            lines[index], lines[other] = lines[other], lines[index]
            continue
        elif kind == 5:
            line = bytearray(rng.choice(VERBS) + b" " + bytes(rng.randrange(256)
                                                               for _ in range(rng.randint(0, 40))))
        elif kind == 6:
            line = bytearray(line * rng.randint(2, 200))
        elif kind == 7:
            line = bytearray(line.lower() if rng.random() < 0.5 else line.upper())
        elif kind == 8:
            lines[index:] = lines[index:index + 1]  # the session ends early, without QUIT
        else:
            line = bytearray(b"X" * rng.choice((600, 1100, 5000, 70000)))
        lines[index] = bytes(line)
    return lines


async def smtp_mutated(target: Target, budget: Budget) -> Tally:
    """Valid sessions, mutated; sent in lock-step, pipelined, or in random pieces."""
    tally = Tally("smtp_mutated")
    idle = float(budget.options.get("idle", 0.5))

    async def talk(conn: Conn, index: int) -> None:
        rng = random.Random(budget.seed * 100_003 + index)
        tag = f"mut{budget.seed}-{index}"
        lines = mutate(rng, _session_script(rng, tag))
        mode = rng.choice(("lockstep", "pipelined", "pieces"))
        try:
            greeting = await conn.reply()
            if not greeting or not greeting[0].startswith(b"220"):
                tally.outcomes["no greeting"] += 1
                return
            data = b"".join(line + b"\r\n" for line in lines)
            if mode == "lockstep":
                content = False
                for line in lines:
                    await conn.send(line + b"\r\n")
                    if content:
                        content = line != b"."
                        if content:
                            continue
                    reply = await conn.reply(idle + 1)
                    if not reply:
                        break
                    content = reply[-1].startswith(b"354")
            elif mode == "pipelined":
                await conn.send(data)
            else:
                while data:
                    cut = rng.randint(1, max(1, len(data) // 3))
                    await conn.send(data[:cut])
                    data = data[cut:]
                    await asyncio.sleep(rng.random() * 0.02)
            tally.outcomes["server closed" if await conn.closed(idle) else "left open"] += 1
        finally:
            # Drawn after the session's other draws, so that a seed still makes the same
            # sessions.
            conn.reset_on_close = rng.random() < 0.2

    return await _attack(tally, target, budget, talk)


async def smtp_slowloris(target: Target, budget: Budget) -> Tally:
    """budget.sessions connections at once, each sending one byte every `interval` seconds;
    how each ended: refused at the greeting, timed out by the server (421 4.4.2), closed, or
    still open when the budget ran out."""
    tally = Tally("smtp_slowloris")
    interval = float(budget.options.get("interval", 2.0))
    script = b"EHLO slowloris.example\r\n" + b"NOOP\r\n" * 1000

    async def talk(conn: Conn, index: int) -> None:
        greeting = await conn.reply()
        if not greeting or not greeting[0].startswith(b"220"):
            tally.outcomes["refused" if greeting else "no greeting"] += 1
            return
        await _trickle(conn, tally, (bytes([byte]) for byte in script), interval,
                       budget.seconds)

    return await _attack(tally, target, budget, talk, _all_at_once)


async def _trickle(conn: Conn, tally: Tally, pieces: Iterable[bytes], interval: float,
                   seconds: float) -> float:
    """Send `pieces` one every `interval` seconds until the server says 421 or closes, or
    `seconds` pass; count how it ended. Returns how long it went on."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + seconds
    for piece in pieces:
        await conn.send(piece)
        reply = await conn.reply(max(0.0, min(interval, deadline - loop.time())))
        if reply == []:
            tally.outcomes["closed"] += 1
            break
        if reply is not None and reply[-1].startswith(b"421"):
            tally.outcomes["timed out" if b"4.4.2" in reply[-1] else "421"] += 1
            await conn.closed(2)
            break
        if loop.time() >= deadline:
            tally.outcomes["still open"] += 1
            break
    return loop.time() - started


async def smtp_data_trickle(target: Target, budget: Budget) -> Tally:
    """budget.sessions connections at once that reach DATA and then send content one byte
    every `interval` seconds: each read well within the data timeout, so only a minimum data
    rate ([smtp] min_data_rate) ends them. How each ended; `longest_session` is the longest
    a trickle was held, from the 354 on."""
    tally = Tally("smtp_data_trickle")
    interval = float(budget.options.get("interval", 1.0))
    opening = (b"EHLO " + HELO + b"\r\n", b"MAIL FROM:<" + SENDER + b">\r\n",
               b"RCPT TO:<" + RECIPIENT + b">\r\n", b"DATA\r\n")

    async def talk(conn: Conn, index: int) -> None:
        greeting = await conn.reply()
        if not greeting or not greeting[0].startswith(b"220"):
            tally.outcomes["refused" if greeting else "no greeting"] += 1
            return
        for command in opening:
            await conn.send(command)
            reply = await conn.reply(10)
            if not reply or reply[-1][:1] not in (b"2", b"3"):
                tally.outcomes["refused before data"] += 1
                return
        held = await _trickle(conn, tally, itertools.repeat(b"x"), interval, budget.seconds)
        tally.longest_session = max(tally.longest_session, held)

    return await _attack(tally, target, budget, talk, _all_at_once)


_FLOODING: dict[Target, int] = {}


async def smtp_connection_flood(target: Target, budget: Budget) -> Tally:
    """Rounds of `per_round` connections opened at once and held `hold` seconds (each reads
    its greeting), until the sessions or the time are spent."""
    tally = Tally("smtp_connection_flood")
    per_round = int(budget.options.get("per_round", 20))
    hold = float(budget.options.get("hold", 1.0))
    own = [0]

    def holding(change: int) -> None:
        # Counted up once the greeting is here and down before QUIT is sent, so at any moment
        # the count is at most what the server holds: a peak over the limit is the server's.
        own[0] += change
        _FLOODING[target] = _FLOODING.get(target, 0) + change
        tally.peak_open = max(tally.peak_open, own[0])
        tally.peak_open_all = max(tally.peak_open_all, _FLOODING[target])

    async def talk(conn: Conn, index: int) -> None:
        greeting = await conn.reply()
        if greeting and greeting[0].startswith(b"220"):
            tally.outcomes["admitted"] += 1
            holding(+1)
            try:
                await asyncio.sleep(hold)
            finally:
                holding(-1)
            await conn.send(b"QUIT\r\n")
            await conn.closed(3)
        else:
            tally.outcomes["refused" if greeting else "no greeting"] += 1

    async def rounds(budget: Budget, one: Callable[[int], Awaitable[None]],
                     tally: Tally) -> None:
        # Each round's connections are held together, so the server sees per_round at once;
        # the next round opens only when the whole round is over.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget.seconds
        while tally.sessions < budget.sessions and loop.time() < deadline:
            count = min(per_round, budget.sessions - tally.sessions)
            await asyncio.gather(*(one(index) for index in range(count)))

    return await _attack(tally, target, budget, talk, rounds)


async def smtp_pipelined_flood(target: Target, budget: Budget) -> Tally:
    """Pipelined groups far beyond what a client needs, each in one write: NOOPs (one reply
    each, counted), recipients past the limit, unknown verbs and errors past their limits, and
    a client that sends megabytes of commands and never reads a reply."""
    tally = Tally("smtp_pipelined_flood")
    noops = int(budget.options.get("noops", 5000))
    unread = int(budget.options.get("unread_bytes", 8 << 20))
    rcpts = int(budget.options.get("rcpts", 100))

    async def talk(conn: Conn, index: int) -> None:
        kind = index % 5
        if not await conn.reply():
            return
        if kind == 0:
            await conn.send(b"EHLO " + HELO + b"\r\n" + b"NOOP\r\n" * noops + b"QUIT\r\n")
            got = 0
            while await conn.reply(10):
                got += 1
            tally.outcomes["noop replies as sent" if got == noops + 2
                           else f"noop replies {got} of {noops + 2}"] += 1
        elif kind == 1:
            group = (b"EHLO " + HELO + b"\r\nMAIL FROM:<" + SENDER + b">\r\n"
                     + b"".join(b"RCPT TO:<r%d@example.com>\r\n" % n for n in range(rcpts))
                     + b"RSET\r\nQUIT\r\n")
            await conn.send(group)
            tally.outcomes["closed" if await conn.closed(20) else "left open"] += 1
        elif kind == 2:
            await conn.send(b"".join(b"XYZZY%d\r\n" % n for n in range(50)))
            tally.outcomes["closed" if await conn.closed(10) else "left open"] += 1
        elif kind == 3:
            await conn.send(b"EHLO " + HELO + b"\r\n" + b"MAIL FROM:<bad\r\n" * 50)
            tally.outcomes["closed" if await conn.closed(10) else "left open"] += 1
        else:
            # Never reading: the server's replies pile up unless it stops reading us.
            chunk = b"NOOP\r\n" * 10000
            sent = 0
            try:
                while sent < unread:
                    conn.writer.write(chunk)
                    sent += len(chunk)
                    tally.bytes_sent += len(chunk)
                    await asyncio.wait_for(conn.writer.drain(), 5)
                tally.outcomes["unread: all sent"] += 1
            except TimeoutError:
                tally.outcomes["unread: server stopped reading"] += 1
            await conn.close(reset=True)

    return await _attack(tally, target, budget, talk)


async def smtp_huge(target: Target, budget: Budget) -> Tally:
    """Too much: content several times the size limit (552 at the end of data), a command
    line of a megabyte (500 5.5.2), a content line of 100 KB, and content that never ends."""
    tally = Tally("smtp_huge")
    size = int(budget.options.get("size", 4 << 20))
    endless = float(budget.options.get("endless_seconds", 3.0))

    async def talk(conn: Conn, index: int) -> None:
        kind = index % 4
        if not await conn.reply():
            return
        if kind == 1:
            await conn.send(b"EHLO " + b"h" * (1 << 20) + b"\r\nQUIT\r\n")
            await conn.closed(10)
            return
        await conn.send(b"EHLO " + HELO + b"\r\n")
        await conn.reply()
        await conn.send(b"MAIL FROM:<" + SENDER + b">\r\n")
        await conn.reply()
        await conn.send(b"RCPT TO:<" + RECIPIENT + b">\r\n")
        rcpt = await conn.reply(10)
        if not rcpt or not rcpt[-1].startswith(b"250"):
            tally.outcomes["rcpt refused"] += 1
            return
        await conn.send(b"DATA\r\n")
        await conn.reply()
        line = b"x" * 998 + b"\r\n"
        if kind == 0:
            for _ in range(size // len(line)):
                await conn.send(line)
            await conn.send(b".\r\nQUIT\r\n")
            await conn.closed(10)
        elif kind == 2:
            await conn.send(b"Subject: long\r\n\r\n" + b"y" * 100_000 + b"\r\n.\r\nQUIT\r\n")
            await conn.closed(10)
        else:
            loop = asyncio.get_running_loop()
            stop = loop.time() + endless
            while loop.time() < stop:
                await conn.send(line * 64)
            tally.outcomes["endless data sent"] += 1
            await conn.close(reset=True)

    return await _attack(tally, target, budget, talk)


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


TLS_GARBAGE_KINDS = ("random bytes", "plain command", "close after 220", "injection",
                     "garbage inside tls", "abrupt close inside tls", "stalled handshake",
                     "truncated hello")


async def smtp_tls_garbage(target: Target, budget: Budget) -> Tally:
    """STARTTLS and then what a TLS server must survive (TLS_GARBAGE_KINDS, in turn)."""
    tally = Tally("smtp_tls_garbage")
    stall = float(budget.options.get("stall", 5.0))

    async def talk(conn: Conn, index: int) -> None:
        kind = TLS_GARBAGE_KINDS[index % len(TLS_GARBAGE_KINDS)]
        rng = random.Random(budget.seed * 7919 + index)
        if not await conn.reply():
            return
        await conn.send(b"EHLO " + HELO + b"\r\n")
        await conn.reply()
        if kind == "injection":
            await conn.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.org>\r\n")
        else:
            await conn.send(b"STARTTLS\r\n")
        ready = await conn.reply()
        if not ready or not ready[-1].startswith(b"220"):
            tally.outcomes["no 220 to STARTTLS"] += 1
            return
        if kind == "random bytes":
            await conn.send(bytes(rng.randrange(256) for _ in range(rng.randint(1, 4000))))
        elif kind == "plain command":
            await conn.send(b"EHLO " + HELO + b"\r\n")
        elif kind == "close after 220":
            await conn.close()
            tally.outcomes[kind] += 1
            return
        elif kind == "truncated hello":
            # A TLS record header that promises more than follows.
            await conn.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        elif kind == "stalled handshake":
            await asyncio.sleep(stall)
        if kind in ("garbage inside tls", "abrupt close inside tls", "injection"):
            try:
                await asyncio.wait_for(conn.writer.start_tls(_client_tls()), 10)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                tally.outcomes[f"{kind}: handshake failed {type(exc).__name__}"] += 1
                return
            if kind == "abrupt close inside tls":
                await conn.send(b"EHLO " + HELO + b"\r\nMAIL FROM:<" + SENDER + b">\r\n")
                await conn.close(reset=True)
                tally.outcomes[kind] += 1
                return
            if kind == "garbage inside tls":
                await conn.send(bytes(rng.randrange(256) for _ in range(2000)) + b"\r\n")
            else:
                await conn.send(b"EHLO " + HELO + b"\r\nQUIT\r\n")
        try:
            closed = await conn.closed(10)
        except ssl.SSLError as exc:
            tally.outcomes[f"{kind}: ssl error {exc.reason}"] += 1
            return
        tally.outcomes[f"{kind}: {'closed' if closed else 'left open'}"] += 1

    return await _attack(tally, target, budget, talk)


HALF_CLOSED_KINDS = ("message then eof", "ehlo then eof", "eof in data", "reset in data",
                     "eof in a line")


async def smtp_half_closed(target: Target, budget: Budget) -> Tally:
    """The client shuts its sending side (or resets) at awkward points. A whole message sent
    before the EOF must still get its 250 (its Message-ID goes into accepted_ids)."""
    tally = Tally("smtp_half_closed")

    async def talk(conn: Conn, index: int) -> None:
        kind = HALF_CLOSED_KINDS[index % len(HALF_CLOSED_KINDS)]
        mid = f"half{budget.seed}-{index}@abuse.example"
        if not await conn.reply():
            return
        ehlo = b"EHLO " + HELO + b"\r\n"
        transaction = (b"MAIL FROM:<" + SENDER + b">\r\nRCPT TO:<" + RECIPIENT
                       + b">\r\nDATA\r\n")
        content = (b"Subject: half closed\r\nMessage-ID: <" + mid.encode()
                   + b">\r\n\r\nbody\r\n")
        if kind == "message then eof":
            await conn.send(ehlo + transaction)
            replies = [await conn.reply(10) for _ in range(4)]
            await conn.send(content + b".\r\n")
            conn.writer.write_eof()
            final = await conn.reply(20)
            if replies[-1] and replies[-1][-1].startswith(b"354") and final \
                    and final[-1].startswith(b"250"):
                tally.accepted_ids.append(mid)
        elif kind == "ehlo then eof":
            await conn.send(ehlo)
            conn.writer.write_eof()
        elif kind == "eof in a line":
            await conn.send(ehlo + b"MAIL FROM:<" + SENDER)
            conn.writer.write_eof()
        else:
            await conn.send(ehlo + transaction + content[:30])
            if kind == "reset in data":
                await asyncio.sleep(0.3)
                await conn.close(reset=True)
                tally.outcomes[kind] += 1
                return
            conn.writer.write_eof()
        tally.outcomes[f"{kind}: {'closed' if await conn.closed(10) else 'left open'}"] += 1

    return await _attack(tally, target, budget, talk)


# --- POP3 attacks ------------------------------------------------------------------------------


async def _pop3_response(conn: Conn, tally: Tally, timeout: float, max_bytes: int,
                         multiline: bool) -> str:
    """Read one response through the proxy: its status line (checked), then for a multi-line
    +OK the body to its final "."; returns how it ended."""
    status = await conn.line(timeout)
    if status is None:
        return "closed" if conn.eof else "silent"
    tally.pop3_line(status, status=True)
    if not (multiline and status.startswith(b"+OK")):
        return "err" if status.startswith(b"-ERR") else "ok"
    got = 0
    while got < max_bytes:
        line = await conn.line(timeout)
        if line is None:
            return "closed mid-body" if conn.eof else "body silent"
        got += len(line) + 2
        if line == b".":
            return "body complete"
        tally.pop3_line(line, status=False)
    return "body cut by client"


POP3_FAULTS = ("garbage", "endless", "liar-small", "liar-big", "longline", "midclose",
               "stall", "badstuff", "trickle", "endless-list")
GREETING_FAULTS = ("garbage", "endless", "silence", "close", "err", "huge")


async def pop3_hostile_server(target: Target, budget: Budget) -> Tally:
    """Sessions through the proxy to the hostile POP3 server: USER names its fault, then
    RETR 1 (LIST for endless-list); what the proxy sends back is read and checked."""
    tally = Tally("pop3_hostile_server")
    timeout = float(budget.options.get("timeout", 8.0))
    max_bytes = int(budget.options.get("max_bytes", 256 << 10))

    async def talk(conn: Conn, index: int) -> None:
        fault = POP3_FAULTS[index % len(POP3_FAULTS)]
        ending = await _pop3_response(conn, tally, timeout, 0, False)
        if ending != "ok":
            tally.outcomes[f"{fault}: greeting {ending}"] += 1
            return
        for command in (b"USER " + fault.encode(), b"PASS x"):
            await conn.send(command + b"\r\n")
            ending = await _pop3_response(conn, tally, timeout, 0, False)
            if ending != "ok":
                tally.outcomes[f"{fault}: {command.split()[0].decode()} {ending}"] += 1
                return
        command = b"LIST" if fault == "endless-list" else b"RETR 1"
        await conn.send(command + b"\r\n")
        ending = await _pop3_response(conn, tally, timeout, max_bytes, True)
        tally.outcomes[f"{fault}: {ending}"] += 1

    return await _attack(tally, target, budget, talk)


async def pop3_greeting_faults(target: Target, budget: Budget) -> Tally:
    """Sessions through the proxy to the hostile server's broken-greeting listener."""
    tally = Tally("pop3_greeting_faults")
    timeout = float(budget.options.get("timeout", 8.0))

    async def talk(conn: Conn, index: int) -> None:
        ending = await _pop3_response(conn, tally, timeout, 0, False)
        if ending == "ok":
            await conn.send(b"QUIT\r\n")
            ending = "ok, then " + await _pop3_response(conn, tally, timeout, 0, False)
        tally.outcomes[ending] += 1

    return await _attack(tally, target, budget, talk)


POP3_VERBS = (b"USER", b"PASS", b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"NOOP", b"RSET",
              b"CAPA", b"APOP", b"AUTH", b"STLS", b"XTND", b"QUIT")


async def pop3_mutated(target: Target, budget: Budget) -> Tally:
    """Mutated client sessions through the proxy to a real server (never DELE: the probe's
    message stays). budget.options: user, password."""
    tally = Tally("pop3_mutated")
    user = str(budget.options.get("user", "bob")).encode()
    password = str(budget.options.get("password", "secret")).encode()
    idle = float(budget.options.get("idle", 1.0))

    async def talk(conn: Conn, index: int) -> None:
        rng = random.Random(budget.seed * 31337 + index)
        lines = [b"CAPA", b"USER " + user, b"PASS " + password, b"STAT", b"LIST", b"UIDL 1",
                 b"TOP 1 0", b"RETR 1", b"NOOP", b"QUIT"]
        lines = [line for line in mutate(rng, lines) if not line.upper().startswith(b"DELE")]
        if rng.random() < 0.3:
            lines.insert(rng.randint(0, len(lines)), rng.choice(POP3_VERBS) + b" "
                         + bytes(rng.randrange(32, 127) for _ in range(rng.randint(0, 30))))
        try:
            ending = await _pop3_response(conn, tally, 5, 0, False)
            if ending != "ok":
                tally.outcomes[f"greeting {ending}"] += 1
                return
            pipelined = rng.random() < 0.5
            if pipelined:
                await conn.send(b"".join(line + b"\r\n" for line in lines))
            for line in lines:
                if not pipelined:
                    await conn.send(line + b"\r\n")
                verb = line.split(b" ", 1)[0].upper()
                multiline = verb in (b"CAPA", b"TOP", b"RETR") or (
                    verb in (b"LIST", b"UIDL") and b" " not in line.strip())
                ending = await _pop3_response(conn, tally, idle + 3, 1 << 20, multiline)
                if ending in ("closed", "silent", "closed mid-body", "body silent"):
                    tally.outcomes[ending] += 1
                    return
            tally.outcomes["ran through"] += 1
        finally:
            # Drawn after the session's other draws, so that a seed still makes the same
            # sessions.
            conn.reset_on_close = rng.random() < 0.2

    return await _attack(tally, target, budget, talk)


async def pop3_slowloris(target: Target, budget: Budget) -> Tally:
    """Slow POP3 clients: one byte every `interval` seconds, all at once."""
    tally = Tally("pop3_slowloris")
    interval = float(budget.options.get("interval", 2.0))

    async def talk(conn: Conn, index: int) -> None:
        greeting = await conn.line(5)
        if not greeting or not greeting.startswith(b"+OK"):
            if greeting:
                tally.pop3_line(greeting, status=True)
            tally.outcomes["refused" if greeting else "no greeting"] += 1
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget.seconds
        for byte in b"CAPA\r\n" * 1000:
            await conn.send(bytes([byte]))
            wake = min(deadline, loop.time() + interval)
            line = await conn.line(max(0.0, wake - loop.time()))
            if line is None and conn.eof:
                tally.outcomes["closed"] += 1
                return
            if line is not None and line.startswith(b"-ERR"):
                tally.pop3_line(line, status=True)
                tally.outcomes["timed out" if b"autologout" in line else "-ERR"] += 1
                return
            if loop.time() >= deadline:
                tally.outcomes["still open"] += 1
                return

    return await _attack(tally, target, budget, talk, _all_at_once)


ATTACKS: dict[str, Callable[[Target, Budget], Awaitable[Tally]]] = {
    "smtp_mutated": smtp_mutated,
    "smtp_slowloris": smtp_slowloris,
    "smtp_data_trickle": smtp_data_trickle,
    "smtp_connection_flood": smtp_connection_flood,
    "smtp_pipelined_flood": smtp_pipelined_flood,
    "smtp_huge": smtp_huge,
    "smtp_tls_garbage": smtp_tls_garbage,
    "smtp_half_closed": smtp_half_closed,
    "pop3_hostile_server": pop3_hostile_server,
    "pop3_greeting_faults": pop3_greeting_faults,
    "pop3_mutated": pop3_mutated,
    "pop3_slowloris": pop3_slowloris,
}


async def run_plan(plan: Sequence[dict[str, Any]]) -> list[Tally]:
    """Every attack of `plan` at once. An entry: {"attack": name, "target": [host, port],
    "sessions", "seconds", and optionally "source", "concurrency", "seed", "options"}."""

    async def one(entry: dict[str, Any]) -> Tally:
        budget = Budget(sessions=int(entry["sessions"]), seconds=float(entry["seconds"]),
                        source=entry.get("source"), concurrency=int(entry.get("concurrency", 4)),
                        seed=int(entry.get("seed", 0)), options=dict(entry.get("options", {})))
        host, port = entry["target"]
        tally = await ATTACKS[entry["attack"]]((host, int(port)), budget)
        if entry.get("label"):
            tally.attack = str(entry["label"])
        return tally

    return list(await asyncio.gather(*(one(entry) for entry in plan)))


def connection_flood_plan(target: Target, sources: Sequence[str], per_client: int,
                          seconds: float = 10, hold: float = 3.0) -> list[dict[str, Any]]:
    """A plan of connection floods on `target`, one from each address of `sources`, all at
    once: each opens `per_client` connections together and holds them `hold` seconds. With
    more sources than the server's total limit has room for, that limit must answer, since no
    one client passes its own. Each entry is labelled with its source, so the tallies stay
    apart."""
    return [{"attack": "smtp_connection_flood", "target": list(target), "sessions": per_client,
             "seconds": seconds, "source": source, "label": f"total flood {source}",
             "options": {"per_round": per_client, "hold": hold}} for source in sources]


# --- the hostile POP3 server -------------------------------------------------------------------


class HostilePop3:
    """See the module docstring. `endless_cap`: the most one response ever sends."""

    def __init__(self, endless_cap: int = 64 << 20) -> None:
        self.endless_cap = endless_cap
        self.greetings = 0
        self.rng = random.Random(1)

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        try:
            await self._session(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def greeting_fault(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        fault = GREETING_FAULTS[self.greetings % len(GREETING_FAULTS)]
        self.greetings += 1
        try:
            if fault == "garbage":
                writer.write(bytes(self.rng.randrange(256) for _ in range(300)) + b"\r\n")
            elif fault == "endless":
                await self._endless(writer, b"+OK " + b"x" * 65536)
            elif fault == "silence":
                await asyncio.sleep(30)
            elif fault == "err":
                writer.write(b"-ERR go away\r\n")
            elif fault == "huge":
                writer.write(b"+OK " + b"y" * 100_000 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.5)
        except OSError:
            pass
        finally:
            writer.close()

    async def _endless(self, writer: asyncio.StreamWriter, piece: bytes) -> None:
        sent = 0
        while sent < self.endless_cap:
            writer.write(piece)
            sent += len(piece)
            await writer.drain()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                       ) -> None:
        writer.write(b"+OK hostile POP3 ready\r\n")
        fault = ""
        while True:
            line = await reader.readline()
            if not line:
                return
            verb, _, argument = line.strip().partition(b" ")
            verb = verb.upper()
            if verb == b"CAPA":
                writer.write(b"+OK\r\nUSER\r\nUIDL\r\nTOP\r\n.\r\n")
            elif verb == b"USER":
                fault = argument.decode("ascii", "replace")
                writer.write(b"+OK\r\n")
            elif verb == b"PASS":
                writer.write(b"+OK logged in\r\n")
            elif verb == b"QUIT":
                writer.write(b"+OK bye\r\n")
                await writer.drain()
                return
            elif verb in (b"LIST", b"UIDL") and argument:
                # The one-message forms (the proxy asks UIDL n for its scan cache): honest.
                writer.write(b"+OK " + argument.split()[0] + b" 1000\r\n")
            elif verb in (b"RETR", b"TOP", b"LIST", b"UIDL"):
                if not await self._respond(fault, writer):
                    return
            else:
                writer.write(b"+OK\r\n")
            await writer.drain()

    async def _respond(self, fault: str, writer: asyncio.StreamWriter) -> bool:
        """The faulty multi-line response; False when the connection is to end."""
        rng = self.rng
        head = b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: h\r\n\r\n"
        if fault == "garbage":
            for _ in range(5):
                writer.write(bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
                             + b"\r\n")
        elif fault in ("endless", "endless-list"):
            writer.write(b"+OK\r\n" + (head if fault == "endless" else b""))
            await self._endless(writer, b"1 1000\r\n" * 8192)
            return False
        elif fault == "liar-small":
            writer.write(b"+OK 100 octets\r\n" + head + (b"z" * 998 + b"\r\n") * 3000 + b".\r\n")
        elif fault == "liar-big":
            writer.write(b"+OK 999999999999 octets\r\n" + head + b"tiny\r\n.\r\n")
        elif fault == "longline":
            await self._endless(writer, b"+OK " + b"L" * 65536)
            return False
        elif fault == "midclose":
            writer.write(b"+OK 5000 octets\r\n" + head + b"half a message\r\n")
            await writer.drain()
            return False
        elif fault == "stall":
            writer.write(b"+OK 5000 octets\r\n")
            await writer.drain()
            await asyncio.sleep(60)
            return False
        elif fault == "badstuff":
            writer.write(b"+OK\r\n" + head + b"bare\nlf\r\nnul\x00here\r\n..dots\r\n.x\r\n"
                         b"cr\ronly\r\n\xff\xfe\r\n.\r\n")
        elif fault == "trickle":
            writer.write(b"+OK 300 octets\r\n")
            for byte in head + b"slow body\r\n.\r\n":
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)
        else:
            writer.write(b"+OK\r\n" + head + b"nothing wrong\r\n.\r\n")
        return True


async def serve_hostile_pop3(listen: Target, greeting_listen: Target | None,
                             endless_cap: int) -> None:
    server = HostilePop3(endless_cap)
    servers = [await asyncio.start_server(server.session, listen[0], listen[1],
                                          reuse_address=True)]
    if greeting_listen is not None:
        servers.append(await asyncio.start_server(server.greeting_fault, greeting_listen[0],
                                                  greeting_listen[1], reuse_address=True))
    print("ready", flush=True)
    await asyncio.Event().wait()


# --- mailgate's log ----------------------------------------------------------------------------

_LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
TASK_WARNINGS = ("Task was destroyed but it is pending", "Task exception was never retrieved",
                 "was never awaited", "Exception in callback", "Fatal error on",
                 "Unclosed ", "ResourceWarning")
# Warnings about the process, not one client: no connection id to give.
PROCESS_WARNINGS = frozenset({"smtp_tls_disabled", "pop3_scanning_off", "verify_cache_write_failed",
                              "verify_cache_prune_failed", "quarantine_purge_failed",
                              "queue_foreign_file", "queue_file_corrupt", "scan_failed"})
CONNECTION_ID_FIELDS = ("conn", "id", "qid")


def parse_line(line: str) -> dict[str, str] | None:
    """One structured log line as a dict; None if the line is not one (logfmt that starts with
    ts=, or a JSON object with ts, level and event)."""
    if line.startswith("{"):
        try:
            data = json.loads(line)
        except ValueError:
            return None
        if not isinstance(data, dict) or not {"ts", "level", "event"} <= data.keys():
            return None
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}
    if not line.startswith("ts="):
        return None
    fields: dict[str, str] = {}
    for key, value in _LOGFMT.findall(line):
        try:
            fields[key] = json.loads(value) if value.startswith('"') else value
        except ValueError:
            return None
    if "level" not in fields or "event" not in fields:
        return None
    return fields


@dataclass
class LogReport:
    lines: int = 0
    errors: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)
    unstructured: list[str] = field(default_factory=list)
    task_warnings: list[str] = field(default_factory=list)
    without_id: list[str] = field(default_factory=list)
    warnings: collections.Counter[str] = field(default_factory=collections.Counter)
    events: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def clean(self) -> bool:
        return not (self.errors or self.tracebacks or self.unstructured or self.task_warnings
                    or self.without_id)

    def problems(self, limit: int = 5) -> str:
        parts = []
        for name in ("errors", "tracebacks", "unstructured", "task_warnings", "without_id"):
            found: list[str] = getattr(self, name)
            if found:
                parts.append(f"{len(found)} {name}:\n  " + "\n  ".join(
                    line[:400] for line in found[:limit]))
        return "\n".join(parts)


def check_log(text: str, *, allowed_errors: Sequence[str] = ()) -> LogReport:
    """What the log says of the run; see the module docstring. `allowed_errors`: event names
    whose level=error lines a caller expects (none under attack)."""
    report = LogReport()
    for line in text.splitlines():
        if not line.strip():
            continue
        report.lines += 1
        if any(marker in line for marker in TASK_WARNINGS):
            report.task_warnings.append(line)
        if "Traceback" in line or "exception" in (parse_line(line) or {}):
            report.tracebacks.append(line)
        fields = parse_line(line)
        if fields is None:
            report.unstructured.append(line)
            continue
        event, level = fields["event"], fields["level"]
        report.events[event] += 1
        if not re.fullmatch(r"[a-z][a-z0-9_]*", event):
            report.unstructured.append(line)  # a foreign logger's message as the event
        if level in ("error", "critical") and event not in allowed_errors:
            report.errors.append(line)
        if level == "warning":
            report.warnings[event] += 1
            if event not in PROCESS_WARNINGS and not any(
                    k in fields for k in CONNECTION_ID_FIELDS):
                report.without_id.append(line)
    return report


# --- the command line --------------------------------------------------------------------------


def _hostport(text: str) -> Target:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m netsetup.lab.abuse", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    attack = commands.add_parser("attack", help="run a plan of attacks at once, print JSON")
    attack.add_argument("--plan", required=True,
                        help="a JSON list of {attack, target: [host, port], sessions, seconds, "
                             "source?, concurrency?, seed?, options?}; attacks: "
                             + ", ".join(ATTACKS))
    server = commands.add_parser("pop3-server", help="the hostile POP3 server")
    server.add_argument("--listen", type=_hostport, required=True,
                        help="ADDRESS:PORT; the USER name picks the fault: "
                             + ", ".join(POP3_FAULTS))
    server.add_argument("--greeting-listen", type=_hostport,
                        help="ADDRESS:PORT for broken greetings: " + ", ".join(GREETING_FAULTS))
    server.add_argument("--endless-cap", type=int, default=64 << 20,
                        help="bytes an endless response stops at (default 64 MiB)")
    args = parser.parse_args(argv)
    if args.command == "pop3-server":
        asyncio.run(serve_hostile_pop3(args.listen, args.greeting_listen, args.endless_cap))
        return 0
    try:
        plan = json.loads(args.plan)
        unknown = [entry.get("attack") for entry in plan if entry.get("attack") not in ATTACKS]
    except (ValueError, AttributeError, TypeError) as exc:
        parser.error(f"--plan: not a JSON list of attacks: {exc}")
    if unknown:
        parser.error(f"--plan: unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
    tallies = asyncio.run(run_plan(plan))
    json.dump([tally.to_json() for tally in tallies], sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
