"""An asyncio client for rspamd's normal worker: `POST /checkv2`, one connection per message.

The request carries the SMTP envelope in rspamd's own request headers (`IP`, `Helo`, `From`,
one `Rcpt` per recipient, `MTA-Name`): its SPF check needs the client address, HELO and
sender, its greylisting keys on address, sender and recipients, and without them both would
judge the message as if it came from nowhere.

rspamd answers a JSON object (its "Protocol" documentation): `score`, `required_score`,
`action` ("no action", "greylist", "add header", "rewrite subject", "soft reject",
"reject", and since rspamd 2 "quarantine" and "discard"), `symbols` (name -> details) and
`messages` (`smtp_message`: the text for the SMTP client). The action is kept as typed data
(`ScanResult.scanner_action`) and the protocol's table (proxies.mail.actions) says what it
means; the verdict is spam when the action would mark or refuse the message. A custom action
rspamd may be configured with is no request at all: the verdict then follows the score.

The SPF, DKIM and DMARC results are read from the symbols rspamd's modules insert (the
`_AUTH_SYMBOLS` table) for the Authentication-Results field (proxies.mail.authresults).

Why no keep-alive and no chunked replies: rspamd's HTTP server never keeps a connection for a
second request. Its reply head always carries `Connection: close` and a `Content-Length`
(rspamd_http_message_write_header, src/libserver/http/http_connection.c, server side), and it
closes the connection after the body, whatever the request asked. Measured with Debian 12's
rspamd 3.4, normal worker and controller, HTTP/1.0 and HTTP/1.1 with `Connection: keep-alive`:
tests/lab/test_scan_peers.py keeps checking it. A connection pool and a chunked decoder would be
code that never meets a real rspamd, so there are none: we say `Connection: close` ourselves,
read the head and exactly Content-Length bytes of body, and close. A reply framed any other
way is a protocol error (ScannerError), not something to guess at.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from proxies.scan.api import (
    SCANNER_ACTIONS,
    AuthMethod,
    AuthOutcome,
    AuthResult,
    ScanEnvelope,
    ScannerAction,
    ScanResult,
)
from proxies.scan.config import ScannerConfig, SocketAddress
from proxies.scan.connection import MAX_REPLY, ScannerError, connect

NAME = "rspamd"
SPAM_ACTIONS: tuple[ScannerAction, ...] = ("add header", "rewrite subject", "reject",
                                           "quarantine", "discard")
# rspamd's symbols for each result (its spf, dkim and dmarc modules, 3.x names).
_AUTH_SYMBOLS: dict[str, tuple[AuthMethod, AuthOutcome]] = {
    "R_SPF_ALLOW": ("spf", "pass"),
    "R_SPF_FAIL": ("spf", "fail"),
    "R_SPF_SOFTFAIL": ("spf", "softfail"),
    "R_SPF_NEUTRAL": ("spf", "neutral"),
    "R_SPF_DNSFAIL": ("spf", "temperror"),
    "R_SPF_PERMFAIL": ("spf", "permerror"),
    "R_SPF_NA": ("spf", "none"),
    "R_DKIM_ALLOW": ("dkim", "pass"),
    "R_DKIM_REJECT": ("dkim", "fail"),
    "R_DKIM_TEMPFAIL": ("dkim", "temperror"),
    "R_DKIM_PERMFAIL": ("dkim", "permerror"),
    "R_DKIM_NA": ("dkim", "none"),
    "DMARC_POLICY_ALLOW": ("dmarc", "pass"),
    "DMARC_POLICY_ALLOW_WITH_FAILURES": ("dmarc", "pass"),
    "DMARC_POLICY_REJECT": ("dmarc", "fail"),
    "DMARC_POLICY_QUARANTINE": ("dmarc", "fail"),
    "DMARC_POLICY_SOFTFAIL": ("dmarc", "fail"),
    "DMARC_BAD_POLICY": ("dmarc", "permerror"),
    "DMARC_DNSFAIL": ("dmarc", "temperror"),
    "DMARC_NA": ("dmarc", "none"),
}
# A domain as rspamd's options name it: DKIM "example.com" or "example.com:s=selector",
# DMARC "example.com" or "example.com : reason".
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*"
                     r"[A-Za-z0-9])?)*")
_SELECTOR = re.compile(r"s=([A-Za-z0-9._-]+)")
# Envelope values go into HTTP request headers: a line end or NUL in one would start another.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
MAX_MESSAGE = 200


def envelope_headers(envelope: ScanEnvelope) -> list[tuple[str, str]]:
    """rspamd's request headers for the envelope (its "Protocol" documentation)."""
    headers = [("IP", envelope.client_address), ("Helo", envelope.helo),
               ("From", envelope.sender or "<>")]
    headers += [("Rcpt", rcpt) for rcpt in envelope.recipients]
    if envelope.received_by:
        headers.append(("MTA-Name", envelope.received_by))
    return [(name, _UNSAFE.sub("", value)) for name, value in headers if value]


def checkv2_request(address: SocketAddress, content: bytes,
                    envelope: ScanEnvelope | None = None) -> bytes:
    host = f"[{address.host}]" if ":" in address.host else address.host
    extra = "".join(f"{name}: {value}\r\n"
                    for name, value in envelope_headers(envelope)) if envelope else ""
    # UTF-8: SMTPUTF8 addresses (RFC 6531); rspamd reads the header values as UTF-8.
    return (f"POST /checkv2 HTTP/1.1\r\nHost: {host}:{address.port}\r\n{extra}"
            f"Content-Length: {len(content)}\r\nConnection: close\r\n\r\n"
            ).encode("utf-8", "surrogateescape") + content


