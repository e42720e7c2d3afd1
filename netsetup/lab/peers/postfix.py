"""Private Postfix instances in lab hosts: a receiver, a sender and a relay.

Each instance has its own config folder (`postfix -c DIR`), queue, data folder and log file,
so instances in different namespaces run side by side and sequential tests never meet an
"already running" Postfix. It runs as `postfix -c DIR start-fg` under `lab.spawn`, so
`lab.down()` kills it whatever happens to the test.

Nothing here looks up a name: the SMTP client has DNS disabled and every next hop is an
[address]:port literal; smtpd does not look up its clients' names either.

Postfix stores a message the way its queue holds it: as lines. The maildir files the virtual
agent writes therefore end lines with LF, and carry Return-Path, X-Original-To, Delivered-To
and a Received header on top. `Delivery.content` undoes exactly that, to give the message as
it arrived on the wire (CRLF line ends, without what this Postfix added).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netsetup.lab.peers._common import (
    PEER_MOUNT,
    PeerError,
    chown_tree,
    ensure_port_free,
    failure,
    peer_command,
    port_open,
    user_ids,
    wait_exit,
    wait_until,
)
from netsetup.lab.topology import Host, Lab

# Every lab range; the receiver still refuses to relay (reject_unauth_destination).
LAB_NETWORKS = ("127.0.0.0/8", "[::1]/128", "192.0.2.0/24", "198.51.100.0/24",
                "203.0.113.0/24", "[2001:db8::]/32")
MAILBOX_USER = "nobody"  # the virtual agent refuses root (virtual_minimum_uid)
START_TIMEOUT = 20.0

# chroot column "n" everywhere: a chroot would need copies of /etc files and libraries.
_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

# Headers the virtual agent puts above the message (Received comes from cleanup/smtpd).
_DELIVERY_HEADERS = (b"return-path:", b"x-original-to:", b"delivered-to:")
_RECEIVED_FROM = re.compile(rb"^Received: from \S+ \((?:\S+ )?\[(?:IPv6:)?([^\]]+)\]\)")


@dataclass(frozen=True)
class Delivery:
    """One message file in an instance's mailbox."""

    path: Path
    raw: bytes  # the file as Postfix wrote it
    hostname: str  # the instance's myhostname, to recognise its own Received header

    def _split(self) -> tuple[list[bytes], bytes]:
        """(the header lines this Postfix added, the rest of the file)."""
        added: list[bytes] = []
        rest = self.raw
        while True:
            line, sep, after = rest.partition(b"\n")
            if not sep:
                return added, rest
            lower = line.lower()
            if lower.startswith(_DELIVERY_HEADERS):
                added.append(line)
                rest = after
                continue
            if lower.startswith(b"received:") and not added_received(added):
                # Its own Received header: "from ... by <myhostname> (Postfix) ...", folded.
                field, remainder = _take_folded(rest)
                if f"by {self.hostname} (Postfix".encode() in field:
                    added.extend(field.split(b"\n"))
                    rest = remainder
                    continue
            return added, rest

    @property
    def content(self) -> bytes:
        """The message as it came over SMTP: Postfix's headers removed, CRLF line ends."""
        _added, rest = self._split()
        return rest.replace(b"\n", b"\r\n")

    @property
    def received_header(self) -> bytes | None:
        added, _rest = self._split()
        lines = [line for line in added if not line.lower().startswith(_DELIVERY_HEADERS)]
        return b"\n".join(lines) if lines else None

    @property
    def client_address(self) -> str | None:
        """The SMTP client address this Postfix saw (from its Received header); None for
        mail submitted locally (sendmail)."""
        header = self.received_header
        match = _RECEIVED_FROM.match(header) if header else None
        return match.group(1).decode() if match else None

    def header(self, name: str) -> str | None:
        """The first header line this Postfix added with that name (X-Original-To, ...)."""
        prefix = name.lower().encode() + b":"
        for line in self._split()[0]:
            if line.lower().startswith(prefix):
                return line[len(prefix):].strip().decode(errors="replace")
        return None


def added_received(lines: list[bytes]) -> bool:
    return any(line.lower().startswith(b"received:") for line in lines)


def _take_folded(data: bytes) -> tuple[bytes, bytes]:
    """Split one (possibly folded) header field off the front of `data`."""
    lines = data.split(b"\n")
    count = 1
    while count < len(lines) and lines[count][:1] in (b" ", b"\t"):
        count += 1
    return b"\n".join(lines[:count]), b"\n".join(lines[count:])


