"""Fuzzing the queue-file reader (proxies.queue.queuefile) with corrupt files.

What must hold: `parse` returns a `ParsedFile` or raises its documented `CorruptQueueFile`,
never anything else, for any bytes. For a valid file damaged at random (cut, bytes flipped,
ranges dropped or repeated, two files spliced, junk appended) it succeeds only when what it
returns is what was written: the same envelope, the same content when asked for it, and the
initial state or one of the state records appended (CRC32 lets a random change through
once in 2**32). And for records whose checksums match but whose JSON is not what we write
(another version's file, a hand edit): CorruptQueueFile, or a torn state record ignored.
"""

from __future__ import annotations

import io
import json
import zlib
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxies.queue import CorruptQueueFile, DeliveryState, Envelope, RecipientState
from proxies.queue import RecipientStatus as S
from proxies.queue.queuefile import MAGIC, ParsedFile, encode_message, encode_state, parse
from tests.fuzz.harness import EXAMPLES, bounded, corpus, fuzz_settings

TARGET = "queue_file"
# For the campaign (bench/fuzz.py): the sources whose arcs it traces, and its mutation tokens.
COVERS = ("proxies/queue/queuefile.py", "proxies/queue/model.py")
TOKENS = (b"\nS ", b"\nX ", b"\nC ", b"E ", b"00000000", b"{}", b"[]", b"null", b"Infinity",
          b'"recipients":', b'"status":"pending"')
ENVELOPE = Envelope(sender="alice@src.example", recipients=("a@example.org", "b@example.org"),
                    client_address="2001:db8::1", client_port=2525,
                    original_destination=("2001:db8::25", 25), helo="h", protocol="ESMTP",
                    arrival=1_700_000_000.5)
CONTENT = b"Subject: x\r\n\r\nbody\r\n.\r\n"
# Another message with the same envelope, spliced into the first.
OTHER = b"other content\r\n"
STATES = (DeliveryState((RecipientState("a@example.org", S.DELIVERED, 250, "ok"),
                         RecipientState("b@example.org", S.DEFERRED, 451, "later")),
                        attempts=1, next_attempt=600.0, last_attempt=300.0,
                        last_error="451 later"),
          DeliveryState((RecipientState("a@example.org", S.DELIVERED, 250, "ok"),
                         RecipientState("b@example.org", S.BOUNCED, 550, "no")),
                        attempts=2, next_attempt=900.0, last_attempt=800.0))
FILE = b"".join(encode_message(ENVELOPE, CONTENT)) + b"".join(encode_state(s) for s in STATES)
INITIAL = parse(io.BytesIO(FILE[:len(b"".join(encode_message(ENVELOPE, CONTENT)))])).state


def read(data: bytes, with_content: bool) -> ParsedFile | None:
    """The parsed file, or None for CorruptQueueFile; anything else fails the test."""
    try:
        parsed = parse(io.BytesIO(data), with_content=with_content)
    except CorruptQueueFile:
        return None
    assert isinstance(parsed, ParsedFile)
    assert 0 < parsed.content_offset <= parsed.valid_end <= len(data)
    assert parsed.content_offset + parsed.content_length < parsed.valid_end
    if with_content:
        assert parsed.content is not None and len(parsed.content) == parsed.content_length
    return parsed


def run(data: bytes) -> None:
    """The harness: `data` as a whole queue file."""
    EXAMPLES[TARGET] += 1
    for with_content in (False, True):
        read(data, with_content)


def check_damaged(data: bytes) -> None:
    """`data` is FILE damaged at random: a success returns only what was written."""
    run(data)
    for with_content in (False, True):
        parsed = read(data, with_content)
        if parsed is None:
            continue
        assert parsed.envelope == ENVELOPE
        assert parsed.state in (INITIAL, *STATES)
        if with_content:
            assert parsed.content in (CONTENT, OTHER)


# --- damage ---------------------------------------------------------------------------------------

