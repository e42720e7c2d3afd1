"""Reading the TOML config file: typed values, every problem reported with file and key.

Each section loader takes a `Section` and pulls typed values out of it; the section
remembers which keys were read so that unknown keys (typos) are reported, and it collects
problems instead of raising on the first one, so the user sees every mistake at once.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_CONFIG_PATH = Path("/etc/mailgate/mailgate.toml")

# Every table the config file may hold. Loaders for one part of the program (netsetup reads only
# [network]) still reject a misspelt table name, because it names none of these.
KNOWN_SECTIONS = (
    "network",
    "smtp",
    "pop3",
    "scan",
    "policy",
    "quarantine",
    "interceptor",
    "log",
    "metrics",
)

T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Check:
    """One cross-check a loader made (a rule no single key shows), and its outcome:
    `mailgate config check` lists them all, passed or not."""

    name: str
    problem: Problem | None = None


@dataclass(frozen=True)
class Problem:
    path: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.key}: {self.message}"


class ConfigError(Exception):
    """The config file cannot be used; `problems` says every reason, each with file and key."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def read_toml(path: Path) -> dict[str, Any]:
    """Parse the file, turning I/O and syntax errors into a ConfigError naming the file."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), "-", "no such file")]) from None
    except PermissionError:
        raise ConfigError([Problem(str(path), "-", "permission denied")]) from None
    except IsADirectoryError:
        raise ConfigError([Problem(str(path), "-", "is a directory, not a file")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(str(path), "-", f"not valid TOML: {exc}")]) from None
    except UnicodeDecodeError as exc:
        # tomllib decodes the whole file first: a Latin-1 "é" in a comment ends up here.
        raise ConfigError([Problem(str(path), "-", f"not valid TOML, which is UTF-8: {exc}")]
                          ) from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively, without a limit.
        raise ConfigError([Problem(str(path), "-", "not valid TOML: nested too deeply")]
                          ) from None
    problems = [
        Problem(str(path), name, f"unknown section (known: {', '.join(KNOWN_SECTIONS)})")
        for name in data
        if name not in KNOWN_SECTIONS
    ]
    problems += [
        Problem(str(path), name, "must be a table, e.g. [" + name + "]")
        for name in data
        if name in KNOWN_SECTIONS and not isinstance(data[name], dict)
    ]
    if problems:
        raise ConfigError(problems)
    return data


_MISSING: Any = object()

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*$")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(value: object) -> float:
    """Seconds from `300`, `300s`, `5m`, `4h`, `5d` or `1w` (Postfix's time units)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 300, '300s', '5m' or '5d'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError(f"expected a duration such as 300, '300s', '5m' or '5d', got {value!r}")


def parse_size(value: object) -> int:
    """Bytes from `1048576`, `'10M'`, `'512k'` or `'1GiB'`."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 10485760 or '10M'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    raise ValueError(f"expected a size such as 10485760 or '10M', got {value!r}")


def parse_network(value: object) -> Network:
    if not isinstance(value, str):
        raise ValueError(f"expected a CIDR string such as '192.0.2.0/24', got {value!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"not an IP network: {value!r}") from None


def parse_hostport(value: object, default_port: int = 25) -> tuple[str, int]:
    """`host`, `host:port`, `[v6addr]:port` or a bare IPv6 address."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected 'host:port', got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"no host in {value!r}")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad port in {value!r}")
        return host, int(port_text)
    return host, default_port


