"""The sans-I/O SMTP client: scripted conversations (bytes <-> events) and properties."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxies.smtp.client import (
    NEED_DATA,
    ClientEvent,
    ClientSession,
    Failed,
    Finished,
    LocalProtocolError,
    ReadyForContent,
    Reply,
    StartTls,
    TlsMode,
)
from proxies.smtp.dataframe import DataReader
from proxies.smtp.events import DataComplete

CI = settings(max_examples=300, deadline=None)

CONTENT = b"Subject: hi\r\n\r\n.leading dot\r\nbody"
WIRE_CONTENT = b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\n"

GREETING = b"220 mx.example ESMTP\r\n"
EHLO_PIPELINING = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250 8BITMIME\r\n"
EHLO_PLAIN = b"250-mx.example\r\n250 SIZE\r\n"
EHLO_TLS = b"250-mx.example\r\n250-STARTTLS\r\n250 PIPELINING\r\n"
C_EHLO = b"EHLO gw.example\r\n"
QUIT = b"QUIT\r\n"


R = Reply


@dataclass
class Session:
    sender: str = "alice@src.example"
    recipients: Sequence[str] = ("bob@dst.example", "carol@dst.example")
    size: int = len(CONTENT)
    options: dict[str, Any] = field(default_factory=dict)

    def make(self) -> ClientSession:
        options = {"eight_bit": False, "smtputf8": False, "tls": "never", **self.options}
        return ClientSession("gw.example", self.sender, self.recipients, self.size, **options)


# Script steps: ("S", server bytes), ("C", bytes the client sends now), ("E", next event),
# ("TLS",) the driver finished the handshake, ("CONTENT", chunk, final).
Step = tuple[Any, ...]


def run(session: ClientSession, script: Sequence[Step], *, byte_by_byte: bool = False) -> None:
    for number, step in enumerate(script):
        kind = step[0]
        where = f"step {number}: {step!r}"
        if kind == "S":
            if byte_by_byte and step[1]:
                for byte in step[1]:
                    session.receive_data(bytes([byte]))
            else:
                session.receive_data(step[1])
        elif kind == "C":
            assert session.data_to_send() == step[1], where
        elif kind == "E":
            assert session.next_event() == step[1], where
        elif kind == "TLS":
            session.tls_established()
        elif kind == "CONTENT":
            session.send_content(step[1], final=step[2])
        else:
            raise AssertionError(kind)
    assert session.data_to_send() == b"", "unexpected output at the end"


def finished(results: dict[str, Reply], session_reply: Reply | None) -> Finished:
    return Finished(results, session_reply)


BOB, CAROL = "bob@dst.example", "carol@dst.example"
QUEUED = R(250, "2.0.0", "Ok: queued as 1")

SCRIPTS: dict[str, tuple[Session, list[Step]]] = {
    "no pipelining, one command at a time": (Session(), [
        ("E", NEED_DATA), ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO),
        ("S", EHLO_PLAIN), ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\n"),
        ("S", b"250 2.1.0 Ok\r\n"), ("E", NEED_DATA), ("C", b"RCPT TO:<bob@dst.example>\r\n"),
        ("S", b"250 2.1.5 Ok\r\n"), ("E", NEED_DATA), ("C", b"RCPT TO:<carol@dst.example>\r\n"),
        ("S", b"250 2.1.5 Ok\r\n"), ("E", NEED_DATA), ("C", b"DATA\r\n"),
        ("S", b"354 End data with <CR><LF>.<CR><LF>\r\n"), ("E", ReadyForContent()),
        ("CONTENT", CONTENT, True), ("C", WIRE_CONTENT), ("E", NEED_DATA),
        ("S", b"250 2.0.0 Ok: queued as 1\r\n"),
        ("E", finished({BOB: QUEUED, CAROL: QUEUED}, QUEUED)), ("C", QUIT),
        ("E", finished({BOB: QUEUED, CAROL: QUEUED}, QUEUED)),   # repeated, not an error
        ("S", b"221 2.0.0 Bye\r\n"),
    ]),
    "pipelining, one recipient refused": (Session(), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\nRCPT TO:<bob@dst.example>\r\n"
              b"RCPT TO:<carol@dst.example>\r\nDATA\r\n"),
        ("S", b"250 2.1.0 Ok\r\n550 5.1.1 <bob@dst.example>: unknown\r\n"),
        ("E", NEED_DATA),
        ("S", b"250 2.1.5 Ok\r\n354 go ahead\r\n"), ("E", ReadyForContent()),
        ("CONTENT", CONTENT, True), ("C", WIRE_CONTENT),
        ("S", b"250 2.0.0 Ok: queued as 1\r\n"),
        ("E", finished({BOB: R(550, "5.1.1", "<bob@dst.example>: unknown"), CAROL: QUEUED},
                       QUEUED)),
        ("C", QUIT),
    ]),
    "8-bit content announced when offered": (Session(options={"eight_bit": True}), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33 BODY=8BITMIME\r\n"
              b"RCPT TO:<bob@dst.example>\r\nRCPT TO:<carol@dst.example>\r\nDATA\r\n"),
        ("S", b"421 4.3.2 shutting down\r\n"),
        ("E", Failed(R(421, "4.3.2", "shutting down"), "mail")),
    ]),
    "8-bit content, no 8BITMIME: sent as it is": (Session(options={"eight_bit": True}), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PLAIN), ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\n"),
        ("S", b"550 5.7.1 go away\r\n"), ("E", Failed(R(550, "5.7.1", "go away"), "mail")),
        ("C", QUIT),
    ]),
    "8-bit content, no 8BITMIME, strict": (
        Session(options={"eight_bit": True, "strict_8bitmime": True}), [
            ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PLAIN),
            ("E", Failed(R(554, "5.6.3", "8-bit content, but the server does not offer "
                                         "8BITMIME"), "policy")),
            ("C", QUIT),
        ]),
    "SMTPUTF8 offered": (
        Session(sender="ålice@src.example", options={"smtputf8": True, "eight_bit": True}), [
            ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO),
            ("S", b"250-mx.example\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"), ("E", NEED_DATA),
            ("C", "MAIL FROM:<ålice@src.example> BODY=8BITMIME SMTPUTF8\r\n".encode()),
            ("S", b"451 4.3.0 try later\r\n"), ("E", Failed(R(451, "4.3.0", "try later"), "mail")),
            ("C", QUIT),
        ]),
    "SMTPUTF8 needed, not offered": (Session(options={"smtputf8": True}), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", Failed(R(550, "5.6.7", "SMTPUTF8 is required, but was not offered by the "
                                     "server"), "policy")),
        ("C", QUIT),
    ]),
    "message over the server's SIZE": (Session(size=20_000), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", Failed(R(552, "5.3.4", "message size 20000 exceeds the size limit 10000 of the "
                                     "server"), "policy")),
        ("C", QUIT),
    ]),
    "every recipient refused, no pipelining: no DATA": (Session(), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PLAIN), ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\n"), ("S", b"250 Ok\r\n"),
        ("E", NEED_DATA), ("C", b"RCPT TO:<bob@dst.example>\r\n"),
        ("S", b"550 5.1.1 no bob\r\n"), ("E", NEED_DATA), ("C", b"RCPT TO:<carol@dst.example>\r\n"),
        ("S", b"450 4.2.0 carol greylisted\r\n"),
        ("E", finished({BOB: R(550, "5.1.1", "no bob"),
                        CAROL: R(450, "4.2.0", "carol greylisted")}, None)),
        ("C", QUIT),
    ]),
    "every recipient refused, pipelined: DATA refused too": (Session(), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\nRCPT TO:<bob@dst.example>\r\n"
              b"RCPT TO:<carol@dst.example>\r\nDATA\r\n"),
        ("S", b"250 Ok\r\n550 5.1.1 no bob\r\n550 5.1.1 no carol\r\n"
              b"554 5.5.1 Error: no valid recipients\r\n"),
        ("E", finished({BOB: R(550, "5.1.1", "no bob"), CAROL: R(550, "5.1.1", "no carol")},
                       None)),
        ("C", QUIT),
    ]),
    "every recipient refused, pipelined, server says 354 anyway": (Session(), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\nRCPT TO:<bob@dst.example>\r\n"
              b"RCPT TO:<carol@dst.example>\r\nDATA\r\n"),
        ("S", b"250 Ok\r\n550 no bob\r\n550 no carol\r\n354 go\r\n"), ("E", NEED_DATA),
        ("C", b".\r\n"), ("S", b"554 5.5.1 no valid recipients\r\n"),
        ("E", finished({BOB: R(550, None, "no bob"), CAROL: R(550, None, "no carol")}, None)),
        ("C", QUIT),
    ]),
    "MAIL refused, pipelined: the other replies are read first": (Session(), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\nRCPT TO:<bob@dst.example>\r\n"
              b"RCPT TO:<carol@dst.example>\r\nDATA\r\n"),
        ("S", b"553 5.1.8 bad sender\r\n503 5.5.1 need MAIL\r\n"), ("E", NEED_DATA),
        ("S", b"503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"),
        ("E", Failed(R(553, "5.1.8", "bad sender"), "mail")), ("C", QUIT),
    ]),
    "DATA refused": (Session(recipients=[BOB]), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\nRCPT TO:<bob@dst.example>\r\nDATA\r\n"),
        ("S", b"250 Ok\r\n250 Ok\r\n554 5.7.1 not from you\r\n"),
        ("E", finished({BOB: R(554, "5.7.1", "not from you")}, R(554, "5.7.1", "not from you"))),
        ("C", QUIT),
    ]),
    "content refused permanently, multi-line": (Session(recipients=[BOB]), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\nRCPT TO:<bob@dst.example>\r\nDATA\r\n"),
        ("S", b"250 Ok\r\n250 Ok\r\n354 go\r\n"), ("E", ReadyForContent()),
        ("CONTENT", CONTENT, True), ("C", WIRE_CONTENT),
        ("S", b"550-5.7.1 spam detected\r\n550 5.7.1 see https://example/why\r\n"),
        ("E", finished({BOB: R(550, "5.7.1", "spam detected\nsee https://example/why")},
                       R(550, "5.7.1", "spam detected\nsee https://example/why"))),
        ("C", QUIT),
    ]),
    "content deferred": (Session(recipients=[BOB]), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\nRCPT TO:<bob@dst.example>\r\nDATA\r\n"),
        ("S", b"250 Ok\r\n250 Ok\r\n354 go\r\n"), ("E", ReadyForContent()),
        ("CONTENT", b"a\r", False), ("C", b"a\r"), ("CONTENT", b"\n.b", False),
        ("C", b"\n..b"), ("CONTENT", b"", True), ("C", b"\r\n.\r\n"),
        ("S", b"451 4.7.1 greylisted\r\n"),
        ("E", finished({BOB: R(451, "4.7.1", "greylisted")}, R(451, "4.7.1", "greylisted"))),
        ("C", QUIT),
    ]),
    "multi-line greeting, null sender, duplicate recipient": (
        Session(sender="", recipients=[BOB, BOB]), [
            ("S", b"220-mx.example ESMTP\r\n220 no UCE\r\n"), ("E", NEED_DATA), ("C", C_EHLO),
            ("S", b"250 mx.example\r\n"), ("E", NEED_DATA), ("C", b"MAIL FROM:<>\r\n"),
            ("S", b"250 Ok\r\n"), ("E", NEED_DATA), ("C", b"RCPT TO:<bob@dst.example>\r\n"),
            ("S", b"250 Ok\r\n"), ("E", NEED_DATA), ("C", b"DATA\r\n"),
            ("S", b"354 go\r\n"), ("E", ReadyForContent()), ("CONTENT", b"", True),
            ("C", b".\r\n"), ("S", b"250 Ok\r\n"),
            ("E", finished({BOB: R(250, None, "Ok")}, R(250, None, "Ok"))), ("C", QUIT),
        ]),
    "EHLO refused: HELO": (Session(recipients=[BOB]), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO),
        ("S", b"502 5.5.2 Error: command not recognized\r\n"), ("E", NEED_DATA),
        ("C", b"HELO gw.example\r\n"), ("S", b"250 mx.example\r\n"), ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example>\r\n"), ("S", b"250 Ok\r\n"), ("E", NEED_DATA),
        ("C", b"RCPT TO:<bob@dst.example>\r\n"), ("S", b"550 No\r\n"),
        ("E", finished({BOB: R(550, None, "No")}, None)), ("C", QUIT),
    ]),
    "HELO refused too": (Session(), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", b"500 what\r\n"),
        ("E", NEED_DATA), ("C", b"HELO gw.example\r\n"), ("S", b"501 bad name\r\n"),
        ("E", Failed(R(501, None, "bad name"), "helo")), ("C", QUIT),
    ]),
    "EHLO deferred": (Session(), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", b"450 busy\r\n"),
        ("E", Failed(R(450, None, "busy"), "ehlo")), ("C", QUIT),
    ]),
    "5xx greeting is retried later": (Session(), [
        ("S", b"554 5.7.1 You are blocked\r\n"),
        ("E", Failed(R(454, "4.7.1", "You are blocked"), "greeting")), ("C", QUIT),
    ]),
    "421 greeting: no QUIT": (Session(), [
        ("S", b"421 4.3.2 too busy\r\n"), ("E", Failed(R(421, "4.3.2", "too busy"), "greeting")),
    ]),
    "STARTTLS offered, opportunistic": (Session(recipients=[BOB],
                                                options={"tls": "opportunistic"}), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_TLS), ("E", NEED_DATA),
        ("C", b"STARTTLS\r\n"), ("S", b"220 2.0.0 Ready to start TLS\r\n"), ("E", StartTls()),
        ("TLS",), ("C", C_EHLO),
        # Over TLS the server offers no STARTTLS; we must not ask again either way.
        ("S", b"250-mx.example\r\n250-STARTTLS\r\n250 PIPELINING\r\n"), ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example>\r\nRCPT TO:<bob@dst.example>\r\nDATA\r\n"),
        ("S", b"250 Ok\r\n250 Ok\r\n354 go\r\n"), ("E", ReadyForContent()),
        ("CONTENT", CONTENT, True), ("C", WIRE_CONTENT), ("S", b"250 2.0.0 Ok: queued as 1\r\n"),
        ("E", finished({BOB: QUEUED}, QUEUED)), ("C", QUIT),
    ]),
    "STARTTLS refused, opportunistic: carry on in plain text": (
        Session(recipients=[BOB], options={"tls": "opportunistic"}), [
            ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_TLS), ("E", NEED_DATA),
            ("C", b"STARTTLS\r\n"), ("S", b"454 4.7.0 TLS not available\r\n"), ("E", NEED_DATA),
            ("C", b"MAIL FROM:<alice@src.example>\r\nRCPT TO:<bob@dst.example>\r\nDATA\r\n"),
            ("S", b"421 4.4.2 bye\r\n"), ("E", Failed(R(421, "4.4.2", "bye"), "mail")),
        ]),
    "STARTTLS never": (Session(recipients=[BOB], options={"tls": "never"}), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_TLS), ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example>\r\nRCPT TO:<bob@dst.example>\r\nDATA\r\n"),
    ]),
    "TLS required, not offered": (Session(options={"tls": "required"}), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", Failed(R(451, "4.7.4", "TLS is required, but was not offered by the server"),
                     "starttls")),
        ("C", QUIT),
    ]),
    "TLS required, refused": (Session(options={"tls": "required"}), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_TLS), ("E", NEED_DATA),
        ("C", b"STARTTLS\r\n"), ("S", b"554 5.7.0 no\r\n"),
        ("E", Failed(R(451, "4.7.4", "TLS is required, but STARTTLS was refused: "
                                     "554 5.7.0 no"), "starttls")),
        ("C", QUIT),
    ]),
    "TLS required, EHLO refused": (Session(options={"tls": "required"}), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", b"502 no\r\n"), ("E", NEED_DATA),
        ("C", b"HELO gw.example\r\n"), ("S", b"250 hi\r\n"),
        ("E", Failed(R(451, "4.7.4", "TLS is required, but was not offered by the server"),
                     "starttls")),
        ("C", QUIT),
    ]),
    "plain text injected after the 220 to STARTTLS": (Session(options={"tls": "required"}), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_TLS), ("E", NEED_DATA),
        ("C", b"STARTTLS\r\n"), ("S", b"220 go ahead\r\n250-injected\r\n250 PIPELINING\r\n"),
        ("E", Failed(R(451, "4.4.0", "protocol error from server: unsolicited data (starttls)"),
                     "starttls")),
    ]),
    "plain text arriving during the TLS handshake": (Session(options={"tls": "required"}), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_TLS), ("E", NEED_DATA),
        ("C", b"STARTTLS\r\n"), ("S", b"220 go ahead\r\n"), ("E", StartTls()),
        ("S", b"250 injected\r\n"), ("TLS",),
        ("E", Failed(R(451, "4.4.0", "protocol error from server: plain text after the 220 to "
                                     "STARTTLS"), "starttls")),
    ]),
    "EHLO refused after STARTTLS": (Session(options={"tls": "required"}), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_TLS), ("E", NEED_DATA),
        ("C", b"STARTTLS\r\n"), ("S", b"220 go ahead\r\n"), ("E", StartTls()), ("TLS",),
        ("C", C_EHLO), ("S", b"554 5.7.1 no\r\n"),
        ("E", Failed(R(454, "4.7.1", "no"), "ehlo")), ("C", QUIT),
    ]),
    "garbage greeting": (Session(), [
        ("S", b"SSH-2.0-OpenSSH_9.2\r\n"),
        ("E", Failed(R(451, "4.4.0", "protocol error from server: not an SMTP reply line: "
                                     "b'SSH-2.0-OpenSSH_9.2'"), "greeting")),
    ]),
    "reply line too long": (Session(), [
        ("S", b"220 " + b"x" * 600),
        ("E", Failed(R(451, "4.4.0", "protocol error from server: reply line longer than 512 "
                                     "octets"), "greeting")),
    ]),
    "reply with too many lines": (Session(), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", b"250-x\r\n" * 150),
        ("E", Failed(R(451, "4.4.0", "protocol error from server: reply longer than 100 lines"),
                     "ehlo")),
    ]),
    "codes change within a reply": (Session(), [
        ("S", b"220-a\r\n250 b\r\n"),
        ("E", Failed(R(451, "4.4.0", "protocol error from server: reply code changed within a "
                                     "multi-line reply: 220, 250"), "greeting")),
    ]),
    "2xx to DATA": (Session(recipients=[BOB]), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\nRCPT TO:<bob@dst.example>\r\nDATA\r\n"),
        ("S", b"250 Ok\r\n250 Ok\r\n250 Ok\r\n"),
        ("E", Failed(R(451, "4.4.0", "protocol error from server: unexpected reply to DATA: "
                                     "250 Ok"), "data")),
    ]),
    "3xx to RCPT": (Session(recipients=[BOB]), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PLAIN), ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\n"), ("S", b"250 Ok\r\n"),
        ("E", NEED_DATA), ("C", b"RCPT TO:<bob@dst.example>\r\n"), ("S", b"354 what\r\n"),
        ("E", Failed(R(451, "4.4.0", "protocol error from server: unexpected reply to RCPT: "
                                     "354 what"), "rcpt")),
    ]),
    "a reply before the command was sent": (Session(), [
        ("S", GREETING + b"250 mx.example\r\n"),
        ("E", Failed(R(451, "4.4.0", "protocol error from server: unsolicited data (ehlo)"),
                     "ehlo")),
    ]),
    "data after 354": (Session(recipients=[BOB]), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\nRCPT TO:<bob@dst.example>\r\nDATA\r\n"),
        ("S", b"250 Ok\r\n250 Ok\r\n354 go\r\n250 2.0.0 fake queued\r\n"),
        ("E", Failed(R(451, "4.4.0", "protocol error from server: unsolicited data (data)"),
                     "data")),
    ]),
    "an unsolicited 421": (Session(), [
        ("S", GREETING + b"421 4.3.2 shutting down\r\n"),
        ("E", Failed(R(421, "4.3.2", "shutting down"), "ehlo")),
    ]),
    "connection closed": (Session(), [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", b"250-mx.example\r\n"),
        ("E", NEED_DATA), ("S", b""),
        ("E", Failed(R(451, "4.4.2", "connection closed by server while waiting for the ehlo "
                                     "reply"), "ehlo")),
    ]),
    "LF-only replies": (Session(recipients=[BOB]), [
        ("S", b"220 mx\n"), ("E", NEED_DATA), ("C", C_EHLO), ("S", b"250-mx\n250 PIPELINING\n"),
        ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example>\r\nRCPT TO:<bob@dst.example>\r\nDATA\r\n"),
        ("S", b"250 Ok\n550 no\n503 no\n"), ("E", finished({BOB: R(550, None, "no")}, None)),
        ("C", QUIT),
    ]),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_script(name: str) -> None:
    session, script = SCRIPTS[name]
    run(session.make(), script)


@pytest.mark.parametrize("name", [n for n in SCRIPTS if "too long" not in n])
def test_script_byte_by_byte(name: str) -> None:
    """The same conversations with the server's bytes arriving one at a time."""
    session, script = SCRIPTS[name]
    # Feeding byte by byte only changes *when* replies complete; events checked at the same
    # points stay the same because every check follows a complete server step.
    run(session.make(), script, byte_by_byte=True)


