"""The queue file format, and queue ids.

One file per message, named by its queue id; the content is written once and never rewritten:

    mailgate-queue 1\\n                         magic and format version
    E <n>\\n <n bytes of JSON> \\n               envelope, with the initial delivery state
    C <n>\\n <n bytes of message content> \\n    the message exactly as it will be sent
    X <crc32 content> <crc32 envelope>\\n       end record: the file is complete
    S <n> <crc32>\\n <n bytes of JSON> \\n       zero or more: delivery state after an attempt

A file without a valid end record was never finished (Postfix's lesson: a queue file proves
it is complete). State records are appended after each attempt, each self-checking; the last
valid one wins, and a torn one at the end (a crash while appending) is ignored and cut off
before the next append, so an update either happened whole or not at all.

JSON is written with ensure_ascii, so addresses that are not valid UTF-8 (surrogate-escaped)
survive the round trip.

The envelope's JSON only grows by optional keys, so the format version stays 1 both ways: a
file without a key reads as its default (older files: no `verification`, no `verdict`), and a
reader that does not know a key ignores it. `verification` ({recipient: how}), `verdict` and
`crlf_only` are written only when they say something.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from proxies.queue.model import (
    CorruptQueueFile,
    DeliveryState,
    Envelope,
    RecipientState,
    RecipientStatus,
)

MAGIC = b"mailgate-queue 1\n"
_LEN_LINE = re.compile(rb"^([EC]) (\d{1,12})\n$")
_END_LINE = re.compile(rb"^X ([0-9a-f]{8}) ([0-9a-f]{8})\n$")
_STATE_LINE = re.compile(rb"^S (\d{1,9}) ([0-9a-f]{8})\n$")

# 13 hex digits of microseconds since 1970 (enough until 2112) then 8 random hex digits:
# ids sort by arrival, and two processes would have to pick the same 32 random bits in the
# same microsecond to collide (and even then the queue refuses to overwrite, see store.py).
QUEUE_ID = re.compile(r"^[0-9A-F]{21}$")


class IdGenerator:
    """Queue ids, strictly increasing within a process even if the clock stalls."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def new(self) -> str:
        with self._lock:
            micros = max(time.time_ns() // 1000, self._last + 1)
            self._last = micros
        return f"{micros:013X}{secrets.randbits(32):08X}"


def is_queue_id(name: str) -> bool:
    return bool(QUEUE_ID.match(name))


def id_time(queue_id: str) -> float:
    """The time a queue id was made (seconds since 1970)."""
    return int(queue_id[:13], 16) / 1e6


# --- encoding -------------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def state_to_json(state: DeliveryState) -> dict[str, Any]:
    return {
        "attempts": state.attempts,
        "next_attempt": state.next_attempt,
        "last_attempt": state.last_attempt,
        "last_error": state.last_error,
        "recipients": [
            {"address": r.address, "status": str(r.status), "code": r.code, "text": r.text,
             "remote_mta": r.remote_mta, "connected": r.connected, "expired": r.expired}
            for r in state.recipients
        ],
    }


def envelope_to_json(envelope: Envelope, state: DeliveryState) -> dict[str, Any]:
    data: dict[str, Any] = {
        "sender": envelope.sender,
        "recipients": list(envelope.recipients),
        "client_address": envelope.client_address,
        "client_port": envelope.client_port,
        "original_destination": list(envelope.original_destination)
        if envelope.original_destination else None,
        "helo": envelope.helo,
        "protocol": envelope.protocol,
        "smtputf8": envelope.smtputf8,
        "body_8bit": envelope.body_8bit,
        "tls": envelope.tls,
        "arrival": envelope.arrival,
        "state": state_to_json(state),
    }
    if envelope.verification:
        data["verification"] = dict(envelope.verification)
    if envelope.verdict:
        data["verdict"] = envelope.verdict
    if envelope.crlf_only:
        data["crlf_only"] = True
    return data


def initial_state(envelope: Envelope) -> DeliveryState:
    assert envelope.arrival is not None
    return DeliveryState(recipients=tuple(RecipientState(r) for r in envelope.recipients),
                         next_attempt=envelope.arrival)


def encode_message(envelope: Envelope, content: bytes) -> list[bytes]:
    """The buffers of a new queue file, for one writev()."""
    env = _dumps(envelope_to_json(envelope, initial_state(envelope)))
    return [
        MAGIC + b"E %d\n" % len(env),
        env,
        b"\nC %d\n" % len(content),
        content,
        b"\nX %08x %08x\n" % (zlib.crc32(content), zlib.crc32(env)),
    ]


def encode_state(state: DeliveryState) -> bytes:
    body = _dumps(state_to_json(state))
    return b"S %d %08x\n" % (len(body), zlib.crc32(body)) + body + b"\n"


# --- decoding -------------------------------------------------------------------------------


def _state_from_json(data: Mapping[str, Any]) -> DeliveryState:
    return DeliveryState(
        recipients=tuple(
            RecipientState(address=str(r["address"]), status=RecipientStatus(r["status"]),
                           code=r.get("code"), text=str(r.get("text") or ""),
                           remote_mta=r.get("remote_mta"),
                           connected=bool(r.get("connected", True)),
                           expired=bool(r.get("expired", False)))
            for r in data["recipients"]
        ),
        attempts=int(data["attempts"]),
        next_attempt=float(data["next_attempt"]),
        last_attempt=data.get("last_attempt"),
        last_error=data.get("last_error"),
    )


def _envelope_from_json(data: Mapping[str, Any]) -> Envelope:
    dest = data.get("original_destination")
    return Envelope(
        sender=str(data["sender"]),
        recipients=tuple(str(r) for r in data["recipients"]),
        client_address=str(data.get("client_address", "")),
        client_port=int(data.get("client_port", 0)),
        original_destination=(str(dest[0]), int(dest[1])) if dest else None,
        helo=str(data.get("helo", "")),
        protocol=str(data.get("protocol", "SMTP")),
        smtputf8=bool(data.get("smtputf8", False)),
        body_8bit=bool(data.get("body_8bit", False)),
        tls=bool(data.get("tls", False)),
        arrival=float(data["arrival"]),
        verification=tuple((str(rcpt), str(how))
                           for rcpt, how in data.get("verification", {}).items()),
        verdict=str(data.get("verdict", "")),
        crlf_only=data.get("crlf_only") is True,
    )


# What decoding a record whose checksum matched can raise when its JSON is not what we write
# (another version's file, a hand edit): a value of the wrong type (a list where an object
# belongs: AttributeError), out of range (10**400 or Infinity as a float or an int:
# OverflowError) or nested past the JSON decoder's recursion limit.
_BAD_RECORD = (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError,
               RecursionError)


@dataclass(frozen=True)
class ParsedFile:
    envelope: Envelope
    state: DeliveryState
    content_offset: int
    content_length: int
    content: bytes | None  # only when asked for (and then its checksum was verified)
    valid_end: int  # offset after the last valid record: where the next state record goes


def parse(handle: IO[bytes], *, with_content: bool = False) -> ParsedFile:
    """Read a queue file; raise CorruptQueueFile if it is incomplete or damaged."""
    try:
        return _parse(handle, with_content)
    except _BAD_RECORD as exc:
        raise CorruptQueueFile(f"bad envelope: {exc}") from None


def _parse(handle: IO[bytes], with_content: bool) -> ParsedFile:
    if handle.readline(len(MAGIC) + 1) != MAGIC:
        raise CorruptQueueFile("not a mailgate queue file (bad magic line)")
    env_len = _length(handle.readline(32), b"E")
    env = handle.read(env_len)
    if len(env) != env_len or handle.read(1) != b"\n":
        raise CorruptQueueFile("envelope record cut short")
    content_length = _length(handle.readline(32), b"C")
    content_offset = handle.tell()
    content: bytes | None = None
    if with_content:
        content = handle.read(content_length)
        if len(content) != content_length:
            raise CorruptQueueFile("content cut short")
    else:
        handle.seek(content_length, os.SEEK_CUR)
    if handle.read(1) != b"\n":
        raise CorruptQueueFile("content cut short")
    end = _END_LINE.match(handle.readline(32))
    if end is None:
        raise CorruptQueueFile("no end record: the file was never completed")
    if int(end.group(2), 16) != zlib.crc32(env):
        raise CorruptQueueFile("envelope checksum mismatch")
    if content is not None and int(end.group(1), 16) != zlib.crc32(content):
        raise CorruptQueueFile("content checksum mismatch")
    data = json.loads(env)
    envelope = _envelope_from_json(data)
    state = _state_from_json(data["state"])
    valid_end = handle.tell()
    while True:
        header = _STATE_LINE.match(handle.readline(32))
        if header is None:
            break
        body = handle.read(int(header.group(1)))
        if (len(body) != int(header.group(1)) or handle.read(1) != b"\n"
                or zlib.crc32(body) != int(header.group(2), 16)):
            break
        try:
            state = _state_from_json(json.loads(body))
        except _BAD_RECORD:
            break
        valid_end = handle.tell()
    if len(state.recipients) != len(envelope.recipients):
        raise CorruptQueueFile("state does not match the envelope's recipients")
    return ParsedFile(envelope, state, content_offset, content_length, content, valid_end)


def _length(line: bytes, kind: bytes) -> int:
    match = _LEN_LINE.match(line)
    if match is None or match.group(1) != kind:
        raise CorruptQueueFile(f"bad {kind.decode()} record")
    return int(match.group(2))
