"""Shared by the POP3 tests (no tests of its own): a content scanner that needs no daemon, and a
small scripted POP3 server for the loopback tests, which can misbehave on request.

`PatternScanner` is also what the lab's proxy process loads (`python -m proxies.pop3
--scanner tests.unit.test_pop3_support:PatternScanner`) when the real scanners are not used.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import re
import zipfile
from dataclasses import dataclass, field

from proxies.scan.api import ScanResult

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
FAIL_MARKER = b"MAILGATE-TEST-SCANNER-FAILS"
SLOW_MARKER = b"MAILGATE-TEST-SCANNER-SLOW"

_BASE64_BLOCK = re.compile(rb"(?:^[A-Za-z0-9+/=]{4,}\r?\n)+", re.MULTILINE)


def _has_eicar(data: bytes, depth: int = 0) -> bool:
    if EICAR in data:
        return True
    if depth > 2:
        return False
    if data.startswith(b"PK"):
        with (contextlib.suppress(zipfile.BadZipFile, OSError, ValueError),
              zipfile.ZipFile(io.BytesIO(data)) as archive):
            return any(_has_eicar(archive.read(name), depth + 1)
                       for name in archive.namelist())
    for block in _BASE64_BLOCK.findall(data):
        with contextlib.suppress(ValueError):
            if _has_eicar(base64.b64decode(b"".join(block.split())), depth + 1):
                return True
    return False


class PatternScanner:
    """EICAR (also base64-encoded, also zipped) is a virus, GTUBE is spam; FAIL_MARKER makes
    the scan raise, SLOW_MARKER makes it take `slow` seconds. Counts its scans."""

    def __init__(self, slow: float = 3.0) -> None:
        self.slow = slow
        self.scans = 0
        self.sizes: list[int] = []

    async def scan(self, content: bytes) -> ScanResult:
        self.scans += 1
        self.sizes.append(len(content))
        if FAIL_MARKER in content:
            raise ConnectionError("scanner unreachable")
        if SLOW_MARKER in content:
            await asyncio.sleep(self.slow)
        if _has_eicar(content):
            return ScanResult("virus", virus="Eicar-Test-Signature", scanners=("pattern",))
        if GTUBE in content:
            return ScanResult("spam", score=1000.0, threshold=5.0, rules=("GTUBE",),
                              scanners=("pattern",))
        return ScanResult("clean", scanners=("pattern",))


def message(subject: str, body: bytes = b"Hello.\r\n", *, trace: int = 2,
            extra_headers: bytes = b"") -> bytes:
    """A CRLF message with `trace` Received fields on top."""
    received = b"".join(
        b"Received: from relay%d.example.org (relay%d.example.org [192.0.2.%d])\r\n"
        b"\tby mx.example.net with ESMTP id ABC%d; Mon, 1 Jan 2024 00:00:0%d +0000\r\n"
        % (i, i, i, i, i) for i in range(trace))
    return (b"Return-Path: <alice@example.org>\r\n" + received
            + b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
            + b"Subject: " + subject.encode() + b"\r\n"
            + b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            + b"Message-ID: <" + hashlib.md5(subject.encode()).hexdigest().encode()
            + b"@example.org>\r\n" + extra_headers + b"\r\n" + body)


def attachment_message(subject: str, name: str, mime_type: str, data: bytes) -> bytes:
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    body = (b"--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
            b"--b1\r\nContent-Type: " + mime_type.encode() + b"; name=" + name.encode()
            + b"\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=" + name.encode() + b"\r\n\r\n"
            + encoded + b"--b1--\r\n")
    return message(subject, body, extra_headers=(
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n"))


def eicar_message() -> bytes:
    """The EICAR test file attached as it is (clamd's hash signature matches the file)."""
    return attachment_message("invoice", "eicar.com", "application/octet-stream", EICAR)


def zipped_eicar_message() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(zipfile.ZipInfo("eicar.com", (2024, 1, 1, 0, 0, 0)), EICAR)
    return attachment_message("zipped", "eicar.zip", "application/zip", buffer.getvalue())


# --- a scripted POP3 server --------------------------------------------------------------------


def stuff(content: bytes) -> bytes:
    stuffed = content.replace(b"\n.", b"\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


@dataclass
class FakeServer:
    """Just enough POP3 (RFC 1939 + CAPA + STLS-less) for the loopback tests.

    `misbehave`: None, "garbage" (answers RETR with junk), "close-mid" (closes halfway through
    a RETR), "stall" (never finishes a RETR), "slow-body" (sends RETR content in pieces with
    `delay` between them), "endless" (the message, then more lines of content for as long as
    the reader takes them: a RETR response that never ends; `endless_sent` counts its octets).
    """

    messages: list[bytes]
    user: str = "bob"
    password: str = "secret"
    misbehave: str | None = None
    delay: float = 0.2
    deleted: set[int] = field(default_factory=set)
    commands: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None
    stop_stalling: asyncio.Event = field(default_factory=asyncio.Event)
    endless_sent: int = 0

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> FakeServer:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        self.stop_stalling.set()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    def uidl(self, number: int) -> bytes:
        return b"uid-%d-" % number + hashlib.md5(self.messages[number - 1]).hexdigest()[:8].encode()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK fake POP3 ready <1234.5678@fake.example>\r\n")
        authorized = False
        while True:
            line = await reader.readline()
            if not line:
                return
            self.commands.append(line)
            verb, _, argument = line.strip().partition(b" ")
            verb = verb.upper()
            if verb == b"CAPA":
                writer.write(b"+OK\r\nTOP\r\nUIDL\r\nUSER\r\nPIPELINING\r\nSASL PLAIN\r\n.\r\n")
            elif verb == b"USER":
                writer.write(b"+OK\r\n")
            elif verb == b"PASS":
                authorized = argument.decode() == self.password
                writer.write(b"+OK logged in\r\n" if authorized else b"-ERR [AUTH] no\r\n")
            elif verb == b"AUTH" and argument.upper().startswith(b"PLAIN"):
                writer.write(b"+ \r\n")
                response = await reader.readline()
                decoded = base64.b64decode(response.strip())
                authorized = decoded.split(b"\0")[2] == self.password.encode()
                writer.write(b"+OK logged in\r\n" if authorized else b"-ERR [AUTH] no\r\n")
            elif verb == b"QUIT":
                writer.write(b"+OK bye\r\n")
                await writer.drain()
                return
            elif not authorized:
                writer.write(b"-ERR not logged in\r\n")
            elif verb == b"STAT":
                live = [m for i, m in enumerate(self.messages, 1) if i not in self.deleted]
                writer.write(b"+OK %d %d\r\n" % (len(live), sum(map(len, live))))
            elif verb in (b"LIST", b"UIDL") and not argument:
                writer.write(b"+OK\r\n")
                for i, content in enumerate(self.messages, 1):
                    if i not in self.deleted:
                        value = b"%d" % len(content) if verb == b"LIST" else self.uidl(i)
                        writer.write(b"%d %s\r\n" % (i, value))
                writer.write(b".\r\n")
            elif verb in (b"LIST", b"UIDL"):
                i = int(argument)
                if not 1 <= i <= len(self.messages) or i in self.deleted:
                    writer.write(b"-ERR no such message\r\n")
                    continue
                value = b"%d" % len(self.messages[i - 1]) if verb == b"LIST" else self.uidl(i)
                writer.write(b"+OK %d %s\r\n" % (i, value))
            elif verb == b"DELE":
                self.deleted.add(int(argument))
                writer.write(b"+OK deleted\r\n")
            elif verb == b"NOOP":
                writer.write(b"+OK\r\n")
            elif verb == b"RSET":
                self.deleted.clear()
                writer.write(b"+OK\r\n")
            elif verb in (b"RETR", b"TOP"):
                args = argument.split()
                number = int(args[0])
                if not 1 <= number <= len(self.messages) or number in self.deleted:
                    writer.write(b"-ERR no such message\r\n")
                    continue
                content = self.messages[number - 1]
                if verb == b"TOP":
                    header, sep, body = content.partition(b"\r\n\r\n")
                    lines = body.removesuffix(b"\r\n").split(b"\r\n") if body else []
                    lines = lines[: int(args[1])]
                    content = header + sep + b"".join(line + b"\r\n" for line in lines)
                    if self.misbehave == "top-differs":
                        content = b"X-Top: a field only TOP shows\r\n" + content
                await self._send_message(writer, content)
            else:
                writer.write(b"-ERR unknown command\r\n")
            await writer.drain()

    async def _send_message(self, writer: asyncio.StreamWriter, content: bytes) -> None:
        if self.misbehave == "garbage":
            writer.write(b"HELLO? \x00\xff garbage\r\n")
            return
        writer.write(b"+OK %d octets\r\n" % len(content))
        stuffed = stuff(content)
        if self.misbehave == "close-mid":
            writer.write(stuffed[: len(stuffed) // 2])
            await writer.drain()
            writer.transport.abort()
            raise ConnectionError("closed on purpose")
        if self.misbehave == "stall":
            writer.write(stuffed[: len(stuffed) // 2])
            await writer.drain()
            await self.stop_stalling.wait()
            return
        if self.misbehave == "endless":
            writer.write(stuffed)
            piece = b"endless line of content, never followed by the final dot\r\n" * 1000
            while not (self.stop_stalling.is_set() or writer.transport.is_closing()):
                writer.write(piece)
                self.endless_sent += len(piece)
                await writer.drain()
            return
        if self.misbehave == "slow-body":
            step = max(1, len(stuffed) // 4)
            for start in range(0, len(stuffed), step):
                writer.write(stuffed[start:start + step])
                await writer.drain()
                await asyncio.sleep(self.delay)
        else:
            writer.write(stuffed)
        writer.write(b".\r\n" if stuffed.endswith(b"\r\n") else b"\r\n.\r\n")
