"""The header section of a message, as bytes, field by field.

RFC 5322 2.2: a field is a line starting with a name and a colon, plus the folded lines after
it that start with a space or a tab; the header section ends at the first empty line (2.1).
Nothing is decoded and re-encoded, so whatever a caller does not change stays byte-identical.
LF-only line ends are understood too: a POP3 server may hand out a message as the MDA stored it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Header", "field_name", "message_header", "parse_header", "split_message"]

# RFC 5322 3.6.8: a field name is printable US-ASCII except the colon; obsolete syntax (4.5)
# allows white space before the colon, which a forger may use to slip a field past a matcher.
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")


@dataclass(frozen=True)
class Header:
    """The header section of a message: `data` (up to and including the last field's line end),
    where the body starts, and the line ending the message uses."""

    data: bytes
    body_start: int
    eol: bytes
    fields: tuple[tuple[str, bytes], ...]  # (lower-case name, raw field with its line end)

    def first(self, name: str) -> bytes | None:
        """The raw value of the first field `name`, unfolded, without the line end."""
        for known, raw in self.fields:
            if known == name:
                return _FOLD.sub(b"", raw.split(b":", 1)[1]).strip()
        return None


def field_name(line: bytes) -> str | None:
    """The lower-case name of the field `line` starts, or None when it starts none."""
    match = _FIELD_NAME.match(line)
    return match.group(1).decode("ascii").lower() if match else None


def parse_header(head: bytes, complete: bool) -> Header | None:
    """The header section of a message starting with `head`.

    `complete`: `head` is the whole message, so one without an empty line is all header
    (TOP n 0 of a message with no body). None when the end of the header is not in `head`.
    """
    crlf, lf = head.find(b"\r\n\r\n"), head.find(b"\n\n")
    if head.startswith(b"\r\n"):
        end, body = 0, 2
    elif head.startswith(b"\n"):
        end, body = 0, 1
    elif crlf >= 0 and (lf < 0 or crlf < lf):
        end, body = crlf + 2, crlf + 4
    elif lf >= 0:
        end, body = lf + 1, lf + 2
    elif complete:
        end = body = len(head)
    else:
        return None
    data = head[:end]
    eol = b"\n" if b"\r\n" not in data and b"\n" in data else b"\r\n"
    fields: list[tuple[str, bytes]] = []
    for line in data.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
        else:
            # A line that is not a field is kept as it is, under a name nothing matches.
            fields.append((field_name(line) or "", line))
    return Header(data, body, eol, tuple(fields))


def message_header(content: bytes) -> Header:
    """The header section of a whole message; the rest is `content[len(header.data):]` (the
    empty line, if there is one, and the body)."""
    header = parse_header(content, complete=True)
    assert header is not None  # a complete message always has a header section, maybe empty
    return header


def split_message(content: bytes) -> tuple[list[bytes], bytes]:
    """The header fields of a whole message (each with its continuation lines and line ends)
    and the rest (the empty line and the body)."""
    header = message_header(content)
    return [raw for _name, raw in header.fields], content[len(header.data):]
