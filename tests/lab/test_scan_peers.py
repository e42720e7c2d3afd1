"""The scanner clients against the REAL clamd and rspamd, where the unit tier had fakes.

Both run in the gateway of one lab, on its loopback; the clients run there too (in_netns), so
`ss` in the gateway sees every connection a client makes, and the daemons' own logs name the
client's port.

clamd (TCP, ReadTimeout 2 s, StreamMaxLength 1M): many scans share one IDSESSION; a session
clamd ends (restart, ReadTimeout) costs the next scan nothing but a new connection; its
size-limit ERROR ends the session; a clamd that stops answering (SIGSTOP) is a timeout.

rspamd (normal worker): it never keeps a connection for a second request, whatever the client
asks, so the client opens one per message (why proxies/scan/rspamd.py has no keep-alive and no
chunked decoding); an rspamd that stops answering is a timeout.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from netsetup.lab.peers._common import connect, in_netns, wait_until
from netsetup.lab.peers.clamd import EICAR, EICAR_FOUND, Clamd, ClamdInstance
from netsetup.lab.peers.rspamd import GTUBE, Rspamd, RspamdInstance
from netsetup.lab.topology import Lab
from proxies.scan.api import ScanResult
from proxies.scan.clamd import ClamdClient
from proxies.scan.clamdconf import limit_warnings
from proxies.scan.config import ScannerConfig, SocketAddress
from proxies.scan.rspamd import RspamdClient
from tests.unit.scan_messages import plain, with_attachments, zipped

T = TypeVar("T")
CLAMD_PORT = 3310
RSPAMD_PORT = 11333
READ_TIMEOUT = 2  # clamd's ReadTimeout: an IDSESSION with no command for this long is ended
STREAM_MAX = 1024 * 1024  # clamd's StreamMaxLength
MAX_FILE = 512 * 1024  # clamd's MaxFileSize


@dataclass
class Peers:
    lab: Lab
    clamd: ClamdInstance
    rspamd: RspamdInstance


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    base = tmp_path_factory.mktemp("scan-peers")
    lab = Lab("router", name=f"scp{secrets.token_hex(2)}")
    try:
        lab.up()
        clamd = Clamd.start(lab, lab.gateway, base / "clamd", tcp=("127.0.0.1", CLAMD_PORT),
                            stream_max_length=str(STREAM_MAX), read_timeout=READ_TIMEOUT,
                            max_file_size=str(MAX_FILE))
        rspamd = Rspamd.start(lab, lab.gateway, base / "rspamd", port=RSPAMD_PORT)
        yield Peers(lab, clamd, rspamd)
        rspamd.stop()
        clamd.stop()
    finally:
        lab.down()


def in_gateway(peers: Peers, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a client's event loop in a thread inside the gateway, where the daemons listen."""
    return in_netns(peers.lab.gateway, lambda: asyncio.run(main()))


def scanner(port: int, timeout: float = 10.0) -> ScannerConfig:
    return ScannerConfig(SocketAddress(host="127.0.0.1", port=port), timeout=timeout,
                         max_size=25 * 1024 * 1024, concurrency=2)


def client_sockets(peers: Peers, port: int) -> list[tuple[str, int]]:
    """(state, local port) of every client socket in the gateway connected to `port`."""
    out = peers.lab.run(peers.lab.gateway, ["ss", "-Htan", f"( dport = :{port} )"]).stdout
    return [(fields[0], int(fields[3].rpartition(":")[2]))
            for fields in (line.split() for line in out.splitlines()) if len(fields) >= 5]


async def left_open(peers: Peers, port: int, states: tuple[str, ...] = ("ESTAB", "CLOSE-WAIT")
                    ) -> list[tuple[str, int]]:
    """The client's sockets to `port` still in `states`, once there are none or after a
    second: a connection the client closes is closed on its loop's next turns."""
    deadline = time.monotonic() + 1.0
    while True:
        left = [s for s in client_sockets(peers, port) if s[0] in states]
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.02)


