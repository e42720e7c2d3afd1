"""Content filtering end to end: `mailgate run` in the gateway intercepts swaks (and a real
Postfix) in the sender on its way to smtp-sink in the server, and scans with the REAL clamd
(signature DB written by its helper: EICAR) and spamd (Debian's shipped rules: GTUBE) running
in the gateway.

One lab, clamd, spamd and smtp-sink for the whole module; `mailgate run` is restarted with the
config each test needs. A scanner that accepts but never answers is a tiny fake server (no
real peer can be made to do that on demand).
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netsetup.lab.peers._common import port_open, wait_exit, wait_until
from netsetup.lab.peers.clamd import EICAR, EICAR_FOUND, Clamd, ClamdInstance
from netsetup.lab.peers.postfix import Postfix
from netsetup.lab.peers.sink import SinkMessage, SmtpSink, swaks
from netsetup.lab.peers.spamd import GTUBE, Spamd
from netsetup.lab.topology import Lab
from proxies.mail.headers import split_message
from tests.unit.scan_messages import plain, with_attachments, zipped

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SERVER = "198.51.100.25"
SPAMD_PORT = 7783
HUNG_PORT = 3399
HUNG_TIMEOUT = 2.0

NETWORK = """\
[network]
mode = "router"
intercept = ["smtp"]
ipv6 = false
spoof_source = false
"""

# Accepts connections, reads whatever comes, never answers.
HUNG_SCANNER = f"""
import asyncio
async def never(reader, writer):
    await reader.read()
async def main():
    server = await asyncio.start_server(never, "127.0.0.1", {HUNG_PORT})
    await server.serve_forever()
asyncio.run(main())
"""


@dataclass
class Gateway:
    lab: Lab
    dir: Path
    clamd: ClamdInstance
    sink: SmtpSink
    seen: int = 0  # sink dumps already looked at
    queue_dir: Path | None = None  # the queue of the `mailgate run` now running

    def scan_section(self, **extra: str) -> str:
        lines = ["[scan]", f'clamd = "unix:{self.clamd.socket_path}"',
                 f'spamd = "127.0.0.1:{SPAMD_PORT}"', 'timeout = "20s"']
        lines += [f"{key} = {value}" for key, value in extra.items()]
        return "\n".join(lines) + "\n"

    def send(self, content: bytes, rcpt: str = "bob@example.com") -> str:
        """swaks from the sender to the server's port 25 (intercepted); its transcript, with
        the time each reply took (`--show-time-lapse`, see `reply_to_dot_seconds`)."""
        result = swaks(self.lab, self.lab.sender, SERVER, 25, mail_from="alice@sender.example",
                       rcpt=rcpt, data=content, check=False, extra_args=["--show-time-lapse"])
        return result.stdout

    def delivered(self, count: int = 1) -> list[SinkMessage]:
        """The next `count` messages smtp-sink got. smtp-sink writes its dump while the
        transaction runs: wait until mailgate's queue is empty too (the sink has answered
        the final dot), so the dumps are complete."""
        self.sink.wait_for_messages(self.seen + count, timeout=20)
        queue_dir = self.queue_dir
        if queue_dir is not None:
            wait_until(lambda: not any(list((queue_dir / d).iterdir())
                                       for d in ("incoming", "active", "deferred")),
                       "mailgate queue empty", 20)
        messages = self.sink.messages()
        new = messages[self.seen:]
        self.seen = len(messages)
        return new

    def nothing_delivered(self) -> None:
        assert len(self.sink.dumps()) == self.seen


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    base = tmp_path_factory.mktemp("filtering")
    lab = Lab("router")
    try:
        lab.up()
        sink = SmtpSink.start(lab, lab.server, base / "sink", port=25, dump=True)
        clamd = Clamd.start(lab, lab.gateway, base / "clamd", tcp=None)
        spamd = Spamd.start(lab, lab.gateway, base / "spamd", port=SPAMD_PORT)
        config = base / "network.toml"
        config.write_text(NETWORK)
        result = lab.run(lab.gateway, [PYTHON, "-m", "netsetup.cli", "--config", str(config),
                                       "--state-file", str(base / "netsetup.json"), "apply"],
                         check=False, cwd=ROOT, timeout=60)
        assert result.returncode == 0, f"netsetup apply:\n{result.stdout}\n{result.stderr}"
        yield Gateway(lab, base, clamd, sink)
        spamd.stop()
    finally:
        lab.down()


@dataclass
class Mailgate:
    process: subprocess.Popen[bytes]
    config: Path
    queue_dir: Path
    quarantine_dir: Path
    log: Path

    def cli(self, gateway: Gateway, *argv: str) -> subprocess.CompletedProcess[str]:
        return gateway.lab.run(gateway.lab.gateway,
                               [PYTHON, "-m", "proxies.cli", *argv, "--config",
                                str(self.config)], check=False, cwd=ROOT)


@contextlib.contextmanager
def mailgate(gateway: Gateway, name: str, scan: str, policy: str = "") -> Iterator[Mailgate]:
    run_dir = gateway.dir / name
    run_dir.mkdir()
    queue_dir, quarantine_dir = run_dir / "queue", run_dir / "quarantine"
    config = run_dir / "mailgate.toml"
    config.write_text(NETWORK + f"""
