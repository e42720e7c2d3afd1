"""Where a message waits while it is fetched and scanned: memory up to a threshold, then an
unlinked temporary file.

A 100 MB message then costs the threshold in RAM, not 100 MB. The file is created already
unlinked (tempfile.TemporaryFile uses O_TMPFILE on Linux), so a crash leaves nothing behind
and nobody else can open it.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["Spool"]

READ_CHUNK = 1 << 20


class Spool:
    """In memory the pieces are kept as they came (immutable bytes, not copied into one
    buffer): a message in one read is never copied, and the client's copy goes out in the
    same pieces (each pass over a MB costs about a millisecond here)."""

    def __init__(self, threshold: int, directory: Path | None = None) -> None:
        self.threshold = threshold
        self.directory = directory
        self._pieces: list[bytes] | None = []
        self._file: BinaryIO | None = None
        self.size = 0

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> None:
        if self._pieces is not None:
            if self.size + len(data) <= self.threshold:
                self._pieces.append(bytes(data) if type(data) is not bytes else data)
                self.size += len(data)
                return
            self._file = tempfile.TemporaryFile(  # noqa: SIM115 (closed by close())
                prefix="mailgate-pop3-", dir=None if self.directory is None else
                str(self.directory))
            self._file.writelines(self._pieces)
            self._pieces = None
        assert self._file is not None
        self._file.write(data)
        self.size += len(data)

    def head(self, limit: int) -> bytes:
        """The first `limit` bytes (fewer if the message is shorter)."""
        if self._pieces is not None:
            if len(self._pieces) == 1 and self.size <= limit:
                return self._pieces[0]
            taken, length = [], 0
            for piece in self._pieces:
                if length >= limit:
                    break
                taken.append(piece)
                length += len(piece)
            data = b"".join(taken)
            return data if len(data) <= limit else data[:limit]
        assert self._file is not None
        self._file.flush()
        self._file.seek(0)
        data = self._file.read(limit)
        self._file.seek(0, io.SEEK_END)
        return data

    def getvalue(self) -> bytes:
        """The whole message in memory (for scanning: callers bound it with max_scan_size)."""
        if self._pieces is not None and len(self._pieces) > 1:
            self._pieces = [b"".join(self._pieces)]  # joined once, for every later reader
        return self.head(self.size)

    def chunks(self, start: int = 0, size: int = READ_CHUNK) -> Iterator[bytes]:
        """The message from `start` on, in pieces of at most `size` bytes (in memory, the
        pieces it is kept in where they are no larger: not copied)."""
        if self._pieces is not None:
            offset = 0
            for piece in self._pieces:
                end = offset + len(piece)
                if end > start:
                    skip = max(start - offset, 0)
                    if skip == 0 and len(piece) <= size:
                        yield piece
                    else:
                        for at in range(skip, len(piece), size):
                            yield piece[at:at + size]
                offset = end
            return
        assert self._file is not None
        self._file.flush()
        self._file.seek(start)
        while True:
            data = self._file.read(size)
            if not data:
                break
            yield data
        self._file.seek(0, io.SEEK_END)

    def close(self) -> None:
        self._pieces = None
        if self._file is not None:
            self._file.close()
            self._file = None