def sessions(peers: Peers) -> list[int]:
    """Local ports of the client's established connections to clamd."""
    return sorted(p for state, p in client_sockets(peers, CLAMD_PORT) if state == "ESTAB")


def found_on(peers: Peers) -> list[int]:
    """Client ports clamd's log names for each EICAR it found: `instream(127.0.0.1@PORT)`."""
    return [int(port) for port in re.findall(rf"instream\(127\.0\.0\.1@(\d+)\): {EICAR_FOUND}",
                                             peers.clamd.log_path.read_text())]


def verdict(result: ScanResult) -> str:
    return result.virus or result.reason or result.verdict


@dataclass
class Step:
    """One scan: the client's sockets to clamd before it, its verdict, its sessions after."""

    before: list[tuple[str, int]]
    result: str
    after: list[int]


CLEAN = plain(subject="clean", body="Nothing to see.\r\n")
ATTACHED = with_attachments(("eicar.com", EICAR, "application/octet-stream"))
ZIPPED = with_attachments(("eicar.zip", zipped(("eicar.com", EICAR)), "application/zip"))
LONG = plain(subject="long", body="A line of a long message.\r\n" * 8000)  # 4 INSTREAM chunks


# --- clamd ----------------------------------------------------------------------------------


def test_clamd_carries_many_scans_over_one_session(peers: Peers) -> None:
    found_before = len(found_on(peers))
    messages = [(CLEAN, "clean"), (ATTACHED, EICAR_FOUND), (LONG, "clean"),
                (ZIPPED, EICAR_FOUND), (CLEAN, "clean")]

    async def main() -> tuple[list[list[int]], list[str], list[int]]:
        client = ClamdClient(scanner(CLAMD_PORT))
        try:
            seen = []
            for content, expected in messages:
                assert verdict(await client.scan(content)) == expected
                seen.append(sessions(peers))
            # Two at a time (the client's concurrency): a second session, and no third.
            batch = await asyncio.gather(*(client.scan(c) for c in (ATTACHED, CLEAN, ZIPPED,
                                                                     LONG, CLEAN, ATTACHED)))
            return seen, [verdict(r) for r in batch], sessions(peers)
        finally:
            client.close()

    seen, batch, after_batch = in_gateway(peers, main)
    # After every scan one connection, the same one: a session carried all five.
    port = seen[0][0]
    assert seen == [[port]] * len(messages), seen
    assert batch == [EICAR_FOUND, "clean", EICAR_FOUND, "clean", "clean", EICAR_FOUND]
    assert len(after_batch) == 2 and port in after_batch, after_batch
    # clamd's own log: each EICAR was found on one of those connections.
    found = found_on(peers)[found_before:]
    assert found[:2] == [port, port] and set(found[2:]) <= set(after_batch), found
    assert len(found) == 5
    # close() ends the sessions.
    wait_until(lambda: not sessions(peers), "client sessions closed", 5)


