"""Why the appliance is not ready, said in one line on the console and in the journal.

On the appliance image (images/README.md) two units must succeed before mail is intercepted:
mailgate-netsetup.service (wait for the interfaces of [network] ports, then `netsetup apply`)
and mailgate.service (`mailgate run`). Each runs `/usr/local/libexec/mailgate/not-ready UNIT`
as its ExecStopPost=, where systemd says how the run ended ($SERVICE_RESULT, $EXIT_CODE,
$EXIT_STATUS: systemd.exec(5)) and which run it was ($INVOCATION_ID). The programs' own words
are in that run's journal (`wait-interfaces: ...`, `netsetup: file: key: problem`,
`mailgate: ...`, a structured `level=error` record, a traceback); `explain` turns them into

    MAILGATE-NOT-READY: <reason>

and `announce` writes it to the console and to stdout (the unit's journal). A reason is said
once: a unit systemd restarts (mailgate.service, Restart=on-failure) failing the same way again
stays quiet. What each unit said is kept in /run/mailgate/not-ready/UNIT until the unit next
starts well (its unit file removes it), and report-ready stays quiet about what was said.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MARKER = "MAILGATE-NOT-READY"
STATE_DIR = Path("/run/mailgate/not-ready")
CONSOLE = Path("/dev/console")
NETSETUP_UNIT = "mailgate-netsetup.service"
PROXIES_UNIT = "mailgate.service"
UNITS = (NETSETUP_UNIT, PROXIES_UNIT)
# The programs' prefixes on their own error lines (`prog: message`, exit status non-zero).
WAIT_INTERFACES = "wait-interfaces: "
NETSETUP = "netsetup: "
MAILGATE = "mailgate: "
CONFIG_INVALID = "2"  # the exit status of netsetup and `mailgate run` for a config they refuse
# journald may still be reading a program's last lines when ExecStopPost= starts.
JOURNAL_TRIES = 4
JOURNAL_RETRY = 0.5  # seconds
LOGFMT_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


@dataclass(frozen=True)
class Ending:
    """How a unit's run ended, from what systemd gives ExecStopPost=."""

    result: str  # $SERVICE_RESULT: success, exit-code, signal, core-dump, timeout, watchdog...
    code: str | None = None  # $EXIT_CODE of the main process: exited, killed, dumped
    status: str | None = None  # $EXIT_STATUS: the exit status, or the signal's name

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Ending:
        return cls(environ.get("SERVICE_RESULT", "success"), environ.get("EXIT_CODE"),
                   environ.get("EXIT_STATUS"))

    @property
    def main_succeeded(self) -> bool:
        return self.code == "exited" and self.status == "0"

    def describe(self) -> str:
        if self.result == "timeout":
            return "timed out"
        if self.result == "watchdog":
            return "was stopped by the watchdog"
        if self.code == "exited":
            return f"exited with status {self.status}"
        if self.code in ("killed", "dumped"):
            dumped = " (core dumped)" if self.code == "dumped" else ""
            return f"was killed by signal {self.status}{dumped}"
        return f"failed ({self.result})"


def config_rejected(problems: Sequence[str]) -> str:
    """The reason for a config a program refused; each problem reads `file: key: problem`."""
    return "config rejected: " + "; ".join(problems)


def missing_interfaces(missing: Sequence[str], present: Sequence[str]) -> str:
    return (f"no network interface for [network] ports: {', '.join(missing)} "
            f"(there are: {', '.join(present) or 'none'})")


def _structured_error(line: str) -> str | None:
    """`event: reason` of a level=error record of the proxies' log (logfmt or JSON)."""
    fields: dict[str, object]
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        fields = record
    else:
        fields = {}
        for key, value in LOGFMT_FIELD.findall(line):
            with contextlib.suppress(ValueError):
                value = json.loads(value) if value.startswith('"') else value
            fields[key] = value
    if fields.get("level") not in ("error", "critical") or "event" not in fields:
        return None
    detail = fields.get("reason") or fields.get("error")
    return f"{fields['event']}: {detail}" if detail else str(fields["event"])


