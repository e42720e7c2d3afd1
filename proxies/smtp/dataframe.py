"""Message content in the DATA phase: framing, line endings, dot-stuffing, header counting.

RFC 5321 4.1.1.4: the content ends with "CRLF . CRLF", where the first CRLF ends the last line
of the content (or the DATA command itself, for an empty message). RFC 5321 4.5.2: a line that
starts with "." is sent with one more "." ("dot-stuffing") and the receiver removes it.

SMTP smuggling (CVE-2023-51764 and kin): servers disagree on what ends the data. One that also
accepts "LF . LF", "LF . CRLF" or "CR . CR" sees a second message inside content that a strict
server forwarded as one. The defence on both sides of the gateway is the same: only a real
CRLF.CRLF ends data (`DataReader`), content with a bare CR or LF is rejected or normalised
(`find_bare_line_endings`, `normalise_line_endings`), and content is only ever re-emitted in
canonical form (`dot_stuff`, `DotStuffer`), in which no reader, strict or lenient, can find an
end before the real one.

A NUL octet is smuggling material of the same kind: a server that drops NULs on input reads
"CRLF NUL . CRLF" as "CRLF . CRLF", ends the data there and takes the rest as commands. A
message has no business holding one (RFC 5322 3.5: body text is %d1-127 less CR and LF, NUL
only in the obsolete syntax of 4.1; RFC 2045 2.7, 2.8: neither 7bit nor 8bit data contains
NULs; only BINARYMIME, RFC 3030, which we never offer, allows them), so a NUL is not
normalised away but refused (`find_nul`): the receiver answers 550 5.6.0, as Postfix does
when told to (message_reject_characters = \\0).
"""

from __future__ import annotations

import functools
import re
from typing import Final

from proxies.smtp.errors import LocalProtocolError, RemoteProtocolError
from proxies.smtp.events import NEED_DATA, DataComplete, NeedData
from proxies.smtp.reply import Reply

__all__ = [
    "MAX_LINE_LENGTH",
    "DataReader",
    "DotStuffer",
    "check_line_length",
    "count_received_headers",
    "dot_stuff",
    "find_bare_line_endings",
    "find_nul",
    "longest_line",
    "normalise_line_endings",
    "split_header_body",
]

# RFC 5321 4.5.3.1.6: "The maximum total length of a text line including the <CRLF> is 1000
# octets (not counting the leading dot duplicated for transparency)."
MAX_LINE_LENGTH: Final = 1000

END_OF_DATA: Final = b"\r\n.\r\n"

# A CR not followed by LF, or an LF not preceded by CR.
_BARE_LINE_ENDING = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_ANY_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
# RFC 5322 2.2 / 3.6.7: a field name, optional obsolete whitespace before the colon (4.5).
# Folded continuation lines start with WSP, so they never match at a line start.
_RECEIVED_FIELD = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_EMPTY_LINE_AFTER_LINE = re.compile(rb"\n\r?\n")


def _only_crlf(content: bytes) -> bool:
    # Every CRLF holds one CR and one LF, so equal counts mean no CR or LF stands alone.
    # bytes.count is memchr-fast; the regex below is for finding where, when there is one.
    crlf = content.count(b"\r\n")
    return content.count(b"\r") == crlf and content.count(b"\n") == crlf


def find_bare_line_endings(content: bytes) -> int | None:
    """Offset of the first CR or LF that is not part of a CRLF pair, or None."""
    if _only_crlf(content):
        return None
    match = _BARE_LINE_ENDING.search(content)
    return None if match is None else match.start()


def find_nul(content: bytes) -> int | None:
    """Offset of the first NUL octet, or None (see the module docstring: the DATA phase refuses
    a message that holds one)."""
    offset = content.find(b"\0")  # memchr: one pass, no regex, no copy
    return None if offset < 0 else offset


def normalise_line_endings(content: bytes) -> bytes:
    """Every bare CR and bare LF becomes CRLF (Postfix's smtpd_forbid_bare_newline=normalize).

    The result has only CRLF line endings, so after `dot_stuff` no reader can find an end of
    data inside it; a bare-LF line "." becomes a CRLF line "." and is stuffed on the way out.
    """
    if find_bare_line_endings(content) is None:
        return content
    return _ANY_LINE_ENDING.sub(b"\r\n", content)


def longest_line(content: bytes) -> int:
    """Length in octets of the longest line, counting its line ending (LF or CRLF).

    A final line without a line ending counts 2 more, for the CRLF `dot_stuff` will add.
    """
    if not content:
        return 0
    pieces = content.split(b"\n")
    longest = max((len(p) + 1 for p in pieces[:-1]), default=0)
    if pieces[-1]:
        longest = max(longest, len(pieces[-1]) + 2)
    return longest


