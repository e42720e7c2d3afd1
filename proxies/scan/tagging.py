"""Changing a message's header block as bytes, leaving every other byte as it was.

Only what tagging needs: add fields at the top (where trace fields go, RFC 5322 3.6.7),
remove earlier copies of the fields we add (a sender must not be able to pre-set
`X-Spam-Flag: NO` for whatever reads the first one), and put a prefix in front of the Subject.
The body and every other field stay byte-identical; no parse-and-reserialise round trip.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# RFC 5322 2.1.1: lines SHOULD be no more than 78 characters.
FOLD_AT = 78
# (separator, word): a word runs to a space or ends just after a comma.
_TOKENS = re.compile(r"( *)([^ ,]*,?)")


def sanitise(text: str) -> str:
    """Printable, single-line text for a header field or an SMTP reply."""
    return "".join(c if c.isprintable() else " " for c in text).strip()


def field(name: str, value: str) -> bytes:
    """`Name: value` CRLF, folded (RFC 5322 2.2.3) before a space or after a comma, as
    SpamAssassin folds its `tests=A,B,C` list; continuation lines start with a tab."""
    lines: list[str] = []
    line = f"{name}:"
    for space, token in _TOKENS.findall(" " + sanitise(value)):
        if not token:
            continue
        if len(line) + len(space) + len(token) > FOLD_AT and line.strip() != f"{name}:":
            lines.append(line)
            line = "\t" + token
        else:
            line += space + token
    lines.append(line)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def split_message(content: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its continuation lines and CRLFs) and the rest (the
    empty line and the body)."""
    if content.startswith(b"\r\n"):
        return [], content
    end = content.find(b"\r\n\r\n")
    head, rest = (content, b"") if end < 0 else (content[:end + 2], content[end + 2:])
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields, rest


def field_name(raw: bytes) -> str:
    return raw.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def tag(content: bytes, add: Sequence[bytes], *, remove: Iterable[str] = (),
        subject_prefix: str = "") -> bytes:
    fields, rest = split_message(content)
    if fields and not fields[-1].endswith(b"\r\n"):
        fields[-1] += b"\r\n"  # a message that is only a header block without a final CRLF
    drop = {name.lower() for name in remove}
    kept = [f for f in fields if field_name(f) not in drop]
    if subject_prefix:
        prefix = subject_prefix.encode("utf-8")
        for index, raw in enumerate(kept):
            if field_name(raw) == "subject":
                kept[index] = _prefixed(raw, prefix)
                break
        else:
            kept.append(b"Subject: " + prefix.rstrip() + b"\r\n")
    return b"".join(add) + b"".join(kept) + rest


def _prefixed(raw: bytes, prefix: bytes) -> bytes:
    name, _, value = raw.partition(b":")
    stripped = value.lstrip(b" \t")
    if stripped.startswith(prefix.strip()):
        return raw  # already tagged (a message that passes twice)
    space = value[:len(value) - len(stripped)] or b" "
    return name + b":" + space + prefix + stripped