def greeted(**options: Any) -> ClientSession:
    session = Session(recipients=[BOB], options=options).make()
    session.receive_data(GREETING)
    assert session.next_event() is NEED_DATA
    session.data_to_send()
    session.receive_data(EHLO_PIPELINING)
    assert session.next_event() is NEED_DATA
    session.data_to_send()
    session.receive_data(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    assert session.next_event() == ReadyForContent()
    return session


def test_local_misuse() -> None:
    session = Session().make()
    with pytest.raises(LocalProtocolError):
        session.send_content(b"too early")
    with pytest.raises(LocalProtocolError):
        session.tls_established()
    ready = greeted()
    with pytest.raises(LocalProtocolError, match="send_content"):
        ready.next_event()
    with pytest.raises(LocalProtocolError, match="bare CR or LF"):
        ready.send_content(b"smuggle\n.\nMAIL FROM:<x@y>\r\n")


def test_canonical_content_is_stuffed_without_the_line_ending_check() -> None:
    """The delivery process's sessions (canonical=True) send the queue's content, which the
    handler made CRLF-only before its 250: stuffed as ever, just not scanned again."""
    ready = greeted(canonical=True)
    ready.send_content(b"line\r\n.dot\r\n")
    assert ready.data_to_send() == b"line\r\n..dot\r\n.\r\n"


@pytest.mark.parametrize(("sender", "recipients", "options"), [
    ("a@b.example", [], {}),
    ("a@b.example", ["x@y.example\r\nRSET"], {}),
    ("a@b.example\r\nDATA", ["x@y.example"], {}),
    ("a@b.example", ["x@y.example>"], {}),
    ("a@b.example", ["x\x00@y.example"], {}),
    ("ålice@b.example", ["x@y.example"], {}),                  # needs smtputf8=True
    ("a@b.example", ["x" * 600 + "@y.example"], {}),
    ("a@b.example", [""], {}),
    ("a@b.example", ["x@y.example"], {"tls": "sometimes"}),
])
def test_bad_arguments(sender: str, recipients: list[str], options: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        Session(sender=sender, recipients=recipients, options=options).make()
    with pytest.raises(LocalProtocolError):
        ClientSession("bad helo", "a@b.example", ["x@y.example"], 1, eight_bit=False,
                      smtputf8=False)


# --- keep_open: several transactions over one connection --------------------------------------

def kept_open_after_one(**options: Any) -> ClientSession:
    """A keep_open session that delivered one message (pipelining) and queued no QUIT."""
    session = Session(recipients=[BOB], options={"keep_open": True, **options}).make()
    run(session, [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\nRCPT TO:<bob@dst.example>\r\n"
              b"DATA\r\n"),
        ("S", b"250 Ok\r\n250 Ok\r\n354 go\r\n"), ("E", ReadyForContent()),
        ("CONTENT", CONTENT, True), ("C", WIRE_CONTENT),
        ("S", b"250 2.0.0 Ok: queued as 1\r\n"),
        ("E", finished({BOB: QUEUED}, QUEUED)), ("C", b""),
    ])
    assert session.reusable
    return session


def test_keep_open_second_transaction_after_rset() -> None:
    """With PIPELINING the RSET leads the next envelope's group (RFC 2920 3.1): one write
    and one round trip, not two."""
    session = kept_open_after_one()
    session.next_transaction("dave@src.example", [CAROL], 4, eight_bit=False, smtputf8=False)
    assert not session.reusable
    second = R(250, "2.0.0", "Ok: queued as 2")
    run(session, [
        ("E", NEED_DATA),
        ("C", b"RSET\r\nMAIL FROM:<dave@src.example> SIZE=4\r\nRCPT TO:<carol@dst.example>\r\n"
              b"DATA\r\n"),
        ("S", b"250 2.0.0 Ok\r\n250 Ok\r\n250 Ok\r\n354 go\r\n"), ("E", ReadyForContent()),
        ("CONTENT", b"body", True), ("C", b"body\r\n.\r\n"),
        ("S", b"250 2.0.0 Ok: queued as 2\r\n"),
        ("E", finished({CAROL: second}, second)), ("C", b""),
    ])
    assert session.reusable
    session.quit()
    assert session.data_to_send() == QUIT
    assert not session.reusable
    with pytest.raises(LocalProtocolError):
        session.next_transaction("a@b.example", [BOB], 1, eight_bit=False, smtputf8=False)


def test_keep_open_without_pipelining_waits_for_the_rset_reply() -> None:
    session = Session(recipients=[BOB], options={"keep_open": True}).make()
    run(session, [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PLAIN), ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\n"), ("S", b"250 Ok\r\n"),
        ("E", NEED_DATA), ("C", b"RCPT TO:<bob@dst.example>\r\n"), ("S", b"250 Ok\r\n"),
        ("E", NEED_DATA), ("C", b"DATA\r\n"), ("S", b"354 go\r\n"), ("E", ReadyForContent()),
        ("CONTENT", CONTENT, True), ("C", WIRE_CONTENT), ("S", b"250 2.0.0 Ok: queued as 1\r\n"),
        ("E", finished({BOB: QUEUED}, QUEUED)), ("C", b""),
    ])
    session.next_transaction("dave@src.example", [CAROL], 4, eight_bit=False, smtputf8=False)
    run(session, [
        ("E", NEED_DATA), ("C", b"RSET\r\n"), ("S", b"250 2.0.0 Ok\r\n"), ("E", NEED_DATA),
        ("C", b"MAIL FROM:<dave@src.example> SIZE=4\r\n"),
    ])


