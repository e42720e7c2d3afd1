"""What every fuzz module shares: hypothesis settings, the corpus, counters and the checks that
a reply on the wire is well formed and carries no internal text."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.conftest import ci_enabled

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"

# Inputs each harness has checked in this process, by target: the campaign prints them.
EXAMPLES: Counter[str] = Counter()

# Bounded time per input. Every harness input is at most a few tens of KB and takes
# milliseconds; two seconds means a quadratic path or a loop, not a slow machine (2 CPUs
# shared with a qemu image test, say). Hypothesis fails an example only if it is over the
# deadline twice in a row.
DEADLINE_MS = int(os.environ.get("FUZZ_DEADLINE_MS", "2000"))
# A corpus replay is one input through every configuration of its harness.
REPLAY_SECONDS = 10.0


def fuzz_settings(examples: int) -> settings:
    """Settings for one property: `examples` is its share of the CI budget (the whole slice
    stays well under a minute); FUZZ_EXAMPLES sets every property's count instead, for a
    campaign by hand.

    Under CI the examples are derandomized: the gate then checks the same inputs on every run,
    so a submission is never failed by a bug it did not introduce, found by chance. Outside CI
    every run draws new inputs, and the campaign (`python -m bench.fuzz`) draws many more.
    """
    override = os.environ.get("FUZZ_EXAMPLES")
    count = int(override) if override else examples
    return settings(
        max_examples=count,
        deadline=timedelta(milliseconds=DEADLINE_MS),
        derandomize=ci_enabled() and not override,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
        print_blob=True,
    )


def corpus(target: str) -> list[Any]:
    """The saved inputs of `target`, one per file, as pytest params named by file."""
    folder = CORPUS_DIR / target
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    assert files, f"no corpus for {target} in {folder}"
    return [pytest.param(p.read_bytes(), id=p.name) for p in files]


@contextmanager
def bounded(seconds: float = REPLAY_SECONDS) -> Iterator[None]:
    """Fails if the block took longer than `seconds`: a saved input that once hung must stay
    fast (pytest-timeout stops a real hang; this catches a slow one)."""
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    assert elapsed < seconds, f"took {elapsed:.1f} s"


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (taken modulo its length): the pieces a network hands
    over, which must never change what a parser makes of the stream."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = []
    previous = 0
    for point in [*points, len(data)]:
        if point > previous:
            pieces.append(data[previous:point])
        previous = point
    return pieces


def every(data: bytes, size: int) -> list[bytes]:
    """`data` in pieces of `size` octets."""
    return [data[i:i + size] for i in range(0, len(data), size)]


# --- what must never reach a peer ---------------------------------------------------------------

# Python's own text: a traceback, an exception's repr ("ValueError('x')"), an object's default
# repr, a bytes repr or its escapes, None or a class shown by str(). STYLE.md practice 3: no
# traceback text ever reaches a peer; a reply that shows one of these was built from an
# exception or a value that was never meant to be shown.
INTERNAL_TEXT = re.compile(
    rb"Traceback|File \"|\w+(?:Error|Exception)\(|object at 0x|<class '|\bNone\b"
    rb"|\bb'|\bb\"|\\x[0-9a-f]{2}")

# RFC 5321 4.2: "ddd" SP text CRLF, with "ddd-" on every line but the last; 4.5.3.1.5: at most
# 512 octets with the CRLF. Our replies are ASCII text (HT and printable).
_SMTP_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])([\t\x20-\x7e]*))?")


def check_smtp_reply(wire: bytes) -> int:
    """Asserts `wire` is exactly one well-formed SMTP reply; returns its code."""
    assert wire.endswith(b"\r\n"), wire
    lines = wire[:-2].split(b"\r\n")
    codes = set()
    for index, line in enumerate(lines):
        assert len(line) + 2 <= 512, line[:80]
        match = _SMTP_LINE.fullmatch(line)
        assert match is not None, f"not a reply line: {line[:80]!r}"
        separator = match.group(2) or ""
        if index == len(lines) - 1:
            assert separator in (b" ", ""), wire
        else:
            assert separator == b"-", wire
        codes.add(match.group(1))
    assert len(codes) == 1, wire
    assert INTERNAL_TEXT.search(wire) is None, wire
    return int(codes.pop())


# RFC 1939 3: a status line is "+OK" or "-ERR", a space and text, CRLF; RFC 2449 4: at most 512
# octets. The codec's own replies are ASCII.
_POP3_ERR = re.compile(rb"-ERR [\x20-\x7e]*\r\n")


def check_pop3_reply(reply: bytes | None) -> None:
    """Asserts `reply` (what a POP3 protocol error carries) is one well-formed -ERR line."""
    assert reply is not None
    assert _POP3_ERR.fullmatch(reply) is not None, reply
    assert len(reply) <= 512, reply[:80]
    assert INTERNAL_TEXT.search(reply) is None, reply
