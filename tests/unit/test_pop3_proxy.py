"""The POP3 proxy over loopback, without interception: plain listeners, a given destination
(the scripted `FakeServer`), Python's poplib as the client. Real Dovecot, fetchmail, getmail
and interception are in tests/lab/test_pop3_lab.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import poplib
import socket
import tempfile
import threading
import time
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from proxies.pop3 import service as service_module
from proxies.pop3 import spool as spool_module
from proxies.pop3.config import Pop3Config
from proxies.pop3.service import Pop3Proxy, SharedQuarantine
from proxies.quarantine import Quarantine
from proxies.scan.api import ContentScanner, ScanResult
from tests.unit.test_pop3_support import (
    EICAR,
    FAIL_MARKER,
    GTUBE,
    SLOW_MARKER,
    FakeServer,
    PatternScanner,
    message,
    zipped_eicar_message,
)
from tests.unit.test_quarantine_store import broken_quarantine

T = TypeVar("T")
CONFIG = Pop3Config(enabled=True, server_timeout=2.0, keepalive_after=30.0)


def clean(n: int) -> bytes:
    return message(f"clean {n}", b"Line one.\r\n.leading dot\r\n..two dots\r\n\r\nend\r\n")


async def with_proxy(messages: list[bytes], client: Callable[[int], T], *,
                     config: Pop3Config = CONFIG, scanner: ContentScanner | None = None,
                     quarantine_dir: Path | None = None, quarantine: Quarantine | None = None,
                     misbehave: str | None = None,
                     check: Callable[[FakeServer, Pop3Proxy], Awaitable[None]] | None = None
                     ) -> T:
    server = await FakeServer(messages, misbehave=misbehave).start()
    if quarantine_dir is not None:
        quarantine = Quarantine(quarantine_dir)
    store = SharedQuarantine(quarantine) if quarantine is not None else None
    proxy = Pop3Proxy(config, scanner=scanner, quarantine=store,
                      spoof_source=False, families=(4,), transparent=False,
                      destination=("127.0.0.1", server.port))
    await proxy.start(port=0)
    try:
        result = await asyncio.to_thread(client, proxy.addresses[0][1])
        if check is not None:
            await check(server, proxy)
        return result
    finally:
        await proxy.stop(grace=1)
        await server.close()


def login(port: int, timeout: float = 10) -> poplib.POP3:
    pop = poplib.POP3("127.0.0.1", port, timeout=timeout)
    pop.user("bob")
    pop.pass_("secret")
    return pop


def retr(pop: poplib.POP3, number: int) -> bytes:
    _status, lines, _octets = pop.retr(number)
    return b"".join(line + b"\r\n" for line in lines)


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


# --- relaying ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scanner", [None, PatternScanner()], ids=["unscanned", "scanned"])
def test_clean_mail_and_listings_are_byte_identical(scanner: PatternScanner | None) -> None:
    messages = [clean(1), clean(2)]

    def client(port: int) -> dict[str, Any]:
        pop = login(port)
        out = {"welcome": pop.getwelcome(), "stat": pop.stat(), "list": pop.list()[1],
               "uidl": pop.uidl()[1], "uidl1": pop.uidl(1), "retr": retr(pop, 1),
               "top": pop.top(2, 1)[1], "noop": pop.noop(), "rset": pop.rset(),
               "dele": pop.dele(2)}
        pop.quit()
        return out

    async def check(server: FakeServer, proxy: Pop3Proxy) -> None:
        assert server.deleted == {2}

    out = run(with_proxy(messages, client, scanner=scanner, check=check))
    assert out["welcome"] == b"+OK fake POP3 ready <1234.5678@fake.example>"
    assert out["retr"] == messages[0]
    header, _, _body = messages[1].partition(b"\r\n\r\n")
    assert out["top"] == [*header.split(b"\r\n"), b"", b"Line one."]
    assert out["stat"] == (2, sum(map(len, messages)))
    assert out["list"] == [b"1 %d" % len(messages[0]), b"2 %d" % len(messages[1])]
    assert out["uidl1"].startswith(b"+OK 1 uid-1-")


def test_a_server_whose_top_differs_from_its_retr_is_not_fetched_ahead_again() -> None:
    """scan_ahead = "top" against a server whose TOP adds a field: the client still gets
    what RETR gives, and the proxy's later sessions no longer fetch ahead from that server."""
    messages = [clean(1), clean(2), clean(3)]

    def client(port: int) -> list[bytes]:
        got = []
        for numbers in ((1, 2), (1, 2, 3)):
            pop = login(port)
            got += [retr(pop, n) for n in numbers]
            pop.quit()
        return got

    async def check(server: FakeServer, proxy: Pop3Proxy) -> None:
        tops = [c for c in server.commands if c.startswith(b"TOP")]
        assert tops == [b"TOP 2 %d\r\n" % len(messages[1])]  # only in the first session
        assert proxy.context.no_peek == {("127.0.0.1", server.port)}

    config = dataclasses.replace(CONFIG, scan_ahead="top")
    got = run(with_proxy(messages, client, config=config, scanner=PatternScanner(),
                         misbehave="top-differs", check=check))
    assert got == [messages[0], messages[1], messages[0], messages[1], messages[2]]


