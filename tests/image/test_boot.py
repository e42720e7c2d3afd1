"""The appliance image, booted: mail crosses it as it would cross the real box.

A bridge-mode lab: the sender (203.0.113.10) and the server (203.0.113.25, a real Postfix) share
one subnet, and the booted image sits between them as an invisible bridge. The image's default
config names no subnet, and the lab's is not the one our other tests use: an appliance taken
out of its box and plugged into someone's network. The lab's gateway
namespace runs no mailgate: it only holds two wires, each a Linux bridge joining the veth from a
lab host with a tap device that qemu (started inside that namespace) opens. So the guest's eth0
faces the sender, its eth1 the server, and the guest has no other network at all.

The disk booted is a sparse copy of images/build/mailgate.raw whose MGCONFIG partition carries
the lab's mailgate.toml: the same path an administrator takes to configure the box before its
first boot. The guest says on its serial console when it intercepts (MAILGATE-READY); the test
watches the console log with deadlines and fails at once on a NOT-READY line, a kernel panic or
qemu exiting.

Then, through the booted appliance: a clean message reaches the server's Postfix with the
appliance's Received: header and the sender's own address; EICAR in an attachment is refused
(554, clamd with the image's test signature); GTUBE is delivered tagged (spamd); and over POP3
from the server's Dovecot, the infected message arrives replaced.

A second, shorter boot: a config naming a port the box does not have (an interface name copied
from another machine). The appliance must say so in one line on the console, naming the port
and the interfaces it has, as soon as udev has seen every device, and never claim to be ready.
"""

from __future__ import annotations

import base64
import contextlib
import os
import poplib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from netsetup.lab.peers._common import in_netns
from netsetup.lab.peers.dovecot import Dovecot
from netsetup.lab.peers.postfix import Postfix
from netsetup.lab.peers.sink import swaks
from netsetup.lab.topology import Lab

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "images" / "build"
IMAGE = BUILD / "mailgate.raw"
DEFAULT_CONFIG = ROOT / "images" / "rootfs" / "etc" / "mailgate" / "mailgate.toml"
CONFIG_PARTITION_OFFSET = 1024 * 1024  # p1 starts at 1 MiB (images/build.sh)
GATEWAY_NAME = "gate.lab.example"
SERVER_NAME = "mx.example.com"
# `make image-test` boots through GRUB, as a real machine does; MAILGATE_IMAGE_BOOT=kernel
# boots images/build/vmlinuz + initrd.img directly (a few seconds faster).
BOOT = os.environ.get("MAILGATE_IMAGE_BOOT", "disk")
# Emulated (TCG) on a loaded 2-core machine: generous, but each wait ends at once on failure.
READY_TIMEOUT = 600.0
# The not-ready line comes at about the time the ready line would.
NOT_READY_TIMEOUT = 480.0
DELIVERY_TIMEOUT = 180.0
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
FAILURE_MARKERS = (b"MAILGATE-NOT-READY", b"Kernel panic", b"You are in emergency mode",
                   b"Failed to start mailgate")


def log(message: str) -> None:
    print(f"[image-test] {message}", flush=True)


# --- the serial console -------------------------------------------------------------------------


class BootFailed(AssertionError):
    pass


