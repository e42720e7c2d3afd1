"""Plumbing for the SMTP proxy's lab tests: a gateway running the real `mailgate run`, and raw
SMTP clients that talk from inside a lab host.

`Gateway` writes a mailgate config for the lab (the [network] part as netsetup wants it for
the lab's mode, the [smtp] part from keyword arguments), puts the interception rules in place
with `netsetup apply` inside the gateway namespace, and runs `mailgate run` there through
`lab.spawn`, so `lab.down()` kills it whatever happens. Its stderr (the structured log) goes to
a file the test can search; readiness is the log's `event=ready` line, never a sleep.

`RawSmtp` is a socket opened inside a lab host (see `_common.in_netns`): for the probes that a
real client library would refuse to send (smuggling, overlong lines, junk).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from netsetup.lab.peers._common import connect, in_netns, wait_until
from netsetup.lab.topology import Host, Lab

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SMTP_LISTEN = 10025
GATEWAY_HOSTNAME = "gw.mailgate.test"
SENDER_DOMAIN = "sender.example"
SERVER_DOMAIN = "example.com"
HELO = "sender.lab.example"

TomlValue = str | int | float | bool | Sequence[Any] | Mapping[str, Any]


def toml_value(value: TomlValue) -> str:
    """A TOML literal for the few value kinds our configs use."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                                for k, v in value.items()) + " }"
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def network_section(lab: Lab) -> dict[str, TomlValue]:
    """[network] for the lab's mode: intercept SMTP, spoof the client's source address."""
    section: dict[str, TomlValue] = {
        "mode": lab.mode,
        "intercept": ["smtp"],
        "ipv6": True,
        "spoof_source": True,
    }
    if lab.mode == "bridge":
        # netsetup builds the bridge; with spoofing it needs no address and no subnet.
        section.update(bridge="br0", ports=list(lab.bridge_ports))
    return section


def server_address(lab: Lab, family: int = 4) -> str:
    address = lab.server.ipv4 if family == 4 else lab.server.ipv6
    assert address is not None
    return address


def sender_address(lab: Lab, family: int = 4) -> str:
    address = lab.sender.ipv4 if family == 4 else lab.sender.ipv6
    assert address is not None
    return address