def _listen_probe(service: str) -> tuple[str, int]:
    """Where to knock to see a master.cf inet service is up: 'PORT', 'ADDR:PORT', '[V6]:PORT'."""
    host, _, port = service.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port or service)


def listen_service(address: str, port: int) -> str:
    """The master.cf service name for address:port (IPv6 in brackets)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class PostfixInstance:
    """A running private Postfix. Made by `Postfix.receiver/sender/relay`."""

    def __init__(self, lab: Lab, host: Host, dir: Path, role: str, hostname: str,
                 listen: Sequence[str], main: Mapping[str, str],
                 service_options: Mapping[str, Mapping[str, str]] | None = None) -> None:
        self.lab = lab
        self.host = host
        self.dir = dir
        self.role = role
        self.hostname = hostname
        self.listen = tuple(listen)
        self.conf_dir = dir / "conf"
        self.queue_dir = dir / "queue"
        self.mailbox_dir = dir / "mail"
        self.log_path = dir / "log" / "maillog"
        self.output_path = dir / "postfix.out"  # start-fg's own stdout/stderr
        # The same folder as Postfix sees it, in every command run with `_command`.
        self.inside = PEER_MOUNT
        self.startup_seconds = 0.0
        self.process: subprocess.Popen[bytes] | None = None
        # Per-listener overrides (master.cf `-o name=value`), keyed by service name as in
        # `listen`: one instance can offer listeners that behave differently.
        self.service_options = {k: dict(v) for k, v in (service_options or {}).items()}
        self._write_config(main)

    # --- configuration ----------------------------------------------------------------------

    def _write_config(self, main: Mapping[str, str]) -> None:
        for folder in (self.conf_dir, self.queue_dir, self.dir / "data", self.log_path.parent):
            folder.mkdir(parents=True, exist_ok=True)
        # master takes its lock in the data folder as the mail owner (postfix-script warns too).
        chown_tree(self.dir / "data", *user_ids("postfix"))
        # The virtual agent writes as the mailbox user: it needs its maildir ready and its own.
        for sub in ("tmp", "new", "cur"):
            (self.mailbox_dir / sub).mkdir(parents=True, exist_ok=True)
        chown_tree(self.mailbox_dir, *user_ids(MAILBOX_USER))
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.inside / "queue"),
            "data_directory": str(self.inside / "data"),
            "meta_directory": "/etc/postfix",  # postfix-files and dynamicmaps.cf live there
            "maillog_file_prefixes": str(self.inside / "log"),
            "maillog_file": str(self.inside / "log" / "maillog"),
            "myhostname": self.hostname,
            "mydestination": "",
            "local_transport": "error:5.1.1 no local delivery in this lab instance",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "inet_interfaces": "all",
            "inet_protocols": "all",
            "mynetworks": " ".join(LAB_NETWORKS),
            # No DNS anywhere: next hops are [address] literals, clients stay nameless.
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            # Postmaster notices would go to a domain nobody routes: keep the mailbox to DSNs.
            "notify_classes": "",
            "virtual_mailbox_base": str(self.inside),
            "virtual_mailbox_maps": "static:mail/",
            "virtual_uid_maps": f"static:{user_ids(MAILBOX_USER)[0]}",
            "virtual_gid_maps": f"static:{user_ids(MAILBOX_USER)[1]}",
            # Else a raised message_size_limit above the mailbox limit makes delivery fatal
            # and master throttles the virtual service for 60 s.
            "virtual_mailbox_limit": "0",
        }
        settings.update(main)
        lines = [f"{key} = {value}" for key, value in settings.items()]
        (self.conf_dir / "main.cf").write_text("\n".join(lines) + "\n")
        unknown = set(self.service_options) - set(self.listen)
        if unknown:
            raise PeerError(f"service_options for services not listened on: {sorted(unknown)}")
        smtpd = ""
        for service in self.listen:
            options = self.service_options.get(service, {})
            for name, value in options.items():
                if not value or any(c.isspace() for c in name + value):
                    raise PeerError(f"master.cf -o {name}={value!r}: no spaces, not empty")
            overrides = "".join(f" -o {name}={value}" for name, value in options.items())
            smtpd += (f"{service:<10} inet  n       -       n       -       -       smtpd"
                      f"{overrides}\n")
        (self.conf_dir / "master.cf").write_text(smtpd + _MASTER_SERVICES)
        # Postfix rereads a main.cf changed in the last couple of seconds until it looks
        # settled (about 2.4 s lost at every start): date the files back a minute.
        settled = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.conf_dir / name, (settled, settled))

    # --- running ----------------------------------------------------------------------------

    def _command(self, *argv: str) -> list[str]:
        """A Postfix command for lab.run/spawn, seeing this instance's folder as Postfix does,
        with its -c (sendmail: -C) config folder as the first argument."""
        return peer_command(self.dir, [argv[0], "-C" if argv[0] == "sendmail" else "-c",
                                       str(self.inside / "conf"), *argv[1:]])

    def start(self, timeout: float = START_TIMEOUT) -> PostfixInstance:
        for service in self.listen:
            ensure_port_free(self.lab, self.host, _listen_probe(service)[1],
                             f"postfix {self.role} in {self.host.role}")
        started = time.monotonic()
        with self.output_path.open("ab") as out:
            self.process = self.lab.spawn(self.host, self._command("postfix", "start-fg"),
                                          stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        pid_file = self.queue_dir / "pid" / "master.pid"
        logs = (self.output_path, self.log_path)
        what = f"postfix {self.role} in {self.host.role}"
        wait_until(pid_file.exists, what, timeout, self.process, logs)
        for service in self.listen:
            address, port = _listen_probe(service)
            remaining = max(0.5, timeout - (time.monotonic() - started))
            wait_until(functools.partial(port_open, self.host, address, port),
                       f"{what} on {service}", remaining, self.process, logs)
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """`postfix stop`; wait for the master and every daemon it had started to be gone."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.lab.run(self.host, self._command("postfix", "stop"), check=False, timeout=timeout)
            wait_exit(self.process, timeout)
            wait_until(lambda: not self._daemon_pids(), f"postfix {self.role} daemons gone",
                       timeout, logs=(self.log_path,))
        self.process = None

    def _daemon_pids(self) -> list[int]:
        """This instance's processes: every Postfix daemon works in its queue_directory
        (compared by inode: each instance's mount shows the same path)."""
        queue = self.queue_dir.stat()
        out = subprocess.run(["ip", "netns", "pids", self.host.netns], capture_output=True,
                             text=True).stdout
        pids = []
        for pid in out.split():
            with contextlib.suppress(OSError):
                cwd = os.stat(f"/proc/{pid}/cwd")
                if (cwd.st_dev, cwd.st_ino) == (queue.st_dev, queue.st_ino):
                    pids.append(int(pid))
        return pids

    def postconf(self, *names: str) -> dict[str, str]:
        out = self.lab.run(self.host, self._command("postconf", "-h", *names)).stdout
        return dict(zip(names, out.splitlines(), strict=True))

    def log(self) -> str:
        """Everything Postfix logged (its maillog_file) plus start-fg's own output."""
        parts = []
        for path in (self.output_path, self.log_path):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    # --- mailbox ----------------------------------------------------------------------------

    def deliveries(self) -> list[Delivery]:
        """Messages the virtual agent delivered, oldest first."""
        files = [p for sub in ("new", "cur") for p in (self.mailbox_dir / sub).iterdir()
                 if p.is_file()]
        # Maildir names start with the delivery time in seconds, then a unique part.
        files.sort(key=lambda p: (p.stat().st_mtime_ns, p.name))
        return [Delivery(p, p.read_bytes(), self.hostname) for p in files]

    def messages(self) -> list[bytes]:
        """The delivered message files' bytes, as Postfix wrote them (LF line ends)."""
        return [d.raw for d in self.deliveries()]

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        """Wait until at least `count` messages are in the mailbox; return them all."""
        try:
            wait_until(lambda: len(self.deliveries()) >= count,
                       f"{count} message(s) in {self.mailbox_dir}", timeout, self.process)
        except PeerError as exc:
            raise failure(f"{exc}; found {len(self.deliveries())}",
                          self.log_path) from None
        return self.deliveries()

    # --- the queue (sender and relay) -------------------------------------------------------

    def send(self, mail_from: str, rcpts: Sequence[str], content: bytes) -> None:
        """Submit a message with this instance's sendmail (-i: a lone '.' is just a line)."""
        cmd = self._command("sendmail", "-i", "-f", mail_from, "--", *rcpts)
        result = subprocess.run(self.lab.command(self.host, cmd), input=content,
                                capture_output=True, timeout=30)
        if result.returncode != 0:
            raise failure(f"sendmail exited with {result.returncode}: "
                          f"{result.stderr.decode(errors='replace').strip()}", self.log_path)

    def queue(self) -> list[dict[str, Any]]:
        """`postqueue -j`: one dict per queued message (queue_name, queue_id, recipients...)."""
        out = self.lab.run(self.host, self._command("postqueue", "-j")).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        """Retry every deferred message now."""
        self.lab.run(self.host, self._command("postqueue", "-f"))

    def wait_queue_empty(self, timeout: float = 15.0) -> None:
        try:
            wait_until(lambda: not self.queue(), f"postfix {self.role} queue empty", timeout,
                       self.process)
        except PeerError as exc:
            raise failure(f"{exc}; still queued: {self.queue()}", self.log_path) from None