@dataclass
class Console:
    """The guest's serial console as qemu writes it to a file."""

    path: Path
    qemu: subprocess.Popen[bytes]
    started: float  # time.monotonic() when qemu was started

    def text(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def tail(self, lines: int = 60) -> str:
        text = self.text().decode(errors="replace")
        # GRUB's menu is full of cursor movements: keep the log readable.
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
        return "\n".join(text.splitlines()[-lines:])

    def wait_for(self, marker: bytes, timeout: float) -> bytes:
        """The console line holding `marker`; BootFailed (with the console's tail) if a failure
        marker shows up first, qemu exits, or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            for line in text.splitlines():
                if marker in line:
                    return line
                for failure in FAILURE_MARKERS:
                    if failure in line:
                        raise BootFailed(f"the guest reported {line.decode(errors='replace')!r}"
                                         f"\n--- console ---\n{self.tail()}")
            if self.qemu.poll() is not None:
                raise BootFailed(f"qemu exited with status {self.qemu.returncode} before "
                                 f"{marker.decode()}\n--- console ---\n{self.tail()}")
            if time.monotonic() > deadline:
                raise BootFailed(f"no {marker.decode()} on the console after {timeout:.0f} s"
                                 f"\n--- console ---\n{self.tail()}")
            time.sleep(0.5)

    def seconds(self) -> float:
        return time.monotonic() - self.started


# --- the disk and the wires ---------------------------------------------------------------------


# Not the 192.0.2.0/24 of the other lab tests.
LAB_SUBNET = ("203.0.113", "2001:db8:5:")


def lab_config() -> str:
    """The image's default config with the lab's name for the gateway. Its relay domain is
    the lab's already (example.com, the server's); it names no subnet at all."""
    default = DEFAULT_CONFIG.read_text()
    placeholder = '# hostname = "mailgate.example.net"'
    for expected in (placeholder, 'relay_domains = ["example.com"]'):
        assert expected in default, f"the default config changed ({expected}): see lab_config()"
    settings = [line for line in default.splitlines() if not line.lstrip().startswith("#")]
    assert not any(line.startswith(("addresses", "bridged_networks")) for line in settings)
    return default.replace(placeholder, f'hostname = "{GATEWAY_NAME}"')


def prepare_disk(work: Path, config_text: str) -> Path:
    """A sparse copy of the image with `config_text` as mailgate.toml on its config partition."""
    if not IMAGE.exists():
        pytest.fail(f"no image at {IMAGE}: build it with 'make image' (make image-test does)")
    disk = work / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(IMAGE), str(disk)], check=True)
    config = work / "mailgate.toml"
    config.write_text(config_text)
    # mtools writes into the FAT partition inside the file: nothing is mounted.
    subprocess.run(["mcopy", "-o", "-i", f"{disk}@@{CONFIG_PARTITION_OFFSET}", str(config),
                    "::mailgate.toml"], check=True, capture_output=True,
                   env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    return disk


def wire_gateway(lab: Lab) -> list[str]:
    """In the gateway namespace: tap0 bridged with the veth towards the sender, tap1 with the
    one towards the server. Returns qemu's network arguments for the two taps."""
    gw = lab.gateway
    args: list[str] = []
    for index, veth in enumerate(lab.bridge_ports[:2]):
        tap, wire = f"tap{index}", f"wire{index}"
        lab.ip(gw, "tuntap", "add", "dev", tap, "mode", "tap")
        lab.ip(gw, "link", "add", wire, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        for port in (veth, tap):
            lab.ip(gw, "link", "set", port, "master", wire)
            lab.ip(gw, "link", "set", port, "up")
        lab.ip(gw, "link", "set", wire, "up")
        args += ["-netdev", f"tap,id=n{index},ifname={tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=n{index},mac=52:54:00:4d:47:0{index}"]
    return args


def qemu_command(disk: Path, console_log: Path, network: list[str]) -> list[str]:
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024",
            "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{console_log}",
            # No network but the two taps: no default NIC, no user-mode networking.
            "-nic", "none", *network,
            "-drive", f"file={disk},format=raw,if=virtio"]
    if BOOT == "kernel":
        argv += ["-kernel", str(BUILD / "vmlinuz"), "-initrd", str(BUILD / "initrd.img"),
                 "-append", (BUILD / "cmdline").read_text().strip()]
    return argv


@contextlib.contextmanager
def booted(work: Path, config_text: str, console_name: str) -> Iterator[tuple[Lab, Console]]:
    """The image booting between a fresh lab's sender and server, `config_text` on its MGCONFIG
    partition. Leaving the block takes the lab down, qemu with it; the serial console is kept as
    images/build/logs/`console_name`."""
    lab = Lab("bridge", make_bridge=False, bridge_subnet=LAB_SUBNET)
    console_log = work / "console.log"
    try:
        lab.up()
        disk = prepare_disk(work, config_text)
        network = wire_gateway(lab)
        log(f"lab {lab.name} up; booting the image ({BOOT})")
        started = time.monotonic()
        with (work / "qemu.err").open("wb") as qemu_err:
            qemu = lab.spawn(lab.gateway, qemu_command(disk, console_log, network),
                             stdout=subprocess.DEVNULL, stderr=qemu_err)
        yield lab, Console(console_log, qemu, started)
    finally:
        # lab.down() kills qemu (started in the gateway namespace) and every peer, then
        # deletes the namespaces, and with them the taps and wires.
        lab.down()
        with contextlib.suppress(OSError):
            BUILD.joinpath("logs").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(console_log, BUILD / "logs" / console_name)
        (work / "disk.raw").unlink(missing_ok=True)


