"""DATA framing: the strict reader, dot-stuffing, line endings (RFC 5321 4.1.1.4, 4.5.2) and
SMTP smuggling (CVE-2023-51764)."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given, settings
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
from proxies.smtp.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from proxies.smtp.events import NEED_DATA, DataComplete

CI = settings(max_examples=300, deadline=None)

# End-of-data sequences that some server somewhere has accepted (the smuggling probes), and the
# real one. Their first line end is the end of the line before the dot.
LENIENT_TERMINATORS = (b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r\n")
SMUGGLING_PROBES = (b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n")


def strict_reference_read(wire: bytes) -> tuple[bytes, bytes]:
    """An independent strict RFC 5321 reader, line by line as aiosmtpd does: lines end only
    at CRLF, the line "." ends the data, a leading dot is removed. Returns (content, rest)."""
    lines: list[bytes] = []
    position = 0
    while True:
        end = wire.find(b"\r\n", position)
        assert end >= 0, "no end of data"
        line = wire[position:end + 2]
        position = end + 2
        if line == b".\r\n":
            return b"".join(lines), wire[position:]
        lines.append(line[1:] if line.startswith(b".") else line)


def first_lenient_end(wire: bytes) -> int:
    """Where the earliest end of data is for a reader that accepts any of the probes: the
    offset just after it in `wire` (the DATA line's CRLF stands before the first line)."""
    framed = b"\r\n" + wire
    ends = [framed.find(t) + len(t) for t in LENIENT_TERMINATORS if framed.find(t) >= 0]
    return min(ends) - 2


def read(wire: bytes, chunks: list[int] | None = None, max_size: int | None = None
         ) -> DataComplete:
    reader = DataReader(max_size)
    pieces = [wire]
    if chunks:
        pieces, position = [], 0
        for size in chunks:
            pieces.append(wire[position:position + size])
            position += size
        pieces.append(wire[position:])
    for piece in pieces:
        if piece:
            reader.receive_data(piece)
        event = reader.next_event()
        if isinstance(event, DataComplete):
            return event
    raise AssertionError("no end of data")


# --- line endings ---------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "offset"), [
    (b"", None),
    (b"a\r\nb\r\n", None),
    (b"a\nb", 1),
    (b"a\rb", 1),
    (b"a\r\nb\n", 4),
    (b"a\r\r\n", 1),
    (b"\n", 0),
    (b"a\r", 1),
    (b"a\n\r", 1),
])
def test_find_bare_line_endings(content: bytes, offset: int | None) -> None:
    assert find_bare_line_endings(content) == offset


@pytest.mark.parametrize(("content", "normal"), [
    (b"a\r\nb", b"a\r\nb"),
    (b"a\nb\rc\r\n", b"a\r\nb\r\nc\r\n"),
    (b"a\n\rb", b"a\r\n\r\nb"),
    (b"a\r\r\n", b"a\r\n\r\n"),
    (b"x\n.\ny", b"x\r\n.\r\ny"),
])
def test_normalise_line_endings(content: bytes, normal: bytes) -> None:
    assert normalise_line_endings(content) == normal


def test_normalise_returns_canonical_content_unchanged() -> None:
    content = b"a\r\nb\r\n"
    assert normalise_line_endings(content) is content


@CI
@given(st.binary())
def test_normalised_content_has_no_bare_line_endings(content: bytes) -> None:
    normal = normalise_line_endings(content)
    assert find_bare_line_endings(normal) is None
    assert normal.replace(b"\r\n", b"") == content.replace(b"\r\n", b"").replace(
        b"\r", b"").replace(b"\n", b"")


# --- NUL ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "offset"), [
    (b"", None),
    (b"a\r\nb\r\n", None),
    (b"\0", 0),
    (b"a\0b\0", 1),
    (b"a\r\n\0.\r\n", 3),
    (b"\x80\xff\x01\r\n", None),   # 8bit and other control octets are not NUL
])
def test_find_nul(content: bytes, offset: int | None) -> None:
    assert find_nul(content) == offset