def test_clamd_ends_a_session_and_the_next_scan_opens_another(peers: Peers) -> None:
    """Three ways a pooled session is gone by the time the next scan wants it: clamd restarts
    while the client waits (the client sees the close at once); clamd ends it for ReadTimeout
    while the client is busy (its loop blocked: the close waits unread), and the write of the
    next scan meets clamd's reset; the same, with clamd's resets not coming back (dropped in
    the gateway, as from a clamd across a network whose reset comes after we have read its
    close), so the read ends with clamd's notice. Each time: the right verdict, on a new
    session."""
    drop_resets = ["nft", "add", "rule", "inet", "scptest", "in", "tcp", "sport",
                   str(CLAMD_PORT), "tcp", "flags", "&", "rst", "==", "rst", "drop"]

    def restart() -> None:
        peers.clamd.stop()
        peers.clamd.start()

    async def main() -> list[Step]:
        client = ClamdClient(scanner(CLAMD_PORT))

        async def step(content: bytes) -> Step:
            before = client_sockets(peers, CLAMD_PORT)
            result = verdict(await client.scan(content))
            return Step(before, result, sessions(peers))

        try:
            steps = [await step(CLEAN)]
            await asyncio.to_thread(restart)  # the loop runs on meanwhile
            steps.append(await step(ATTACHED))
            time.sleep(READ_TIMEOUT + 1)  # blocking: the loop does not see clamd's close
            steps.append(await step(ZIPPED))
            lab, gateway = peers.lab, peers.lab.gateway
            lab.run(gateway, ["nft", "add", "table", "inet", "scptest"])
            try:
                lab.run(gateway, ["nft", "add", "chain", "inet", "scptest", "in",
                                  "{ type filter hook input priority 0; }"])
                lab.run(gateway, drop_resets)
                time.sleep(READ_TIMEOUT + 1)
                steps.append(await step(ATTACHED))
            finally:
                lab.run(gateway, ["nft", "delete", "table", "inet", "scptest"], check=False)
            return steps
        finally:
            client.close()

    started = time.monotonic()
    first, restarted, timed_out, timed_out_unreset = in_gateway(peers, main)
    assert time.monotonic() - started < 20
    assert first.result == "clean" and len(first.after) == 1
    for previous, step in ((first, restarted), (restarted, timed_out),
                           (timed_out, timed_out_unreset)):
        assert step.result == EICAR_FOUND, step
        assert len(step.after) == 1 and step.after != previous.after, (previous, step)
    # Before each timed-out step clamd had ended the old session: our end of it was left.
    for previous, step in ((restarted, timed_out), (timed_out, timed_out_unreset)):
        assert ("CLOSE-WAIT", previous.after[0]) in step.before, step


def test_clamd_size_limit_error_ends_the_session(peers: Peers) -> None:
    big = b"x" * (2 * STREAM_MAX)

    async def main() -> tuple[list[int], ScanResult, list[int], str, list[int]]:
        client = ClamdClient(scanner(CLAMD_PORT))
        try:
            assert verdict(await client.scan(CLEAN)) == "clean"
            first = sessions(peers)
            over = await client.scan(big)
            await asyncio.sleep(0.2)
            after = sessions(peers)
            again = verdict(await client.scan(ATTACHED))
            return first, over, after, again, sessions(peers)
        finally:
            client.close()

    first, over, after, again, last = in_gateway(peers, main)
    assert over.verdict == "failed" and over.oversize, over
    assert over.reason == "clamd: INSTREAM size limit exceeded"
    assert over.output == ("clamd: INSTREAM size limit exceeded. ERROR",)
    assert len(first) == 1 and after == []  # the session is over on both sides
    assert again == EICAR_FOUND and len(last) == 1 and last != first


def test_clamd_passes_what_is_over_its_max_file_size_and_config_check_says_so(
        peers: Peers) -> None:
    """clamd does not read past MaxFileSize and answers OK: a virus in a message between it
    and [scan] max_size would pass as clean. What mailgate's check warns of, from this
    clamd's own clamd.conf."""
    padded = with_attachments(("eicar.com", EICAR, "application/octet-stream"),
                              ("padding.txt", b"x" * MAX_FILE, "text/plain"))
    assert MAX_FILE < len(padded) < STREAM_MAX

    async def main() -> list[str]:
        client = ClamdClient(scanner(CLAMD_PORT))
        try:
            return [verdict(await client.scan(content)) for content in (ATTACHED, padded)]
        finally:
            client.close()

    assert in_gateway(peers, main) == [EICAR_FOUND, "clean"]
    (warning,) = [w for w in limit_warnings(peers.clamd.socket_path, STREAM_MAX,
                                            peers.clamd.conf_path) if "MaxFileSize" in w]
    assert warning.startswith(f"{peers.clamd.conf_path}: MaxFileSize 512K is below [scan] "
                              "max_size 1M: ") and "would pass as clean" in warning
    assert limit_warnings(peers.clamd.socket_path, MAX_FILE, peers.clamd.conf_path) == []


