"""Envelope addresses (RFC 5321 4.1.2, RFC 6531 3.3) and relay control.

`parse_path` is strict: what it accepts is one mailbox with one meaning, in a normalised form
(`Address.domain` is lowercase ASCII, A-labels for IDNs). `RelayPolicy.check_recipient` is the
open-relay guard, after Postfix's `reject_unauth_destination`: a client outside
`relay_networks` may only send to our domains, and an address that asks for onward routing
("sender-specified routing": user%foreign@ours, foreign!user@ours, "user@foreign"@ours,
@ours:user@foreign) is refused even when it names our domain, because the server behind us may
honour the routing (Postfix sets RESOLVE_FLAG_ROUTED for these and `permit_auth_destination`
then declines them). What the policy accepted is what the delivery agent should route on:
`Verdict.address`, never a second parse of the raw string.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from encodings import idna
from typing import Final

from proxies.smtp.errors import RemoteProtocolError
from proxies.smtp.reply import Reply

__all__ = [
    "Address",
    "AddressSyntaxError",
    "RelayPolicy",
    "Verdict",
    "normalise_domain",
    "parse_path",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 5321 4.5.3.1.2: a domain name is at most 255 octets (DNS: 253 in text form).
MAX_DOMAIN_LENGTH: Final = 253
# RFC 5321 4.5.3.1.3: a path is at most 256 octets including the angle brackets.
MAX_PATH_LENGTH: Final = 256

# RFC 5322 3.2.3 atext; RFC 6531 3.3 adds UTF8-non-ascii.
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]+")
# RFC 5321 4.1.2 sub-domain = Let-dig [Ldh-str]; RFC 1035 2.3.4: at most 63 octets.
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Characters that ask for the local part to be routed onward: RFC 1123 5.2.16 (%), UUCP bang
# paths (!), and a second @ (only possible quoted). Postfix: allow_percent_hack, swap_bangpath.
_ROUTING_CHARACTERS: Final = frozenset("@%!")
# Ideographic, fullwidth and halfwidth ideographic full stops.
_IDNA_DOTS: Final = frozenset("\u3002\uff0e\uff61")


class AddressSyntaxError(RemoteProtocolError):
    """The client gave a path that is not a valid RFC 5321 (or RFC 6531) path."""

    def __init__(self, message: str) -> None:
        super().__init__(message, Reply(501, "5.1.3", "Bad address syntax"))


@dataclass(frozen=True)
class Address:
    """One parsed path.

    `local_part` is dequoted ("user@x" for the wire form "\\"user@x\\""); `domain` is lowercase
    ASCII with A-labels, or an address literal as "[192.0.2.1]" / "[IPv6:2001:db8::1]" (then
    `literal` holds the IP), or "" for the null path "<>" and a bare "<Postmaster>". `route`
    holds the domains of a source route (RFC 5321 4.1.2 A-d-l; 3.6.1 says to ignore them, we
    refuse them). `raw` is the text as given.
    """

    raw: str
    local_part: str
    domain: str
    quoted: bool = False
    route: tuple[str, ...] = ()
    literal: IPAddress | None = None

    @property
    def is_null(self) -> bool:
        """The null reverse-path "<>" (RFC 5321 4.5.5), used for bounces."""
        return not self.local_part and not self.domain

    @property
    def is_postmaster_only(self) -> bool:
        """RCPT TO:<Postmaster> without a domain (RFC 5321 4.1.1.3)."""
        return not self.domain and self.local_part.lower() == "postmaster"

    @property
    def has_routing(self) -> bool:
        """The local part asks for onward routing (@, % or ! in it, also after Unicode
        compatibility folding: a fullwidth at sign, U+FF20, is an "@" to
        a server that applies NFKC)."""
        folded = unicodedata.normalize("NFKC", self.local_part)
        return bool(_ROUTING_CHARACTERS.intersection(folded))

    @property
    def normalised(self) -> str:
        """The mailbox as it should be sent on: local part (quoted when it must be) "@"
        normalised domain, no source route; "" for the null path."""
        if self.is_null:
            return ""
        local = self.local_part
        if not _is_dot_string(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}" if self.domain else local


def _is_dot_string(text: str) -> bool:
    return bool(text) and all(_ATEXT.fullmatch(atom) for atom in text.split("."))


def _is_canonical_u_label(label: str, ascii_label: str) -> bool:
    # IDNA 2003 (the standard library's codec) maps some characters before encoding: case,
    # fullwidth forms, zero-width joiners, "ß" -> "ss", even a fullwidth dot into a real one.
    # A label that changes in that mapping could mean one domain here and another to the next
    # resolver, so only labels that survive the round trip are accepted.
    # ToUnicode raises UnicodeError for an A-label that does not decode ("xn--ss", the ToASCII
    # of "xn--\u00df"): not canonical either.
    try:
        decoded = idna.ToUnicode(ascii_label)
    except UnicodeError:
        return False
    return decoded == label.lower() and bool(_LDH_LABEL.fullmatch(ascii_label))


def normalise_domain(domain: str) -> str:
    """A domain name (RFC 5321 4.1.2 Domain, with U-labels per RFC 6531) as lowercase ASCII.

    Raises `AddressSyntaxError` for anything else, including a trailing dot, empty labels and
    IDN labels that are not in canonical form.
    """
    if not domain or len(domain) > MAX_DOMAIN_LENGTH * 4:
        raise AddressSyntaxError("empty or overlong domain")
    if _IDNA_DOTS.intersection(domain):
        # RFC 3490 3.1: these separate labels to an IDNA resolver, but not to us.
        raise AddressSyntaxError("non-ASCII full stop in domain")
    labels = []
    for label in domain.split("."):
        if label.isascii():
            lowered = label.lower()
            if not _LDH_LABEL.fullmatch(lowered):
                raise AddressSyntaxError(f"bad domain label {label!r}")
            if lowered.startswith("xn--"):
                # An A-label must decode, and re-encode to itself; one that is not valid
                # punycode ("xn--a") makes ToUnicode raise UnicodeError.
                try:
                    unicode_label = idna.ToUnicode(lowered)
                    again = idna.ToASCII(unicode_label).decode("ascii")
                except UnicodeError as exc:
                    raise AddressSyntaxError(f"bad A-label {label!r}") from exc
                if unicode_label == lowered or again != lowered:
                    raise AddressSyntaxError(f"bad A-label {label!r}")
            labels.append(lowered)
            continue
        try:
            ascii_label = idna.ToASCII(label).decode("ascii").lower()
        except UnicodeError as exc:
            raise AddressSyntaxError(f"bad IDN label {label!r}") from exc
        if not _is_canonical_u_label(label, ascii_label):
            raise AddressSyntaxError(f"IDN label {label!r} is not in canonical form")
        labels.append(ascii_label)
    result = ".".join(labels)
    if len(result) > MAX_DOMAIN_LENGTH:
        raise AddressSyntaxError("domain longer than 253 octets")
    return result


def _parse_literal(text: str) -> tuple[str, IPAddress]:
    # RFC 5321 4.1.3: "[" IPv4 "]" or "[IPv6:" IPv6 "]"; General-address-literal is refused.
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ip6 = ipaddress.IPv6Address(inner[5:])
            if ip6.scope_id is not None:
                raise ValueError("scoped address")
            return f"[IPv6:{ip6.compressed}]", ip6
        ip4 = ipaddress.IPv4Address(inner)
    except ValueError as exc:
        raise AddressSyntaxError(f"bad address literal {text!r}") from exc
    return f"[{ip4}]", ip4


def _parse_quoted(text: str) -> tuple[str, int]:
    """RFC 5321 4.1.2 Quoted-string at text[0]; returns (dequoted, index after the quote)."""
    out: list[str] = []
    index = 1
    while index < len(text):
        char = text[index]
        if char == '"':
            return "".join(out), index + 1
        if char == "\\":
            # quoted-pairSMTP = "\" %d32-126
            if index + 1 >= len(text) or not (" " <= text[index + 1] <= "~"):
                raise AddressSyntaxError("bad quoted pair")
            out.append(text[index + 1])
            index += 2
            continue
        # qtextSMTP = %d32-33 / %d35-91 / %d93-126, plus UTF8-non-ascii (RFC 6531).
        if not (" " <= char <= "~" or char >= "\u0080"):
            raise AddressSyntaxError("bad character in quoted local part")
        out.append(char)
        index += 1
    raise AddressSyntaxError("unterminated quoted local part")


def parse_path(text: str, *, null_ok: bool = False) -> Address:
    """Parse a MAIL FROM / RCPT TO path: "<user@example.org>" or, as aiosmtpd passes it,
    "user@example.org".

    Accepts RFC 5321 4.1.2 Path (with a source route, recorded in `route`), UTF-8 per RFC 6531,
    "<>" only with `null_ok`, and a bare "Postmaster". Raises `AddressSyntaxError` otherwise:
    no domain, empty local part, trailing dot, unbalanced brackets, whitespace or control
    characters, unquoted second "@", general address literals, non-canonical IDN labels.
    """
    raw = text
    path = text.strip(" \t")
    if path.startswith("<") or path.endswith(">"):
        if not (path.startswith("<") and path.endswith(">")) or len(path) < 2:
            raise AddressSyntaxError("unbalanced angle brackets")
        path = path[1:-1]
    if not path:
        if null_ok:
            return Address(raw=raw, local_part="", domain="")
        raise AddressSyntaxError("empty path")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_LENGTH - 2:
        raise AddressSyntaxError("path longer than 256 octets")
    route: tuple[str, ...] = ()
    if path.startswith("@"):
        # A-d-l ":" Mailbox; A-d-l = At-domain *( "," At-domain )
        adl, colon, path = path.partition(":")
        if not colon:
            raise AddressSyntaxError("source route without ':'")
        hops = adl.split(",")
        if any(not hop.startswith("@") for hop in hops):
            raise AddressSyntaxError("bad source route")
        route = tuple(normalise_domain(hop[1:]) for hop in hops)
    quoted = path.startswith('"')
    if quoted:
        local_part, end = _parse_quoted(path)
        if path[end:end + 1] not in ("@", ""):
            raise AddressSyntaxError("text after the quoted local part")
        rest = path[end:]
    else:
        local_part, at, domain_text = path.partition("@")
        rest = at + domain_text
        if not _is_dot_string(local_part):
            raise AddressSyntaxError("bad local part")
    if not local_part:
        raise AddressSyntaxError("empty local part")
    if not rest:
        if local_part.lower() == "postmaster" and not quoted and not route:
            return Address(raw=raw, local_part=local_part, domain="")
        raise AddressSyntaxError("no domain")
    domain_text = rest[1:]
    if domain_text.startswith("[") and domain_text.endswith("]"):
        domain, literal = _parse_literal(domain_text)
        return Address(raw=raw, local_part=local_part, domain=domain, quoted=quoted,
                       route=route, literal=literal)
    return Address(raw=raw, local_part=local_part, domain=normalise_domain(domain_text),
                   quoted=quoted, route=route)


@dataclass(frozen=True)
class Verdict:
    """The answer to one RCPT (or MAIL): accepted, or the reply to refuse it with.

    `address` is the parsed address (None when it did not parse): route on its `domain`.
    """

    accepted: bool
    code: int
    enhanced: str
    text: str
    address: Address | None = None

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


def _config_domain(entry: str) -> str:
    """A configured domain: lowercase ASCII, trailing dot ignored, leading "." kept (it means
    "every subdomain")."""
    entry = entry.strip().rstrip(".")
    subdomains = entry.startswith(".")
    try:
        normal = normalise_domain(entry[1:] if subdomains else entry)
    except AddressSyntaxError as exc:
        raise ValueError(f"not a domain name: {entry!r}") from exc
    return "." + normal if subdomains else normal


def _client_ip(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack socket shows an IPv4 client as ::ffff:a.b.c.d.
        return address.ipv4_mapped
    return address


def _shown(address: Address) -> str:
    # Postfix quotes the address as the client gave it: "<user@example.org>: ...". The parse
    # succeeded, so there are no control characters in it to echo.
    path = address.raw.strip(" \t")
    if path.startswith("<") and path.endswith(">"):
        path = path[1:-1]
    return f"<{path}>"


class RelayPolicy:
    """Who may send mail to which recipients through us (Postfix: relay_domains, mynetworks,
    reject_unauth_destination).

    Domains are our `relay_domains` and the domains of the transport table: an entry matches
    that exact domain, or, when it starts with ".", any of its subdomains (not itself). A client
    in `relay_networks` may send to any valid domain or address literal, routing characters
    included (it could name the final address itself, as Postfix lets mynetworks do). Source
    routes are refused from everyone: RFC 5321 3.6.1 lets a server decline them, and nothing
    legitimate has used them for decades.
    """

    def __init__(self, relay_domains: Sequence[str], relay_networks: Sequence[IPNetwork | str],
                 transport_domains: Sequence[str] = ()) -> None:
        entries = [_config_domain(d) for d in (*relay_domains, *transport_domains)]
        self._exact = frozenset(e for e in entries if not e.startswith("."))
        self._parents = tuple(sorted({e for e in entries if e.startswith(".")}))
        self._networks = tuple(
            n if isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network)
            else ipaddress.ip_network(n, strict=False)
            for n in relay_networks)

    def is_our_domain(self, domain: str) -> bool:
        """Whether mail to this (normalised, see `normalise_domain`) domain is ours to take."""
        if not domain or domain.startswith("["):
            return False
        return domain in self._exact or any(domain.endswith(p) for p in self._parents)

    def is_relay_client(self, client_ip: str) -> bool:
        address = _client_ip(client_ip)
        return address is not None and any(address in n for n in self._networks)

    def check_recipient(self, rcpt: str, client_ip: str) -> Verdict:
        """The verdict on RCPT TO:<rcpt> from `client_ip`."""
        try:
            address = parse_path(rcpt)
        except AddressSyntaxError:
            return Verdict(False, 501, "5.1.3", "Bad recipient address syntax")
        shown = _shown(address)
        if address.route:
            return Verdict(False, 554, "5.7.1", f"{shown}: Source routes are not accepted",
                           address)
        if address.is_postmaster_only:
            # Postfix's reject_non_fqdn_recipient: we cannot tell whose postmaster is meant.
            return Verdict(False, 504, "5.5.2",
                           f"{shown}: Recipient address rejected: need fully-qualified address",
                           address)
        if self.is_relay_client(client_ip):
            return Verdict(True, 250, "2.1.5", "Ok", address)
        if not self.is_our_domain(address.domain) or address.has_routing:
            return Verdict(False, 554, "5.7.1", f"{shown}: Relay access denied", address)
        return Verdict(True, 250, "2.1.5", "Ok", address)

    def check_sender(self, sender: str) -> Verdict:
        """The verdict on MAIL FROM:<sender>: syntax only ("<>" is allowed)."""
        try:
            address = parse_path(sender, null_ok=True)
        except AddressSyntaxError:
            return Verdict(False, 501, "5.1.7", "Bad sender address syntax")
        if address.route:
            return Verdict(False, 501, "5.1.7", "Bad sender address syntax", address)
        return Verdict(True, 250, "2.1.0", "Ok", address)
