"""The queue file format: round trips, and every truncation is recognised."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxies.queue import CorruptQueueFile, DeliveryState, Envelope, RecipientState
from proxies.queue import RecipientStatus as S
from proxies.queue.queuefile import encode_message, encode_state, parse

addresses = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() != "")


def sample() -> tuple[Envelope, bytes]:
    env = Envelope(sender="", recipients=("a@example.org", "b@example.org"),
                   client_address="2001:db8::1", client_port=2525,
                   original_destination=("2001:db8::25", 25), helo="h", protocol="ESMTP",
                   arrival=1.5)
    return env, b"Subject: x\r\n\r\nbody\r\n"


@settings(max_examples=60)
@given(sender=st.text(max_size=40), recipients=st.lists(addresses, min_size=1, max_size=5),
       content=st.binary(max_size=2000), helo=st.text(max_size=20),
       flags=st.tuples(st.booleans(), st.booleans(), st.booleans()))
def test_round_trip(sender: str, recipients: list[str], content: bytes, helo: str,
                    flags: tuple[bool, bool, bool]) -> None:
    env = Envelope(sender=sender, recipients=tuple(recipients), client_address="192.0.2.1",
                   client_port=1, original_destination=None, helo=helo, smtputf8=flags[0],
                   body_8bit=flags[1], tls=flags[2], arrival=1_700_000_000.25)
    parsed = parse(io.BytesIO(b"".join(encode_message(env, content))), with_content=True)
    assert parsed.envelope == env and parsed.content == content
    assert [r.address for r in parsed.state.recipients] == list(env.recipients)
    assert all(r.status == S.PENDING for r in parsed.state.recipients)


def test_every_truncation_is_corrupt() -> None:
    env, content = sample()
    data = b"".join(encode_message(env, content))
    for length in range(len(data)):
        with pytest.raises(CorruptQueueFile):
            parse(io.BytesIO(data[:length]), with_content=True)


def test_a_flipped_content_byte_is_caught_when_the_content_is_read() -> None:
    env, content = sample()
    data = bytearray(b"".join(encode_message(env, content)))
    data[data.index(b"body")] ^= 0x20
    with pytest.raises(CorruptQueueFile):
        parse(io.BytesIO(bytes(data)), with_content=True)


def test_last_complete_state_record_wins_and_torn_ones_are_ignored() -> None:
    env, content = sample()
    data = b"".join(encode_message(env, content))
    state = DeliveryState((RecipientState("a@example.org", S.DELIVERED, 250, "ok"),
                           RecipientState("b@example.org", S.DEFERRED, 451, "later")),
                          attempts=1, next_attempt=600.0, last_attempt=300.0,
                          last_error="451 later")
    record = encode_state(state)
    base = parse(io.BytesIO(data))
    for cut in range(len(record)):
        parsed = parse(io.BytesIO(data + record[:cut]))
        assert parsed.state == base.state and parsed.valid_end == len(data)
    parsed = parse(io.BytesIO(data + record + encode_state(state)[:7]))
    assert parsed.state == state and parsed.valid_end == len(data) + len(record)


def test_envelope_rejects_no_recipients_and_drops_duplicates() -> None:
    with pytest.raises(ValueError):
        Envelope(sender="a@example.com", recipients=())
    env = Envelope(sender="a@example.com", recipients=("x@example.org", "x@example.org"))
    assert env.recipients == ("x@example.org",)