def test_pipelined_commands_are_answered_in_order() -> None:
    messages = [clean(1), clean(2)]

    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"USER bob\r\nPASS secret\r\nSTAT\r\nRETR 1\r\nNOOP\r\nQUIT\r\n")
            data = b""
            while not data.endswith(b"+OK bye\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    data = run(with_proxy(messages, client, scanner=PatternScanner()))
    stuffed = messages[0].replace(b"\r\n.", b"\r\n..")
    assert data.endswith(b"+OK %d octets\r\n" % len(messages[0]) + stuffed
                         + b".\r\n+OK\r\n+OK bye\r\n"), data


def test_capa_keeps_pipelining_and_hides_stls_when_server_has_none() -> None:
    def client(port: int) -> list[bytes]:
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        _status, lines, _ = pop._longcmd("CAPA")  # type: ignore[attr-defined]
        pop.quit()
        return list(lines)

    lines = run(with_proxy([clean(1)], client))
    assert b"PIPELINING" in lines and b"STLS" not in lines


def test_auth_plain_is_relayed() -> None:
    def client(port: int) -> bytes:
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        pop._putcmd("AUTH PLAIN")  # type: ignore[attr-defined]
        assert pop._getline()[0] == b"+ "  # type: ignore[attr-defined]
        pop._putcmd(base64.b64encode(b"\0bob\0secret").decode())  # type: ignore[attr-defined]
        assert pop._getresp().startswith(b"+OK")  # type: ignore[attr-defined]
        content = retr(pop, 1)
        pop.quit()
        return content

    assert run(with_proxy([clean(1)], client, scanner=PatternScanner())) == clean(1)


def test_commands_in_the_wrong_state_are_refused_locally() -> None:
    def client(port: int) -> str:
        pop = poplib.POP3("127.0.0.1", port, timeout=10)
        try:
            pop.retr(1)
        except poplib.error_proto as exc:
            return str(exc)
        finally:
            pop.quit()
        return "no error"

    assert "not valid in the AUTHORIZATION state" in run(with_proxy([clean(1)], client))


# --- scanning ------------------------------------------------------------------------------------


def test_spam_is_tagged_virus_replaced_and_quarantined(tmp_path: Path) -> None:
    spam = message("cheap pills", b"Buy now.\r\n" + GTUBE + b"\r\n")
    virus = message("invoice", EICAR + b"\r\n")
    messages = [spam, virus, zipped_eicar_message()]
    scanner = PatternScanner()

    def client(port: int) -> list[bytes]:
        pop = login(port)
        got = [retr(pop, n) for n in (1, 2, 3)]
        got.append(b"\r\n".join(pop.top(2, 99999999)[1]) + b"\r\n")
        got.append(retr(pop, 2))  # again: remembered, not rescanned
        pop.quit()
        return got

    got = run(with_proxy(messages, client, scanner=scanner, quarantine_dir=tmp_path))
    tagged, notice, zipped, top, again = got
    assert b"X-Spam-Flag: YES\r\n" in tagged and b"Subject: [SPAM] cheap pills\r\n" in tagged
    assert tagged.endswith(b"\r\n\r\nBuy now.\r\n" + GTUBE + b"\r\n")
    assert tagged.startswith(spam[:spam.index(b"From:")])  # trace fields first, unchanged
    for replaced in (notice, zipped, top, again):
        assert EICAR not in replaced and b"UEsDB" not in replaced
        assert b"[VIRUS REMOVED]" in replaced and b"Eicar-Test-Signature" in replaced
        assert b"From: Alice <alice@example.org>\r\n" in replaced
        assert b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n" in replaced
    quarantine = Quarantine(tmp_path)
    entries = quarantine.list()
    assert len(entries) == 3  # RETR 2, RETR 3 and TOP 2 (a TOP is its own scan)
    assert {virus, zipped_eicar_message()} <= {quarantine.content(e.id) for e in entries}
    assert {e.source for e in entries} == {"pop3"} and entries[0].recipients == ("bob",)
    for entry in entries:
        assert entry.id.encode() in (notice + zipped + top)
    assert scanner.scans == 4  # the second RETR 2 came from the cache


def test_forged_spam_fields_are_removed() -> None:
    """The client's filter reads our X-Spam-Flag, not the sender's (as SMTP tagging has it:
    test_scan_filter.py)."""
    spam = message("cheap pills", b"Buy now.\r\n" + GTUBE + b"\r\n",
                   extra_headers=b"X-Spam-Flag: NO\r\nX-Spam-Status: No, score=-50\r\n")

    def client(port: int) -> bytes:
        pop = login(port)
        content = retr(pop, 1)
        pop.quit()
        return content

    tagged = run(with_proxy([spam], client, scanner=PatternScanner()))
    assert tagged.count(b"X-Spam-Flag:") == 1 and b"X-Spam-Flag: YES\r\n" in tagged
    assert tagged.count(b"X-Spam-Status:") == 1 and b"score=-50" not in tagged


def test_a_failed_quarantine_write_gives_err_and_leaves_the_message(tmp_path: Path) -> None:
    """No notice for an original that is kept nowhere: -ERR [SYS/TEMP], the session goes on,
    the message stays on the server (as SMTP answers 451: test_scan_filter.py)."""
    virus = message("invoice", EICAR + b"\r\n")

    def client(port: int) -> list[str]:
        pop = login(port)
        answers = []
        for _ in range(2):  # the second time too: a scan result cached must not yield a notice
            try:
                answers.append(retr(pop, 1).decode(errors="replace"))
            except poplib.error_proto as exc:
                answers.append(str(exc))
        answers.append(repr(pop.stat()))  # still there, the session still going
        pop.quit()
        return answers

    async def check(server: FakeServer, proxy: Pop3Proxy) -> None:
        assert server.deleted == set()

    scanner = PatternScanner()
    answers = run(with_proxy([virus], client, scanner=scanner, check=check,
                             quarantine=broken_quarantine(tmp_path / "q")))
    for answer in answers[:2]:
        assert "-ERR [SYS/TEMP]" in answer and "quarantine write failed" in answer, answer
    assert answers[2] == repr((1, len(virus)))
    assert scanner.scans == 1  # the verdict was remembered; only the write is retried


def test_scanner_failure_tempfails_and_leaves_the_message() -> None:
    broken = message("broken", FAIL_MARKER + b"\r\n")

    def client(port: int) -> str:
        pop = login(port)
        try:
            retr(pop, 1)
        except poplib.error_proto as exc:
            pop.quit()
            return str(exc)
        return "delivered"

    text = run(with_proxy([broken], client, scanner=PatternScanner()))
    assert "[SYS/TEMP]" in text and "scanner failed" in text


def test_scanner_failure_with_fail_mode_pass_adds_a_header() -> None:
    broken = message("broken", FAIL_MARKER + b"\r\n")
    config = dataclasses.replace(CONFIG, fail_mode="pass")

    def client(port: int) -> bytes:
        pop = login(port)
        content = retr(pop, 1)
        pop.quit()
        return content

    content = run(with_proxy([broken], client, scanner=PatternScanner(), config=config))
    assert b"X-Mailgate-Scan: unscanned; reason=scanner error: ConnectionError\r\n" in content
    assert content.endswith(FAIL_MARKER + b"\r\n")


class SpoolFiles:
    """The spool's files, seen where they are made: each is created already unlinked, so it is
    recorded with the folder it was made in and a second descriptor to read its size."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: list[tuple[str | None, int]] = []
        monkeypatch.setattr(spool_module, "tempfile",
                            types.SimpleNamespace(TemporaryFile=self._file))

    def _file(self, *args: Any, **kwargs: Any) -> Any:
        handle = tempfile.TemporaryFile(*args, **kwargs)  # noqa: SIM115 (the spool closes it)
        self.made.append((kwargs.get("dir"), os.dup(handle.fileno())))
        return handle

    def folders(self) -> list[str | None]:
        return [folder for folder, _fd in self.made]

    def sizes(self) -> list[int]:
        return [os.fstat(fd).st_size for _folder, fd in self.made]

    def close(self) -> None:
        for _folder, fd in self.made:
            os.close(fd)


def logged_messages(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "pop3_message"]


def test_oversize_passes_unscanned_and_big_messages_spool_to_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A message over spool_threshold waits on disk to be scanned; one over max_scan_size is
    relayed unscanned (oversize_action = "pass") once it passes the limit, so its spool never
    holds more than max_scan_size (it used to hold the whole message: see the endless test
    below for why it may not)."""
    medium = message("medium", (b"y" * 998 + b"\r\n") * 90)  # about 90 KB
    big = message("big", (b"x" * 998 + b"\r\n") * 300)  # about 300 KB
    config = dataclasses.replace(CONFIG, spool_threshold=64 * 1024, max_scan_size=100 * 1024,
                                 spool_dir=tmp_path)
    scanner = PatternScanner()
    spooled = SpoolFiles(monkeypatch)
    caplog.set_level(logging.INFO, logger="mailgate")

    def client(port: int) -> list[bytes]:
        pop = login(port)
        contents = [retr(pop, 1), retr(pop, 2)]
        pop.quit()
        return contents

    try:
        assert run(with_proxy([medium, big], client, scanner=scanner, config=config)) \
            == [medium, big]
        assert scanner.sizes == [len(medium)]  # the big one was never scanned
        # The medium message's file, in spool_dir, held it whole; any file the big one made
        # held no more than max_scan_size; nothing is left in the folder.
        assert set(spooled.folders()) == {str(tmp_path)}
        sizes = spooled.sizes()
        assert sizes[0] == len(medium), sizes
        assert all(size <= config.max_scan_size for size in sizes[1:]), sizes
        assert list(tmp_path.iterdir()) == []
    finally:
        spooled.close()
    first, second = logged_messages(caplog)
    assert first["spooled"] is True and first["verdict"] == "clean", first
    assert second["size"] == len(big) and second["verdict"] == "oversize", second
    assert second["action"] == "deliver", second


def _endless_client(port: int, wanted: int) -> tuple[bytes, bytes]:
    """RETR 1 from an endless server: the status line and the first `wanted` octets after it
    (or whatever came before the proxy closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"USER bob\r\nPASS secret\r\n")
        data = b""
        while data.count(b"\r\n") < 3:
            data += sock.recv(65536)
        sock.sendall(b"RETR 1\r\n")
        data = data.split(b"\r\n", 3)[3]
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        status, _, data = data.partition(b"\r\n")
        while len(data) < wanted:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
        return status, data


@pytest.mark.parametrize("spool_threshold", [64 * 1024, 8 * 1024 * 1024],
                         ids=["disk", "memory"])
def test_an_endless_response_is_relayed_unscanned_with_a_bounded_spool(
        spool_threshold: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A hostile server's RETR that never ends: past max_scan_size the proxy stops spooling and
    relays it as it comes (oversize_action = "pass"), so disk and memory stay bounded however
    long the client keeps reading."""
    first = clean(1)
    config = dataclasses.replace(CONFIG, spool_threshold=spool_threshold,
                                 max_scan_size=256 * 1024, spool_dir=tmp_path)
    scanner = PatternScanner()
    spooled = SpoolFiles(monkeypatch)
    caplog.set_level(logging.INFO, logger="mailgate")
    wanted = 16 * 1024 * 1024  # 64 times max_scan_size

    async def check(server: FakeServer, proxy: Pop3Proxy) -> None:
        assert server.endless_sent >= wanted
        server.stop_stalling.set()

    try:
        status, data = run(with_proxy([first], lambda port: _endless_client(port, wanted),
                                      scanner=scanner, config=config, misbehave="endless",
                                      check=check))
        assert status == b"+OK %d octets" % len(first)
        # Byte-identical as far as it went: the message, then the server's endless lines.
        assert data.startswith(first.replace(b"\r\n.", b"\r\n..") + b"endless line")
        assert len(data) >= wanted
        assert scanner.scans == 0
        assert all(size <= config.max_scan_size for size in spooled.sizes()), spooled.sizes()
        assert len(spooled.made) <= 1
    finally:
        spooled.close()
    assert list(tmp_path.iterdir()) == []


def test_an_endless_response_under_oversize_tempfail_ends_the_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """oversize_action = "tempfail": -ERR [SYS/TEMP] once max_scan_size is passed, and the
    session ends (the rest would have to be read to go on). No QUIT reaches the server, so
    the message stays there."""
    config = dataclasses.replace(CONFIG, spool_threshold=64 * 1024, max_scan_size=256 * 1024,
                                 spool_dir=tmp_path, oversize_action="tempfail")
    spooled = SpoolFiles(monkeypatch)
    caplog.set_level(logging.INFO, logger="mailgate")
    started = time.monotonic()

    async def check(server: FakeServer, proxy: Pop3Proxy) -> None:
        assert not any(c.upper().startswith(b"QUIT") for c in server.commands), server.commands
        assert server.deleted == set()

    try:
        status, rest = run(with_proxy([clean(1)], lambda port: _endless_client(port, 1),
                                      scanner=PatternScanner(), config=config,
                                      misbehave="endless", check=check))
        assert status == (b"-ERR [SYS/TEMP] message temporarily unavailable (message too "
                          b"large to scan), try again later")
        assert rest == b""  # and then the connection closed
        assert time.monotonic() - started < 5
        assert all(size <= config.max_scan_size for size in spooled.sizes()), spooled.sizes()
    finally:
        spooled.close()
    [logged] = logged_messages(caplog)
    assert logged["verdict"] == "oversize" and logged["action"] == "tempfail", logged


def test_slow_scan_keeps_the_client_alive_and_stays_byte_identical() -> None:
    slow = message("slow", SLOW_MARKER + b"\r\n", trace=3)
    after, interval, scan_seconds = 0.3, 0.2, 1.5
    config = dataclasses.replace(CONFIG, keepalive_after=after, keepalive_interval=interval)
    arrivals: list[tuple[float, bytes]] = []
    sent_at: list[float] = []

    class TimedScanner(PatternScanner):
        """The scan window as the proxy lived it: when the scan began and ended."""

        window: tuple[float, float] | None = None

        async def scan(self, content: bytes) -> ScanResult:
            began = time.monotonic()
            try:
                return await super().scan(content)
            finally:
                self.window = (began, time.monotonic())

    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sent_at.append(time.monotonic())
            sock.sendall(b"USER bob\r\nPASS secret\r\nRETR 1\r\nQUIT\r\n")
            data = b""
            while not data.endswith(b"+OK bye\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                arrivals.append((time.monotonic(), chunk))
                data += chunk
            return data

    scanner = TimedScanner(slow=scan_seconds)
    data = run(with_proxy([slow], client, scanner=scanner, config=config))
    status = b"+OK %d octets\r\n" % len(slow)
    assert data.endswith(status + slow + b".\r\n+OK bye\r\n")
    assert scanner.window is not None
    began, ended = scanner.window
    # When each byte of the stream arrived (however the recv() calls cut it).
    arrived: list[float] = []
    for when, chunk in arrivals:
        arrived += [when] * len(chunk)
    status_end = data.index(status) + len(status)  # offset of the message's first byte
    status_at = arrived[status_end - 1]
    # The status line was held back for `after`, then sent while the scan still ran ...
    assert status_at - sent_at[0] >= after, (status_at - sent_at[0])
    assert began < status_at < ended, (began, status_at, ended)
    # ... and then the message's first bytes (its trace fields), one per interval: those that
    # arrived before the verdict, no more than the keep-alive steps the window had room for.
    early = [when for when in arrived[status_end:] if when < ended]
    steps = 1 + int((ended - status_at) / interval)
    assert 3 <= len(early) <= steps + 1, (len(early), steps, arrivals)
    assert all(when >= status_at for when in early)
    # Spread over the window, not sent together at its end.
    assert early[-1] - early[0] >= (len(early) - 2) * interval * 0.5, early


# --- a misbehaving server -------------------------------------------------------------------------


@pytest.mark.parametrize("misbehave", ["garbage", "close-mid", "stall"])
@pytest.mark.parametrize("scanner", [None, PatternScanner()], ids=["unscanned", "scanned"])
def test_broken_server_gives_err_or_close_never_a_hang(misbehave: str,
                                                       scanner: PatternScanner | None) -> None:
    def client(port: int) -> str:
        pop = login(port)
        started = time.monotonic()
        try:
            retr(pop, 1)
        except (poplib.error_proto, OSError) as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        else:
            outcome = "delivered"
        assert time.monotonic() - started < 5
        return outcome

    async def check(server: FakeServer, proxy: Pop3Proxy) -> None:
        # The proxy is still up: a new session works (against a well-behaved server).
        server.misbehave = None
        server.stop_stalling.set()

        def again(port: int) -> bytes:
            pop = login(port)
            content = retr(pop, 1)
            pop.quit()
            return content

        assert await asyncio.to_thread(again, proxy.addresses[0][1]) == clean(1)

    outcome = run(with_proxy([clean(1)], client, scanner=scanner, misbehave=misbehave,
                             check=check))
    assert outcome != "delivered"
    if misbehave == "garbage" or scanner is not None:
        assert "[SYS/TEMP]" in outcome, outcome  # the status line was still held: -ERR


def test_connection_limit_per_client() -> None:
    config = dataclasses.replace(CONFIG, max_connections_per_client=1)

    def client(port: int) -> bytes:
        first = poplib.POP3("127.0.0.1", port, timeout=10)
        try:
            poplib.POP3("127.0.0.1", port, timeout=10)
        except poplib.error_proto as exc:
            first.quit()
            return exc.args[0]
        return b"accepted"

    assert b"[SYS/TEMP] too many connections" in run(with_proxy([clean(1)], client,
                                                                config=config))


def test_unreachable_server_gives_err() -> None:
    async def scenario() -> bytes:
        proxy = Pop3Proxy(CONFIG, scanner=None, quarantine=None, spoof_source=False,
                          families=(4,), transparent=False, destination=("127.0.0.1", 9))
        await proxy.start(port=0)
        try:
            def client(port: int) -> bytes:
                try:
                    poplib.POP3("127.0.0.1", port, timeout=10)
                except poplib.error_proto as exc:
                    return exc.args[0]
                return b"connected"

            return await asyncio.to_thread(client, proxy.addresses[0][1])
        finally:
            await proxy.stop(grace=1)

    assert run(scenario()) == b"-ERR [SYS/TEMP] cannot reach the mail server"


def test_a_client_that_pipelines_without_reading_is_held_back_not_buffered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands pipelined by a client that does not read the answers: once the answers waiting
    for it pass the client buffer (1 MiB; 64 KiB here, to keep the test short), the proxy
    stops taking commands and so stops reading, and what the client can push in is bounded
    by the socket buffers; when it reads, every answer comes, in order."""
    monkeypatch.setattr(service_module, "CLIENT_BUFFER", 64 * 1024)
    content = message("sixteen", (b"z" * 78 + b"\r\n") * 200)
    status = b"+OK %d octets\r\n" % len(content)
    # Long commands (the FakeServer ignores what follows the number) with long answers: the
    # buffers fill with a few hundred of them, not a hundred thousand.
    command = b"RETR 1 " + b"p" * 4000 + b"\r\n"
    offered = 60 * 1024 * 1024

    def client(port: int) -> tuple[int, int, int]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"USER bob\r\nPASS secret\r\n")
            flood = command * 100
            sent = 0
            sock.settimeout(1.0)
            with contextlib.suppress(TimeoutError):
                while sent < offered:
                    sent += sock.send(flood)
            sock.settimeout(30)
            commands = -(-sent // len(command))
            data = bytearray()

            def read_all() -> None:
                while not data.endswith(b"+OK bye\r\n"):
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        break
                    data.extend(chunk)

            # Now read, and (meanwhile: the proxy reads on only as the answers leave) finish
            # the last command and quit.
            reader = threading.Thread(target=read_all)
            reader.start()
            sock.sendall(command[sent % len(command):] + b"QUIT\r\n" if sent % len(command)
                         else b"QUIT\r\n")
            reader.join(30)
            return sent, commands, bytes(data).count(status + content)

    sent, commands, answered = run(with_proxy([content], client))
    assert sent < offered // 4, sent  # held back: nowhere near what was offered
    assert answered == commands, (answered, commands)  # each answered, whole, in order