@dataclass
class Gateway:
    """`mailgate run` in the lab's gateway namespace (see the module docstring)."""

    lab: Lab
    dir: Path
    smtp: dict[str, TomlValue] = field(default_factory=dict)
    # A shell prefix for the command line, e.g. to run it under `unshare -m`.
    wrap: Callable[[list[str]], list[str]] | None = None
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.queue_dir = self.dir / "queue"
        self.config_path = self.dir / "mailgate.toml"
        self.log_path = self.dir / "mailgate.log"
        self._log_offset = 0

    # --- config and network ---------------------------------------------------------------

    def write_config(self, **smtp: TomlValue) -> None:
        settings: dict[str, TomlValue] = {
            "listen": SMTP_LISTEN,
            "hostname": GATEWAY_HOSTNAME,
            "queue_dir": str(self.queue_dir),
            "relay_domains": [SERVER_DOMAIN],
            "retry_min": "1s",
            "retry_max": "2s",
            "queue_scan_interval": "1s",
            "connect_timeout": "3s",
            "delivery_timeout": "20s",
        }
        settings.update(self.smtp)
        settings.update(smtp)
        self.smtp = settings
        sections: dict[str, Mapping[str, TomlValue]] = {
            "network": network_section(self.lab), "smtp": settings, "log": {"level": "debug"}}
        text = ""
        for name, values in sections.items():
            text += f"[{name}]\n" + "".join(f"{key} = {toml_value(value)}\n"
                                           for key, value in values.items()) + "\n"
        self.config_path.write_text(text)

    def apply_network(self) -> None:
        if not self.config_path.exists():
            self.write_config()
        argv = [PYTHON, "-m", "netsetup.cli", "--config", str(self.config_path),
                "--state-file", str(self.dir / "netsetup-state.json"), "apply"]
        result = self.lab.run(self.lab.gateway, argv, check=False, cwd=ROOT, timeout=60)
        assert result.returncode == 0, f"netsetup apply:\n{result.stdout}\n{result.stderr}"

    # --- the process ----------------------------------------------------------------------

    def command(self) -> list[str]:
        argv = [PYTHON, "-m", "proxies.cli", "run", "--config", str(self.config_path)]
        return self.wrap(argv) if self.wrap else argv

    def start(self, timeout: float = 20.0, **smtp: TomlValue) -> Gateway:
        """Start `mailgate run` (writing the config first when settings are given) and wait
        for its `ready` line."""
        assert self.process is None or self.process.poll() is not None, "already running"
        if smtp or not self.config_path.exists():
            self.write_config(**smtp)
        self.starts += 1
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = self.lab.spawn(self.lab.gateway, self.command(), cwd=ROOT,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        process = self.process
        wait_until(lambda: "event=ready" in self.log(since_start=True), "mailgate run ready",
                   timeout, process, (self.log_path,))
        return self

    def stop(self, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM; return (exit status, seconds it took)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        # `ip netns exec` execs the program, so this pid is mailgate's own.
        code = self.process.wait(timeout=timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    # --- what it says ---------------------------------------------------------------------

    def log(self, since_start: bool = False) -> str:
        try:
            with self.log_path.open("rb") as handle:
                if since_start:
                    handle.seek(self._log_offset)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def events(self, name: str | None = None, **fields: str) -> list[dict[str, str]]:
        """The log's logfmt lines as dicts, filtered by event name and field values."""
        out = []
        for line in self.log().splitlines():
            parsed = parse_logfmt(line)
            if name is not None and parsed.get("event") != name:
                continue
            if all(parsed.get(k) == v for k, v in fields.items()):
                out.append(parsed)
        return out

    def wait_event(self, name: str, timeout: float = 15.0, count: int = 1,
                   **fields: str) -> list[dict[str, str]]:
        wait_until(lambda: len(self.events(name, **fields)) >= count,
                   f"{count} x {name} {fields} in the mailgate log", timeout, self.process,
                   (self.log_path,))
        return self.events(name, **fields)

    def queue(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """`mailgate queue ARGV... --queue-dir DIR`, as an administrator would run it."""
        command = [PYTHON, "-m", "proxies.cli", "queue", *argv, "--queue-dir",
                   str(self.queue_dir)]
        return self.lab.run(self.lab.gateway, command, check=False, cwd=ROOT, timeout=30)

    def queue_list(self) -> list[dict[str, Any]]:
        result = self.queue("list", "--json")
        assert result.returncode == 0, result.stderr
        entries: list[dict[str, Any]] = json.loads(result.stdout)
        return entries

    def wait_queue_empty(self, timeout: float = 20.0) -> None:
        try:
            wait_until(lambda: not self.queue_list(), "mailgate queue empty", timeout,
                       self.process, (self.log_path,))
        except Exception as exc:
            raise AssertionError(f"{exc}\nstill queued: {self.queue_list()}") from None


_LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def kill_gateways(gateways: list[Gateway]) -> None:
    """Every `mailgate run` of `gateways` a test left running, killed; the list emptied."""
    for gateway in gateways:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.kill()
    gateways.clear()


class _LabEnv(Protocol):
    base: Path

    def cleanup(self) -> None: ...


_Env = TypeVar("_Env", bound=_LabEnv)


def per_test(lab_env: _Env, tmp_path: Path) -> Iterator[_Env]:
    """A module's lab for one test (the body of its `env` fixture): the test's files under its
    own tmp_path, and what it started stopped after it, whether it passed or not."""
    lab_env.base = tmp_path
    try:
        yield lab_env
    finally:
        lab_env.cleanup()


def parse_logfmt(line: str) -> dict[str, str]:
    fields = {}
    for key, value in _LOGFMT.findall(line):
        fields[key] = json.loads(value) if value.startswith('"') else value
    return fields


def qid_of(reply: str | bytes) -> str:
    """The queue id in our `250 2.0.0 Ok: queued as ID`."""
    text = reply.decode() if isinstance(reply, bytes) else reply
    match = re.search(r"queued as (\w+)", text)
    assert match, f"no queue id in {text!r}"
    return match.group(1)


# --- clients --------------------------------------------------------------------------------


def smtp_client(host: Host, server: str, port: int = 25, *, source: str | None = None,
                timeout: float = 10.0) -> smtplib.SMTP:
    """An smtplib connection made from inside `host` (optionally from a given address)."""
    def make() -> smtplib.SMTP:
        return smtplib.SMTP(server, port, local_hostname=HELO, timeout=timeout,
                            source_address=(source, 0) if source else None)

    return in_netns(host, make)


def message(subject: str, body: bytes = b"Hello from the lab.\r\n", *,
            message_id: str | None = None, to: str = "alice@example.com") -> bytes:
    mid = message_id or f"{subject.replace(' ', '-')}@{SENDER_DOMAIN}"
    return (f"From: Sender <sender@{SENDER_DOMAIN}>\r\nTo: <{to}>\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{mid}>\r\n\r\n").encode() + body


def split_our_received(content: bytes) -> tuple[bytes, bytes]:
    """(our Received: field, the rest) of a message as the server got it."""
    assert content.startswith(b"Received: "), content[:200]
    lines = content.split(b"\r\n")
    count = 1
    while lines[count][:1] in (b" ", b"\t"):
        count += 1
    return b"\r\n".join(lines[:count]), b"\r\n".join(lines[count:])


class RawSmtp:
    """A plain socket from inside a lab host, for byte-exact SMTP probes."""

    def __init__(self, host: Host, server: str, port: int = 25, timeout: float = 10.0) -> None:
        self.sock: socket.socket = connect(host, server, port, timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One complete (maybe multi-line) reply, CRLF kept off; b"" at EOF."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return b"\r\n".join(lines)
                self.buffer += chunk
            line, _, self.buffer = self.buffer.partition(b"\r\n")
            lines.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(lines)

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the connection within `timeout` (reading away what it
        still sends)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawSmtp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
