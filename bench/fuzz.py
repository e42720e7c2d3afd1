"""A fuzzing campaign over every parser, run by hand: the CI slice (tests/fuzz) at length.

    python -m bench.fuzz [--minutes 10] [--target smtp_server ...] [--save-corpus] [--json]

Each target (one module of tests/fuzz) gets an equal share of the time, spent in two halves:
  hypothesis: the module's properties again and again, each run with new random inputs
      (FUZZ_EXAMPLES per run, not derandomized, the example database as usual);
  coverage:   a coverage-guided mutator, as atheris would do, in pure Python: inputs from the
      module's corpus are cut, flipped, spliced and given the target's tokens, each run
      through the module's `run()` harness with the arcs (line -> line) of the parser's
      source traced, and an input that reaches a new arc joins the queue. An input that
      takes over a second traced, and still over five untraced, is a hang.
A failed property is printed by hypothesis, shrunk, and kept in its example database (the
next run tries it first). A failure in the coverage half (a check of `run()`, an exception,
a hang) is shrunk by cutting pieces away and saved under --findings, ready to become a corpus
file and a regression example; one per kind of failure (exception and where it was raised).
With --save-corpus the three inputs that first reached the most arcs go into
tests/fuzz/corpus/<target>/ (review them before committing: the corpus is kept small).
Exit status: 0 if nothing was found, 1 if something was, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FUZZ_DIR = ROOT / "tests" / "fuzz"
CORPUS_DIR = FUZZ_DIR / "corpus"
# Examples per hypothesis run; each run is a fresh random start.
BATCH = 200
MAX_INPUT = 16384
HANG_SECONDS = 1.0
# Outside the work tree, so nothing found lands in a commit by accident.
FINDINGS = Path(tempfile.gettempdir()) / "mailgate-fuzz-findings"
# Octets that change a parser's mind (tests/fuzz/inputs.py SPECIAL), as mutation tokens too.
SPECIAL_TOKENS = (b"\r\n", b"\n", b"\r", b"\x00", b".", b"\r\n.\r\n", b" ", b":", b"<", b">",
                  b'"', b"\\", b"@", b"=", b"\xff", b"\xc3", b"\x80", b"\t", b"\x7f")


class Hang(BaseException):
    """Raised by the alarm inside a harness that runs too long. A BaseException, so that no
    `except Exception` in the code under test can swallow it."""


@dataclass
class Finding:
    kind: str                  # "property" (hypothesis), "crash", "hang"
    signature: str             # the exception and where it was raised
    detail: str = ""           # its message
    data: bytes = b""
    saved: str = ""


@dataclass
class Report:
    target: str
    hypothesis_runs: int = 0
    examples: int = 0
    executions: int = 0
    corpus: int = 0
    new_inputs: int = 0
    arcs: int = 0
    findings: list[Finding] = field(default_factory=list)


def targets() -> dict[str, ModuleType]:
    """Every fuzz module, by its TARGET."""
    found = {}
    for path in sorted(FUZZ_DIR.glob("test_*.py")):
        module = importlib.import_module(f"tests.fuzz.{path.stem}")
        found[module.TARGET] = module
    return found


# --- hypothesis ---------------------------------------------------------------------------------

def hypothesis_phase(module: ModuleType, seconds: float, report: Report) -> None:
    from tests.fuzz.harness import EXAMPLES

    tests = [getattr(module, name) for name in dir(module)
             if name.startswith("test_") and getattr(getattr(module, name), "is_hypothesis_test",
                                                     False)]
    before = EXAMPLES[report.target]
    deadline = time.monotonic() + seconds
    while tests and time.monotonic() < deadline:
        for test in tests:
            report.hypothesis_runs += 1
            try:
                test()
            except Exception as exc:   # a property failed: hypothesis printed the example
                report.findings.append(Finding("property", f"{test.__name__}: {_signature(exc)}",
                                               detail=_detail(exc)))
                tests.remove(test)        # shrunk and saved in the database; no more of it
                break
            if time.monotonic() >= deadline:
                break
    report.examples = EXAMPLES[report.target] - before


# --- coverage-guided mutation --------------------------------------------------------------------

class Arcs:
    """Line-to-line arcs executed in the files a target covers (sys.settrace)."""

    def __init__(self, covers: Sequence[str]) -> None:
        self.covers = tuple(covers)
        self.current: set[tuple[str, int, int]] = set()
        self._wanted: dict[str, bool] = {}

    def _is_covered(self, filename: str) -> bool:
        wanted = self._wanted.get(filename)
        if wanted is None:
            wanted = self._wanted[filename] = filename.endswith(self.covers)
        return wanted

    def trace(self, frame: FrameType, event: str, arg: object) -> Any:
        if not self._is_covered(frame.f_code.co_filename):
            return None
        last = -1
        current = self.current
        filename = frame.f_code.co_filename

        def local(frame: FrameType, event: str, arg: object) -> Any:
            nonlocal last
            if event == "line":
                current.add((filename, last, frame.f_lineno))
                last = frame.f_lineno
            return local
        return local

    def run(self, harness: Callable[[bytes], None], data: bytes) -> set[tuple[str, int, int]]:
        self.current = set()
        sys.settrace(self.trace)
        try:
            harness(data)
        finally:
            sys.settrace(None)
        return self.current


def mutate(data: bytes, pool: Sequence[bytes], tokens: Sequence[bytes], rng: random.Random
           ) -> bytes:
    """One to four random edits: what AFL and libFuzzer do, minus the instrumentation."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(8)
        at = rng.randint(0, len(out))
        if kind == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:
            out[min(at, len(out) - 1)] = rng.choice(b"\r\n\x00. :<>\"\\@\xff\x80")
        elif kind == 2:
            del out[at:at + rng.randint(1, 32)]
        elif kind == 3:
            out[at:at] = out[at:at + rng.randint(1, 64)]
        elif kind == 4:
            out[at:at] = rng.choice(tokens)
        elif kind == 5:
            other = rng.choice(pool)
            start = rng.randint(0, len(other))
            out = out[:at] + bytearray(other[start:start + rng.randint(1, 512)])
        elif kind == 6:
            del out[at:]
        else:
            out[at:at] = rng.randbytes(rng.randint(1, 16))
    return bytes(out[:MAX_INPUT])


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang()