@pytest.mark.parametrize(("reply", "expected", "quit"), [
    (b"421 4.3.2 closing\r\n", Failed(R(421, "4.3.2", "closing"), "rset"), b""),
    (b"554 5.5.0 no\r\n", Failed(R(454, "4.5.0", "no"), "rset"), QUIT),
])
def test_keep_open_rset_refused(reply: bytes, expected: Failed, quit: bytes) -> None:
    # The message is not at fault: a refused RSET is a transient failure of the connection
    # (the driver retries on a new one), whatever the pipelined envelope behind it got.
    session = kept_open_after_one()
    session.next_transaction("a@b.example", [BOB], 1, eight_bit=False, smtputf8=False)
    run(session, [("C", b"RSET\r\nMAIL FROM:<a@b.example> SIZE=1\r\nRCPT TO:<bob@dst.example>"
                        b"\r\nDATA\r\n"), ("S", reply), ("E", expected), ("C", quit)])
    assert not session.reusable


def test_keep_open_not_reusable_after_421_or_eof() -> None:
    session = Session(recipients=[BOB], options={"keep_open": True}).make()
    run(session, [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PIPELINING),
        ("E", NEED_DATA), ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\n"
                                b"RCPT TO:<bob@dst.example>\r\nDATA\r\n"),
        ("S", b"421 4.3.2 shutting down\r\n"),
        ("E", Failed(R(421, "4.3.2", "shutting down"), "mail")), ("C", b""),
    ])
    assert not session.reusable
    with pytest.raises(LocalProtocolError):
        session.next_transaction("a@b.example", [BOB], 1, eight_bit=False, smtputf8=False)
    # A greeting refused: never past hello, so never reused (QUIT as without keep_open).
    refused = Session(recipients=[BOB], options={"keep_open": True}).make()
    run(refused, [("S", b"554 5.7.1 go away\r\n"),
                  ("E", Failed(R(454, "4.7.1", "go away"), "greeting")), ("C", QUIT)])
    assert not refused.reusable


