"""`mailgate demo`: a guided tour in a throwaway lab, in plain words.

It builds three hosts in network namespaces (a sender, the mailgate box as an invisible bridge,
a mail server), turns the box into an intercepting gateway with netsetup, runs the real
proxies and real mail programs, and shows what happens to mail. Everything it creates is
removed at the end, also on Ctrl-C or failure; nothing outside the lab is touched.
"""

from __future__ import annotations

import base64
import io
import json
import os
import poplib
import shutil
import sys
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netsetup.commands import run_in_namespace
from netsetup.lab.peers._common import in_netns
from netsetup.lab.peers.clamd import EICAR, Clamd
from netsetup.lab.peers.dovecot import Dovecot
from netsetup.lab.peers.postfix import Postfix, PostfixInstance
from netsetup.lab.peers.sink import swaks
from netsetup.lab.peers.spamd import GTUBE, Spamd
from netsetup.lab.topology import Lab, LabError

BOLD = "\033[1m" if sys.stdout.isatty() else ""
DIM = "\033[2m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


def say(text: str = "") -> None:
    print(textwrap.fill(text, 96) if text else "", flush=True)


def step(number: int, title: str) -> None:
    print(f"\n{BOLD}{number}. {title}{RESET}", flush=True)


def show(text: str, limit: int = 30) -> None:
    lines = text.rstrip("\n").splitlines()
    for line in lines[:limit]:
        print(f"   {DIM}{line}{RESET}")
    if len(lines) > limit:
        print(f"   {DIM}... ({len(lines) - limit} more lines){RESET}")


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise TimeoutError(f"gave up waiting for {what}")


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.lab = Lab("bridge", servers=1)
        self.config = workdir / "mailgate.toml"
        self.state = workdir / "netsetup-state.json"
        self.queue_dir = workdir / "queue"
        self.log = workdir / "mailgate.log"

    def mailgate_command(self, *args: str) -> str:
        result = self.lab.run(self.lab.gateway, [sys.executable, "-m", "proxies.cli", *args,
                                                 "--config", str(self.config)], check=False)
        return result.stdout + result.stderr

    def queue(self, *args: str) -> str:
        """`mailgate queue VERB ...` run in the gateway, as an administrator would."""
        result = self.lab.run(self.lab.gateway, [sys.executable, "-m", "proxies.cli", "queue",
                                                 *args, "--config", str(self.config)],
                              check=False)
        return result.stdout + result.stderr

    @property
    def server_ip(self) -> str:
        assert self.lab.server.ipv4 is not None
        return self.lab.server.ipv4

    def write_config(self) -> None:
        lab = self.lab
        v4, v6 = lab.bridge_management_addresses()
        self.config.write_text(textwrap.dedent(f"""\
            # The gateway's config: an invisible bridge between eth0 (sender side) and eth1.
            [network]
            mode = "bridge"
            bridge = "br0"
            ports = {json.dumps(list(lab.bridge_ports))}
            addresses = ["{v4}", "{v6}"]
            intercept = ["smtp", "pop3"]
            spoof_source = true

            [smtp]
            hostname = "gateway.lab.example"
            relay_domains = ["example.com"]
            queue_dir = "{self.queue_dir}"
            transport = {{ "sender.example" = "{lab.sender.ipv4}:25" }}
            retry_min = "2s"
            retry_max = "4s"

            [scan]
            clamd = "tcp:127.0.0.1:3310"
            spamd = "127.0.0.1:783"

            [policy]
            virus = "reject"
            spam = "tag"
            subject_prefix = "[SPAM] "
            banned_extensions = ["exe", "scr", "pif", "bat", "cmd", "com", "vbs", "js"]

            [quarantine]
            dir = "{self.dir / 'quarantine'}"

            [pop3]
            enabled = true
            """))

    def start_gateway(self) -> None:
        self.log_handle = self.log.open("w")
        self.lab.spawn(self.lab.gateway,
                       [sys.executable, "-m", "proxies.cli", "run", "--config", str(self.config)],
                       stdout=self.log_handle, stderr=self.log_handle)
        wait_until(lambda: "event=ready" in self.log.read_text(), 30, "mailgate to start")

    def run(self) -> int:
        lab = self.lab
        step(1, "A lab: three hosts in network namespaces, linked by virtual cables")
        lab.up()
        say("The box in the middle is an Ethernet bridge: the sender and the server share one "
            "subnet and do not know the box is there.")
        show(f"sender   {lab.sender.ipv4:15} {lab.sender.ipv6}   (namespace {lab.sender.netns})\n"
             f"gateway  bridge br0 over {', '.join(lab.bridge_ports)}      "
             f"(namespace {lab.gateway.netns})\n"
             f"server   {lab.server.ipv4:15} {lab.server.ipv6}   (namespace {lab.server.netns})")

        step(2, "netsetup makes the box intercept tcp 25 (SMTP) and 110 (POP3)")
        self.write_config()
        plan = run_in_namespace(lab.gateway.netns, "plan", self.config, self.state)
        say("'netsetup plan' says what it would change, without changing anything:")
        show(plan.stdout, limit=14)
        applied = run_in_namespace(lab.gateway.netns, "apply", self.config, self.state)
        if applied.returncode != 0:
            show(applied.stdout + applied.stderr)
            raise LabError("netsetup apply failed")
        status = run_in_namespace(lab.gateway.netns, "status", self.config, self.state)
        say(f"'netsetup apply' did it; 'netsetup status' now exits {status.returncode} "
            "(0 = everything in place as configured).")

        step(3, "Real mail programs: Postfix on the server, Postfix and swaks on the sender")
        server = Postfix.receiver(lab, lab.server, ["example.com"], self.dir / "server-postfix",
                                  users=["alice@example.com"])
        sender = Postfix.sender(lab, lab.sender, {"example.com": f"[{lab.server.ipv4}]:25"},
                                self.dir / "sender-postfix",
                                listen=("127.0.0.1:25", f"{lab.sender.ipv4}:25"))
        Clamd.start(lab, lab.gateway, self.dir / "clamd")
        Spamd.start(lab, lab.gateway, self.dir / "spamd")
        self.start_gateway()
        say("On the box: ClamAV (clamd, with a test signature database) and SpamAssassin "
            "(spamd, Debian's rules), which mailgate asks about every message. "
            "The server's Postfix takes mail for example.com (only alice exists). The sender's "
            "Postfix sends example.com mail straight to the server's address: it knows nothing "
            "of mailgate. mailgate runs on the box.")

        step(4, "The sender sends a mail to the server; the box catches it on the way")
        server_ip = self.server_ip
        result = swaks(lab, lab.sender, server_ip, mail_from="bob@sender.example",
                       rcpt="alice@example.com", body="Hello Alice, this is Bob.")
        show("\n".join(line for line in result.stdout.splitlines()
                       if line.startswith(("=== Connected", "<-  220", "<-  250 2.0.0 Ok"))))
        say(f"swaks connected to {lab.server.ipv4}, but the greeting came from "
            "gateway.lab.example: mailgate answered, queued the mail on disk (fsync) and "
            "only then said 250.")
        delivery = server.wait_for_messages(1, timeout=30)[0]
        say(f"The server received it from {delivery.client_address}, the sender's own address "
            "(mailgate connects onward with the client's address), with mailgate's trace "
            "header on top:")
        show(_mailgate_received(delivery.raw))

        step(5, "Relay control: the box is not an open relay")
        denied = swaks(lab, lab.sender, server_ip, mail_from="bob@sender.example",
                       rcpt="someone@elsewhere.example", check=False)
        show("\n".join(line for line in denied.stdout.splitlines()
                       if "RCPT" in line or line.startswith("<** ")))
        trick = swaks(lab, lab.sender, server_ip, mail_from="bob@sender.example",
                      rcpt="someone%elsewhere.example@example.com", check=False)
        show("\n".join(line for line in trick.stdout.splitlines() if line.startswith("<** ")))
        say("Mail for domains the box does not serve is refused, and so are the old tricks "
            "open-relay testers use (here the % hack).")

        step(6, "The queue: the server goes down, no mail is lost")
        server.stop()
        sender.send("bob@sender.example", ["alice@example.com"],
                    b"Subject: sent while the server is down\r\n\r\nStill arrives.\r\n")
        wait_until(lambda: '"queue_id"' in self.queue("list", "--json"), 30,
                   "the message to be queued")
        say("The sender's Postfix handed the mail to mailgate (which knew from step 4 that "
            "the server takes alice's mail: verified recipients are remembered for a week); "
            "the server is down, so it waits in mailgate's queue ('mailgate queue list', like "
            "mailq):")
        wait_until(lambda: "connect" in self.queue("list"), 30, "a first delivery try")
        show(self.queue("list"))
        server = Postfix.receiver(lab, lab.server, ["example.com"], self.dir / "server-postfix",
                                  users=["alice@example.com"])
        self.queue("flush")
        server.wait_for_messages(1, timeout=30)
        say("The server is back; 'mailgate queue flush' retried at once and the mail arrived.")

        step(7, "A user that does not exist is refused at once: no bounce from the box")
        unknown = swaks(lab, lab.sender, server_ip, mail_from="bob@sender.example",
                        rcpt="nobody@example.com", check=False)
        show("\n".join(line for line in unknown.stdout.splitlines()
                       if line.startswith((" -> RCPT", "<** "))))
        say("Before it answered RCPT, mailgate asked the server (MAIL FROM:<>, RCPT TO, QUIT, "
            "from bob's own address) and passed its refusal on: 550 5.1.1, during the "
            "session. Had it said 250, it would have had to mail a bounce to whatever sender "
            "the mail claimed, which for spam is an innocent third party (backscatter).")
        sender.send("bob@sender.example", ["nobody@example.com"],
                    b"Subject: to a user that does not exist\r\n\r\nHello?\r\n")
        bounce = self._wait_for_bounce(sender)
        say("The same through the sender's Postfix: refused at RCPT (this time from mailgate's "
            "cache, without asking the server again), so the sender's own server, which "
            "knows bob is real, told him (RFC 3464):")
        show(bounce, limit=12)
        bounced = [line for line in self.log.read_text().splitlines() if "event=bounced" in line]
        if bounced or '"queue_id"' in self.queue("list", "--json"):
            raise LabError("mailgate queued or bounced mail for nobody@example.com")
        say("mailgate's queue is empty and it sent no bounce of its own.")

        step(8, "Scanning: a clean, an infected and a spam message")
        self._scanning(server)

        step(9, "POP3: alice fetches her mail from the server, through the box")
        self._pop3()

        step(10, "What mailgate logged (one line per event; every line of a mail carries qid=)")
        show("\n".join(line for line in self.log.read_text().splitlines()
                       if "event=smtp_accepted" in line or "event=delivery " in line
                       or "event=smtp_rcpt_rejected" in line
                       or "event=smtp_filter" in line)[:6000],
             limit=16)
        return 0

    def _scanning(self, server: PostfixInstance) -> None:
        lab = self.lab
        before = len(server.deliveries())
        clean = swaks(lab, lab.sender, self.server_ip, mail_from="bob@sender.example",
                      rcpt="alice@example.com", body="Lunch at noon?")
        say("A clean message: accepted and delivered unchanged, apart from mailgate's trace "
            "header. " + _last_reply(clean.stdout))
        eicar_file = self.dir / "invoice.zip"
        with zipfile.ZipFile(eicar_file, "w") as archive:
            archive.writestr("invoice.txt", EICAR)
        infected = swaks(lab, lab.sender, self.server_ip, mail_from="bob@sender.example",
                         rcpt="alice@example.com", attach=[eicar_file], check=False)
        say("A message with the EICAR test virus, zipped as an attachment: refused during the "
            "SMTP session, so the sender's own server has to report it and nothing reaches "
            "alice. " + _last_reply(infected.stdout))
        spam = swaks(lab, lab.sender, self.server_ip, mail_from="bob@sender.example",
                     rcpt="alice@example.com", body="Cheap pills! " + GTUBE.decode(),
                     extra_args=["--header", "Subject: you have won"])
        say("A spam message (the GTUBE test string): delivered, but tagged. "
            + _last_reply(spam.stdout))
        deliveries = server.wait_for_messages(before + 2, timeout=60)
        tagged = deliveries[-1].content.decode(errors="replace")
        show("\n".join(line for line in tagged.splitlines()
                       if line.startswith(("Subject:", "X-Spam-Flag", "X-Spam-Score",
                                           "X-Mailgate-Scan")))
             or "(no tags found)")
        say(f"alice received {len(deliveries) - before} of the 3 messages: the clean one and "
            "the tagged spam.")

    def _pop3(self) -> None:
        lab = self.lab
        dovecot = Dovecot.start(lab, lab.server, {"alice": "secret"}, self.dir / "dovecot")
        zipped = io.BytesIO()
        with zipfile.ZipFile(zipped, "w") as archive:
            archive.writestr("invoice.txt", EICAR)
        attachment = base64.encodebytes(zipped.getvalue()).replace(b"\n", b"\r\n")
        mails = {
            "Minutes of Monday's meeting": b"All agreed.\r\n",
            "You have won a prize": b"Claim it now! " + GTUBE + b"\r\n",
            "Invoice attached": (
                b"--b\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n--b\r\n"
                b"Content-Type: application/zip; name=invoice.zip\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\n" + attachment + b"--b--\r\n"),
        }
        originals = []
        for subject, body in mails.items():
            mime = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n" \
                if body.startswith(b"--b") else b""
            message = (f"From: carol@example.org\r\nTo: alice@example.com\r\n"
                       f"Subject: {subject}\r\n").encode() + mime + b"\r\n" + body
            originals.append(message)
            dovecot.deliver("alice", message)
        say("Dovecot on the server holds three messages for alice. Her mail client (Python's "
            f"poplib, on the sender host) connects to {self.server_ip}:110 as always; "
            "mailgate scans each message as it is retrieved:")
        server_ip = self.server_ip

        def fetch() -> list[bytes]:
            pop = poplib.POP3(server_ip, 110, timeout=30)
            try:
                pop.user("alice")
                pop.pass_("secret")
                count = len(pop.list()[1])
                return [b"\r\n".join(pop.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
            finally:
                pop.quit()

        fetched = in_netns(lab.sender, fetch)
        for original, got in zip(originals, fetched, strict=True):
            headers = got.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
            subject = next((h for h in headers.splitlines() if h.startswith("Subject:")), "")
            if got == original:
                fate = "arrived byte for byte as stored on the server"
            elif "X-Spam-Flag: YES" in headers:
                fate = "arrived tagged as spam"
            else:
                fate = "was replaced by a notice; the original is in quarantine"
            show(f"{subject:48} {fate}")
        listing = self.mailgate_command("quarantine", "list")
        show(listing, limit=6)

    def _wait_for_bounce(self, sender: PostfixInstance) -> str:
        def bounce() -> str | None:
            for delivery in sender.deliveries():
                text = delivery.content.decode(errors="replace")
                if "delivery-status" in text:
                    return "\n".join(line for line in text.splitlines()
                                     if line.startswith(("From:", "Subject:", "Final-Recipient",
                                                         "Action:", "Status:", "Diagnostic")))
            return None

        result: str = wait_until(bounce, 60, "the bounce")
        return result

    def cleanup(self) -> None:
        step(11, "Cleaning up")
        if self.lab.gateway.netns in {n for n in os.listdir("/run/netns")}:
            torn = run_in_namespace(self.lab.gateway.netns, "teardown", self.config, self.state)
            say(f"'netsetup teardown' removed what netsetup installed (exit {torn.returncode}).")
        self.lab.down()
        say("The lab's namespaces and every process in them are gone.")


def _last_reply(transcript: str) -> str:
    """The server's reply to the end of the message, from a swaks transcript."""
    replies = [line[4:].strip() for line in transcript.splitlines()
               if line.startswith(("<-  ", "<** ")) and line[4:7] not in ("221", "354")]
    return f"mailgate answered: {replies[-1]}" if replies else ""


def _mailgate_received(raw: bytes) -> str:
    """The Received: header mailgate added, unfolded onto one line."""
    text = raw.decode(errors="replace").replace("\r\n", "\n")
    headers = text.split("\n\n", 1)[0]
    unfolded = headers.replace("\n\t", " ").replace("\n ", " ")
    for line in unfolded.splitlines():
        if line.startswith("Received:") and "(mailgate)" in line:
            return line
    return "(no Received header from mailgate found)"


def run_demo() -> int:
    if os.geteuid() != 0:
        print("mailgate demo: needs root (it builds network namespaces)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="mailgate-demo-"))
    workdir.chmod(0o755)
    demo = Demo(workdir)
    print(f"{BOLD}mailgate demo{RESET}: a throwaway lab; nothing outside it is touched.")
    try:
        code = demo.run()
    except (LabError, TimeoutError, OSError) as exc:
        print(f"\nmailgate demo: {exc}", file=sys.stderr)
        if demo.log.exists():
            print("last lines of mailgate's log:", file=sys.stderr)
            print("\n".join(demo.log.read_text().splitlines()[-15:]), file=sys.stderr)
        return 1
    finally:
        demo.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{BOLD}Done.{RESET} Try it yourself: 'mailgate lab up --mode bridge', then "
          "'netsetup' and 'mailgate run' inside the gateway (see README.md).")
    return code
