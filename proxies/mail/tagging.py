"""Tagging a message: our header fields added, forged copies of them removed, the Subject
prefixed; every other byte left as it was (no parse-and-reserialise round trip).

Forged copies go because mail readers and filters act on the *first* `X-Spam-Flag` they find:
a sender who pre-sets `X-Spam-Flag: NO` must not win against ours, wherever ours is put. So
`tag_header` always drops earlier copies of the fields it adds, and callers name the rest of
ours (`OUR_FIELDS`) that must not survive either.

Where the added fields go is the caller's choice: SMTP puts them on top, where trace fields go
(RFC 5322 3.6.7); POP3 at the end, because the leading trace fields may already be on their
way to a waiting client (`proxies.pop3.keepalive`) and must stay the first bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

from proxies.mail.headers import Header, field_name, message_header

__all__ = ["OUR_FIELDS", "SCAN_FIELD", "SPAM_FIELDS", "field", "sanitise", "tag", "tag_header"]

SCAN_FIELD = "X-Mailgate-Scan"
SPAM_FIELDS = ("X-Spam-Flag", "X-Spam-Score", "X-Spam-Status")
# Every field mailgate writes: a copy the sender put there is forged.
OUR_FIELDS = (*SPAM_FIELDS, SCAN_FIELD)
# RFC 5322 2.1.1: lines SHOULD be no more than 78 characters.
FOLD_AT = 78
# (separator, word): a word runs to a space or ends just after a comma.
_TOKENS = re.compile(r"( *)([^ ,]*,?)")


def sanitise(text: str) -> str:
    """Printable, single-line text for a header field or a protocol reply."""
    return "".join(c if c.isprintable() else " " for c in text).strip()


def field(name: str, value: str, eol: bytes = b"\r\n") -> bytes:
    """`Name: value` and `eol`, folded (RFC 5322 2.2.3) before a space or after a comma, as
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
    separator = eol.decode("ascii")
    return (separator.join(lines) + separator).encode("utf-8")


def tag_header(header: Header, add: Sequence[bytes], *, remove: Iterable[str] = (),
               subject_prefix: str = "", place: Literal["top", "end"] = "top",
               protected: int = 0) -> bytes:
    """The header section after tagging (it replaces `header.data`).

    `add`: whole fields (`field()`), put at the `place`; earlier copies of them are removed,
    and so are the fields named in `remove`. `subject_prefix` goes in front of the first
    Subject unless it is there already (a message tagged twice); a message without a Subject
    gets one. The first `protected` octets are already sent: nothing in them is changed or
    removed, which only makes sense with `place="end"`.
    """
    if protected and place != "end":
        raise ValueError("protected octets stay first only when fields are added at the end")
    drop = {name.lower() for name in remove}
    drop.update(name for name in map(field_name, add) if name is not None)
    kept: list[tuple[str, bytes, int]] = []  # (name, raw field, offset in header.data)
    offset = 0
    for name, raw in header.fields:
        if offset < protected or name not in drop:
            kept.append((name, raw, offset))
        offset += len(raw)
    if kept and not kept[-1][1].endswith(b"\n"):
        name, raw, at = kept[-1]  # a message that is only a header without a final line end
        kept[-1] = (name, raw + header.eol, at)
    if subject_prefix:
        prefix = subject_prefix.encode("utf-8")
        index = next((i for i, (name, _raw, _at) in enumerate(kept) if name == "subject"), None)
        if index is None:
            kept.append(("subject", b"Subject: " + prefix.rstrip() + header.eol, offset))
        elif kept[index][2] >= protected:
            name, raw, at = kept[index]
            kept[index] = (name, _prefixed(raw, prefix), at)
    fields = b"".join(raw for _name, raw, _at in kept)
    return b"".join(add) + fields if place == "top" else fields + b"".join(add)


def tag(content: bytes, add: Sequence[bytes], *, remove: Iterable[str] = (),
        subject_prefix: str = "") -> bytes:
    """A whole message tagged, the fields added on top (`tag_header`)."""
    header = message_header(content)
    return tag_header(header, add, remove=remove, subject_prefix=subject_prefix) \
        + content[len(header.data):]


def _prefixed(raw: bytes, prefix: bytes) -> bytes:
    name, _, value = raw.partition(b":")
    stripped = value.lstrip(b" \t")
    if stripped.startswith(prefix.strip()):
        return raw  # already tagged (a message that passes twice)
    space = value[:len(value) - len(stripped)] or b" "
    return name + b":" + space + prefix + stripped