def nul_dropping_read(wire: bytes) -> tuple[bytes, bytes]:
    """A strict reader behind a server that silently drops NULs on input."""
    return strict_reference_read(wire.replace(b"\0", b""))


def test_crlf_nul_dot_crlf_is_content_and_is_found() -> None:
    inner = b"MAIL FROM:<evil@example>\r\nRCPT TO:<victim@example>\r\nDATA\r\nsmuggled\r\n"
    wire = b"outer\r\n\0.\r\n" + inner + b".\r\nQUIT\r\n"
    event = read(wire)
    # Our reader: one message, the would-be commands are text, and the NUL is there to refuse.
    assert event.content == b"outer\r\n\0.\r\n" + inner
    assert event.leftover == b"QUIT\r\n"
    assert find_nul(event.content) == 7
    # What a NUL-dropping server would have made of it: a message that ends at the NUL, and
    # the smuggled transaction as commands. Hence: refuse, do not pass on.
    assert nul_dropping_read(wire) == (b"outer\r\n", inner + b".\r\nQUIT\r\n")


# --- line length ----------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "longest"), [
    (b"", 0),
    (b"abc\r\n", 5),
    (b"abc", 5),                      # the CRLF dot_stuff will add counts
    (b"a\r\nbcdef\r\nxy", 7),
])
def test_longest_line(content: bytes, longest: int) -> None:
    assert longest_line(content) == longest


def test_check_line_length_at_the_rfc_limit() -> None:
    fits = b"x" * 998 + b"\r\n"
    assert len(fits) == 1000
    assert check_line_length(fits) is None
    assert check_line_length(b"ok\r\n" + b"x" * 999 + b"\r\n") == 4
    assert check_line_length(b"ok\r\n" + b"x" * 998) is None
    assert check_line_length(b"ok\r\n" + b"x" * 999) == 4
    assert check_line_length(b"abcd\r\n", limit=5) == 0


@CI
@given(st.lists(st.sampled_from([b"a", b"b", b"\r\n", b"\n", b"\r"]), max_size=40).map(b"".join),
       st.integers(3, 12))
def test_check_line_length_agrees_with_longest_line(content: bytes, limit: int) -> None:
    assert (check_line_length(content, limit) is None) == (longest_line(content) <= limit)


# --- headers ----------------------------------------------------------------------------------

def test_split_header_body() -> None:
    assert split_header_body(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == (b"A: 1\r\nB: 2\r\n", b"body\r\n")
    assert split_header_body(b"\r\nbody") == (b"", b"body")
    assert split_header_body(b"A: 1\r\n") == (b"A: 1\r\n", b"")
    assert split_header_body(b"A: 1\n\nbody") == (b"A: 1\n", b"body")
    assert split_header_body(b"A: 1\r\n\r\nB: 2\r\n\r\nC") == (b"A: 1\r\n", b"B: 2\r\n\r\nC")


@pytest.mark.parametrize(("content", "count"), [
    (b"Received: a\r\nreceived: b\r\nRECEIVED : c\r\n\r\nReceived: in body\r\n", 3),
    (b"Subject: x\r\n Received: folded, not a field\r\n\tReceived: also folded\r\n\r\n", 0),
    (b"X-Received: no\r\nReceived-SPF: no\r\nReceived:\r\n  from a\r\n\r\n", 1),
    (b"\r\nReceived: body only\r\n", 0),
    (b"Received: no body at all\r\n", 1),
])
def test_count_received_headers(content: bytes, count: int) -> None:
    assert count_received_headers(content) == count


# --- dot-stuffing -----------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "wire"), [
    (b"", b".\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"..x\r\n.y", b"...x\r\n..y\r\n.\r\n"),
])
def test_dot_stuff(content: bytes, wire: bytes) -> None:
    assert dot_stuff(content) == wire