@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    data = bytearray(FILE)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 6))
        at = draw(st.integers(0, len(data)))
        size = draw(st.integers(1, 40))
        if kind == 0:
            del data[at:]
        elif kind == 1 and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif kind == 2:
            del data[at:at + size]
        elif kind == 3:
            data[at:at] = data[at:at + size]
        elif kind == 4:
            data[at:at] = draw(st.binary(min_size=1, max_size=size) | st.sampled_from(
                [b"\n", b"S 2 00000000\n{}\n", b"X 00000000 00000000\n", MAGIC, b"E 99\n"]))
        elif kind == 5:
            other = b"".join(encode_message(ENVELOPE, OTHER))
            data = data[:at] + bytearray(other[draw(st.integers(0, len(other))):])
        else:
            data += draw(st.sampled_from([encode_state(STATES[0])[:-1], b"S 1",
                                          b"S 999999999 00000000\n", encode_state(STATES[1])]))
    return bytes(data)


@fuzz_settings(300)
@given(damaged())
def test_random_damage(data: bytes) -> None:
    check_damaged(data)


def test_every_single_byte_flip_and_cut() -> None:
    """The small file exhaustively: every cut, and every octet with its lowest bit flipped."""
    for at in range(len(FILE)):
        flipped = bytearray(FILE)
        flipped[at] ^= 1
        check_damaged(bytes(flipped))
        check_damaged(FILE[:at])


# --- records whose checksums match -----------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from([10**400, -1, 2**64]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["sender", "recipients", "state", "arrival", "address",
                                       "status", "attempts", "next_attempt", "client_port",
                                       "original_destination", "x"]), children, max_size=4),
    max_leaves=10)
GOOD_ENVELOPE: dict[str, Any] = json.loads(FILE.split(b"\n")[2])


def checked_file(envelope: bytes, states: list[bytes]) -> bytes:
    """A queue file with `envelope` as its envelope JSON and checksums that match."""
    return (MAGIC + b"E %d\n" % len(envelope) + envelope + b"\nC %d\n" % len(CONTENT) + CONTENT
            + b"\nX %08x %08x\n" % (zlib.crc32(CONTENT), zlib.crc32(envelope))
            + b"".join(b"S %d %08x\n" % (len(s), zlib.crc32(s)) + s + b"\n" for s in states))


def dumps(value: object) -> bytes:
    # allow_nan: Infinity and NaN, which json.loads accepts.
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """The good envelope and state JSON with values replaced, keys dropped or the whole
    record swapped for any JSON value."""
    def mangle(record: dict[str, Any]) -> object:
        choice = draw(st.integers(0, 3))
        if choice == 0:
            return draw(JSON)
        copy = dict(record)
        for key in draw(st.lists(st.sampled_from(sorted(copy)), max_size=3, unique=True)):
            if choice == 1:
                del copy[key]
            else:
                copy[key] = draw(JSON)
        return copy
    envelope = dumps(mangle(GOOD_ENVELOPE)) if draw(st.booleans()) else dumps(GOOD_ENVELOPE)
    states = [dumps(mangle(GOOD_ENVELOPE["state"]))
              for _ in range(draw(st.integers(0, 2)))]
    return checked_file(envelope, states)


@fuzz_settings(300)
@given(mangled())
@example(checked_file(b"[1]", []))                                  # once AttributeError
@example(checked_file(dumps({**GOOD_ENVELOPE, "arrival": 10**400}), []))   # OverflowError
@example(checked_file(dumps({**GOOD_ENVELOPE, "client_port": float("inf")}), []))
@example(checked_file(b"[" * 100_000 + b"]" * 100_000, []))         # RecursionError
@example(checked_file(dumps(GOOD_ENVELOPE),
                      [dumps({**GOOD_ENVELOPE["state"], "attempts": float("inf")})]))
def test_checksummed_nonsense(data: bytes) -> None:
    run(data)


@pytest.mark.parametrize("data", corpus(TARGET))
def test_corpus(data: bytes) -> None:
    with bounded():
        run(data)