def test_clamd_that_stops_answering_is_a_timeout(peers: Peers) -> None:
    process = peers.clamd.process
    assert process is not None

    async def main() -> tuple[ScanResult, float, list[tuple[str, int]], str]:
        client = ClamdClient(scanner(CLAMD_PORT, timeout=1.0))
        try:
            assert verdict(await client.scan(CLEAN)) == "clean"
            process.send_signal(signal.SIGSTOP)  # its sockets stay open; nobody reads them
            try:
                started = time.monotonic()
                silent = await client.scan(ATTACHED)
                took = time.monotonic() - started
                # The session waits one more timeout for clamd's answer (holding its scan
                # slot, as clamd may still be scanning), then is given up.
                await asyncio.sleep(1.0)
                left = await left_open(peers, CLAMD_PORT, ("ESTAB",))
            finally:
                process.send_signal(signal.SIGCONT)
            return silent, took, left, verdict(await client.scan(ATTACHED))
        finally:
            client.close()

    silent, took, left, again = in_gateway(peers, main)
    assert silent.verdict == "failed" and silent.timed_out, silent
    assert silent.reason == "clamd: no answer within 1 s"
    assert 1.0 <= took < 2.5, took  # the timeout, not more
    assert left == []  # the client gave that session up, one timeout later
    assert again == EICAR_FOUND


async def streamed(client: ClamdClient, content: bytes, piece: int,
                   pause: float = 0.0) -> tuple[ScanResult, bool]:
    """`content` through a clamd stream in pieces of `piece` bytes (after half of them, a
    pause with the loop running); the verdict, and whether it was still streaming at the end."""
    stream = client.stream()
    assert stream is not None
    pieces = [content[start:start + piece] for start in range(0, len(content), piece)]
    for number, data in enumerate(pieces):
        stream.feed(data)
        await asyncio.sleep(0)  # the stream writes as the pieces come
        if pause and number == len(pieces) // 2:
            await asyncio.sleep(pause)
    return await stream.finish(content), stream.streaming


def test_clamd_stream_fed_in_pieces_finds_what_a_whole_scan_finds(peers: Peers) -> None:
    """The POP3 proxy's streaming scan: EICAR split over pieces (7 bytes each, and clamd's
    64 KiB chunks for the long one) is still found, and streams ride the pooled session as
    whole scans do."""
    found_before = len(found_on(peers))

    async def main() -> tuple[list[tuple[str, bool]], list[list[int]]]:
        client = ClamdClient(scanner(CLAMD_PORT))
        try:
            got, seen = [], []
            for content, piece in ((CLEAN, 7), (ATTACHED, 7), (LONG, 50_000),
                                   (ZIPPED, 1000), (ATTACHED + LONG, 30_000)):
                result, streaming = await streamed(client, content, piece)
                got.append((verdict(result), streaming))
                seen.append(sessions(peers))
            assert verdict(await client.scan(CLEAN)) == "clean"
            seen.append(sessions(peers))
            return got, seen
        finally:
            client.close()

    got, seen = in_gateway(peers, main)
    assert got == [("clean", True), (EICAR_FOUND, True), ("clean", True),
                   (EICAR_FOUND, True), (EICAR_FOUND, True)]
    assert seen == [seen[0]] * len(seen) and len(seen[0]) == 1, seen  # one session for all
    assert found_on(peers)[found_before:] == seen[0] * 3  # clamd found them on it


def test_clamd_stream_that_clamd_ends_midway_is_scanned_whole(peers: Peers) -> None:
    """Two ways a stream breaks before its end: clamd ends it for ReadTimeout while the server
    pauses; clamd refuses it past StreamMaxLength. The first still gets its verdict (a whole
    scan, on a new session); the second is over the scan limit, as a whole scan says."""

    async def main() -> tuple[tuple[ScanResult, bool], list[int], tuple[ScanResult, bool],
                              list[int]]:
        client = ClamdClient(scanner(CLAMD_PORT))
        try:
            assert verdict(await client.scan(CLEAN)) == "clean"
            before = sessions(peers)
            paused = await streamed(client, ATTACHED + LONG, 20_000, pause=READ_TIMEOUT + 1)
            after = sessions(peers)
            over = await streamed(client, b"x" * (2 * STREAM_MAX), 65536)
            return paused, [*before, *after], over, sessions(peers)
        finally:
            client.close()

    (paused, paused_streaming), ports, (over, _), last = in_gateway(peers, main)
    assert verdict(paused) == EICAR_FOUND and not paused_streaming
    assert len(ports) == 2 and ports[0] != ports[1], ports
    assert over.verdict == "failed" and over.oversize, over
    assert over.reason == "clamd: INSTREAM size limit exceeded"
    assert len(last) <= 1