def _signature(exc: BaseException) -> str:
    """The exception's type and the innermost line of ours it passed through: one bug, however
    many inputs show it (the message often quotes the input)."""
    where = ""
    for entry in traceback.extract_tb(exc.__traceback__):
        if entry.filename.startswith(str(ROOT)) and "/.venv/" not in entry.filename:
            where = f"{Path(entry.filename).relative_to(ROOT)}:{entry.lineno}"
    return f"{type(exc).__name__} at {where}"


def attempt(harness: Callable[[bytes], None], data: bytes) -> str | None:
    """None if the harness passed, else the failure's signature (a hang included)."""
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS * 5)
    try:
        harness(data)
    except Hang:
        return "Hang"
    except Exception as exc:
        return _signature(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return None


def _detail(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0][:160]


def shrink(harness: Callable[[bytes], None], data: bytes, signature: str) -> bytes:
    """Cut pieces away while the same failure remains (delta debugging, bounded)."""
    size = max(1, len(data) // 2)
    tries = 0
    while size >= 1 and tries < 400:
        start = 0
        while start < len(data) and tries < 400:
            candidate = data[:start] + data[start + size:]
            tries += 1
            if attempt(harness, candidate) == signature:
                data = candidate
            else:
                start += size
        size //= 2
    return data


def coverage_phase(module: ModuleType, seconds: float, report: Report, findings_dir: Path,
                   save_corpus: bool, rng: random.Random) -> None:
    harness: Callable[[bytes], None] = module.run
    covers = getattr(module, "COVERS", ())
    tokens = (*SPECIAL_TOKENS, *getattr(module, "TOKENS", ()))
    folder = CORPUS_DIR / report.target
    queue = [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()]
    report.corpus = len(queue)
    arcs = Arcs(covers)
    seen: set[tuple[str, int, int]] = set()
    for data in queue:
        seen |= arcs.run(harness, data)
    new_inputs: list[tuple[int, bytes]] = []     # (arcs it was first to reach, input)
    signatures: set[str] = set()
    deadline = time.monotonic() + seconds
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        while time.monotonic() < deadline:
            data = mutate(rng.choice(queue), queue, tokens, rng)
            report.executions += 1
            signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
            try:
                covered = arcs.run(harness, data)
            except Hang:
                signature, detail = "Hang", f"over {HANG_SECONDS} s traced"
            except Exception as exc:
                signature, detail = _signature(exc), _detail(exc)
            else:
                signature, detail = "", ""
                new = covered - seen
                if new:
                    seen |= new
                    queue.append(data)
                    new_inputs.append((len(new), data))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if not signature or signature in signatures:
                continue
            signatures.add(signature)
            # Again untraced (with five times the time): a hang that was only the tracer's
            # slowness passes now. What fails is shrunk by its own signature.
            again = attempt(harness, data)
            if again is None:
                continue
            small = shrink(harness, data, again)
            name = f"{'hang' if again == 'Hang' else 'crash'}-{_digest(small)}"
            path = findings_dir / report.target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(small)
            report.findings.append(Finding("hang" if again == "Hang" else "crash", again, detail,
                                           small, str(path)))
    finally:
        signal.signal(signal.SIGALRM, previous)
    report.new_inputs = len(new_inputs)
    report.arcs = len(seen)
    if save_corpus:
        # The inputs that opened up the most, small ones first among equals.
        best = sorted((i for i in new_inputs if len(i[1]) <= 4096),
                      key=lambda item: (-item[0], len(item[1])))
        for _, data in best[:3]:
            (folder / f"cov-{_digest(data)}").write_bytes(data)


def _digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:12]


# --- the command ------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Targets: the TARGET of each tests/fuzz module (smtp_server, smtp_client, "
               "smtp_dataframe, pop3_codec, smtp_addresses, scan_rules, queue_file, config).")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="the whole campaign, shared by the targets (default 10)")
    parser.add_argument("--target", action="append", default=[],
                        help="fuzz only this target (repeatable; default: all)")
    parser.add_argument("--mode", choices=("both", "hypothesis", "coverage"), default="both",
                        help="which half to run (default both)")
    parser.add_argument("--findings", type=Path, default=FINDINGS,
                        help=f"where inputs that broke something are saved ({FINDINGS})")
    parser.add_argument("--save-corpus", action="store_true",
                        help="add the three inputs that reached the most new arcs to the corpus")
    parser.add_argument("--seed", type=int, default=None, help="for the mutator (default: random)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    # Read by tests/fuzz/harness.py when the modules are imported: big runs, new inputs.
    os.environ["FUZZ_EXAMPLES"] = str(BATCH)
    sys.path.insert(0, str(ROOT))
    available = targets()
    unknown = sorted(set(args.target) - set(available))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)} "
                     f"(known: {', '.join(sorted(available))})")
    chosen = args.target or sorted(available)
    share = args.minutes * 60 / len(chosen)
    halves = {"both": (0.5, 0.5), "hypothesis": (1.0, 0.0), "coverage": (0.0, 1.0)}[args.mode]
    rng = random.Random(args.seed)
    reports = []
    for name in chosen:
        report = Report(name)
        if halves[0]:
            hypothesis_phase(available[name], share * halves[0], report)
        if halves[1]:
            coverage_phase(available[name], share * halves[1], report, args.findings,
                           args.save_corpus, rng)
        reports.append(report)
        if not args.json:
            print_report(report)
    if args.json:
        print(json.dumps([{**vars(r), "findings": [
            {**vars(f), "data": f.data.decode("latin-1")} for f in r.findings]}
            for r in reports], indent=2))
    return 1 if any(r.findings for r in reports) else 0


def print_report(report: Report) -> None:
    print(f"{report.target}: {report.examples} hypothesis examples in {report.hypothesis_runs} "
          f"runs; {report.executions} mutated inputs from a corpus of {report.corpus}, "
          f"{report.new_inputs} reaching new arcs ({report.arcs} arcs)", flush=True)
    for finding in report.findings:
        print(f"  FOUND {finding.kind}: {finding.signature}: {finding.detail}", flush=True)
        if finding.saved:
            print(f"    input ({len(finding.data)} octets) in {finding.saved}: "
                  f"{finding.data[:200]!r}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
