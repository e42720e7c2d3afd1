"""One set of figures for all the processes of a `mailgate run`: prometheus_client's
multiprocess mode.

The SMTP acceptors are separate processes (proxies.run, proxies.process); a counter kept in
each would show Prometheus only the process that happened to answer the scrape, and a
worker's counts would vanish with it when it dies. In multiprocess mode every process writes
its values into a file of its own in one directory (`<type>_<pid>.db`, mmapped: an increment
is a store into shared memory, no system call, no lock between processes), and the exporter
adds them up at each scrape (MultiProcessCollector). This beats the alternatives:

- asking each worker at scrape time (a socket per worker) loses a dead worker's counts and
  makes a scrape wait for the slowest worker;
- sending every increment to the master (a pipe) puts a system call on the hot path;
- a shared mapping of our own (as proxies.process.ConnectionSlots does for the connection
  counts) would mean writing the summing, the histograms and the text format again.

The directory's life:
- the master wipes it at start (`prepare`): figures are since the master started, like any
  exporter's, and Prometheus takes the drop to zero as a counter reset;
- a worker joins it (`join`), the master's environment and config naming the same place;
- a dead worker's files stay: its counts are part of the totals, which must not go down when
  it dies (Prometheus would take that for a reset, and `rate()` would jump). `process_dead`
  removes only what belongs to live processes alone (prometheus_client's "live" gauges; we
  keep none, but the bookkeeping is theirs to need). Each restart leaves a few sparse files;
  the supervisor's crash limit bounds how fast, and the master's next start clears them.

prometheus_client picks its value class when it is first imported, from the environment
variable PROMETHEUS_MULTIPROC_DIR; so the variable is set here before that import, and, should
something have imported it earlier, the value class is switched explicitly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

ENVIRONMENT = "PROMETHEUS_MULTIPROC_DIR"


def prepare(directory: Path) -> None:
    """The master, at start: an empty directory of its own, used by this process from now on
    (and inherited by the workers through the environment)."""
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise OSError(f"{directory}: not a directory")
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    join(directory)


def join(directory: Path) -> None:
    """This process counts into `directory` (a worker: the master prepared it)."""
    os.environ[ENVIRONMENT] = str(directory)
    from prometheus_client import values

    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


def leave() -> None:
    """Back to process-local values (for tests and for a master that has stopped)."""
    os.environ.pop(ENVIRONMENT, None)
    from prometheus_client import values

    values.close_all_multiprocess_files()
    values.ValueClass = values.MutexValue


def process_dead(directory: Path, pid: int) -> None:
    """A worker was reaped (see the module docstring for why its counter files stay)."""
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(pid, str(directory))