@pytest.mark.parametrize("content", [b"a\nb", b"a\rb", b"a\r", b"\n.\n"])
def test_dot_stuff_refuses_bare_line_endings(content: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        dot_stuff(content)


@CI
@given(st.lists(st.sampled_from([b"a", b".", b"\r\n", b"..", b"x\r\n."]), max_size=30),
       st.lists(st.integers(0, 8), max_size=10))
def test_stuffing_in_chunks_equals_stuffing_at_once(parts: list[bytes], cuts: list[int]) -> None:
    content = b"".join(parts)
    stuffer = DotStuffer()
    out, position = [], 0
    for cut in cuts:
        out.append(stuffer.feed(content[position:position + cut]))
        position += cut
    out.append(stuffer.feed(content[position:]))
    out.append(stuffer.finish())
    assert b"".join(out) == dot_stuff(content)


def test_stuffer_split_inside_crlf() -> None:
    stuffer = DotStuffer()
    assert stuffer.feed(b"a\r") == b"a\r"
    assert stuffer.feed(b"\n.b") == b"\n..b"
    assert stuffer.finish() == b"\r\n.\r\n"
    with pytest.raises(LocalProtocolError):
        stuffer.feed(b"more")


# --- the strict reader ------------------------------------------------------------------------

@pytest.mark.parametrize(("wire", "content", "leftover"), [
    (b".\r\n", b"", b""),
    (b"a\r\n.\r\n", b"a\r\n", b""),
    (b"..a\r\n.\r\n", b".a\r\n", b""),
    (b"a\r\n..\r\n.\r\nQUIT\r\n", b"a\r\n.\r\n", b"QUIT\r\n"),
    # The smuggling probes end nothing; the content keeps them and says where.
    (b"a\n.\nMAIL FROM:<x>\r\n.\r\n", b"a\n.\nMAIL FROM:<x>\r\n", b""),
    (b"a\r.\r\n.\r\n", b"a\r.\r\n", b""),
])
def test_reader(wire: bytes, content: bytes, leftover: bytes) -> None:
    event = read(wire)
    assert event.content == content
    assert event.leftover == leftover
    assert event.size == len(wire) - len(leftover) - 3
    assert not event.too_big
    assert event.bare_line_ending == find_bare_line_endings(content)


def test_reader_reports_bare_line_endings() -> None:
    event = read(b"ok\r\nbad\nline\r\n.\r\n")
    assert event.bare_line_ending == 7


def test_reader_byte_by_byte() -> None:
    wire = b"..a\r\nb\r\n.\r\nRSET\r\n"
    event = read(wire, chunks=[1] * len(wire))
    assert event.content == b".a\r\nb\r\n"


def test_reader_size_cap_drops_the_buffer_and_reports_at_the_end() -> None:
    reader = DataReader(max_size=100)
    reader.receive_data(b"x" * 98 + b"\r\n")   # exactly 100: fits
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"y" * 10_000)
    assert reader.next_event() is NEED_DATA
    assert len(reader._buffer) < 10        # dropped, only a terminator's worth kept
    reader.receive_data(b"\r\n.\r\nQUIT\r\n")
    event = reader.next_event()
    assert isinstance(event, DataComplete)
    assert event.too_big and event.content == b""
    assert event.size == 100 + 10_000 + 2
    assert event.leftover == b"QUIT\r\n"


def test_reader_size_cap_exact_fit() -> None:
    event = read(b"x" * 98 + b"\r\n.\r\n", max_size=100)
    assert not event.too_big and event.size == 100


def test_reader_eof_before_the_end_is_a_remote_error() -> None:
    reader = DataReader()
    reader.receive_data(b"a\r\n.")
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_event()
    assert info.value.reply is not None and info.value.reply.code == 421


def test_reader_is_single_use() -> None:
    reader = DataReader()
    reader.receive_data(b".\r\n")
    assert isinstance(reader.next_event(), DataComplete)
    with pytest.raises(LocalProtocolError):
        reader.next_event()
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"x")


# --- properties -------------------------------------------------------------------------------

@CI
@given(st.lists(st.binary(max_size=40) | st.sampled_from(
    [b"\r\n", b"\r\n.", b".\r\n", b"\n", b"\r", b"\r\n.\r\n", *SMUGGLING_PROBES]), max_size=30),
    st.lists(st.integers(1, 30), max_size=8), st.none() | st.integers(0, 200))
