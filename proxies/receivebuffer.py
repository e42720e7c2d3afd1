"""The buffer asyncio reads into for our protocols (`asyncio.BufferedProtocol`): one per
thread, shared by every connection of that thread's loop.

Why not `Protocol.data_received`: for it asyncio calls `sock.recv(256 KiB)`, which allocates
256 KiB (an mmap, above glibc's threshold), then shrinks and frees it, three system calls and
fresh pages for every read. Measured on this project's 2-core VM: 24 us for a 5 KB read that
way, against 5 us with `recv_into` a buffer that stays; a 5 KB POP3 RETR through the proxy
costs two or three reads.

One buffer serves every connection because asyncio calls `buffer_updated` right after it has
filled the buffer. The rule for a protocol: copy what it keeps *before it calls anything else*
(the POP3 codecs append to their own bytearrays; the byte relay hands `bytes` on, since a
transport may keep what it could not send yet). Copying before returning is not enough:
closing an asyncio TLS transport (3.11 sslproto: close -> _do_flush -> _do_read) delivers
that transport's decrypted bytes at once, into this same buffer, so a callback that closed
one would overwrite the view its caller still holds.
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["SIZE", "SharedBufferProtocol", "receive_buffer"]

# asyncio's own read size for Protocols (selector_events.max_size).
SIZE = 256 * 1024

_local = threading.local()


def receive_buffer() -> memoryview:
    """This thread's buffer (its contents are only valid until the next read)."""
    try:
        view: memoryview = _local.view
    except AttributeError:
        view = _local.view = memoryview(bytearray(SIZE))
    return view


class SharedBufferProtocol(asyncio.BufferedProtocol):
    """A protocol that reads into this thread's buffer: each read reaches `data_received` as
    a memoryview of it, which the subclass copies from before it calls anything else."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(receive_buffer()[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        raise NotImplementedError
