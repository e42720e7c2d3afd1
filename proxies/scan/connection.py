"""Opening a stream to a scanner and the errors every scanner client shares.

`ScannerError` means the scanner could not give a verdict (refused, closed early, answered
something we do not understand); a timeout is asyncio's TimeoutError. Either makes the scan
"failed" and [scan] fail_mode decides what happens to the message.
"""

from __future__ import annotations

import asyncio
import contextlib

from proxies.scan.config import SocketAddress

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# Replies from scanners are short (a verdict, a list of rule names, a JSON object); a reply
# larger than this is a protocol error, not something to buffer.
MAX_REPLY = 4 * 1024 * 1024


class ScannerError(Exception):
    """The scanner could not give a verdict; the text goes into logs and headers."""


async def open_stream(address: SocketAddress) -> Stream:
    if address.path is not None:
        return await asyncio.open_unix_connection(str(address.path), limit=MAX_REPLY)
    return await asyncio.open_connection(address.host, address.port, limit=MAX_REPLY)


class Connection:
    """An open stream to a scanner and how many requests it has carried."""

    def __init__(self, stream: Stream) -> None:
        self.reader, self.writer = stream
        self.requests = 0

    @property
    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        """Close without waiting (used on timeouts and errors, when the peer may be stuck)."""
        with contextlib.suppress(Exception):
            self.writer.close()


async def connect(address: SocketAddress) -> Connection:
    return Connection(await open_stream(address))


class ConnectionPool:
    """Idle connections kept for reuse, for protocols that allow more than one request per
    connection (clamd's IDSESSION). At most `size` are kept."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: list[Connection] = []
        self._closed = False

    def take(self) -> Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable:
                return connection
            connection.close()
        return None

    def give_back(self, connection: Connection) -> None:
        # After close: a reply awaited in the background (a scan given up on) came late.
        if not self._closed and len(self._idle) < self.size and connection.usable:
            self._idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