def test_keep_open_without_pipelining_all_recipients_refused() -> None:
    # Nothing outstanding after the last RCPT's 550: the connection stays usable.
    session = Session(recipients=[BOB], options={"keep_open": True}).make()
    refused = R(550, "5.1.1", "unknown")
    run(session, [
        ("S", GREETING), ("E", NEED_DATA), ("C", C_EHLO), ("S", EHLO_PLAIN), ("E", NEED_DATA),
        ("C", b"MAIL FROM:<alice@src.example> SIZE=33\r\n"), ("S", b"250 Ok\r\n"),
        ("E", NEED_DATA), ("C", b"RCPT TO:<bob@dst.example>\r\n"),
        ("S", b"550 5.1.1 unknown\r\n"), ("E", finished({BOB: refused}, None)), ("C", b""),
    ])
    assert session.reusable


# --- properties -----------------------------------------------------------------------------

def drive(session: ClientSession, server_chunks: Sequence[bytes], content: bytes = CONTENT
          ) -> tuple[ClientEvent, bytes]:
    """The lead's driver loop against canned server bytes: returns the last event and
    everything the client sent."""
    sent = []
    chunks = list(server_chunks)
    event: ClientEvent = NEED_DATA
    for _ in range(10_000):
        sent.append(session.data_to_send())
        event = session.next_event()
        if event is NEED_DATA:
            if not chunks:
                break
            session.receive_data(chunks.pop(0))
        elif isinstance(event, StartTls):
            session.tls_established()
        elif isinstance(event, ReadyForContent):
            session.send_content(content)
        else:
            sent.append(session.data_to_send())
            break
    return event, b"".join(sent)


