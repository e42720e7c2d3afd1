"""Every key the config loaders accept is read by the program: no dead keys.

The keys come from the loaders themselves (each `Section` records what it was asked for), so a
key added to a loader is covered without touching this test. A key counts as read when the
field it fills is read somewhere outside the config modules, on that section's data: as
`<...>.smtp.hostname`, or as `<name>.hostname` in a module that works with `SmtpConfig` (names
the class), where `<name>` is not another section (`config.pop3.enabled` does not count for
`[smtp] enabled`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path

from interceptor.config import InterceptorConfig
from netsetup.config import NetworkConfig
from proxies.config import Config, LogConfig, SmtpConfig, read_sections
from proxies.metrics.config import MetricsConfig
from proxies.pop3.config import Pop3Config
from proxies.scan.config import PolicyConfig, QuarantineConfig, ScanConfig

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ("interceptor", "proxies", "netsetup")

# Where each section's values end up, and the attribute that reaches them from `Config`.
SECTIONS: dict[str, tuple[type, str]] = {
    "network": (NetworkConfig, "network"),
    "smtp": (SmtpConfig, "smtp"),
    "pop3": (Pop3Config, "pop3"),
    "scan": (ScanConfig, "scan"),
    "policy": (PolicyConfig, "policy"),
    "quarantine": (QuarantineConfig, "quarantine"),
    "log": (LogConfig, "log"),
    "interceptor": (InterceptorConfig, "interceptor"),
    "metrics": (MetricsConfig, "metrics"),
}
# Keys whose field has another name.
FIELDS = {
    ("smtp", "listen"): "listen_port",
    ("pop3", "listen"): "listen_port",
    ("pop3", "spam"): "spam_action",
    ("pop3", "virus"): "virus_action",
    ("pop3", "banned"): "banned_action",
}
# Keys the loader folds into other fields instead of keeping them for the program: [scan]'s
# timeout, max_size and concurrency are each scanner's default (checked below).
FOLDED = {("scan", "timeout"), ("scan", "max_size"), ("scan", "concurrency")}
# Keys read only when they are given.
CONDITIONAL = {"interceptor": {"services": ["smtp"]}}


def accepted_keys() -> Iterator[tuple[str, str]]:
    _, sections, problems = read_sections(Path("keys.toml"), CONDITIONAL)
    assert problems == []
    for name, section in sections.items():
        for key in section.defaults:
            yield name, key


def _is_config_module(path: Path) -> bool:
    return path.name in ("config.py", "configfile.py", "configcheck.py")


@functools.cache
def program_modules() -> list[tuple[Path, list[ast.Attribute], str]]:
    """Each program module with every attribute it reads."""
    modules = []
    for package in PROGRAM:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "lab" in path.relative_to(ROOT).parts or _is_config_module(path):
                continue
            text = path.read_text()
            attributes = [node for node in ast.walk(ast.parse(text))
                          if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)]
            modules.append((path, attributes, text))
    return modules


def reads(field: str, section: str) -> list[str]:
    """Where the program reads `field` of `section`'s data (module:line)."""
    kind, attribute = SECTIONS[section]
    others = {a for _, a in SECTIONS.values()} - {attribute}
    found = []
    for path, attributes, text in program_modules():
        works_with_it = kind.__name__ in text
        for node in attributes:
            if node.attr != field:
                continue
            receiver = ast.unparse(node.value).rsplit(".", 1)[-1]
            if receiver == attribute or (works_with_it and receiver not in others):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_loaders_accept_keys_in_every_section() -> None:
    keys = set(accepted_keys())
    assert {name for name, _ in keys} == set(SECTIONS)
    assert ("smtp", "listen") in keys and ("interceptor", "services") in keys
    assert ("smtp", "enabled") not in keys  # removed: SMTP always runs


def test_every_accepted_key_fills_a_field() -> None:
    missing = []
    for section, key in accepted_keys():
        kind, _ = SECTIONS[section]
        field = FIELDS.get((section, key), key)
        if field not in {f.name for f in dataclasses.fields(kind)}:
            missing.append(f"{section}.{key} -> {kind.__name__}.{field}")
    assert missing == []


def test_every_accepted_key_is_read_by_the_program() -> None:
    dead = [f"{section}.{key}" for section, key in accepted_keys()
            if (section, key) not in FOLDED
            and not reads(FIELDS.get((section, key), key), section)]
    assert dead == [], "keys the loaders accept but nothing reads: " + ", ".join(dead)


def test_the_check_itself_finds_a_dead_key() -> None:
    # A field nothing reads on [smtp]'s data (`enabled` is read, but only of other sections).
    assert reads("enabled", "smtp") == []
    assert reads("enabled", "pop3") != []
    assert dataclasses.fields(Config)  # the tree the sections hang from


def test_the_folded_scan_keys_are_each_scanners_default() -> None:
    data = {"scan": {"timeout": "7s", "max_size": "1M", "concurrency": 3,
                     "clamd": "unix:/run/clamd.sock", "spamd": {"address": "127.0.0.1:783",
                                                               "concurrency": 5}}}
    config, _, problems = read_sections(Path("folded.toml"), data)
    assert problems == []
    assert config.scan.clamd is not None and config.scan.spamd is not None
    assert (config.scan.clamd.timeout, config.scan.clamd.max_size,
            config.scan.clamd.concurrency) == (7.0, 1024 * 1024, 3)
    assert (config.scan.spamd.timeout, config.scan.spamd.concurrency) == (7.0, 5)