[smtp]
hostname = "gw.lab.example"
relay_domains = ["example.com"]
queue_dir = "{queue_dir}"
tls = false
{scan}
[policy]
{policy}
[quarantine]
dir = "{quarantine_dir}"
""")
    log = run_dir / "mailgate.log"
    with log.open("ab") as out:
        process = gateway.lab.spawn(gateway.lab.gateway,
                                    [PYTHON, "-m", "proxies.cli", "run", "--config",
                                     str(config)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_until(lambda: "event=ready" in log.read_text(), "mailgate run", 20, process,
                   (log,))
        gateway.queue_dir = queue_dir
        yield Mailgate(process, config, queue_dir, quarantine_dir, log)
    finally:
        gateway.queue_dir = None
        process.terminate()
        wait_exit(process, 15)


def header(message: SinkMessage, name: str) -> str:
    """A header field's value, unfolded ('' when absent)."""
    parsed = email.message_from_bytes(message.content, policy=email.policy.compat32)
    value = parsed.get(name)
    return "" if value is None else " ".join(str(value).split())


def assert_byte_identical(delivered: SinkMessage, sent: bytes) -> None:
    """What arrived is what was sent, with only our Received: field in front."""
    assert delivered.content.endswith(sent), delivered.content[:600]
    fields, rest = split_message(delivered.content[:-len(sent)] + b"\r\n")
    assert len(fields) == 1 and fields[0].startswith(b"Received: from ") and rest == b"\r\n"


def reply_to_dot(transcript: str) -> str:
    """The server's reply to the end of DATA in a swaks transcript."""
    lines = transcript.splitlines()
    index = max(i for i, line in enumerate(lines) if line.startswith(" -> .")
                or line == " -> .")
    return next(line[4:] for line in lines[index:] if line.startswith(("<- ", "<** ")))


def reply_to_dot_seconds(transcript: str) -> float:
    """How long the server took to answer the end of DATA: swaks's own measurement, from
    sending the "." to reading the reply (no process start-up in it)."""
    lines = transcript.splitlines()
    index = max(i for i, line in enumerate(lines) if line.startswith(" -> .")
                or line == " -> .")
    lapse = next(line for line in lines[index:] if line.startswith("=== response in "))
    match = re.fullmatch(r"=== response in (\d+\.\d+)s", lapse)
    assert match, lapse
    return float(match.group(1))


EXE = ("setup.exe", b"MZ\x90\x00 not really", "application/octet-stream")


def test_reject_tag_and_deliver(gateway: Gateway) -> None:
    with mailgate(gateway, "defaults", gateway.scan_section(),
                  'subject_prefix = "[SPAM] "\nbanned_extensions = ["exe", "scr"]\n'):
        # Clean: delivered byte-identical (no header added).
        clean = plain(subject="clean one", body="Hello.\r\n.A dot line.\r\n")
        assert reply_to_dot(gateway.send(clean)).startswith("250 2.0.0 Ok: queued as ")
        assert_byte_identical(gateway.delivered()[0], clean)

        # EICAR as an attachment, and inside a zip: 554 at DATA naming the virus.
        for content in (with_attachments(("eicar.com.txt", EICAR, "text/plain")),
                        with_attachments(("files.zip", zipped(("eicar.com", EICAR)),
                                          "application/zip"))):
            assert reply_to_dot(gateway.send(content)) == \
                f"554 5.7.1 Virus found: {EICAR_FOUND}"

        # A banned .exe (double extension too).
        reply = reply_to_dot(gateway.send(with_attachments(EXE)))
        assert reply == "554 5.7.1 Message rejected: banned attachment name 'setup.exe'"
        reply = reply_to_dot(gateway.send(with_attachments(
            ("invoice.pdf.exe", b"MZ", "application/pdf"))))
        assert reply.startswith("554 5.7.1 Message rejected: banned attachment name "
                                "'invoice.pdf.exe' (double extension .pdf.exe)")
        gateway.nothing_delivered()

        # GTUBE: delivered, tagged by spamd's verdict.
        spam = plain(subject="buy", body=GTUBE.decode() + "\r\n")
        assert reply_to_dot(gateway.send(spam)).startswith("250 ")
        tagged = gateway.delivered()[0]
        fields, _ = split_message(tagged.content)
        names = [f.split(b":")[0] for f in fields]
        assert names[:5] == [b"Received", b"X-Spam-Flag", b"X-Spam-Score", b"X-Spam-Status",
                             b"X-Mailgate-Scan"]
        assert header(tagged, "X-Spam-Flag") == "YES"
        assert float(header(tagged, "X-Spam-Score")) >= 900
        assert "GTUBE" in header(tagged, "X-Spam-Status")
        assert header(tagged, "X-Mailgate-Scan").endswith("(clamd, spamd)")
        assert header(tagged, "Subject") == "[SPAM] buy"
        assert tagged.content.endswith(spam.split(b"\r\n\r\n", 1)[1])


