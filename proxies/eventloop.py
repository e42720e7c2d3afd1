"""The event loop the proxies run on: asyncio's own, or uvloop when asked for.

Measured with bench/smtp.py (2 SMTP workers, 10 KiB messages, 2 cores): uvloop did not pay,
3,903 against 3,957 CPU microseconds per message and no more messages per second. The time
goes to our own per-message work, not to the loop; so uvloop is not a dependency. It can be
tried with MAILGATE_EVENT_LOOP=uvloop (if installed): every piece works on both loops (the
supervisor watches pidfds, not SIGCHLD, which uvloop keeps for itself), and the tests say so:
tests/unit/test_smtp_differential.py runs the SMTP front end on both, and
tests/lab/test_pop3_lab.py::test_poplib_on_uvloop the POP3 proxy.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def name() -> str:
    """The loop `run` uses: "uvloop" or "asyncio"."""
    wanted = os.environ.get("MAILGATE_EVENT_LOOP", "asyncio").lower()
    if wanted == "uvloop" and importlib.util.find_spec("uvloop") is not None:
        return "uvloop"
    return "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    if name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
