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
    def __init__(self, threshold: int, directory: Path | None = None) -> None:
        self.threshold = threshold
        self.directory = directory
        self._memory: bytearray | None = bytearray()
        self._file: BinaryIO | None = None
        self.size = 0

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._memory is not None:
            if len(self._memory) + len(data) <= self.threshold:
                self._memory += data
                return
            self._file = tempfile.TemporaryFile(  # noqa: SIM115 (closed by close())
                prefix="mailgate-pop3-", dir=None if self.directory is None else
                str(self.directory))
            self._file.write(self._memory)
            self._memory = None
        assert self._file is not None
        self._file.write(data)

    def head(self, limit: int) -> bytes:
        """The first `limit` bytes (fewer if the message is shorter)."""
        if self._memory is not None:
            return bytes(self._memory[:limit])
        assert self._file is not None
        self._file.flush()
        self._file.seek(0)
        data = self._file.read(limit)
        self._file.seek(0, io.SEEK_END)
        return data

    def getvalue(self) -> bytes:
        """The whole message in memory (for scanning: callers bound it with max_scan_size)."""
        return self.head(self.size)

    def chunks(self, start: int = 0, size: int = READ_CHUNK) -> Iterator[bytes]:
        """The message from `start` on, in pieces of at most `size` bytes."""
        if self._memory is not None:
            view = memoryview(self._memory)
            for offset in range(start, len(self._memory), size):
                yield bytes(view[offset:offset + size])
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
        self._memory = None
        if self._file is not None:
            self._file.close()
            self._file = None
