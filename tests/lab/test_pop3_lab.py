"""The POP3 proxy with real peers: Dovecot in the server host, `mailgate run` (POP3 on, with
the real clamd and spamd scanners in the gateway) behind netsetup's interception, and in the
sender host Python's poplib, fetchmail and getmail.

Matrix, kept small: poplib over IPv4 and IPv6 in router and bridge mode (both in one lab per
mode); fetchmail keep (TOP) and nokeep/fetchall (RETR + DELE) in router mode; getmail in
bridge mode; the 50 MB message and its memory bound in router mode; STLS terminate and
passthrough in a lab of their own.

What "as against Dovecot directly" is compared with: the sender also holds an address listed
in bypass_sources, so the same client from that address reaches Dovecot untouched.
"""

from __future__ import annotations

import json
import mailbox
import os
import poplib
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from netsetup.lab.peers._common import (
    PEER_MOUNT,
    chown_tree,
    in_netns,
    peer_command,
    user_ids,
    wait_exit,
)
from netsetup.lab.peers.clamd import EICAR, Clamd
from netsetup.lab.peers.dovecot import DovecotInstance
from netsetup.lab.peers.spamd import Spamd
from netsetup.lab.topology import Lab
from tests.lab.tcp_probes import JsonLines
from tests.lab.test_interception import (
    apply_with_netsetup,
    bypass_address,
    network_config,
)
from tests.unit.scan_messages import with_attachments
from tests.unit.test_pop3_support import (
    GTUBE,
    eicar_message,
    message,
    zipped_eicar_message,
)

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
LabFactory = Callable[..., Lab]
USER, PASSWORD = "bob", "secret"
BIG_SIZE = 50 * 1024 * 1024
# Peak RSS the proxy may add while a 50 MB message passes: the 8 MiB memory spool, a 1 MiB read
# buffer on each side and the copies made on the way; the rest of the message waits on disk.
RSS_GROWTH_BOUND = 40 * 1024 * 1024


class DualStackDovecot(DovecotInstance):
    """The lab helper's Dovecot, listening on IPv4 and IPv6 (its `address` takes one)."""

    def _write_config(self) -> None:
        super()._write_config()
        text = self.conf_path.read_text()
        text = text.replace("listen = ::\n", "listen = *, ::\n")
        text = text.replace("address = ::\n", "address = *, ::\n")
        self.conf_path.write_text(text)


class BoundPOP3(poplib.POP3):
    """poplib from a chosen source address (poplib itself has no source_address)."""

    def __init__(self, host: str, port: int, timeout: float,
                 source: tuple[str, int] | None) -> None:
        self.source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=self.source)