@CI
@given(st.lists(st.binary(max_size=60) | st.sampled_from([
    GREETING, EHLO_PIPELINING, EHLO_TLS, b"250 Ok\r\n", b"354 go\r\n", b"220 go\r\n",
    b"550 no\r\n", b"421 bye\r\n", b"250-", b"\r\n", b""]), max_size=25),
    st.sampled_from(["never", "opportunistic", "required"]))
def test_arbitrary_server_bytes_never_raise(chunks: list[bytes], tls: TlsMode) -> None:
    session = Session(options={"tls": tls}).make()
    event, sent = drive(session, chunks)
    if isinstance(event, Finished):
        assert set(event.results) == {BOB, CAROL}
    if isinstance(event, Failed):
        assert event.reply.code // 100 in (4, 5)
        assert "\n" not in str(event.reply) and "\r" not in str(event.reply)
    # Whatever the server said, the client only ever sent whole commands and, at most once,
    # the stuffed content: nothing the server sends can make it say anything else.
    assert sent.count(WIRE_CONTENT) <= 1
    commands = sent.replace(WIRE_CONTENT, b"")
    assert commands == b"" or commands.endswith(b"\r\n")
    for line in commands.split(b"\r\n")[:-1]:
        assert line in COMMANDS, line


COMMANDS = {C_EHLO[:-2], b"HELO gw.example", b"STARTTLS", b"DATA", b"QUIT", b".",
            b"MAIL FROM:<alice@src.example>", b"MAIL FROM:<alice@src.example> SIZE=33",
            b"RCPT TO:<bob@dst.example>", b"RCPT TO:<carol@dst.example>"}


