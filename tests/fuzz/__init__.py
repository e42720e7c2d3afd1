"""Fuzzers for every parser that reads hostile input (issue 15, item 1).

One module per parser. Each has a `run(data: bytes)` harness that checks the parser's
properties for one raw input (no exception but the documented ones, every reply well formed
and free of internal text, bounded time and memory), hypothesis properties that feed it
near-valid protocol input, and a replay of its corpus (`corpus/<target>/`): inputs that once
reached an interesting state or broke something, kept as explicit examples.

Why a directory of its own and not tests/unit/test_fuzz_*: the slice is timed and scaled as
a whole (`pytest tests/fuzz`, `FUZZ_EXAMPLES`), its corpus lives beside it, and the long
campaign (`python -m bench.fuzz`) imports the same harnesses. It needs no privilege and no
sockets, like tests/unit, and runs in `make test` (`pytest tests`).
"""
