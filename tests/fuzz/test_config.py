"""Fuzzing the config loaders (proxies.config.load_config, netsetup.config.load_network_config
and netsetup.configfile.read_toml beneath them).

What must hold for any file: the loaders return their config or raise ConfigError, never
anything else; every problem names the file, and a key ("-" for the file as a whole, else a
section's name and the key within it) with a message on one line. The documents are valid TOML
with the sections and keys the loaders know (read from the loaders themselves), unknown ones
among them, and values of every TOML type near what each key wants (durations, sizes, CIDRs,
addresses, regexes...); and the same text damaged, so that it is TOML no longer.
"""

from __future__ import annotations

import datetime
import json
import math
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from netsetup.config import load_network_config
from netsetup.configfile import KNOWN_SECTIONS, ConfigError
from proxies.config import Config, load_config, read_sections
from tests.fuzz import inputs
from tests.fuzz.harness import EXAMPLES, bounded, corpus, fuzz_settings

TARGET = "config"
# For the campaign (bench/fuzz.py): the sources whose arcs it traces, and its mutation tokens.
COVERS = ("netsetup/configfile.py", "netsetup/config.py", "proxies/config.py",
          "proxies/scan/config.py", "proxies/pop3/config.py", "interceptor/config.py",
          "proxies/metrics/config.py", "tomllib/_parser.py")
TOKENS = (b"[smtp]\n", b"[network]\n", b"[scan]\n", b"[policy]\n", b"[interceptor]\n",
          b" = ", b'"5m"', b'"10M"', b"true", b"[", b"]", b"{ ", b" }", b'"192.0.2.0/24"',
          b"\n", b"#", b'"""', b"'")
# Every key each section's loader reads, from the loaders (as tests/unit/test_config_keys.py).
_SECTIONS = read_sections(Path("keys.toml"), {"interceptor": {"services": ["smtp"]}})[1]
KEYS: dict[str, list[str]] = {name: sorted(s.defaults) for name, s in _SECTIONS.items()}
SCANNER_KEYS = ["address", "timeout", "max_size", "concurrency"]


