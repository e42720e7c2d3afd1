"""Fuzzing DATA framing (proxies.smtp.dataframe): the strict reader, dot-stuffing and the line
helpers, against independent references.

What must hold: the reader ends data exactly at the first CRLF.CRLF (counting the CRLF of the
DATA line) and nowhere else, whatever the reads; its content is the line-by-line unstuffing of
what came before, its leftover what came after; a close before the end is its documented
RemoteProtocolError with a 421 reply; with a size limit the buffer stays bounded. Stuffing
canonical content and reading it back is the identity, and the stuffed form has no end of
data for a lenient reader either (SMTP smuggling, CVE-2023-51764); content with a bare CR or
LF is refused with LocalProtocolError, never anything else.
"""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxies.smtp.dataframe import (
    DataReader,
    DotStuffer,
    check_line_length,
    count_received_headers,
    dot_stuff,
    find_bare_line_endings,
    find_nul,
    longest_line,
    normalise_line_endings,
    split_header_body,
)
from proxies.smtp.errors import LocalProtocolError, RemoteProtocolError
from proxies.smtp.events import NEED_DATA, DataComplete
from tests.fuzz import inputs
from tests.fuzz.harness import (
    EXAMPLES,
    bounded,
    check_smtp_reply,
    corpus,
    every,
    fuzz_settings,
    split_at,
)

