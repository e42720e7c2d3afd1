"""Fuzzing the POP3 proxy's layer (proxies.pop3.layer): hostile clients, servers, scanners and
clocks, all at once, in any order.

An input is a script of steps, each one byte for the step and, for those that carry bytes, a
length byte and that many bytes: client or server bytes, an end of either stream, a lost
client, a connect, TLS, scan or quarantine result (right or for something nobody asked), a
client that stops or starts reading, time passing. The first byte picks the configuration (TLS
mode, scanning, scanning ahead, the cache). What must hold for any script: the layer never
crashes (no "internal error" close), says nothing once it has closed, closes with at most one
well-formed -ERR line for the client, and never sends the server a QUIT the client did not
send (RFC 1939 6: only the client's QUIT deletes messages).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxies.pop3.cache import ScanCache
from proxies.pop3.config import Pop3Config
from proxies.pop3.events import (
    CancelScan,
    ClientLost,
    ClientPaused,
    ClientReadable,
    ClientWritable,
    Close,
    Command_,
    Connected,
    ConnectFailed,
    Event,
    QuarantineDone,
    Scan,
    ScanData,
    ScanDone,
    SendServer,
    ServerReadable,
    StreamScan,
    Tick,
    TlsDone,
)
from proxies.pop3.layer import LayerSetup, Pop3Layer
from proxies.scan.api import ScanResult
from tests.fuzz import inputs
from tests.fuzz.harness import EXAMPLES, bounded, check_pop3_reply, corpus, fuzz_settings

TARGET = "pop3_layer"
COVERS = ("proxies/pop3/layer.py", "proxies/pop3/relay.py", "proxies/pop3/rewrite.py")
TOKENS = (b"+OK ", b"-ERR ", b"+ ", b".\r\n", b"\r\n..", b"RETR 1\r\n", b"AUTH PLAIN\r\n",
          b"USER a\r\n", b"PASS b\r\n", b"CAPA\r\n", b"STLS\r\n", b"QUIT\r\n", b"\r\nSTLS\r\n")

CLIENT, SERVER, CLIENT_EOF, SERVER_EOF, CONNECTED, CONNECT_FAILED, TIME, PAUSED, WRITABLE, \
    LOST, SCANNED, STORED, TLS = range(13)
STEPS = 13
CARRIES_BYTES = (CLIENT, SERVER)
VERDICTS = (ScanResult("clean"), ScanResult("spam", score=9.0, threshold=5.0),
            ScanResult("virus", virus="Eicar-Test-Signature"),
            ScanResult("failed", reason="clamd: gone"), ScanResult("failed", oversize=True))
TLS_MODES = ("terminate", "passthrough", "strip")


def layer_for(choice: int) -> Pop3Layer:
    config = replace(Pop3Config(), tls=TLS_MODES[choice % 3],
                     scan_ahead=("off", "top", "retr")[(choice >> 2) % 3],
                     max_scan_size=4096, keepalive_after=5.0, keepalive_interval=5.0)
    return Pop3Layer(LayerSetup(
        config=config, ident=1, client=("192.0.2.1", 1), destination=("198.51.100.1", 110),
        cache=ScanCache(3600.0 if choice & 8 else 0.0), hostname="gw.example",
        scanning=bool(choice & 16 or not choice & 32), quarantining=bool(choice & 64),
        our_certificate=bool(choice & 128), streaming=bool(choice & 2)))


def steps(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    index = 1
    while index < len(data):
        step = data[index] % STEPS
        index += 1
        payload = b""
        if step in CARRIES_BYTES or step in (TIME, SCANNED, STORED, TLS):
            size = data[index] if index < len(data) else 0
            payload = data[index + 1:index + 1 + size]
            index += 1 + size
        out.append((step, payload))
    return out


def run(data: bytes) -> None:
    EXAMPLES[TARGET] += 1
    layer = layer_for(data[0] if data else 0)
    now = 0.0
    client_lines = bytearray()
    to_server = bytearray()
    scans: list[int] = []
    streams: dict[int, int] = {}  # open streaming scans: token -> bytes fed
    closed = False

    def apply(commands: list[Command_]) -> None:
        nonlocal closed
        for command in commands:
            assert not closed, f"{command} after the close"
            if isinstance(command, SendServer):
                to_server.extend(command.data)
            elif isinstance(command, StreamScan):
                assert command.token not in streams and command.token not in scans
                streams[command.token] = 0
            elif isinstance(command, ScanData):
                assert command.token in streams, f"{command} for no open stream"
                streams[command.token] += len(command.data)
            elif isinstance(command, Scan):
                if command.token in streams:  # its end: the whole of what was fed
                    assert len(command.content) == streams.pop(command.token)
                scans.append(command.token)
            elif isinstance(command, CancelScan):
                streams.pop(command.token, None)
            elif isinstance(command, Close):
                assert command.error != "internal error"
                if command.reply is not None:
                    check_pop3_reply(command.reply)
                closed = True
        if layer.waiting == "flush" and not layer.client_paused and not closed:
            apply(layer.handle(ClientWritable(), now))

    def event(what: Event) -> None:
        commands = layer.handle(what, now)
        if closed:
            assert commands == [], commands
        apply(commands)

    apply(layer.start(now))
    for step, payload in steps(data):
        if step == CLIENT:
            client_lines.extend(payload)
            layer.client.receive_data(payload)
            event(ClientReadable())
        elif step == SERVER:
            layer.server.receive_data(payload)
            event(ServerReadable())
        elif step == CLIENT_EOF:
            layer.client.receive_data(b"")
            event(ClientReadable())
        elif step == SERVER_EOF:
            layer.server.receive_data(b"")
            event(ServerReadable())
        elif step == CONNECTED:
            event(Connected())
        elif step == CONNECT_FAILED:
            event(ConnectFailed("Connection refused"))
        elif step == TIME:
            now += (payload[0] if payload else 1) * 3.0
            event(Tick())
        elif step == PAUSED:
            event(ClientPaused())
        elif step == WRITABLE:
            event(ClientWritable())
        elif step == LOST:
            event(ClientLost())
        elif step == SCANNED:
            pick = payload[0] if payload else 0
            token = scans[-1 - pick % len(scans)] if scans and pick < 200 else 999
            event(ScanDone(VERDICTS[pick % len(VERDICTS)], token))
        elif step == STORED:
            event(QuarantineDone("q-1" if payload[:1] != b"\0" else None))
        elif step == TLS:
            side = "client" if payload[:1] == b"c" else "server"
            event(TlsDone(side, None if len(payload) < 2 else "handshake failed"))
    sent = {bytes(line.strip().upper()) for line in client_lines.split(b"\n")}
    for line in to_server.split(b"\n"):
        if line.strip().upper().startswith(b"QUIT"):
            assert bytes(line.strip().upper()) in sent, "a QUIT the client did not send"


def encode(script: list[tuple[int, bytes]], choice: int) -> bytes:
    out = bytearray([choice])
    for step, payload in script:
        out.append(step)
        if step in CARRIES_BYTES or step in (TIME, SCANNED, STORED, TLS):
            out.append(len(payload))
            out.extend(payload)
    return bytes(out)


CLIENT_LINES = (b"USER alice\r\n", b"PASS secret\r\n", b"APOP alice 0123456789abcdef\r\n",
                b"AUTH PLAIN\r\n", b"AGFsaWNlAHNlY3JldA==\r\n", b"*\r\n", b"STLS\r\n",
                b"CAPA\r\n", b"RETR 1\r\n", b"RETR 2\r\n", b"TOP 1 10\r\n", b"LIST\r\n",
                b"UIDL 1\r\n", b"DELE 1\r\n", b"NOOP\r\n", b"QUIT\r\n", b"XFOO\r\n", b"\r\n")
SERVER_LINES = (b"+OK ready <1.2@h>\r\n", b"+OK\r\n", b"-ERR no\r\n", b"+ \r\n",
                b"+OK 1 uid-1\r\n", b"+OK 2 300\r\n", b"+OK 300 octets\r\n",
                b"Subject: hi\r\n\r\nbody\r\n", b"..dotted\r\n", b".\r\n",
                b"STLS\r\nTOP\r\nUIDL\r\n.\r\n", b"X-Spam-Flag: NO\r\n")

steps_strategy = st.lists(st.one_of(
    st.tuples(st.just(CLIENT), st.lists(st.sampled_from(CLIENT_LINES), max_size=4).map(
        b"".join) | inputs.noise),
    st.tuples(st.just(SERVER), st.lists(st.sampled_from(SERVER_LINES), max_size=5).map(
        b"".join) | inputs.noise),
    st.tuples(st.sampled_from((CLIENT_EOF, SERVER_EOF, CONNECTED, CONNECT_FAILED, PAUSED,
                               WRITABLE, LOST)), st.just(b"")),
    st.tuples(st.sampled_from((TIME, SCANNED, STORED, TLS)), st.binary(min_size=1,
                                                                       max_size=2)),
), max_size=40)


@fuzz_settings(300)
@given(steps_strategy, st.integers(0, 255))
@example([(CONNECTED, b""), (SERVER, b"+OK hi\r\n"), (CLIENT, b"USER a\r\nPASS b\r\n"),
          (SERVER, b"+OK\r\n+OK\r\n"), (CLIENT, b"RETR 1\r\n"),
          (SERVER, b"+OK 30 octets\r\nSubject: x\r\n\r\nhi\r\n.\r\n"), (SCANNED, b"\x02"),
          (STORED, b"\x00"), (CLIENT, b"QUIT\r\n"), (SERVER, b"+OK bye\r\n")], 16)
def test_any_conversation(script: list[tuple[int, bytes]], choice: int) -> None:
    run(encode(script, choice))


@pytest.mark.parametrize("data", corpus(TARGET))
def test_corpus(data: bytes) -> None:
    with bounded():
        run(data)
