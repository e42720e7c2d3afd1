"""SMTP reply parsing (RFC 5321 4.2, RFC 2034) and the Reply value."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxies.smtp.errors import RemoteProtocolError
from proxies.smtp.reply import Reply, ReplyReader


def read_all(data: bytes) -> list[Reply]:
    reader = ReplyReader()
    reader.receive_data(data)
    replies = []
    while (reply := reader.next_reply()) is not None:
        replies.append(reply)
    return replies


@pytest.mark.parametrize(("wire", "expected"), [
    (b"250 Ok\r\n", Reply(250, None, "Ok")),
    (b"250 2.0.0 Ok: queued as X\r\n", Reply(250, "2.0.0", "Ok: queued as X")),
    (b"250\r\n", Reply(250, None, "")),
    (b"250 \r\n", Reply(250, None, "")),
    (b"220 mx.example ESMTP\n", Reply(220, None, "mx.example ESMTP")),  # bare LF tolerated
    (b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 1000\r\n",
     Reply(250, None, "mx.example\nPIPELINING\nSIZE 1000")),
    (b"550-5.1.1 first\r\n550 5.1.1 second\r\n", Reply(550, "5.1.1", "first\nsecond")),
    # An enhanced code whose class does not match the reply is ordinary text.
    (b"550 2.0.0 odd\r\n", Reply(550, None, "2.0.0 odd")),
    (b"451 4.3.0\r\n", Reply(451, "4.3.0", "")),
    # Control characters are neutralised, never passed on.
    (b"250 a\x00b\x1bc\r\n", Reply(250, None, "a?b?c")),
    (b"250 caf\xc3\xa9\r\n", Reply(250, None, "caf\u00e9")),
])
def test_reply_parsing(wire: bytes, expected: Reply) -> None:
    assert read_all(wire) == [expected]


@pytest.mark.parametrize("wire", [
    b"hello\r\n",
    b"25 short\r\n",
    b"2500 long code\r\n",
    b"150 no such class\r\n",
    b"650 no such class\r\n",
    b"250_bad separator\r\n",
    b"250-first\r\n251 second\r\n",
    b"250 " + b"x" * 600 + b"\r\n",
    b"250 " + b"x" * 600,                               # no line end yet, already too long
    b"".join(b"250-line\r\n" for _ in range(200)) + b"250 end\r\n",
])
def test_garbage_is_a_remote_error(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        read_all(wire)
    assert info.value.reply is not None
    assert info.value.reply.code == 451
    assert info.value.reply.enhanced == "4.4.0"
    assert str(info.value.reply).startswith("451 4.4.0 protocol error from server: ")


def test_reply_line_of_exactly_512_octets_is_fine() -> None:
    line = b"250 " + b"x" * (512 - 6) + b"\r\n"
    assert len(line) == 512
    assert read_all(line)[0].code == 250


def test_partial_replies_wait_for_more() -> None:
    reader = ReplyReader()
    for byte in b"250-a\r\n250 b\r\n":
        assert reader.next_reply() is None
        reader.receive_data(bytes([byte]))
    assert reader.next_reply() == Reply(250, None, "a\nb")
    assert not reader.has_data


def test_reply_rendering() -> None:
    reply = Reply(550, "5.1.1", "first\nsecond")
    assert str(reply) == "550 5.1.1 first second"
    assert reply.wire() == "550-5.1.1 first\r\n550 5.1.1 second"
    assert str(Reply(250, "2.0.0", "Ok")) == "250 2.0.0 Ok"
    assert str(Reply(250, None, "")) == "250"
    assert Reply(250, None, "").wire() == "250"
    assert reply.is_permanent and not reply.is_transient and not reply.is_positive
    assert Reply(354, None, "go").is_positive
    assert Reply(421, "4.4.2", "bye").is_transient


def test_as_transient() -> None:
    assert Reply(554, "5.7.1", "no").as_transient() == Reply(454, "4.7.1", "no")
    assert Reply(550, None, "no").as_transient() == Reply(450, None, "no")
    assert Reply(421, None, "x").as_transient() == Reply(421, None, "x")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=20))
def test_arbitrary_bytes_raise_only_remote_errors(chunks: list[bytes]) -> None:
    reader = ReplyReader()
    try:
        for chunk in chunks:
            reader.receive_data(chunk)
            while (reply := reader.next_reply()) is not None:
                assert 200 <= reply.code < 600
                assert "\r" not in str(reply) and "\n" not in str(reply)
    except RemoteProtocolError as exc:
        assert exc.reply is not None and exc.reply.code == 451