def test_arbitrary_bytes_into_the_reader(parts: list[bytes], cuts: list[int],
                                         max_size: int | None) -> None:
    """Never anything but a protocol error; a message it accepts goes back out with dot_stuff
    and reads back identically, ending exactly at the end, for strict and lenient readers."""
    wire = b"".join(parts)
    reader = DataReader(max_size)
    pieces, position = [], 0
    for cut in cuts:
        pieces.append(wire[position:position + cut])
        position += cut
    pieces = [*(p for p in [*pieces, wire[position:]] if p), b""]   # b"": end of stream
    event, unread = None, b""
    try:
        for index, piece in enumerate(pieces):
            reader.receive_data(piece)
            result = reader.next_event()
            if isinstance(result, DataComplete):
                event, unread = result, b"".join(pieces[index + 1:])
                break
    except ProtocolError:
        assert event is None
        assert b"\r\n.\r\n" not in b"\r\n" + wire
        return
    assert event is not None
    framed = b"\r\n" + wire
    assert event.leftover + unread == framed[framed.find(b"\r\n.\r\n") + 5:]
    if event.too_big:
        assert max_size is not None and event.size > max_size and event.content == b""
        return
    content = event.content
    if event.bare_line_ending is not None:
        content = normalise_line_endings(content)
    stuffed = dot_stuff(content)
    assert strict_reference_read(stuffed) == (content, b"")
    assert first_lenient_end(stuffed) == len(stuffed)
    again = read(stuffed + b"NEXT")
    assert (again.content, again.leftover, again.size) == (content, b"NEXT", len(stuffed) - 3)


@CI
@given(st.binary(max_size=200), st.sampled_from(SMUGGLING_PROBES), st.binary(max_size=200))
def test_smuggling_probes_never_end_data_after_re_emission(before: bytes, probe: bytes,
                                                          after: bytes) -> None:
    content = normalise_line_endings(before + probe + b"MAIL FROM:<evil@example>\r\n" + after)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"   # what dot_stuff adds, and a reader gives back
    stuffed = dot_stuff(content)
    assert first_lenient_end(stuffed) == len(stuffed)
    assert strict_reference_read(stuffed) == (content, b"")
    event = read(stuffed)
    assert event.content == content and event.leftover == b""


@CI
@given(st.lists(st.binary(max_size=20) | st.sampled_from(
    [b"\0", b"\r\n", b".", b"\r\n\0.\r\n", b"\0.\r\n", b"\r\n.\0\r\n"]), max_size=30),
    st.lists(st.integers(1, 30), max_size=8))
def test_a_nul_before_the_end_is_always_found(parts: list[bytes], cuts: list[int]) -> None:
    """A NUL never ends data and is never lost: the content holds one exactly when the wire did
    before the end. Content without one reads the same to a NUL-dropping server, so refusing
    what `find_nul` finds leaves such a server nothing to misread."""
    wire = b"".join(parts) + b"\r\n.\r\n"
    event = read(wire, chunks=cuts)
    framed = b"\r\n" + wire
    before_end = framed[:framed.find(b"\r\n.\r\n")]
    assert (find_nul(event.content) is None) == (b"\0" not in before_end)
    if find_nul(event.content) is None:
        content = normalise_line_endings(event.content)
        stuffed = dot_stuff(content)
        assert nul_dropping_read(stuffed) == strict_reference_read(stuffed) == (content, b"")


@CI
@given(st.lists(st.sampled_from([b"a", b".", b"..", b"\r\n", b"From ", b" "]), max_size=40))
def test_round_trip_of_canonical_content(parts: list[bytes]) -> None:
    content = b"".join(parts)
    assume(find_bare_line_endings(content) is None)
    stuffed = dot_stuff(content)
    expected = content if content.endswith(b"\r\n") or not content else content + b"\r\n"
    assert read(stuffed).content == expected
    assert strict_reference_read(stuffed) == (expected, b"")
    # No line of the wire form other than the last is a lone dot.
    assert not re.search(rb"(^|\r\n)\.\r\n(?!$)", stuffed)
