"""Content rules of [policy], checked with the stdlib `email` package: banned attachment
names and MIME types, names inside zip archives, attachment size, header regexes.

A file name is judged by its last extension, after removing what Windows ignores or a mail
reader may hide (trailing dots and spaces, Unicode format characters such as the
right-to-left override), so `invoice.pdf.exe`, `invoice.exe.` and `photo\u202egpj.exe` are all
`exe`. Zip archives (by name or type) have their member names checked the same way, two levels
deep; clamd finds viruses inside archives by itself, but does not tell member names. A
message whose MIME structure the parser cannot make sense of is a hit ("unparsable MIME
structure"), handled as a banned attachment: what the rules cannot see into, they refuse.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.message
import email.policy
import io
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

from proxies.scan.api import ScanResult
from proxies.scan.config import PolicyConfig

ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/x-zip")
MAX_ZIP_DEPTH = 2
# A nested archive bigger than this is not opened (its name was still checked).
MAX_NESTED_ZIP = 10 * 1024 * 1024


@dataclass(frozen=True)
class RuleHit:
    reason: str
    action: str | None = None  # None: [policy] banned decides

    def result(self) -> ScanResult:
        return ScanResult("banned", reason=self.reason, action=self.action,
                          scanners=("rules",), output=(f"rules: {self.reason}",))


def clean_name(name: str) -> str:
    """The name as the receiving system would see it (see the module docstring)."""
    visible = "".join(c for c in name if unicodedata.category(c) not in ("Cf", "Cc"))
    return visible.strip().rstrip(". ").lower()


def extensions(name: str) -> list[str]:
    """All extensions, last one last: 'invoice.pdf.exe' -> ['pdf', 'exe']."""
    base = clean_name(name).rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    parts = base.split(".")
    return [p for p in parts[1:] if p]


def banned_name(name: str, banned: tuple[str, ...]) -> str | None:
    exts = extensions(name)
    if not exts or exts[-1] not in banned:
        return None
    if len(exts) > 1:
        return f"banned attachment name {name!r} (double extension .{'.'.join(exts[-2:])})"
    return f"banned attachment name {name!r}"


def banned_type(content_type: str, banned: tuple[str, ...]) -> bool:
    major = content_type.split("/", 1)[0]
    return content_type in banned or f"{major}/*" in banned


class ContentRules:
    def __init__(self, policy: PolicyConfig) -> None:
        self.policy = policy

    @property
    def active(self) -> bool:
        return self.policy.has_content_rules

    def check(self, content: bytes) -> RuleHit | None:
        if not self.active:
            return None
        try:
            message = email.message_from_bytes(content, policy=email.policy.compat32)
            return self._headers(message) or self._parts(message)
        except (TypeError, ValueError, LookupError) as exc:
            # The stdlib gives up on some parameter lists while it parses (RFC 2231
            # continuations numbered and not, on a multipart type: it sorts None with ints
            # to find the boundary). The rules cannot look inside what cannot be parsed, and
            # a sender would hide a banned attachment there: it counts as banned.
            return RuleHit(f"unparsable MIME structure ({type(exc).__name__})")

    def _headers(self, message: email.message.Message) -> RuleHit | None:
        for rule in self.policy.header_rules:
            for value in message.get_all(rule.header) or ():
                if rule.regex.search(_decoded(value)):
                    return RuleHit(f"header {rule.description}", rule.action)
        return None

    def _parts(self, message: email.message.Message) -> RuleHit | None:
        policy = self.policy
        for part in message.walk():
            if part.is_multipart():
                continue
            name = _filename(part)
            content_type = part.get_content_type()
            if policy.banned_mime_types and banned_type(content_type, policy.banned_mime_types):
                return RuleHit(f"banned attachment type {content_type}"
                               + (f" ({name!r})" if name else ""))
            if name and policy.banned_extensions:
                why = banned_name(name, policy.banned_extensions)
                if why:
                    return RuleHit(why)
            is_zip = content_type in ZIP_TYPES or (name and extensions(name)[-1:] == ["zip"])
            if not (is_zip and policy.banned_extensions) and not policy.max_attachment_size:
                continue
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                continue
            limit = policy.max_attachment_size
            if limit and len(payload) > limit and (name or _is_attachment(part)):
                return RuleHit(f"attachment {name or content_type!r} is {len(payload)} bytes, "
                               f"over the limit of {limit}")
            if is_zip and policy.banned_extensions:
                for member in _zip_members(payload, 1):
                    why = banned_name(member, policy.banned_extensions)
                    if why:
                        return RuleHit(f"{why} inside archive {name or 'attachment'!r}")
        return None


def _decoded(value: object) -> str:
    """A header value with RFC 2047 encoded words decoded (what a reader would see)."""
    text = str(value)
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, email.errors.MessageError):
        # MessageError: HeaderParseError, and CharsetError for a charset name that is not
        # ASCII ("=?utf\xad8?q??=").
        return text


def _filename(part: email.message.Message) -> str | None:
    try:
        name = part.get_filename()  # filename= of Content-Disposition, else name=; RFC 2231
    except (ValueError, LookupError, TypeError):
        # TypeError: RFC 2231 continuations with and without a number ('filename*0="";
        # filename*'), which the stdlib sorts together (None < 0).
        return None
    return _decoded(name) if name else None


def _is_attachment(part: email.message.Message) -> bool:
    # str(): compat32 gives a header with raw 8-bit octets as a Header object, not a str.
    return str(part.get("Content-Disposition") or "").strip().lower().startswith("attachment")


def _zip_members(data: bytes, depth: int) -> Iterator[str]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError):
        # NotImplementedError: a member needs a later zip version than Python reads ("zip
        # file version 14.8"); like a damaged archive, it is left to the virus scanner.
        return
    for info in infos:
        yield info.filename
        if depth < MAX_ZIP_DEPTH and info.filename.lower().endswith(".zip") \
                and info.file_size <= MAX_NESTED_ZIP:
            try:
                inner = archive.read(info)
            except (zipfile.BadZipFile, ValueError, OSError, RuntimeError, EOFError,
                    NotImplementedError):
                continue  # encrypted or damaged: its name was checked, that is all
            yield from _zip_members(inner, depth + 1)