def last_words(lines: Sequence[str], prefix: str) -> str | None:
    """A program's last word on why it stopped: its last `prefix` line, the last error record
    of a structured log, or the exception ending a traceback, whichever came last."""
    words = None
    in_traceback = False
    for line in lines:
        if line.startswith("Traceback (most recent call last):"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            in_traceback = False
            words = line
        elif line.startswith(prefix):
            words = line
        elif (error := _structured_error(line)) is not None:
            words = error
    return words


def explain(unit: str, ending: Ending, lines: Sequence[str]) -> str | None:
    """Why `unit`'s run leaves the appliance not ready, in one line; None if it does not (it
    succeeded, or only its stop failed)."""
    if ending.result == "success":
        return None
    own = [line for line in lines if not line.startswith(MARKER)]
    if unit == NETSETUP_UNIT:
        if ending.main_succeeded:  # `netsetup apply` worked; the failure was at stop
            return None
        waited = [line for line in own if line.startswith(WAIT_INTERFACES)]
        if waited:
            return waited[-1].removeprefix(WAIT_INTERFACES)
        problems = [line.removeprefix(NETSETUP) for line in own if line.startswith(NETSETUP)]
        if ending.status == CONFIG_INVALID and problems:
            return config_rejected(problems)
        return f"network setup failed: {last_words(own, NETSETUP) or ending.describe()}"
    problems = [line.removeprefix(MAILGATE) for line in own if line.startswith(MAILGATE)]
    if ending.code == "exited" and ending.status == CONFIG_INVALID and problems:
        return config_rejected(problems)
    words = last_words(own, MAILGATE)
    return f"mailgate run {ending.describe()}" + (f": {words}" if words else "")


def _journal_priority() -> str:
    """`<3>` (err) when stdout is the journal (systemd.exec(5), $JOURNAL_STREAM), else ''."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return ""
    return "<3>" if stream == f"{stat.st_dev}:{stat.st_ino}" else ""


def announce(unit: str, reason: str, console: Path | None = CONSOLE,
             state_dir: Path = STATE_DIR) -> bool:
    """Say `MAILGATE-NOT-READY: reason` on stdout and on `console` (None: stdout reaches it
    already), unless `unit` said just that last. Returns whether it was said."""
    line = f"{MARKER}: {reason}"
    record = state_dir / unit
    with contextlib.suppress(OSError):
        if record.read_text() == line + "\n":
            return False
    with contextlib.suppress(OSError):
        state_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(line + "\n")
    print(_journal_priority() + line, flush=True)
    if console is not None:
        try:
            with console.open("w") as terminal:
                terminal.write(line + "\n")
        except OSError as exc:  # the journal has the line; say why the console does not
            print(f"not-ready: cannot write to {console}: {exc.strerror or exc}",
                  file=sys.stderr, flush=True)
    return True


def announced(state_dir: Path = STATE_DIR) -> list[str]:
    """What the units said and have not taken back by starting well since."""
    with contextlib.suppress(OSError):
        return [path.read_text().strip() for path in sorted(state_dir.iterdir())]
    return []


def _journal(invocation: str) -> list[str]:
    # Not `journalctl --sync`: journald says so on the console (kernel log level info).
    try:
        shown = subprocess.run(["journalctl", "--no-pager", "--quiet", "--output=cat",
                                f"_SYSTEMD_INVOCATION_ID={invocation}"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return shown.stdout.splitlines()


def _shutting_down() -> bool:
    try:
        state = subprocess.run(["systemctl", "is-system-running"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return state == "stopping"


def main(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int:
    """`not-ready UNIT`, as UNIT's ExecStopPost=: say why its run failed, if it did."""
    if len(argv) != 1 or argv[0] not in UNITS:
        print(f"usage: not-ready {{{','.join(UNITS)}}} (as the unit's ExecStopPost=)",
              file=sys.stderr)
        return 2
    unit, ending = argv[0], Ending.from_environ(environ)
    if explain(unit, ending, []) is None or _shutting_down():
        return 0
    lines: list[str] = []
    invocation = environ.get("INVOCATION_ID")
    for attempt in range(JOURNAL_TRIES if invocation else 0):
        if attempt:
            time.sleep(JOURNAL_RETRY)
        lines = _journal(invocation or "")
        prefix = NETSETUP if unit == NETSETUP_UNIT else MAILGATE
        if any(line.startswith(WAIT_INTERFACES) for line in lines) or last_words(lines, prefix):
            break
    reason = explain(unit, ending, lines)
    if reason is not None:
        announce(unit, reason)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
