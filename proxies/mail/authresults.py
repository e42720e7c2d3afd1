"""The Authentication-Results header field (RFC 8601): ours added, forged ones removed.

Pure bytes in, bytes out, like `proxies.mail.tagging`: nothing else in the message changes.

What we add: the SPF, DKIM and DMARC results a scanner reported (rspamd's), under our
authserv-id, one result per line (on the wire each continuation line starts with a tab):

    Authentication-Results: gw.example.net;
        spf=pass smtp.mailfrom=alice@sender.example;
        dkim=none;
        dmarc=pass header.from=sender.example

SPF's identity is the envelope's (RFC 8601 2.7.2: `smtp.mailfrom`, or `smtp.helo` for the
null reverse-path, which is what SPF then checks, RFC 7208 2.3); DKIM names the signing
domain and selector (`header.d`, `header.s`, 2.7.1), DMARC the author domain (`header.from`,
RFC 7489 11.2). A property whose value would not be a plain address or domain is left out
rather than quoted: readers parse these fields loosely, and a value is only a hint.

What we remove (RFC 8601 5): a field that arrives claiming our authserv-id cannot be ours (we
have not seen the message before) and would be believed by whatever reads the mailbox, so a
border MTA removes it, whether or not it adds one itself. The authserv-id is the first thing
in the field's value after any comments and white space (2.2: `authserv-id [ CFWS
authres-version ]`), a token or a quoted string, compared case-insensitively (2.5) and
without a trailing dot (a domain name written absolutely is the same name). Fields with any
other authserv-id are someone else's statements and are kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from proxies.mail.headers import message_header
from proxies.scan.api import AuthResult

__all__ = [
    "FIELD",
    "authentication_results",
    "authserv_id_of",
    "remove_forged",
    "valid_authserv_id",
]

FIELD = "Authentication-Results"
_NAME = FIELD.lower()
# A quick look before a parse: most mail has no such field. Obsolete syntax allows white
# space before the colon (RFC 5322 4.5.3), which `headers.field_name` also accepts.
_MENTIONED = re.compile(rb"(?im)^authentication-results[ \t]*:")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
# RFC 2045 5.1 token: any US-ASCII printable but SPACE and tspecials.
_TOKEN = re.compile(r'[!#$%&\'*+\-.0-9A-Z^_`a-z{|}~]+')
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
# RFC 5322 3.2.3 dot-atom, the only local part we write unquoted.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def valid_authserv_id(text: str) -> bool:
    """An authserv-id we can write as a token (the config's check)."""
    return bool(_TOKEN.fullmatch(text))


def _normal(authserv_id: str) -> str:
    return authserv_id.lower().rstrip(".")


def _skip_cfws(text: str, at: int) -> int:
    """The index after white space and comments (RFC 5322 3.2.2, nested, with quoted-pairs)
    from `at`; len(text) + 1 when a comment never ends."""
    depth = 0
    while at < len(text):
        char = text[at]
        if depth and char == "\\":
            at += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth and char not in " \t\r\n":
            return at
        at += 1
    return at if not depth else len(text) + 1


def authserv_id_of(raw_field: bytes) -> str | None:
    """The authserv-id an Authentication-Results field (name, colon, value, maybe folded)
    claims, as written; None when its value does not start with one."""
    value = raw_field.split(b":", 1)[1].decode("utf-8", "replace")
    value = _FOLD.sub("", value)
    at = _skip_cfws(value, 0)
    if at >= len(value):
        return None
    if value[at] == '"':
        text, at = [], at + 1
        while at < len(value) and value[at] != '"':
            if value[at] == "\\":
                at += 1
            text.append(value[at:at + 1])
            at += 1
        return "".join(text) if at < len(value) else None
    match = _TOKEN.match(value, at)
    return match.group(0) if match else None


def remove_forged(content: bytes, authserv_id: str) -> bytes | None:
    """`content` without the Authentication-Results fields that claim `authserv_id`; None
    when it has none (nothing to copy)."""
    end = content.find(b"\r\n\r\n")
    if not _MENTIONED.search(content, 0, len(content) if end < 0 else end + 2):
        return None
    ours = _normal(authserv_id)
    header = message_header(content)
    kept = [raw for name, raw in header.fields
            if name != _NAME or _normal(authserv_id_of(raw) or "") != ours]
    if len(kept) == len(header.fields):
        return None
    return b"".join(kept) + content[len(header.data):]


def _address(sender: str) -> str:
    local, at, domain = sender.rpartition("@")
    if not at or not _DOMAIN.fullmatch(domain):
        return ""
    return sender if _DOT_ATOM.fullmatch(local) else domain


def _resinfo(result: AuthResult, sender: str, helo: str) -> str:
    properties: list[str] = []
    if result.method == "spf":
        identity = _address(sender) if sender else ""
        if identity:
            properties.append(f"smtp.mailfrom={identity}")
        elif not sender and _DOMAIN.fullmatch(helo):
            properties.append(f"smtp.helo={helo}")
    elif result.domain and _DOMAIN.fullmatch(result.domain):
        if result.method == "dkim":
            properties.append(f"header.d={result.domain}")
            if result.selector and _TOKEN.fullmatch(result.selector):
                properties.append(f"header.s={result.selector}")
        else:
            properties.append(f"header.from={result.domain}")
    return " ".join([f"{result.method}={result.result}", *properties])


def authentication_results(authserv_id: str, results: Sequence[AuthResult], *,
                           sender: str, helo: str, eol: bytes = b"\r\n") -> bytes | None:
    """Our field for `results` (with its line end), None when there are none: a field that
    says only `none` would claim we checked what nobody checked."""
    if not results:
        return None
    separator = ";" + eol.decode("ascii") + "\t"
    lines = [f"{FIELD}: {authserv_id}", *(_resinfo(r, sender, helo) for r in results)]
    return (separator.join(lines) + eol.decode("ascii")).encode("ascii", "replace")