@dataclass
class Appliance:
    lab: Lab
    console: Console
    ready_seconds: float


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[Appliance]:
    with booted(tmp_path, lab_config(), "image-test-console.log") as (lab, console):
        line = console.wait_for(b"MAILGATE-READY", READY_TIMEOUT)
        ready = console.seconds()
        log(f"ready {ready:.1f} s after qemu started: {line.decode(errors='replace').strip()}")
        yield Appliance(lab, console, ready)


# --- the test -----------------------------------------------------------------------------------


def message(subject: str, body: bytes, headers: bytes = b"") -> bytes:
    return (b"From: <alice@sender.example>\r\nTo: <bob@example.com>\r\n"
            b"Subject: " + subject.encode() + b"\r\nMessage-ID: <" + subject.encode()
            + b"@sender.example>\r\n" + headers + b"\r\n" + body)


def with_attachment(subject: str, attachment: bytes) -> bytes:
    """A multipart message with `attachment` base64-encoded, as mail carries files."""
    boundary = b"=-mailgate-image-test-="
    body = b"".join((
        b"--", boundary, b"\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n",
        b"--", boundary, b"\r\nContent-Type: application/octet-stream; name=eicar.com\r\n"
        b"Content-Disposition: attachment; filename=eicar.com\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n", base64.b64encode(attachment), b"\r\n",
        b"--", boundary, b"--\r\n",
    ))
    headers = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\""
               + boundary + b"\"\r\n")
    return message(subject, body, headers)


def send(appliance: Appliance, content: bytes, check: bool = True) -> str:
    """One SMTP session from the sender to the server's address, through the appliance."""
    lab = appliance.lab
    assert lab.server.ipv4
    return swaks(lab, lab.sender, lab.server.ipv4, 25, mail_from="alice@sender.example",
                 rcpt="bob@example.com", data=content, timeout=180, check=check).stdout


