"""`mailgate config check`: the effective config and every cross-check, before anything runs.

Like `postconf -n`, it prints only what the file changes from the built-in defaults (`--all`:
every key, defaults included), as `section.key = value` lines: the output as a whole is TOML
that loads to the same config. Then, as comments, every cross-check the loaders make (rules
no single key shows, such as "intercepted pop3 has its proxy running"), passed or not, and
every problem with file and key. The checks are the loaders' own (`Section.check` in
netsetup/configfile.py), so `netsetup plan` and `mailgate run` refuse exactly what this
reports.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netsetup.configfile import DEFAULT_CONFIG_PATH, Check, ConfigError, Problem, Section, read_toml
from proxies.scan import clamdconf

if TYPE_CHECKING:
    from proxies.config import Config

__all__ = ["Report", "add_commands", "check_file", "host_warnings", "render"]


@dataclass(frozen=True)
class Report:
    path: Path
    sections: Mapping[str, Section]
    problems: list[Problem]
    # What the config means together with the host (a local clamd's own limits): printed,
    # not problems, since the file itself is usable.
    warnings: tuple[str, ...] = ()

    @property
    def checks(self) -> list[Check]:
        return [check for section in self.sections.values() for check in section.checks]


def check_file(path: Path) -> Report:
    """Load `path` as `mailgate run` does, keeping what each section's loader saw. A file that
    cannot be read or parsed has no sections, only its problem."""
    from proxies.config import read_sections

    try:
        data = read_toml(path)
    except ConfigError as exc:
        return Report(path, {}, exc.problems)
    config, sections, problems = read_sections(path, data)
    return Report(path, sections, problems, () if problems else tuple(host_warnings(config)))


def host_warnings(config: Config) -> list[str]:
    """What `mailgate run` warns of at its start, about this host rather than the file."""
    clamd = config.scan.clamd
    if clamd is None or clamd.address.path is None:
        return []
    return clamdconf.limit_warnings(clamd.address.path, clamd.max_size)


def _toml(value: Any) -> str:
    """`value` as TOML would spell it (typed values back to their config-file form)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if math.isfinite(value) and value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Path | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


def _key(name: str) -> str:
    return name if name.replace("_", "").replace("-", "").isalnum() else json.dumps(name)


def _changed(section: Section, key: str) -> bool:
    if not section.given(key):
        return False
    default = section.defaults.get(key)
    value = section.values.get(key)
    if isinstance(default, tuple):
        default = list(default)
    if isinstance(value, tuple):
        value = list(value)
    return bool(value != default)


def effective_lines(report: Report, show_all: bool) -> Iterator[str]:
    for name, section in report.sections.items():
        for key in section.defaults:
            if show_all or _changed(section, key):
                shown = section.data[key] if section.given(key) else section.defaults[key]
                if key in section.unused and not section.given(key):
                    yield f"# {name}.{key} = {_toml(shown)}  ({section.unused[key]})"
                elif shown is None:
                    yield f"# {name}.{key} is not set"
                else:
                    yield f"{name}.{key} = {_toml(shown)}"


def render(report: Report, show_all: bool = False) -> str:
    lines = [f"# {report.path}: " + ("every key, defaults included" if show_all
                                     else "what differs from the defaults (--all: every key)")]
    lines += effective_lines(report, show_all)
    if report.sections:
        lines.append("# cross-checks:")
        for check in report.checks:
            if check.problem is None:
                lines.append(f"# ok       {check.name}")
            else:
                lines.append(f"# PROBLEM  {check.name}: {check.problem.key}: "
                             f"{check.problem.message}")
    crossed = {check.problem for check in report.checks if check.problem is not None}
    others = [p for p in report.problems if p not in crossed]
    if others:
        lines.append("# problems:")
        lines += [f"# PROBLEM  {problem}" for problem in others]
    lines += [f"# WARNING  {warning}" for warning in report.warnings]
    lines.append(f"# {len(report.problems)} problem(s)" if report.problems else "# config is ok")
    return "\n".join(lines) + "\n"


def _check(args: argparse.Namespace) -> int:
    report = check_file(args.config)
    print(render(report, args.all), end="")
    return 2 if report.problems else 0


def add_commands(commands: Any) -> None:
    config = commands.add_parser(
        "config", help="check the config file and print the effective config",
        description="Inspect the TOML config file without running anything.")
    verbs = config.add_subparsers(dest="config_command", required=True, metavar="VERB")
    check = verbs.add_parser(
        "check", help="print the effective config and the result of every cross-check",
        description=(
            "Load the config as 'mailgate run' and 'netsetup plan' do, print what it changes "
            "from the built-in defaults (postconf -n style; --all: every key), then the result "
            "of every cross-check and every problem with file and key. Exit status: 0 when "
            "the config is usable, 2 when it has a problem (then mailgate run and netsetup "
            "refuse it too)."))
    check.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH,
                       help=f"the TOML config file (default: {DEFAULT_CONFIG_PATH})")
    check.add_argument("--all", action="store_true",
                       help="print every key with its effective value, defaults included")
    check.set_defaults(handler=_check)
