"""Writing a file so that it survives a crash: the Postfix rule the queue and the quarantine
share, that nothing is acknowledged (a `250`, a quarantine id) before it is on disk.

The sequence is write, flush, fsync the file, rename it into place, fsync the directory: the
file's fsync makes its data durable, the directory's makes its name durable (a rename that is
not fsynced can vanish in a crash, leaving the data under no name; see fsync(2)).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["fsync_directory", "fsync_file", "write_all", "write_new_file"]


def fsync_file(path: Path) -> None:
    """fsync a file already written (and closed) by someone else, e.g. a writer thread."""
    _fsync(path, 0)


def fsync_directory(path: Path) -> None:
    """Make the names created, renamed or removed in `path` durable."""
    _fsync(path, os.O_DIRECTORY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, chunks: list[bytes]) -> None:
    """Write every chunk, in order, with as few writev calls as the kernel allows (it may
    write less than asked, and takes at most IOV_MAX buffers a call)."""
    views = [memoryview(c) for c in chunks if c]
    while views:
        written = os.writev(fd, views[:1024])
        while written:
            if written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0


def write_new_file(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist: two writers never share a file), write `data` and
    fsync it; mode 0600, as it holds other people's mail. On any failure the partial file is
    removed and the OSError raised."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)  # close can report a delayed write error too (NFS)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