class Postfix:
    """Constructors for the three roles; each returns a started `PostfixInstance`."""

    @staticmethod
    def receiver(lab: Lab, host: Host, domains: Sequence[str], dir: Path, *,
                 users: Sequence[str] | None = None, port: int = 25,
                 addresses: Sequence[str] = ("0.0.0.0", "::"), hostname: str | None = None,
                 extra: Mapping[str, str] | None = None,
                 service_options: Mapping[str, Mapping[str, str]] | None = None
                 ) -> PostfixInstance:
        """A final destination for `domains`, storing every message in one maildir.

        `users`: full addresses to accept; others get 550 5.1.1 at RCPT (None: accept every
        local part). Mail for other domains is refused (554 5.7.1): it never relays.
        `service_options`: main.cf overrides for single listeners, keyed by their service name
        (`listen_service(address, port)`), e.g. {"198.51.100.27:25": {"smtpd_timeout": "1s"}}.
        """
        if users is not None:
            mailbox_maps = "inline:{" + ", ".join(f"{u}=mail/" for u in users) + "}"
        else:
            mailbox_maps = "static:mail/"
        main = {
            "myorigin": "$myhostname",
            "virtual_mailbox_domains": " ".join(domains),
            "virtual_mailbox_maps": mailbox_maps,
            "smtpd_relay_restrictions": "reject_unauth_destination",
            # Keep what arrives as it arrived: no header rewriting for anyone.
            "local_header_rewrite_clients": "",
        }
        main.update(extra or {})
        listen = [listen_service(a, port) for a in addresses]
        name = hostname or f"mx.{domains[0]}"
        return PostfixInstance(lab, host, _fresh(dir), "receiver", name, listen, main,
                               service_options).start()

    @staticmethod
    def sender(lab: Lab, host: Host, routes: Mapping[str, str], dir: Path, *,
               domain: str = "sender.example", relayhost: str = "",
               listen: Sequence[str] = ("127.0.0.1:25",), hostname: str | None = None,
               extra: Mapping[str, str] | None = None) -> PostfixInstance:
        """A Postfix that sends: `routes` maps a domain to its next hop ('[addr]:port').

        It is the final destination of its own `domain`, so bounces (DSNs) to its senders
        land in its mailbox. Retries come quickly (1 s backoff) for tests that bring a
        gateway up late.
        """
        transport = ", ".join(f"{d}=smtp:{hop}" for d, hop in routes.items())
        main = {
            "myorigin": domain,
            "mydomain": domain,
            "virtual_mailbox_domains": domain,
            "transport_maps": "inline:{" + transport + "}" if transport else "",
            "relayhost": relayhost,
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "4s",
        }
        main.update(extra or {})
        name = hostname or f"mail.{domain}"
        return PostfixInstance(lab, host, _fresh(dir), "sender", name, listen, main).start()

    @staticmethod
    def relay(lab: Lab, host: Host, relayhost: str, dir: Path, *,
              listen: Sequence[str] = ("0.0.0.0:25", "[::]:25"), relay_domains: Sequence[str] = (),
              hostname: str = "relay.lab.example",
              extra: Mapping[str, str] | None = None) -> PostfixInstance:
        """Accepts mail (from the lab networks, or for `relay_domains` from anyone) and
        relays it to `relayhost`, with Postfix's usual durability (fsync before 250)."""
        main = {
            "myorigin": "$myhostname",
            "virtual_mailbox_domains": "",
            "relay_domains": " ".join(relay_domains),
            "relayhost": relayhost,
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "4s",
        }
        main.update(extra or {})
        return PostfixInstance(lab, host, _fresh(dir), "relay", hostname, listen, main).start()


def _fresh(dir: Path) -> Path:
    """The instance folder. A queue left by an earlier instance there is removed (it would
    send old mail again); its mailbox is kept, so a restarted receiver keeps what it got."""
    if (dir / "queue").exists():
        shutil.rmtree(dir / "queue")
    dir.mkdir(parents=True, exist_ok=True)
    return dir