@dataclass
class Gateway:
    lab: Lab
    dovecot: DovecotInstance
    dir: Path
    proxy: subprocess.Popen[bytes] | None = None
    log: JsonLines | None = None

    def server(self, family: int) -> str:
        address = self.lab.server.ipv4 if family == 4 else self.lab.server.ipv6
        assert address is not None
        return address

    def start_proxy(self, *, event_loop: str = "asyncio", **pop3: object) -> None:
        settings = {"enabled": True, "keepalive_after": "20s", **pop3}
        lines = [network_config(self.lab, spoof=True),
                 "[smtp]", f'queue_dir = "{self.dir / "queue"}"', 'hostname = "gw.lab.example"',
                 "[pop3]", *(f"{key} = {json.dumps(value)}" for key, value in settings.items()),
                 "[scan]", f'clamd = "unix:{self.dir / "clamd" / "clamd.sock"}"',
                 'spamd = "127.0.0.1:783"',
                 "[quarantine]", f'dir = "{self.dir / "quarantine"}"',
                 "[log]", 'format = "json"']
        config = self.dir / "mailgate.toml"
        config.write_text("\n".join(lines) + "\n")
        self.proxy = self.lab.spawn(self.lab.gateway, [PYTHON, "-m", "proxies.cli", "run",
                                                       "--config", str(config)],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env={**os.environ, "MAILGATE_EVENT_LOOP": event_loop})
        self.log = JsonLines(self.proxy)
        ready = self.log.wait_for(lambda e: e["event"] == "ready", timeout=20,
                                  what="mailgate ready")
        assert ready["event_loop"] == event_loop

    def stop_proxy(self) -> None:
        if self.proxy is not None:
            self.proxy.send_signal(signal.SIGTERM)
            wait_exit(self.proxy, 15)
            self.proxy = None

    def peak_rss(self) -> int:
        assert self.proxy is not None
        for line in Path(f"/proc/{self.proxy.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def events(self, name: str) -> list[dict[str, Any]]:
        assert self.log is not None
        return [e for e in self.log.settle(0.2) if e.get("event") == name]

    def pop(self, family: int, action: Callable[[poplib.POP3], Any], *, direct: bool = False,
            timeout: float = 30) -> Any:
        """Run `action` on a logged-in poplib session from the sender (via the proxy, or from
        the bypassed address straight to Dovecot)."""
        # Name the source: the sender also holds the bypassed address, and IPv6 source
        # selection may well pick that one.
        sender = self.lab.sender.ipv4 if family == 4 else self.lab.sender.ipv6
        assert sender is not None
        source = (bypass_address(family) if direct else sender, 0)

        def session() -> Any:
            pop = BoundPOP3(self.server(family), 110, timeout=timeout, source=source)
            try:
                pop.user(USER)
                pop.pass_(PASSWORD)
                return action(pop)
            finally:
                pop.quit()

        return in_netns(self.lab.sender, session)


def deliver(gateway: Gateway, *contents: bytes) -> list[bytes]:
    """Put messages in the Maildir; return the files' bytes (Dovecot later moves the files
    to cur/)."""
    return [gateway.dovecot.deliver(USER, content).read_bytes() for content in contents]


def retr(pop: poplib.POP3, number: int) -> bytes:
    _status, lines, _octets = pop.retr(number)
    return b"".join(line + b"\r\n" for line in lines)


def clean_message(n: int) -> bytes:
    return message(f"clean {n}", b"Hello.\r\n.A line with a leading dot\r\n\r\nBye.\r\n")


def spam_message() -> bytes:
    return message("cheap", b"Buy now.\r\n" + GTUBE + b"\r\n")


def virus_message() -> bytes:
    return eicar_message()


def big_message() -> bytes:
    line = b"0123456789" * 99 + b"\r\n"  # 992 bytes
    return message("big", line * (BIG_SIZE // len(line)))


@pytest.fixture(params=["router", "bridge"])
def gateway(request: pytest.FixtureRequest, lab_factory: LabFactory,
            tmp_path: Path) -> Iterator[Gateway]:
    lab = lab_factory(request.param, make_bridge=False)
    yield _gateway(lab, tmp_path)


def _gateway(lab: Lab, tmp_path: Path, tls: bool = False) -> Gateway:
    for family, prefix in ((4, 24), (6, 64)):
        lab.ip(lab.sender, f"-{family}", "addr", "add", f"{bypass_address(family)}/{prefix}",
               "dev", "eth0", *(["nodad"] if family == 6 else []))
    dovecot = DualStackDovecot(lab, lab.server, tmp_path / "dovecot", {USER: PASSWORD}, "::",
                               110, tls).start()
    # A unix socket: in bridge mode the gateway has no address but loopback, and clamd's
    # getaddrinfo (AI_ADDRCONFIG) then refuses even 127.0.0.1.
    Clamd.start(lab, lab.gateway, tmp_path / "clamd", tcp=None)
    Spamd.start(lab, lab.gateway, tmp_path / "spamd")
    config = tmp_path / "network.toml"
    config.write_text(network_config(lab, spoof=True) + "[pop3]\nenabled = true\n")
    apply_with_netsetup(lab, config, tmp_path / "netsetup-state.json")
    return Gateway(lab, dovecot, tmp_path)


# --- poplib in both modes, both families -------------------------------------------------------


def test_poplib_through_the_gateway(gateway: Gateway) -> None:
    files = deliver(gateway, clean_message(1), spam_message(), virus_message(),
                    zipped_eicar_message(), clean_message(2))
    gateway.start_proxy()

    def listing(pop: poplib.POP3) -> dict[str, Any]:
        return {"stat": pop.stat(), "list": pop.list()[1], "uidl": pop.uidl()[1],
                "uidl2": pop.uidl(2), "top1": pop.top(1, 1)[1], "list5": pop.list(5)}

    for family in (4, 6):
        # UIDL, LIST, STAT and TOP of a clean message: as Dovecot says directly.
        assert gateway.pop(family, listing) == gateway.pop(family, listing, direct=True)
        got = gateway.pop(family, lambda pop: [retr(pop, n) for n in range(1, 6)])
        clean1, spam, virus, zipped, clean2 = got
        assert clean1 == files[0] and clean2 == files[4]
        assert b"X-Spam-Flag: YES" in spam and b"Subject: [SPAM] cheap" in spam
        assert spam.endswith(b"Buy now.\r\n" + GTUBE + b"\r\n")
        for notice in (virus, zipped):
            assert b"WDVPIVAlQEFQ" not in notice and b"UEsDB" not in notice  # base64 EICAR, zip
            assert b"[VIRUS REMOVED]" in notice
            assert b"Eicar-Test-Signature" in notice and b"quarantined" in notice
            assert b"From: Alice <alice@example.org>" in notice
    # Each replaced message was quarantined (per server address: the cache key is
    # (server, user, UIDL), and the IPv4 and IPv6 addresses are two servers to the proxy).
    quarantined = {e["quarantine"] for e in gateway.events("pop3_message") if "quarantine" in e}
    assert len(quarantined) == 4, quarantined
    stored = {p.read_bytes() for p in (gateway.dir / "quarantine").rglob("*.eml")}
    assert {virus_message(), zipped_eicar_message()} <= stored
    # Fetched again (a leave-on-server client): remembered, not scanned again.
    before = len(gateway.events("pop3_message"))
    again = gateway.pop(4, lambda pop: [retr(pop, 2), retr(pop, 3)])
    assert b"X-Spam-Flag: YES" in again[0] and b"[VIRUS REMOVED]" in again[1]
    repeat = gateway.events("pop3_message")[before:]
    assert [e["cached"] for e in repeat] == [True, True], repeat
    assert repeat[1]["quarantine"] in quarantined

    # DELE then QUIT deletes through the proxy, as directly; without QUIT nothing is deleted.
    def delete_first(pop: poplib.POP3) -> None:
        pop.dele(1)

    gateway.pop(4, delete_first)
    assert gateway.pop(6, lambda pop: pop.stat()[0]) == 4
    assert gateway.pop(4, lambda pop: pop.stat(), direct=True)[0] == 4

    if gateway.lab.mode == "router":
        _fetchmail_checks(gateway)
        _big_message_check(gateway)
    else:
        _getmail_check(gateway)


def test_poplib_on_uvloop(lab_factory: LabFactory, tmp_path: Path) -> None:
    """MAILGATE_EVENT_LOOP=uvloop: the POP3 proxy serves and scans on uvloop as on asyncio's
    loop (it once failed at the greeting: uvloop's transports are not asyncio.Transport)."""
    gateway = _gateway(lab_factory("router", make_bridge=False), tmp_path)
    files = deliver(gateway, clean_message(1), virus_message())
    gateway.start_proxy(event_loop="uvloop")
    clean, notice = gateway.pop(4, lambda pop: [retr(pop, 1), retr(pop, 2)])
    assert clean == files[0]
    assert b"[VIRUS REMOVED]" in notice and b"WDVPIVAlQEFQ" not in notice


def test_large_messages_scanned_as_they_arrive(lab_factory: LabFactory, tmp_path: Path) -> None:
    """Messages of some MB come in many reads, and stream into clamd as they come: the EICAR
    attachment behind 3 MB of text is found, and the clean one arrives byte for byte."""
    gateway = _gateway(lab_factory("router", make_bridge=False), tmp_path)
    padding = ("padding.txt", b"Nothing to see here.\r\n" * 140_000, "text/plain")
    infected = with_attachments(padding, ("eicar.com", EICAR, "application/octet-stream"))
    clean = with_attachments(padding)
    files = deliver(gateway, clean, infected)
    gateway.start_proxy()
    got_clean, notice = gateway.pop(4, lambda pop: [retr(pop, 1), retr(pop, 2)], timeout=60)
    assert got_clean == files[0]
    assert b"[VIRUS REMOVED]" in notice and b"Eicar-Test-Signature" in notice
    events = gateway.events("pop3_message")
    assert [(e["verdict"], e["size"] > 3_000_000) for e in events] == [
        ("clean", True), ("virus", True)], events


@pytest.mark.parametrize("mode", ["top", "retr"])
def test_scan_ahead_with_dovecot_and_clamd(lab_factory: LabFactory, tmp_path: Path,
                                           mode: str) -> None:
    """[pop3] scan_ahead: while poplib reads message n the proxy has n+1 fetched and
    scanned, and each outcome is what it is without scanning ahead."""
    gateway = _gateway(lab_factory("router", make_bridge=False), tmp_path)
    files = deliver(gateway, clean_message(1), spam_message(), virus_message(),
                    zipped_eicar_message(), clean_message(2))
    gateway.start_proxy(scan_ahead=mode)

    def fetch(pop: poplib.POP3) -> list[bytes]:
        got = [retr(pop, n) for n in range(1, 6)]
        pop.dele(1)  # another command after a scan ahead: waits its turn, answered in order
        return got

    clean1, spam, virus, zipped, clean2 = gateway.pop(4, fetch)
    assert clean1 == files[0] and clean2 == files[4]
    assert b"X-Spam-Flag: YES" in spam and spam.endswith(b"Buy now.\r\n" + GTUBE + b"\r\n")
    for notice in (virus, zipped):
        assert b"[VIRUS REMOVED]" in notice and b"WDVPIVAlQEFQ" not in notice
    events = gateway.events("pop3_message")
    assert [e["ahead"] for e in events] == [False, True, True, True, True], events
    assert gateway.pop(4, lambda pop: pop.stat()[0]) == 4  # DELE 1 and QUIT went through
    assert not gateway.events("pop3_scan_ahead_off")  # Dovecot's TOP is its RETR


@pytest.mark.parametrize(("mode", "second_seen"), [("top", False), ("retr", True)])
def test_scan_ahead_top_leaves_the_next_message_unread_on_the_server(
        lab_factory: LabFactory, tmp_path: Path, mode: str, second_seen: bool) -> None:
    """A client that reads message 1 and quits: with scan_ahead = "top" Dovecot marks only
    message 1 \\Seen; "retr" asked for message 2 too, and Dovecot marks it as well."""
    gateway = _gateway(lab_factory("router", make_bridge=False), tmp_path)
    files = deliver(gateway, clean_message(1), clean_message(2))
    gateway.start_proxy(scan_ahead=mode)
    assert gateway.pop(4, lambda pop: retr(pop, 1)) == files[0]
    # Dovecot's logout line counts what it was asked for: message 2 was fetched ahead.
    logout = "top=1/" if mode == "top" else "retr=2/"
    deadline = time.monotonic() + 10
    while logout not in gateway.dovecot.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert logout in gateway.dovecot.log_path.read_text()
    cur = gateway.dovecot.mail_dir / USER / "Maildir" / "cur"
    flags = {path.name.split(":2,")[0]: path.name.partition(":2,")[2]
             for path in cur.iterdir()}
    assert len(flags) == 2, flags
    seen = sorted("S" in value for value in flags.values())
    assert seen == sorted([True, second_seen]), flags


# --- fetchmail and getmail ---------------------------------------------------------------------


def _run_in_sender(gateway: Gateway, argv: list[str], env: dict[str, str],
                   timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    process = gateway.lab.spawn(gateway.lab.sender, argv, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        # What the client printed, what the proxy logged meanwhile and where the proxy's
        # threads are now (its SIGUSR2 stack dump) tell which side hung.
        if gateway.proxy is not None and gateway.proxy.poll() is None:
            gateway.proxy.send_signal(signal.SIGUSR2)
        events = gateway.log.settle(1.0)[-80:] if gateway.log is not None else []
        raise AssertionError(
            f"{shlex.join(argv)} did not finish within {timeout:g} s; its output:\n"
            f"{out.decode(errors='replace')}\nthe proxy's last events:\n"
            + "\n".join(json.dumps(e) for e in events)) from None
    return subprocess.CompletedProcess(argv, process.returncode, out)


def _fetchmail(gateway: Gateway, name: str, mode: str, server_options: str) -> list[bytes]:
    home = gateway.dir / name
    out = home / "out"
    out.mkdir(parents=True)
    mda = home / "mda.sh"
    mda.write_text(f'#!/bin/sh\nexec cat > "$(mktemp {out}/msg.XXXXXXXX)"\n')
    mda.chmod(0o755)
    rc = home / "fetchmailrc"
    rc.write_text(f"set no syslog\npoll {gateway.server(4)} protocol pop3 port 110 timeout 60 "
                  f"{server_options}\n"
                  f'  user "{USER}" there with password "{PASSWORD}" is "root" here\n'
                  f'  {mode} no rewrite sslproto "" mda "{mda}"\n')
    rc.chmod(0o600)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "FETCHMAILHOME": str(home)}
    result = _run_in_sender(gateway, ["fetchmail", "-f", str(rc), "--nodetach", "-v",
                                      "--pidfile", str(home / "pid")], env)
    assert result.returncode == 0, result.stdout.decode(errors="replace")
    return [p.read_bytes() for p in sorted(out.iterdir(), key=lambda p: p.stat().st_mtime_ns)]


def _lf(content: bytes) -> bytes:
    return content.replace(b"\r\n", b"\n")


def _fetchmail_checks(gateway: Gateway) -> None:
    """keep mode fetches with TOP n 99999999, nokeep fetchall with RETR + DELE."""
    remaining = [clean_message(2), spam_message(), virus_message(), zipped_eicar_message()]
    before = len(gateway.events("pop3_message"))
    # fetchmail(1), "RETR or TOP": keep with uidl uses TOP; fetchall always uses RETR.
    for name, mode, server_options in (("fetchmail-keep", "keep", "uidl"),
                                       ("fetchmail-nokeep", "nokeep fetchall", "")):
        got = [_lf(content) for content in _fetchmail(gateway, name, mode, server_options)]
        assert len(got) == 4, got
        # fetchmail puts its own Received field after Return-Path and delivers with LF line
        # ends; everything else is the message as Dovecot has it.
        clean = _lf(remaining[0])
        return_path, rest = clean.split(b"\n", 1)
        assert [c for c in got if c.startswith(return_path) and c.endswith(rest)], got
        assert sum(b"X-Spam-Flag: YES" in c for c in got) == 1
        assert sum(b"[VIRUS REMOVED]" in c for c in got) == 2
        assert not any(b"UEsDB" in content or b"WDVPIVAlQEFQ" in content for content in got)
    commands = [e["command"] for e in gateway.events("pop3_message")[before:]]
    assert any(c.startswith("TOP") and c.endswith("99999999") for c in commands), commands
    assert any(c.startswith("RETR") for c in commands), commands
    assert gateway.pop(4, lambda pop: pop.stat()[0], direct=True) == 0  # nokeep deleted them


def _getmail_check(gateway: Gateway) -> None:
    home = gateway.dir / "getmail"
    home.mkdir()
    maildir = home / "Maildir"
    mailbox.Maildir(maildir, create=True)
    # getmail delivers as nobody, who cannot pass pytest's 0700 tmp folder: the folder is
    # bind-mounted at PEER_MOUNT for the command (as the peer helpers do).
    uid, gid = user_ids("nobody")
    chown_tree(maildir, uid, gid)
    rc = home / "getmailrc"
    rc.write_text(f"""[retriever]
type = SimplePOP3Retriever
server = {gateway.server(4)}
port = 110
username = {USER}
password = {PASSWORD}

[destination]
type = Maildir
path = {PEER_MOUNT}/Maildir/
user = nobody

[options]
read_all = true
delete = false
delivered_to = false
received = false
verbose = 1
""")
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    # The venv's getmail (pyproject.toml says why not Debian's).
    getmail = Path(sys.executable).with_name("getmail")
    argv = [str(getmail), "--getmaildir", str(PEER_MOUNT), "--rcfile", f"{PEER_MOUNT}/getmailrc"]
    result = _run_in_sender(gateway, peer_command(home, argv), env)
    assert result.returncode == 0, result.stdout.decode(errors="replace")
    got = [p.read_bytes() for p in (maildir / "new").iterdir()]
    assert len(got) == 4, result.stdout
    lf = [_lf(content) for content in got]
    assert _lf(clean_message(2)) in lf
    assert sum(b"X-Spam-Flag: YES" in c for c in lf) == 1
    assert sum(b"[VIRUS REMOVED]" in c for c in lf) == 2
    assert not any(b"UEsDB" in c or b"WDVPIVAlQEFQ" in c for c in got)


def test_fetchmail_and_getmail_with_scan_ahead_top(lab_factory: LabFactory,
                                                  tmp_path: Path) -> None:
    """Real clients with scan_ahead = "top": fetchmail's keep (TOP) and nokeep (RETR, DELE)
    runs and getmail's get the same outcomes as without it, and fetchmail's RETRs were
    answered from messages fetched ahead (its own LIST gave the sizes)."""
    gateway = _gateway(lab_factory("router", make_bridge=False), tmp_path)
    remaining = (clean_message(2), spam_message(), virus_message(), zipped_eicar_message())
    deliver(gateway, *remaining)
    gateway.start_proxy(scan_ahead="top")
    _fetchmail_checks(gateway)
    assert any(e["ahead"] for e in gateway.events("pop3_message")
               if e["command"].startswith("RETR"))
    deliver(gateway, *remaining)  # nokeep took them all
    _getmail_check(gateway)
    assert not gateway.events("pop3_scan_ahead_off")


# --- a 50 MB message ---------------------------------------------------------------------------


def _big_message_check(gateway: Gateway) -> None:
    stored = deliver(gateway, big_message())[0]
    baseline = gateway.peak_rss()
    started = time.monotonic()
    got = gateway.pop(4, lambda pop: retr(pop, pop.stat()[0]), timeout=120)
    seconds = time.monotonic() - started
    assert got == stored
    peak = gateway.peak_rss()
    assert peak - baseline < RSS_GROWTH_BOUND, (baseline, peak)
    event = [e for e in gateway.events("pop3_message") if e["size"] > BIG_SIZE // 2][-1]
    assert event["spooled"] and event["verdict"] == "oversize", event
    print(f"50 MB through the gateway: {seconds:.2f} s, proxy peak RSS {peak >> 20} MiB "
          f"(baseline {baseline >> 20} MiB)")


# --- STLS --------------------------------------------------------------------------------------


def _stls_fetch(gateway: Gateway) -> tuple[dict[str, Any], bytes, bytes]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    def session() -> tuple[dict[str, Any], bytes, bytes]:
        pop = poplib.POP3(gateway.server(4), 110, timeout=30)
        try:
            pop.stls(context)
            der = pop.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
            pop.user(USER)
            pop.pass_(PASSWORD)
            return pop.capa(), der or b"", b"".join(
                line + b"\r\n" for line in pop.retr(2)[1])
        finally:
            pop.quit()

    return in_netns(gateway.lab.sender, session)


def _subject(der: bytes) -> str:
    pem = ssl.DER_cert_to_PEM_cert(der)
    result = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=pem.encode(),
                            capture_output=True, check=True)
    return result.stdout.decode()


def test_stls_terminate_and_passthrough(lab_factory: LabFactory, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the STLS test")
    gateway = _gateway(lab_factory("router", make_bridge=False), tmp_path, tls=True)
    deliver(gateway, clean_message(1), virus_message())

    gateway.start_proxy(tls="terminate")
    capabilities, der, content = _stls_fetch(gateway)
    assert "gw.lab.example" in _subject(der)  # the gateway's certificate, not Dovecot's
    assert "STLS" not in capabilities  # not offered again inside TLS
    assert b"[VIRUS REMOVED]" in content  # scanned: the gateway sees the plaintext
    gateway.stop_proxy()

    gateway.start_proxy(tls="passthrough")
    capabilities, der, content = _stls_fetch(gateway)
    assert "pop.lab.example" in _subject(der)  # Dovecot's own certificate, end to end
    assert b"WDVPIVAlQEFQ" in content  # relayed unscanned (the log says so)
    assert gateway.events("pop3_tls_passthrough")