def check_line_length(content: bytes, limit: int = MAX_LINE_LENGTH) -> int | None:
    """Offset of the start of the first line longer than `limit` octets (RFC 5321 4.5.3.1.6,
    counted with its CRLF, as `longest_line` does), or None if every line fits."""
    if limit < 3:
        raise ValueError("a line limit below 3 octets cannot hold a line")
    # `limit` non-LF octets from a line start make a line of more than `limit` octets with its
    # LF. Any run of that many non-LF octets covers a whole aligned block of limit // 2
    # octets, so if every such block holds an LF (one memchr each, stopping at the first LF),
    # no line is too long: 26 us for 100 KiB of 78-octet lines, against 185 us for hopping
    # from LF to LF (one call per line). Otherwise the hop finds where, which the anchored
    # regex confirms.
    found = None
    find = content.find
    block = limit // 2
    start = 0
    if all(find(b"\n", at, at + block) >= 0
           for at in range(0, len(content) - block + 1, block)):
        start = len(content)  # no line is too long; only the unterminated last one may be
    while True:
        end = find(b"\n", start)
        if end < 0:
            break
        if end - start >= limit:
            match = _long_line_pattern(limit).search(content, start)
            found = None if match is None else match.start()
            break
        start = end + 1
    if content and not content.endswith(b"\n"):
        last = content.rfind(b"\n") + 1
        if len(content) - last + 2 > limit and (found is None or last < found):
            found = last
    return found


@functools.lru_cache(maxsize=8)
def _long_line_pattern(limit: int) -> re.Pattern[bytes]:
    return re.compile(rb"^[^\n]{%d}" % limit, re.MULTILINE)


def count_received_headers(content: bytes) -> int:
    """How many Received: fields the header section holds (RFC 5321 6.3 loop detection).

    Only the header section counts (a forwarded message in the body has its own), the field
    name is case-insensitive, and folded continuation lines are not fields.
    """
    headers, _body = split_header_body(content)
    return len(_RECEIVED_FIELD.findall(headers))


def split_header_body(content: bytes) -> tuple[bytes, bytes]:
    """Split at the first empty line (RFC 5322 2.1).

    `headers` keeps the line ending of its last field; the empty line itself is in neither
    part, so `headers + b"\\r\\n" + body == content` when there is one. Content without an empty
    line is all header. LF-only line endings are understood too.
    """
    if content.startswith((b"\r\n", b"\n")):
        return b"", content[2:] if content.startswith(b"\r\n") else content[1:]
    match = _EMPTY_LINE_AFTER_LINE.search(content)
    if match is None:
        return content, b""
    return content[:match.start() + 1], content[match.end():]


class DotStuffer:
    """Dot-stuffs canonical (CRLF-only) content in chunks, for streaming (RFC 5321 4.5.2).

    `feed(chunk)` returns the wire form of that chunk, `finish()` the rest: the CRLF that
    ends the last line if the content lacks one, and the terminating ".CRLF". Chunks may split
    anywhere, even between CR and LF. A bare CR or LF raises `LocalProtocolError`: content must
    be normalised or rejected before it is sent (it would otherwise be smuggling material);
    `check=False` skips that check, for content known to be canonical.
    """

    def __init__(self, check: bool = True) -> None:
        self._check = check
        # The last two octets fed, so a chunk boundary inside "CRLF." is handled; starting
        # with CRLF stands for the line end of the DATA command (RFC 5321 4.1.1.4).
        self._tail = b"\r\n"
        self._finished = False

    def feed(self, chunk: bytes) -> bytes:
        if self._finished:
            raise LocalProtocolError("content fed after the end of data")
        if not chunk:
            return b""
        if self._check:
            self._check_line_endings(chunk)
        tail = (self._tail + chunk[-2:])[-2:]
        prefix = b""
        if chunk[:1] == b"." and self._tail == b"\r\n":
            prefix, chunk = b"..", chunk[1:]
        elif chunk[:2] == b"\n." and self._tail[-1:] == b"\r":
            prefix, chunk = b"\n..", chunk[2:]
        self._tail = tail
        # bytes.replace returns the chunk itself when there is nothing to stuff: no copy.
        stuffed = chunk.replace(b"\r\n.", b"\r\n..")
        return prefix + stuffed if prefix else stuffed

    def finish(self) -> bytes:
        if self._finished:
            raise LocalProtocolError("end of data sent twice")
        if self._tail[-1:] == b"\r":
            raise LocalProtocolError("content ends with a bare CR")
        self._finished = True
        return b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n"

    def _check_line_endings(self, chunk: bytes) -> None:
        if _only_crlf(chunk):
            return
        position = 0
        while True:
            match = _BARE_LINE_ENDING.search(chunk, position)
            if match is None:
                return
            offset = match.start()
            # The halves of a CRLF split between two chunks are fine.
            joined_lf = offset == 0 and chunk[:1] == b"\n" and self._tail[-1:] == b"\r"
            pending_cr = offset == len(chunk) - 1 and chunk[-1:] == b"\r"
            if not (joined_lf or pending_cr):
                raise LocalProtocolError(
                    f"bare CR or LF in content (chunk offset {offset}); "
                    "normalise or reject it before sending")
            position = offset + 1