# --- rspamd ---------------------------------------------------------------------------------


def test_rspamd_answers_once_per_connection(peers: Peers) -> None:
    """What rspamd does with a client that asks to keep the connection (HTTP/1.1, `Connection:
    keep-alive`): it says `Connection: close`, frames the body with Content-Length, and closes.
    So our client opens one connection per message, and rspamd's log shows each."""
    spam, ham = plain(subject="buy", body=GTUBE.decode() + "\r\n"), plain(subject="hello")
    for message in (ham, spam):
        with connect(peers.lab.gateway, "127.0.0.1", RSPAMD_PORT, timeout=10) as sock:
            sock.sendall(b"POST /checkv2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n"
                         b"Connection: keep-alive\r\n\r\n%s" % (len(message), message))
            sock.settimeout(3)
            reply, ended = b"", False
            try:
                while part := sock.recv(65536):
                    reply += part
                ended = True  # recv returned b"": rspamd closed the connection
            except TimeoutError:
                pass  # still open after 3 s
        head, _, body = reply.partition(b"\r\n\r\n")
        fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert fields[b"connection"] == b"close", head
        assert b"transfer-encoding" not in fields and int(fields[b"content-length"]) == len(body)
        assert ended, "rspamd kept the connection open: proxies/scan/rspamd.py could reuse it"

    accepted_before = len(accepted_ports(peers))

    async def main() -> tuple[list[ScanResult], list[list[tuple[str, int]]]]:
        client = RspamdClient(scanner(RSPAMD_PORT, timeout=20))
        try:
            results, left = [], []
            for message in (spam, ham, spam):
                results.append(await client.scan(message))
                left.append(await left_open(peers, RSPAMD_PORT))
            return results, left
        finally:
            client.close()

    results, left = in_gateway(peers, main)
    assert [r.verdict for r in results] == ["spam", "clean", "spam"], results
    assert "GTUBE" in results[0].rules and "GTUBE" in results[2].rules
    assert left == [[], [], []]  # nothing kept open between messages
    ports = accepted_ports(peers)[accepted_before:]
    assert len(ports) == 3 and len(set(ports)) == 3, ports  # a connection per message


def accepted_ports(peers: Peers) -> list[int]:
    """Client ports of the requests rspamd's normal worker logged."""
    return [int(port) for port in re.findall(r"accepted connection from 127\.0\.0\.1 port (\d+)",
                                             peers.rspamd.log_path.read_text())]


def test_rspamd_that_stops_answering_is_a_timeout(peers: Peers) -> None:
    process = peers.rspamd.process
    assert process is not None

    async def main() -> tuple[ScanResult, float, list[tuple[str, int]], str]:
        client = RspamdClient(scanner(RSPAMD_PORT, timeout=1.0))
        # The main process and its workers share a process group (lab.spawn's session).
        os.killpg(process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            silent = await client.scan(plain(subject="hello"))
            took = time.monotonic() - started
            left = await left_open(peers, RSPAMD_PORT, ("ESTAB",))
        finally:
            os.killpg(process.pid, signal.SIGCONT)
        client = RspamdClient(scanner(RSPAMD_PORT, timeout=20))
        again = await client.scan(plain(subject="buy", body=GTUBE.decode() + "\r\n"))
        return silent, took, left, again.verdict

    silent, took, left, again = in_gateway(peers, main)
    assert silent.verdict == "failed" and silent.timed_out, silent
    assert silent.reason == "rspamd: no answer within 1 s"
    assert 1.0 <= took < 2.5, took  # the timeout, not more
    assert left == []
    assert again == "spam"