@pytest.mark.timeout(1200)
def test_mail_crosses_the_booted_appliance(appliance: Appliance, tmp_path: Path) -> None:
    lab, console = appliance.lab, appliance.console
    receiver = Postfix.receiver(lab, lab.server, domains=["example.com"], dir=tmp_path / "rx",
                                hostname=SERVER_NAME)

    # The sender talks to the server's address; the appliance answers in its place.
    clean = message("clean", b"Hello through the bridge.\r\n")
    transcript = send(appliance, clean)
    first_session = console.seconds()
    assert re.search(rf"<-  220 {re.escape(GATEWAY_NAME)}\b", transcript), transcript
    log(f"first intercepted SMTP session done {first_session:.1f} s after qemu started "
        f"(ready at {appliance.ready_seconds:.1f} s)")
    (delivery,) = receiver.wait_for_messages(1, timeout=DELIVERY_TIMEOUT)
    log(f"delivered to the server's Postfix {console.seconds():.1f} s after qemu started")
    # Invisible at layer 3: the server sees the sender's own address (spoof_source = true).
    assert delivery.client_address == lab.sender.ipv4, delivery.raw[:2000]
    # The appliance's own Received: header, then the message as the sender wrote it.
    sender = re.escape(lab.sender.ipv4.encode())
    assert re.search(rb"^Received: from sender\.lab\.example \(\[" + sender + rb"\]\)\s+by "
                     + re.escape(GATEWAY_NAME.encode()), delivery.content, re.M), delivery.raw
    assert delivery.content.endswith(clean), delivery.raw
    # The config came from the MGCONFIG partition, and the console says so.
    assert b"mailgate-config: installed /boot/config/mailgate.toml" in console.text()

    # clamd (with the image's EICAR signature) finds the virus in an attachment: refused at
    # the end of DATA.
    virus = send(appliance, with_attachment("virus", EICAR), check=False)
    assert re.search(r"<\*\* +554 5\.7\.1 .*Virus found", virus), virus

    # spamd scores GTUBE as spam: tagged ([policy] subject_prefix, "[SPAM] " by default, and
    # X-Spam headers) and delivered.
    send(appliance, message("spam", GTUBE + b"\r\n"))
    deliveries = receiver.wait_for_messages(2, timeout=DELIVERY_TIMEOUT)
    assert len(deliveries) == 2, [d.raw[:500] for d in deliveries]
    spam = deliveries[1].content
    assert b"\r\nSubject: [SPAM] spam\r\n" in spam, spam[:2000]
    assert re.search(rb"^X-Spam-Flag: YES", spam, re.M), spam[:2000]
    # The virus message went nowhere: EICAR travels base64-encoded in it, so look for that
    # form and for the message itself.
    assert not [d.raw[:500] for d in deliveries if base64.b64encode(EICAR) in d.raw
                or b"Subject: virus\r\n" in d.content]
    log(f"virus refused, spam tagged: done {console.seconds():.1f} s after qemu started")

    # POP3: a mailbox on the server holds a clean message and an infected one; the sender's
    # client reads them through the appliance, which replaces the virus by a notice.
    pop = Dovecot.start(lab, lab.server, users={"alice": "secret"}, dir=tmp_path / "pop")
    clean_pop = message("pop-clean", b"Fetched through the bridge.\r\n")
    pop.deliver("alice", clean_pop)
    pop.deliver("alice", with_attachment("pop-virus", EICAR))
    server = lab.server.ipv4
    assert server

    def retrieve() -> list[bytes]:
        client = poplib.POP3(server, 110, timeout=120)
        try:
            client.user("alice")
            client.pass_("secret")
            return [b"\r\n".join(client.retr(number)[1]) + b"\r\n" for number in (1, 2)]
        finally:
            client.quit()

    fetched_clean, fetched_virus = in_netns(lab.sender, retrieve)
    assert fetched_clean.endswith(b"\r\n\r\nFetched through the bridge.\r\n"), fetched_clean
    assert base64.b64encode(EICAR) not in fetched_virus, fetched_virus
    # In its place, the notice (proxies/pop3/rewrite.py build_notice): the original's Subject
    # marked, its Message-ID kept aside, the verdict, a plain text body, and no attachment.
    assert b"\r\nSubject: [VIRUS REMOVED] pop-virus\r\n" in fetched_virus, fetched_virus
    assert b"\r\nX-Mailgate-Original-Message-ID: <pop-virus@sender.example>\r\n" \
        in fetched_virus, fetched_virus
    assert re.search(rb"^X-Mailgate-Scan: virus; found=\S", fetched_virus, re.M), fetched_virus
    assert b"\r\naddressed to you because it contained a virus: " in fetched_virus, fetched_virus
    assert b"eicar.com" not in fetched_virus and b"multipart" not in fetched_virus, fetched_virus
    assert b"Subject: pop-clean" in fetched_clean
    log(f"POP3 through the appliance, virus replaced: done {console.seconds():.1f} s "
        "after qemu started")


@pytest.mark.timeout(900)
def test_console_says_why_the_appliance_is_not_ready(tmp_path: Path) -> None:
    default_ports = 'ports = ["eth0", "eth1"]'
    assert default_ports in lab_config(), "the default config changed: see this test"
    config = lab_config().replace(default_ports, 'ports = ["eth0", "enp1s0"]')
    with booted(tmp_path, config, "image-test-not-ready-console.log") as (_, console):
        line = console.wait_for(b"MAILGATE-NOT-READY", NOT_READY_TIMEOUT).decode(errors="replace")
        log(f"not ready, said {console.seconds():.1f} s after qemu started: {line.strip()}")
        assert line.strip().endswith("MAILGATE-NOT-READY: no network interface for [network] "
                                     "ports: enp1s0 (there are: eth0, eth1)"), console.tail()
        text = console.text()
        # The config was taken (it is valid: only this box lacks the port) ...
        assert b"mailgate-config: installed /boot/config/mailgate.toml" in text, console.tail()
        # ... and the reason is said once, with nothing claiming the box is ready.
        assert text.count(b"MAILGATE-NOT-READY") == 1, console.tail()
        assert b"MAILGATE-READY" not in text, console.tail()