def dot_stuff(content: bytes) -> bytes:
    """The wire form of canonical, unstuffed content: every line starting with "." gets one
    more, a final CRLF is added if missing, and the terminating ".CRLF" is appended.

    Raises `LocalProtocolError` for a bare CR or LF (see `DotStuffer`).
    """
    stuffer = DotStuffer()
    return stuffer.feed(content) + stuffer.finish()


class DataReader:
    """A strict sans-I/O reader of DATA content (RFC 5321 4.1.1.4, 4.5.2).

    Start it right after the 354 reply; `receive_data(bytes)` buffers (b"" means the peer
    closed), `next_event()` returns `NEED_DATA` or, once, `DataComplete`. Only CRLF.CRLF ends
    data; a bare CR or LF never does, and is reported in `DataComplete.bare_line_ending`. A NUL
    never does either ("CRLF NUL . CRLF" is content): the caller refuses content in which
    `find_nul` finds one.

    With `max_size`, once the content is known to be bigger the buffer is dropped (only the
    last octets are kept, to find the terminator) while octets are still counted, and
    `DataComplete.too_big` is set: the reply (552 5.3.4) waits until the end of data, as
    aiosmtpd does and RFC 5321 4.2.5 implies.
    """

    def __init__(self, max_size: int | None = None) -> None:
        if max_size is not None and max_size < 0:
            raise ValueError("max_size must not be negative")
        self._max_size = max_size
        # The CRLF that ended the DATA command line: it lets ".CRLF" at the very start end an
        # empty message, and lets a "." that starts the first line be unstuffed.
        self._buffer = bytearray(b"\r\n")
        # Offset in the client's data of _buffer[0] (-2: the virtual CRLF above).
        self._base = -2
        self._scan_from = 0
        self._dropped = False
        self._eof = False
        self._done = False

    @property
    def received(self) -> int:
        """Octets received so far, including those dropped and any leftover."""
        return self._base + len(self._buffer)

    def receive_data(self, data: bytes | memoryview) -> None:
        if self._done:
            raise LocalProtocolError("DATA already complete; leftover data goes elsewhere")
        if self._eof:
            raise LocalProtocolError("data received after the end of the stream")
        if not data:
            self._eof = True
            return
        self._buffer += data

    def next_event(self) -> NeedData | DataComplete:
        if self._done:
            raise LocalProtocolError("DataReader already returned the message")
        end = self._buffer.find(END_OF_DATA, self._scan_from)
        if end < 0:
            if self._eof:
                raise RemoteProtocolError(
                    "connection closed before the end of data",
                    Reply(421, "4.4.2", "Connection closed before the end of data"))
            # A terminator not yet complete starts within the last four octets.
            self._scan_from = max(0, len(self._buffer) - (len(END_OF_DATA) - 1))
            self._maybe_drop()
            return NEED_DATA
        self._done = True
        # The content runs to the CRLF that begins the terminator, inclusive.
        content_end = end + 2
        size = self._base + content_end
        leftover = bytes(self._buffer[end + len(END_OF_DATA):])
        too_big = self._dropped or (self._max_size is not None and size > self._max_size)
        if too_big:
            content = b""
        else:
            with memoryview(self._buffer) as view:
                content = bytes(view[2:content_end])
            # RFC 5321 4.5.2: remove the first "." of every line that starts with one.
            if content.startswith(b"."):
                content = content[1:]
            content = content.replace(b"\r\n.", b"\r\n")
        self._buffer = bytearray()
        return DataComplete(
            content=content,
            size=size,
            too_big=too_big,
            bare_line_ending=None if too_big else find_bare_line_endings(content),
            leftover=leftover,
        )

    def _maybe_drop(self) -> None:
        if self._max_size is None:
            return
        keep = len(END_OF_DATA) - 1
        # No terminator in the buffer, so one can start at the fourth-last octet at the
        # earliest: the content is at least everything before that plus the CRLF that begins
        # the terminator.
        if self._base + len(self._buffer) - keep + 2 > self._max_size and \
                len(self._buffer) > keep:
            self._dropped = True
            self._base += len(self._buffer) - keep
            del self._buffer[:-keep]
            self._scan_from = 0
