"""smtp-sink (a fast receiving SMTP server), smtp-source (a load generator) and swaks (a
scriptable SMTP client), run inside lab hosts.

None of them may look up a name: servers are given as address literals, and swaks always gets
an explicit --helo (its default HELO name comes from a lookup of the machine's hostname).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from netsetup.lab.peers._common import (
    PEER_MOUNT,
    ensure_port_free,
    failure,
    peer_command,
    port_open,
    user_ids,
    wait_exit,
    wait_until,
)
from netsetup.lab.topology import Host, Lab

# smtp-sink -c's running counters, which it rewrites in place ("\r") as they change.
_COUNTER = re.compile(rb"mesg=(\d+)")

SINK_USER = "nobody"  # smtp-sink refuses to keep running as root


def _endpoint(address: str, port: int) -> str:
    """Postfix tools' `host:port` syntax, IPv6 in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class SmtpSink:
    """A running smtp-sink. `dump_dir` set: every transaction is also written to a file
    there (headers X-Client-Addr, X-Mail-Args, X-Rcpt-Args... then the message)."""

    def __init__(self, lab: Lab, host: Host, process: subprocess.Popen[bytes], address: str,
                 port: int, dump_dir: Path | None, log_path: Path) -> None:
        self.lab = lab
        self.host = host
        self.process: subprocess.Popen[bytes] | None = process
        self.address = address
        self.port = port
        self.dump_dir = dump_dir
        self.log_path = log_path
        self.startup_seconds = 0.0

    @classmethod
    def start(cls, lab: Lab, host: Host, dir: Path, address: str = "0.0.0.0", port: int = 25,
              *, dump: bool = False, backlog: int = 256, hostname: str = "sink.lab.example",
              extra_args: Sequence[str] = (), timeout: float = 10.0) -> SmtpSink:
        ensure_port_free(lab, host, port, f"smtp-sink in {host.role}")
        dir.mkdir(parents=True, exist_ok=True)
        log_path = dir / "smtp-sink.log"
        argv = ["smtp-sink", "-u", SINK_USER, "-h", hostname, *extra_args]
        dump_dir = None
        if dump:
            # smtp-sink writes its dumps as SINK_USER, after dropping root.
            dump_dir = dir / "dump"
            dump_dir.mkdir(exist_ok=True)
            os.chown(dump_dir, *user_ids(SINK_USER))
            argv += ["-d", f"{PEER_MOUNT}/dump/%Y%m%d%H%M%S."]
        argv += [_endpoint(address, port), str(backlog)]
        with log_path.open("ab") as log:
            process = lab.spawn(host, peer_command(dir, argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        sink = cls(lab, host, process, address, port, dump_dir, log_path)
        probe = "127.0.0.1" if address == "0.0.0.0" else ("::1" if address == "::" else address)
        sink.startup_seconds = wait_until(lambda: port_open(host, probe, port),
                                          f"smtp-sink in {host.role}", timeout, process,
                                          (log_path,))
        return sink

    def dumps(self) -> list[bytes]:
        """The finished transactions, oldest first (empty unless started with dump=True).

        smtp-sink writes a dump while its transaction runs (the envelope lines first, the
        content at the end of DATA): one still being written is left out, or a test that sees
        a new file at once would read it without its recipients (seen under load). A finished
        dump holds smtp-sink's own Received: line and ends with the empty separator line."""
        if self.dump_dir is None:
            return []
        files = sorted(self.dump_dir.iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
        dumps = [p.read_bytes() for p in files if p.is_file()]
        return [d for d in dumps if b"\nReceived: " in d and d.endswith(b"\n\n")]

    def messages(self) -> list[SinkMessage]:
        return [SinkMessage.parse(raw) for raw in self.dumps()]

    def wait_for_messages(self, count: int, timeout: float = 10.0,
                          logs: tuple[Path | None, ...] = ()) -> list[SinkMessage]:
        """Wait until `count` dump files exist. smtp-sink writes a dump while the transaction
        runs, so call this once the client has had its reply to the final '.'. `logs`: the
        other parties' logs, whose tails a failure shows with smtp-sink's."""
        wait_until(lambda: len(self.dumps()) >= count, f"{count} smtp-sink dump(s)", timeout,
                   self.process, (self.log_path, *logs))
        return self.messages()

    def counted(self) -> int:
        """Messages received so far, by smtp-sink's own running counter (start it with
        extra_args=["-c"]): the last "mesg=N" in its log ("sess=3 quit=3 mesg=3\\r")."""
        with self.log_path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 256))
            found = _COUNTER.findall(log.read())
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            wait_exit(self.process, 5)
            self.process = None


@dataclass(frozen=True)
class SinkMessage:
    """One smtp-sink dump, parsed: the envelope smtp-sink saw and the message itself."""

    client_address: str
    helo: str
    mail_from: str  # MAIL FROM argument, e.g. "<a@b> SIZE=12"
    rcpts: tuple[str, ...]
    content: bytes  # as sent after DATA (smtp-sink's own Received removed), CRLF line ends

    @classmethod
    def parse(cls, raw: bytes) -> SinkMessage:
        # A dump is "X-Name: value" lines, smtp-sink's Received header, the message with LF
        # line ends, then one empty separator line.
        fields: dict[str, list[str]] = {}
        rest = raw
        while rest.startswith(b"X-"):
            line, _, rest = rest.partition(b"\n")
            name, _, value = line.decode(errors="replace").partition(":")
            fields.setdefault(name, []).append(value.strip())
        if rest.startswith(b"Received: "):
            lines = rest.split(b"\n")
            count = 1
            while count < len(lines) and lines[count][:1] in (b" ", b"\t"):
                count += 1
            rest = b"\n".join(lines[count:])
        rest = rest.removesuffix(b"\n")
        return cls(
            client_address=fields.get("X-Client-Addr", [""])[0],
            helo=fields.get("X-Helo-Args", [""])[0],
            mail_from=fields.get("X-Mail-Args", [""])[0],
            rcpts=tuple(fields.get("X-Rcpt-Args", [])),
            content=rest.replace(b"\n", b"\r\n"),
        )


@dataclass(frozen=True)
class SourceRun:
    seconds: float  # wall time of the whole smtp-source run
    messages: int
    output: str

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def smtp_source(lab: Lab, host: Host, server: str, port: int = 25, *, count: int = 100,
                sessions: int = 10, size: int = 10240, mail_from: str = "bench@sender.example",
                rcpt: str = "sink@example.com", reuse_connection: bool = False,
                helo: str = "sender.lab.example", extra_args: Sequence[str] = (),
                timeout: float = 600) -> SourceRun:
    """Run smtp-source from `host`; return the elapsed time. `reuse_connection` (-d) sends
    many messages per connection instead of one."""
    argv = ["smtp-source", "-c", "-m", str(count), "-s", str(sessions), "-l", str(size),
            "-f", mail_from, "-t", rcpt, "-M", helo]
    if reuse_connection:
        argv.append("-d")
    argv += [*extra_args, _endpoint(server, port)]
    started = time.monotonic()
    result = lab.run(host, argv, check=False, timeout=timeout)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise failure(f"smtp-source exited with {result.returncode}: "
                      f"{(result.stderr or result.stdout).strip()[-2000:]}")
    return SourceRun(seconds, count, result.stdout + result.stderr)


def swaks(lab: Lab, host: Host, server: str, port: int = 25, *,
          mail_from: str = "sender@sender.example", rcpt: str | Sequence[str] = "rcpt@example.com",
          data: bytes | None = None, body: str | None = None, attach: Sequence[Path] = (),
          helo: str = "sender.lab.example", extra_args: Sequence[str] = (),
          check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """One SMTP transaction with swaks from `host` to server:port (an address literal).

    `data`: the exact message (headers and body) sent after DATA, fed through stdin; the
    server receives exactly these bytes (CRLF line ends wanted; a missing final CRLF is
    added). Else swaks builds a message from `body` and `attach`. The transcript is in stdout.
    """
    rcpts = [rcpt] if isinstance(rcpt, str) else list(rcpt)
    stdin = None
    if data is not None:
        # swaks "fixes" --data by default: replaces %TOKENS% and literal \\n, strips a
        # leading "From " line, adds an empty line before its final dot. With --no-data-fixup
        # it sends the text as given plus CRLF, so give it the wire form: dot-stuffed
        # (RFC 5321 4.5.2) and ending with the "." line, minus that last CRLF.
        wire = data if data.endswith(b"\r\n") or not data else data + b"\r\n"
        stdin = re.sub(rb"(^|\r\n)\.", rb"\1..", wire) + b"."
    argv = ["swaks", "--server", server, "--port", str(port), "--helo", helo,
            "--from", mail_from, "--to", ",".join(rcpts), "--timeout", "20"]
    if ":" in server:
        argv.append("-6")
    if stdin is not None:
        argv += ["--data", "-", "--no-data-fixup"]
    if body is not None:
        argv += ["--body", body]
    for path in attach:
        argv += ["--attach", f"@{path}"]
    argv += list(extra_args)
    result = subprocess.run(lab.command(host, argv), input=stdin.decode("latin-1") if stdin
                            is not None else None, capture_output=True, text=True,
                            encoding="latin-1", timeout=timeout)
    if check and result.returncode != 0:
        raise failure(f"swaks exited with {result.returncode}:\n{result.stdout[-3000:]}"
                      f"{result.stderr[-1000:]}")
    return result