def test_quarantine_list_and_release(gateway: Gateway) -> None:
    with mailgate(gateway, "quarantine", gateway.scan_section(),
                  'virus = "quarantine"\n') as run:
        infected = with_attachments(("eicar.txt", EICAR, "text/plain"), subject="held")
        reply = reply_to_dot(gateway.send(infected, rcpt="carol@example.com"))
        assert reply.startswith("250 2.0.0 Ok: quarantined as "), reply
        entry_id = reply.rsplit(" ", 1)[1]
        listed = run.cli(gateway, "quarantine", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        [entry] = json.loads(listed.stdout)
        assert entry["id"] == entry_id
        assert entry["result"]["virus"] == EICAR_FOUND
        assert entry["recipients"] == ["carol@example.com"]
        assert entry["original_destination"] == [SERVER, 25]
        gateway.nothing_delivered()

        released = run.cli(gateway, "quarantine", "release", entry_id)
        assert released.returncode == 0, released.stderr
        assert "daemon (pid" in released.stdout
        [delivered] = gateway.delivered()
        assert delivered.rcpts[0].startswith("<carol@example.com>")
        assert delivered.content.endswith(infected)
        assert json.loads(run.cli(gateway, "quarantine", "list", "--json").stdout) == []


def test_clamd_down_tempfails_and_postfix_delivers_once_it_is_back(gateway: Gateway) -> None:
    sender = Postfix.sender(gateway.lab, gateway.lab.sender, {"example.com": f"[{SERVER}]:25"},
                            gateway.dir / "postfix-sender")
    try:
        with mailgate(gateway, "clamd-down", gateway.scan_section()):
            gateway.clamd.stop()
            try:
                reply = reply_to_dot(gateway.send(plain(subject="while down")))
                assert reply == "451 4.7.1 Message cannot be scanned now, try again later"
                sender.send("alice@sender.example", ["dave@example.com"],
                            plain(subject="retried").replace(b"\r\n", b"\n"))
                wait_until(lambda: "451 4.7.1" in sender.log(), "postfix deferred on 451", 20)
                gateway.nothing_delivered()
            finally:
                gateway.clamd.start()
            # Postfix's own queue retries it (backoff 1-4 s in the lab sender). Its queue manager
            # can skip the deferred message once ("skipped, still being delivered") and then
            # wait out a longer scan; the flush only asks it to retry now, as an admin would.
            sender.flush()
            [delivered] = gateway.delivered()
            assert delivered.rcpts[0].startswith("<dave@example.com>")
            assert b"Subject: retried" in delivered.content
            sender.wait_queue_empty()
    finally:
        sender.stop()


def test_fail_mode_pass_delivers_with_the_failure_header(gateway: Gateway) -> None:
    scan = gateway.scan_section(fail_mode='"pass"')
    with mailgate(gateway, "fail-pass", scan):
        gateway.clamd.stop()
        try:
            message = plain(subject="unscanned")
            assert reply_to_dot(gateway.send(message)).startswith("250 ")
            [delivered] = gateway.delivered()
        finally:
            gateway.clamd.start()
    scan_header = header(delivered, "X-Mailgate-Scan")
    assert scan_header.startswith("not scanned: clamd: "), scan_header
    assert delivered.content.endswith(message)


def test_a_scanner_that_never_answers_does_not_hang_the_session(gateway: Gateway) -> None:
    lab = gateway.lab
    hung = lab.spawn(lab.gateway, [PYTHON, "-c", HUNG_SCANNER], stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(lab.gateway, "127.0.0.1", HUNG_PORT), "hung scanner", 10,
                   hung)
        scan = (f'[scan]\nclamd = {{ address = "tcp:127.0.0.1:{HUNG_PORT}", '
                f'timeout = "{HUNG_TIMEOUT:g}s" }}\nmax_timeouts = 2\n')
        with mailgate(gateway, "hung", scan) as run:
            message = plain(subject="stuck")
            transcript = gateway.send(message)
            reply, elapsed = reply_to_dot(transcript), reply_to_dot_seconds(transcript)
            assert reply == "451 4.7.1 Message cannot be scanned now, try again later"
            # The scan's own timeout and hardly more: the session did not wait on anything else.
            assert HUNG_TIMEOUT <= elapsed < HUNG_TIMEOUT + 1, transcript
            # The same message timing out again is held, not tempfailed for ever.
            reply = reply_to_dot(gateway.send(message))
            assert reply.startswith("250 2.0.0 Ok: quarantined as "), reply
            [entry] = json.loads(run.cli(gateway, "quarantine", "list", "--json").stdout)
            assert entry["reason"] == "scan timed out 2 times"
            assert entry["result"]["timed_out"] is True
            gateway.nothing_delivered()
    finally:
        hung.terminate()
        wait_exit(hung, 5)