class FakeServer:
    """A scripted server: answers each command the client sends from a list of choices, and
    reads DATA with the strict reader, to check what arrives."""

    def __init__(self, ehlo: bytes, codes: dict[str, list[int]]) -> None:
        self.ehlo = ehlo
        self.codes = codes
        self.buffer = b""
        self.data: DataReader | None = None
        self.received: bytes | None = None
        self.rcpt_codes: dict[str, int] = {}
        self.data_code: int | None = None

    def answer(self, code: int) -> bytes:
        return f"{code} {code // 100}.0.0 reply\r\n".encode()

    def feed(self, data: bytes) -> bytes:
        out = b""
        self.buffer += data
        while self.buffer:
            if self.data is not None:
                self.data.receive_data(self.buffer)
                self.buffer = b""
                event = self.data.next_event()
                if not isinstance(event, DataComplete):
                    break
                self.data = None
                self.received = event.content
                self.buffer = event.leftover
                out += self.answer(self.codes["end"].pop(0))
                continue
            line, sep, rest = self.buffer.partition(b"\r\n")
            if not sep:
                break
            self.buffer = rest
            verb = line.split(b" ")[0].split(b":")[0].upper()
            if verb == b"EHLO":
                out += self.ehlo
            elif verb == b"MAIL":
                out += self.answer(self.codes["mail"].pop(0))
            elif verb == b"RCPT":
                code = self.codes["rcpt"].pop(0)
                self.rcpt_codes[line.decode()[9:-1]] = code
                out += self.answer(code)
            elif verb == b"DATA":
                code = self.codes["data"].pop(0)
                self.data_code = code
                if code == 354:
                    self.data = DataReader()
                out += self.answer(code)
            elif verb == b"QUIT":
                out += b"221 bye\r\n"
            else:
                out += b"502 unknown\r\n"
        return out


