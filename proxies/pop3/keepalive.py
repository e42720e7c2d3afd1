"""Keeping a client alive while a message is fetched whole and scanned (sans-I/O: the driver
passes the time in and sends what comes out).

The problem: the proxy must have the whole message, and the scanner's verdict, before it can
send the client one byte of content, and that can take longer than a client waits in silence
(fetchmail's default timeout is 300 s, getmail's 180 s, many desktop clients' 60 s or less).

The design, chosen so that clean mail still arrives byte-identical:
1. The server's status line ("+OK 1234 octets") is held back. A message that is ready within
   `after` seconds (the usual case) reaches the client exactly as the server sent it, status
   line included, with no trace of the proxy.
2. After `after` seconds the status line is sent, and then every `interval` seconds one more
   byte of the message's leading trace fields (Return-Path:, Received:, ...). Every version of
   the message the client can end up with (clean, tagged or the replacing notice) begins with
   those same fields (`proxies.pop3.rewrite`), so nothing sent early is ever wrong, and a
   client whose read timeout restarts with each byte keeps waiting.
3. When the verdict is in, the rest follows at full speed.
A message with no trace fields gets only the early status line. A failure after the status
line has gone (a scanner error under fail_mode = "tempfail", the server vanishing) can no
longer be answered with -ERR: the proxy closes the connection without the final ".", which
every client treats as a failed download, and the message stays on the server.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keepalive", "KeepaliveStep"]


@dataclass(frozen=True)
class KeepaliveStep:
    send_status: bool  # send the held status line now
    content: bytes  # then these bytes of content (unstuffed)


class Keepalive:
    def __init__(self, started: float, after: float, interval: float,
                 step_bytes: int = 1) -> None:
        self.started = started
        self.after = after
        self.interval = interval
        self.step_bytes = step_bytes
        self.status_sent = False
        self.sent = 0  # content octets sent early
        self._prefix = b""
        self._last = started

    def offer(self, prefix: bytes) -> None:
        """Content that every possible outcome starts with (the trace fields), as known."""
        if len(prefix) > len(self._prefix):
            self._prefix = prefix

    @property
    def next_due(self) -> float:
        if not self.status_sent:
            return self.started + self.after
        return self._last + self.interval

    def due(self, now: float) -> KeepaliveStep | None:
        """What to send at `now`, if anything; call it when `next_due` has come."""
        if now < self.next_due:
            return None
        self._last = now
        send_status = not self.status_sent
        self.status_sent = True
        content = self._prefix[self.sent:self.sent + self.step_bytes]
        self.sent += len(content)
        if not send_status and not content:
            return None
        return KeepaliveStep(send_status, content)