TARGET = "smtp_dataframe"
# For the campaign (bench/fuzz.py): the sources whose arcs it traces, and its mutation tokens.
COVERS = ("proxies/smtp/dataframe.py",)
TOKENS = (b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"..", b"\r\n..", b"Received: x\r\n")
END = b"\r\n.\r\n"
# End-of-data sequences some server has accepted (the smuggling probes), and the real one.
LENIENT_ENDS = (b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", END)


def reference(data: bytes) -> tuple[bytes, int, bytes] | None:
    """An independent strict reader, line by line as aiosmtpd reads: lines end only at CRLF,
    the line "." ends the data, a leading dot is removed. (content, size, leftover), or None
    when the data has no end."""
    lines: list[bytes] = []
    position = 0
    while True:
        end = data.find(b"\r\n", position)
        if end < 0:
            return None
        line = data[position:end + 2]
        if line == b".\r\n":
            return b"".join(lines), position, data[end + 2:]
        lines.append(line[1:] if line.startswith(b".") else line)
        position = end + 2


def read(pieces: list[bytes], max_size: int | None
         ) -> tuple[DataComplete | RemoteProtocolError, bytes]:
    """The reader's outcome, and the pieces not given to it (they go to the command parser,
    after the leftover)."""
    reader = DataReader(max_size)
    pieces = [*pieces, b""]
    for index, piece in enumerate(pieces):
        reader.receive_data(piece)
        try:
            event = reader.next_event()
        except RemoteProtocolError as exc:
            assert piece == b"", "a protocol error before the close"
            return exc, b""
        if isinstance(event, DataComplete):
            return event, b"".join(pieces[index + 1:])
        assert event is NEED_DATA
    raise AssertionError("neither an end of data nor an error after the close")


def check_read(data: bytes, pieces: list[bytes], max_size: int | None) -> None:
    outcome, rest = read(pieces, max_size)
    expected = reference(data)
    if expected is None:
        assert isinstance(outcome, RemoteProtocolError), outcome
        assert outcome.reply is not None
        assert check_smtp_reply(outcome.reply.wire().encode() + b"\r\n") == 421
        return
    assert isinstance(outcome, DataComplete), outcome
    content, size, leftover = expected
    assert outcome.size == size
    assert outcome.leftover + rest == leftover
    assert outcome.too_big == (max_size is not None and size > max_size)
    if outcome.too_big:
        assert outcome.content == b""
    else:
        assert outcome.content == content
        assert outcome.bare_line_ending == find_bare_line_endings(content)


def check_stuffing(data: bytes, cuts: list[int]) -> None:
    if find_bare_line_endings(data) is not None or data.endswith(b"\r"):
        with pytest.raises(LocalProtocolError):
            dot_stuff(data)
        data = normalise_line_endings(data)
    stuffer = DotStuffer()
    wire = b"".join(stuffer.feed(piece) for piece in split_at(data, cuts)) + stuffer.finish()
    assert wire == dot_stuff(data)
    outcome, _ = read([wire], None)
    assert isinstance(outcome, DataComplete)
    assert outcome.content == (data if data == b"" or data.endswith(b"\r\n") else data + b"\r\n")
    assert outcome.leftover == b""
    # No reader, however lenient, finds an end before the real one (the DATA line's CRLF
    # stands before the first line).
    framed = b"\r\n" + wire
    for probe in LENIENT_ENDS:
        found = framed.find(probe)
        assert found < 0 or found + len(probe) == len(framed), (probe, found)


def check_helpers(data: bytes) -> None:
    for limit in (3, 80, 1000):
        assert (check_line_length(data, limit) is None) == (longest_line(data) <= limit)
    headers, body = split_header_body(data)
    assert data.startswith(headers) and data.endswith(body)
    assert count_received_headers(data) >= 0
    assert find_nul(data) == (None if b"\0" not in data else data.index(b"\0"))


def run(data: bytes) -> None:
    """The harness: `data` is what follows the DATA command's line."""
    EXAMPLES[TARGET] += 1
    pieces = every(data, 1) if len(data) < 512 else every(data, 7)
    for max_size in (None, 0, 64, 100_000):
        check_read(data, [data], max_size)
        check_read(data, pieces, max_size)
    check_stuffing(data, [1, 2, 3, 5, 8, 13])
    check_helpers(data)


# --- hostile content -------------------------------------------------------------------------

LINES = (b"", b".", b"..", b"...", b".x", b"x", b"Subject: x", b"Received: from x", b"\x00",
         b"\x00.", b"x" * 79, b"x" * 999, b"\xc3\xa9", b" ", b"\t.")


@st.composite
def wires(draw: st.DrawFn) -> bytes:
    """Content lines with any line ends (the probes among them), maybe the real end, maybe
    pipelined commands after it."""
    parts = []
    for _ in range(draw(st.integers(0, 10))):
        line = draw(st.sampled_from(LINES) | inputs.noise | st.sampled_from(LENIENT_ENDS))
        parts.append(line + draw(inputs.line_ends))
    if draw(st.booleans()):
        parts.append(draw(st.sampled_from([b".\r\n", END, b".\n", b"\r\n.\r", b"."])))
        parts.append(draw(st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b>\r\n.\r\n"])))
    return b"".join(parts)


@fuzz_settings(300)
@given(wires())
@example(b".\r\n")
@example(b"\r\n.\r\n")
@example(b"a\n.\nb\r\n.\r\n")
@example(b"a\r\n\x00.\r\nb\r\n.\r\n")
def test_any_content(data: bytes) -> None:
    run(data)


@fuzz_settings(200)
@given(wires(), st.lists(st.integers(min_value=0), max_size=12),
       st.sampled_from([None, 0, 1, 10, 64, 4096]))
def test_any_reads(data: bytes, cuts: list[int], max_size: int | None) -> None:
    EXAMPLES[TARGET] += 1
    check_read(data, split_at(data, cuts), max_size)
    check_stuffing(data, cuts)


@pytest.mark.parametrize("data", corpus(TARGET))
def test_corpus(data: bytes) -> None:
    with bounded():
        run(data)


def test_an_oversized_message_is_not_buffered() -> None:
    """Over max_size the reader keeps only what could start the terminator (RFC 5321 4.2.5:
    the 552 waits for the end of data, the octets need not)."""
    reader = DataReader(max_size=100_000)
    tracemalloc.start()
    try:
        for _ in range(256):
            reader.receive_data(b"x" * 16383 + b"\r")
            assert reader.next_event() is NEED_DATA
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} octets for a 4 MiB message"
    reader.receive_data(b"\n.\r\n")
    complete = reader.next_event()
    assert isinstance(complete, DataComplete) and complete.too_big