@CI
@given(
    st.lists(st.sampled_from(["a@x.example", "b@x.example", "c@y.example", "d@z.example"]),
             min_size=1, max_size=4, unique=True),
    st.sampled_from([250, 451, 550]),
    st.lists(st.sampled_from([250, 250, 450, 550]), min_size=4, max_size=4),
    st.sampled_from([354, 354, 451, 554]),
    st.sampled_from([250, 250, 452, 552]),
    st.booleans(),
    st.lists(st.sampled_from([b"a", b".", b"\r\n", b"..", b"x" * 30]), max_size=30),
)
def test_against_a_fake_server(recipients: list[str], mail: int, rcpt: list[int], data: int,
                               end: int, pipelining: bool, parts: list[bytes]) -> None:
    content = b"".join(parts)
    ehlo = b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n" if pipelining else b"250 mx\r\n"
    server = FakeServer(ehlo, {"mail": [mail], "rcpt": list(rcpt), "data": [data],
                               "end": [end]})
    session = ClientSession("gw.example", "s@src.example", recipients, len(content),
                            eight_bit=False, smtputf8=False, tls="never")
    session.receive_data(GREETING)
    event: ClientEvent = NEED_DATA
    for _ in range(100):
        event = session.next_event()
        if isinstance(event, ReadyForContent):
            session.send_content(content)
            continue
        reply = server.feed(session.data_to_send())
        if isinstance(event, Finished | Failed):
            break
        assert event is NEED_DATA
        session.receive_data(reply)
    if mail != 250:
        assert event == Failed(Reply(mail, f"{mail // 100}.0.0", "reply"), "mail")
        assert not server.received   # at most the empty message that drains a 354
        return
    assert isinstance(event, Finished)
    assert list(event.results) == recipients
    accepted = [r for r in recipients if server.rcpt_codes[r] == 250]
    for recipient in recipients:
        code = server.rcpt_codes[recipient]
        if code != 250:
            assert event.results[recipient].code == code
    if not accepted:
        assert event.session_reply is None
        assert not server.received   # at most the empty message that drains a 354
        return
    final = end if data == 354 else data
    assert event.session_reply is not None and event.session_reply.code == final
    assert all(event.results[r].code == final for r in accepted)
    if data == 354:
        expected = content if content.endswith(b"\r\n") or not content else content + b"\r\n"
        assert server.received == expected