class Section:
    """One table of the config file, read key by key with its problems collected."""

    def __init__(self, path: Path | str, name: str, data: Mapping[str, Any] | None) -> None:
        self.path = str(path)
        self.name = name
        self.data: Mapping[str, Any] = data or {}
        self.problems: list[Problem] = []
        self.checks: list[Check] = []
        # Every key a loader asked for, in order, with its default and the value it got: what
        # `mailgate config check` prints as the effective config.
        self.defaults: dict[str, Any] = {}
        self.values: dict[str, Any] = {}
        # Keys this config has no use for (bridge keys in router mode), with why.
        self.unused: dict[str, str] = {}
        self._read: set[str] = set()

    def problem(self, key: str, message: str) -> None:
        # Two loaders may read one key (netsetup's and the proxies' both read [smtp] listen): a
        # bad value is still one problem.
        problem = Problem(self.path, f"{self.name}.{key}", message)
        if problem not in self.problems:
            self.problems.append(problem)

    def check(self, name: str, key: str, ok: bool, message: str) -> bool:
        """A cross-check named `name`: when not `ok`, `message` is a problem with `key`."""
        problem = None if ok else Problem(self.path, f"{self.name}.{key}", message)
        self.checks.append(Check(name, problem))
        if problem is not None and problem not in self.problems:
            self.problems.append(problem)
        return ok

    def given(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, default: Any) -> Any:
        self._read.add(key)
        self.defaults.setdefault(key, None if default is _MISSING else default)
        if key not in self.data:
            if default is _MISSING:
                self.problem(key, "is required")
            self.values.setdefault(key, self.defaults[key])
            return default
        self.values[key] = self.data[key]
        return self.data[key]

    def _got(self, key: str, value: T) -> T:
        self.values[key] = value
        return value

    def typed(self, key: str, kind: type[T] | tuple[type, ...], default: T) -> T:
        if key not in self.data:
            return self._get(key, default)
        value = self._get(key, default)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a config that says `port = true` is a mistake.
        if isinstance(value, bool) and bool not in kinds:
            self.problem(key, f"expected {_kind_names(kinds)}, got a boolean")
            return self._got(key, default)
        if not isinstance(value, kinds):
            self.problem(key, f"expected {_kind_names(kinds)}, got {type(value).__name__}")
            return self._got(key, default)
        return value  # type: ignore[return-value]

    def string(self, key: str, default: str = _MISSING) -> str:
        return self.typed(key, str, default)

    def boolean(self, key: str, default: bool) -> bool:
        return self.typed(key, bool, default)

    def integer(self, key: str, default: int, minimum: int | None = None,
                maximum: int | None = None) -> int:
        value = self.typed(key, int, default)
        if minimum is not None and value < minimum:
            self.problem(key, f"must be at least {minimum}, got {value}")
            return default
        if maximum is not None and value > maximum:
            self.problem(key, f"must be at most {maximum}, got {value}")
            return default
        return value

    def port(self, key: str, default: int) -> int:
        return self.integer(key, default, 1, 65535)

    def choice(self, key: str, choices: Iterable[str], default: str) -> str:
        allowed = tuple(choices)
        value = self.string(key, default)
        if value not in allowed:
            self.problem(key, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
            return default
        return value

    def converted(self, key: str, convert: Callable[[Any], T], default: T) -> T:
        self._read.add(key)
        self.defaults.setdefault(key, default)
        if key not in self.data:
            self.values.setdefault(key, default)
            return default
        try:
            return self._got(key, convert(self.data[key]))
        except ValueError as exc:
            self.problem(key, str(exc))
            return self._got(key, default)

    def duration(self, key: str, default: float) -> float:
        return self.converted(key, parse_duration, default)

    def size(self, key: str, default: int) -> int:
        return self.converted(key, parse_size, default)

    def string_list(self, key: str, default: Iterable[str] = ()) -> tuple[str, ...]:
        value = self._get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(key, "expected a list of strings")
            return tuple(default)
        return tuple(value)

    def list_of(self, key: str, convert: Callable[[Any], T]) -> tuple[T, ...]:
        value = self._get(key, [])
        if not isinstance(value, list):
            self.problem(key, "expected a list")
            return ()
        out: list[T] = []
        for index, item in enumerate(value):
            try:
                out.append(convert(item))
            except ValueError as exc:
                self.problems.append(Problem(self.path, f"{self.name}.{key}[{index}]", str(exc)))
        return tuple(out)

    def networks(self, key: str) -> tuple[Network, ...]:
        return self.list_of(key, parse_network)

    def table(self, key: str) -> Mapping[str, Any]:
        value = self._get(key, {})
        if not isinstance(value, dict):
            self.problem(key, "expected a table")
            return {}
        return value

    def finish(self) -> list[Problem]:
        """All problems, including keys nobody read (unknown, most likely misspelt)."""
        for key in self.data:
            if key not in self._read:
                self.problem(key, "unknown key")
        return self.problems


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