@dataclass(frozen=True)
class HttpHead:
    status: int
    headers: dict[str, str]


def parse_head(raw: bytes) -> HttpHead:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ScannerError(f"{NAME}: not an HTTP reply: {lines[0][:200]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ScannerError(f"{NAME}: bad HTTP header line {line[:200]!r}")
        headers[name.strip().lower()] = value.strip()
    return HttpHead(int(parts[1]), headers)


def body_length(head: HttpHead) -> int:
    """The length of the body that follows `head`: its Content-Length, the only framing
    rspamd uses (see the module's docstring)."""
    if "transfer-encoding" in head.headers:
        raise ScannerError(f"{NAME}: unexpected Transfer-Encoding "
                           f"{head.headers['transfer-encoding'][:50]!r}")
    length_text = head.headers.get("content-length")
    if length_text is None or not length_text.isdigit():
        raise ScannerError(f"{NAME}: reply without a Content-Length")
    length = int(length_text)
    if length > MAX_REPLY:
        raise ScannerError(f"{NAME}: reply too long")
    return length


def result_from_json(body: bytes) -> ScanResult:
    try:
        data = json.loads(body)
        score = float(data["score"])
        threshold = float(data["required_score"])
        action_text = str(data["action"])
        symbols = data.get("symbols") or {}
        messages = data.get("messages") or {}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ScannerError(f"{NAME}: unexpected reply {body[:200]!r}") from None
    if not isinstance(symbols, dict):
        symbols = {}
    rules = tuple(sorted(symbols))
    action = next((a for a in SCANNER_ACTIONS if a == action_text), None)
    spam = action in SPAM_ACTIONS if action is not None else score >= threshold
    message = messages.get("smtp_message") if isinstance(messages, dict) else None
    output = (f"{NAME}: action={action_text!r} score={score:g} required={threshold:g} "
              f"symbols={','.join(rules)}",)
    return ScanResult("spam" if spam else "clean", score=score, threshold=threshold,
                      rules=rules, scanners=(NAME,), output=output, scanner_action=action,
                      scanner_message=_message(message), auth=auth_results(symbols))


def _message(value: object) -> str:
    """rspamd's text for the SMTP client, as one printable line of ASCII (it goes into our
    reply; RFC 5321 4.2 allows no more without SMTPUTF8)."""
    if not isinstance(value, str):
        return ""
    text = "".join(c if c.isascii() and c.isprintable() else " " for c in value)
    return " ".join(text.split())[:MAX_MESSAGE]


def auth_results(symbols: dict[str, Any]) -> tuple[AuthResult, ...]:
    """SPF, DKIM and DMARC results from rspamd's symbols, in that order; DKIM once per
    signing domain rspamd names."""
    found: list[AuthResult] = []
    for name, (method, result) in _AUTH_SYMBOLS.items():
        if name not in symbols:
            continue
        details = symbols[name]
        options = details.get("options") if isinstance(details, dict) else None
        options = [o for o in options if isinstance(o, str)] if isinstance(options, list) \
            else []
        if method == "spf":
            found.append(AuthResult("spf", result))
        elif method == "dkim":
            signatures = [_dkim_signature(o) for o in options] if result != "none" else []
            signatures = [sig for sig in signatures if sig[0]]
            found.extend(AuthResult("dkim", result, domain, selector)
                         for domain, selector in signatures or [("", "")])
        else:
            domain = _domain(options[0]) if options and result != "none" else ""
            found.append(AuthResult("dmarc", result, domain))
    order = {"spf": 0, "dkim": 1, "dmarc": 2}
    return tuple(sorted(found, key=lambda r: order[r.method]))


def _domain(option: str) -> str:
    match = _DOMAIN.match(option.strip())
    return match.group(0).lower() if match and "." in match.group(0) else ""


def _dkim_signature(option: str) -> tuple[str, str]:
    selector = _SELECTOR.search(option)
    return _domain(option.split(":", 1)[0]), selector.group(1) if selector else ""


class RspamdClient:
    name = NAME

    def __init__(self, config: ScannerConfig) -> None:
        self.config = config
        self._slots = asyncio.Semaphore(config.concurrency)

    async def scan(self, content: bytes, envelope: ScanEnvelope | None = None) -> ScanResult:
        if len(content) > self.config.max_size:
            return ScanResult("clean", reason=f"{NAME}: skipped, over {self.config.max_size} "
                              "bytes")
        try:
            async with asyncio.timeout(self.config.timeout), self._slots:
                body = await self._request(content, envelope)
            return result_from_json(body)
        except TimeoutError:
            return ScanResult("failed", reason=f"{NAME}: no answer within "
                              f"{self.config.timeout:g} s", timed_out=True)
        except ScannerError as exc:
            return ScanResult("failed", reason=str(exc))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return ScanResult("failed", reason=f"{NAME}: connection closed before a reply")
        except OSError as exc:
            return ScanResult("failed", reason=f"{NAME}: {exc.strerror or exc}")

    async def _request(self, content: bytes, envelope: ScanEnvelope | None) -> bytes:
        connection = await connect(self.config.address)
        try:
            connection.writer.write(checkv2_request(self.config.address, content, envelope))
            await connection.writer.drain()
            head = parse_head((await connection.reader.readuntil(b"\r\n\r\n"))[:-4])
            body = await connection.reader.readexactly(body_length(head))
            if head.status != 200:
                raise ScannerError(f"{NAME}: HTTP {head.status} "
                                   f"{body[:200].decode('utf-8', 'replace')}")
            return body
        finally:
            connection.close()

    def close(self) -> None:
        """Nothing stays open between scans; kept so every scanner client closes alike."""
