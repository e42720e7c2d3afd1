"""Near-valid hostile input, shared by the fuzz modules: the pieces real attacks and broken
peers are made of. Random bytes alone rarely get past a parser's first check; these reach the
states behind it."""

from __future__ import annotations

from hypothesis import strategies as st

# Line ends that some implementation somewhere accepts, and their broken neighbours (SMTP
# smuggling, CVE-2023-51764, lives in the difference).
LINE_ENDS = (b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"", b"\r\r\n", b"\n\r", b"\x00\r\n")
line_ends = st.sampled_from(LINE_ENDS)

# A TLS ClientHello record header and the start of its body: what a client that misread the
# port or STARTTLS's reply sends where a command belongs.
TLS_RECORD = (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32))
              + b"\x00\x02\x13\x01\x01\x00")

# Bytes that change a parser's mind: line ends, NUL, the dot of dot-stuffing, the characters
# of paths and parameters, an invalid UTF-8 lead byte, a UTF-8 continuation byte, DEL.
SPECIAL = b"\r\n\x00. :<>\"\\@%!=,[]\t\x7f\xff\x80\xc3"

noise = st.binary(max_size=40)
special_bytes = st.lists(st.sampled_from([bytes([b]) for b in SPECIAL]),
                         max_size=12).map(b"".join)


def odd_case(word: bytes) -> st.SearchStrategy[bytes]:
    """`word` with the case of each letter drawn: commands are case-insensitive."""
    flips = st.lists(st.booleans(), min_size=len(word), max_size=len(word))
    return flips.map(lambda bits: bytes(
        c ^ 0x20 if bit and chr(c).isalpha() else c for c, bit in zip(word, bits, strict=True)))


def long_line(sizes: tuple[int, ...] = (250, 509, 510, 511, 512, 513, 998, 999, 1000, 1001,
                                        1200)) -> st.SearchStrategy[bytes]:
    """A line around a length limit (RFC 5321 4.5.3.1.4 and .6), of one repeated octet."""
    return st.tuples(st.sampled_from(sizes), st.sampled_from([b"x", b".", b" ", b"\xc3"])).map(
        lambda t: t[1] * t[0])


# --- envelope addresses ---------------------------------------------------------------------

LOCAL_PARTS = ("alice", "a.b", ".a", "a.", "a..b", '"a b"', '"a\\"b"', '"a@b"', '"', '""',
               "user%other.example", "host!user", "Postmaster", "postmaster", "é", "a\uff20b",
               "\u202eexe", "a+tag", "x" * 64, "x" * 65, "a\\b", "a b", "")
DOMAINS = ("example.com", "EXAMPLE.COM", "example.com.", "xn--bcher-kva.example", "bücher.example",
           "xn--a", "xn--ls8h", "xn--", "a..b", "-a.example", "a-.example", "[192.0.2.1]",
           "[IPv6:2001:db8::1]", "[IPv6:fe80::1%eth0]", "[300.1.1.1]", "[tag:x]",
           "sub.example\u3002com", "b\u00fccher.example", "x" * 64 + ".example",
           ".".join(["a" * 63] * 4), "ex_ample.com", "")


@st.composite
def paths(draw: st.DrawFn) -> str:
    """A MAIL/RCPT path near the RFC 5321 4.1.2 grammar, with the usual suspects."""
    local = draw(st.sampled_from(LOCAL_PARTS) | st.text(max_size=12))
    domain = draw(st.sampled_from(DOMAINS) | st.text(max_size=12))
    at = draw(st.sampled_from(["@", "@", "@", "", "@@", "\uff20"]))
    route = draw(st.sampled_from(["", "", "", "@relay.example:", "@a.example,@b.example:",
                                  "@:", "@a.example"]))
    path = route + local + at + domain
    return draw(st.sampled_from([f"<{path}>", f"<{path}>", path, f"<{path}", f"{path}>",
                                 f" <{path}> ", "<>", "<<>>"]))