# One folder for the whole run, removed at exit, in memory where there is a tmpfs: a folder
# per example, or a disk that a neighbour keeps busy, took ten times as long as the loading.
_FOLDER = tempfile.TemporaryDirectory(
    prefix="mailgate-fuzz-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)


def load(text: bytes) -> None:
    """Both loaders on `text` as a file; only a Config or ConfigError may come out."""
    EXAMPLES[TARGET] += 1
    path = Path(_FOLDER.name) / "mailgate.toml"
    path.write_bytes(text)
    try:
        tables = set(tomllib.loads(text.decode()))
    except (ValueError, RecursionError):
        tables = set()
    for loader in (load_config, load_network_config):
        try:
            config = loader(path)
        except ConfigError as error:
            check_problems(error, path, tables)
        else:
            assert isinstance(config, Config) or loader is load_network_config


def check_problems(error: ConfigError, path: Path, tables: set[str]) -> None:
    """Every problem names the file and "-", a table of the file, or a key of a section."""
    assert error.problems
    for problem in error.problems:
        assert problem.path == str(path)
        section = problem.key.split(".", 1)[0]
        assert problem.key == "-" or problem.key in tables or section in KNOWN_SECTIONS, problem
        assert problem.message and "\n" not in problem.message, problem


def run(data: bytes) -> None:
    """The harness: `data` as the whole config file."""
    load(data)


# --- TOML, written here so that any value can be -------------------------------------------

def toml_string(text: str) -> str:
    # A TOML basic string is a JSON string less its escapes for DEL (TOML 1.0: U+007F must be
    # escaped) and for non-BMP characters, which TOML writes as themselves.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{ " + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + " }"


def toml_document(document: dict[str, dict[str, Any]]) -> bytes:
    lines = []
    for section, table in document.items():
        lines.append(f"[{toml_string(section)}]")
        lines += [f"{toml_string(key)} = {toml_value(value)}" for key, value in table.items()]
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")


# --- values near what the keys want -------------------------------------------------------------

STRINGS = ("5m", "300", "300s", "1.5h", "-1s", "1e400s", " 2 d ", "10M", "512k", "1GiB", "0", "",
           "-5", "99999999999999999999G", "192.0.2.0/24", "2001:db8::/32", "192.0.2.1/33",
           "10.0.0.0/8 ", "::/0", "host:25", "[2001:db8::1]:25", "host:0", "host:65536",
           "host:\u00b2", ":25", "unix:/run/clamd.ctl", "unix:relative", "tcp:127.0.0.1:3310",
           "http://127.0.0.1:11333", "http://h/path", "/var/spool/mailgate", "relative/dir",
           "mon-fri 08:00-18:00", "22:00-06:00", "sun-mon 00:00-24:00", "08:00-08:00",
           "xyz 1:00-2:00", "24:60-1:00", "example.com", "bad domain", ".sub.example", "x@y",
           "reject", "tag", "open", "closed", "bridge", "router", "smtp", "pop3", "eth0", "a" * 16,
           "(?i)lottery", "a{4294967296}", "(" * 300, "[", "\udcff", "\x00", "\n",
           "subject\r\nx", "\u00e9")


def scalars() -> st.SearchStrategy[Any]:
    return (st.sampled_from(STRINGS) | st.text(max_size=10) | st.booleans()
            | st.integers(-(2**63), 2**63 - 1)
            | st.sampled_from([0, 1, -1, 25, 10025, 65535, 65536, 0x7FFFFFFF, 2**32, 3, 0x2])
            | st.floats() | st.sampled_from([datetime.date(1979, 5, 27), datetime.time(7, 32),
                                             datetime.datetime(1979, 5, 27, 7, 32)]))


def values(keys: list[str]) -> st.SearchStrategy[Any]:
    header_rule = st.fixed_dictionaries(
        {"header": st.sampled_from(["Subject", "X-Spam", "Bad Name", ""]),
         "regex": st.sampled_from(STRINGS), "action": st.sampled_from(["reject", "tag", "x"])},
        optional={"extra": scalars()})
    return st.recursive(
        scalars() | header_rule,
        lambda children: st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from([*keys, "smtp", "pop3", "example.com", "x"]) | st.text(
            max_size=5), children, max_size=3),
        max_leaves=6)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    names = draw(st.lists(st.sampled_from([*KEYS, "unknown", "SMTP"]), max_size=5, unique=True))
    document: dict[str, dict[str, Any]] = {}
    for name in names:
        keys = KEYS.get(name, []) + (SCANNER_KEYS if name == "scan" else [])
        chosen = draw(st.lists(st.sampled_from([*keys, "typo", "listen"]) if keys else
                               st.just("typo"), max_size=8, unique=True))
        document[name] = {key: draw(values(keys)) for key in chosen}
    return document


@fuzz_settings(80)
@given(documents())
@example({"policy": {"header_rules": [{"header": "Subject", "regex": "a{4294967296}",
                                       "action": "reject"}]}})   # once OverflowError
@example({"policy": {"header_rules": [{"header": "Subject", "regex": "(" * 1000,
                                       "action": "reject"}]}})   # once RecursionError
def test_any_document(document: dict[str, dict[str, Any]]) -> None:
    load(toml_document(document))


@fuzz_settings(60)
@given(documents(), st.lists(st.tuples(st.integers(min_value=0), inputs.special_bytes
                                       | st.sampled_from([b"[", b"]", b"=", b"\"", b"[[smtp]]\n",
                                                          b"\xe9", b"\n[smtp]\n"])), max_size=4))
@example({}, [(0, b"# caf\xe9\n")])                          # once UnicodeDecodeError
@example({}, [(0, b"x = " + b"[" * 5000)])                   # once RecursionError
def test_any_damaged_document(document: dict[str, dict[str, Any]],
                              edits: list[tuple[int, bytes]]) -> None:
    text = bytearray(toml_document(document))
    for at, insert in edits:
        at %= len(text) + 1
        text[at:at + len(insert) // 2] = insert
    load(bytes(text))


@pytest.mark.parametrize("data", corpus(TARGET))
def test_corpus(data: bytes) -> None:
    with bounded():
        run(data)
