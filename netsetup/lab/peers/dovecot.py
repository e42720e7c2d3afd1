"""A private Dovecot POP3 server in a lab host (`dovecot -F -c CONF`).

Everything it owns sits in the folder the caller gives: config, base_dir (sockets, master pid
file), state_dir, log, passwords and the users' Maildirs. Users log in with plain passwords
(no TLS unless asked for: `tls=True` makes a throw-away self-signed certificate for STLS).
Mail is delivered straight into a user's Maildir with Python's `mailbox`, owned by the one
system user all mailboxes run as (a static userdb).
"""

from __future__ import annotations

import mailbox
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from netsetup.lab.peers._common import (
    PEER_MOUNT,
    chown_tree,
    connect,
    failure,
    peer_command,
    read_reply_line,
    user_ids,
    wait_exit,
    wait_until,
)
from netsetup.lab.topology import Host, Lab

MAIL_USER = "nobody"  # Dovecot refuses mail uids below first_valid_uid (500): not root
STOP_TIMEOUT = 10.0


class DovecotInstance:
    def __init__(self, lab: Lab, host: Host, dir: Path, users: Mapping[str, str],
                 address: str, port: int, tls: bool) -> None:
        self.lab = lab
        self.host = host
        self.dir = dir
        self.users = dict(users)
        self.address = address
        self.port = port
        self.tls = tls
        self.conf_path = dir / "dovecot.conf"
        self.base_dir = dir / "run"
        self.log_path = dir / "dovecot.log"
        self.mail_dir = dir / "mail"
        self.cert_path = dir / "cert.pem"
        self.key_path = dir / "key.pem"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    @property
    def pid_file(self) -> Path:
        return self.base_dir / "master.pid"

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mail_dir.mkdir(exist_ok=True)
        uid, gid = user_ids(MAIL_USER)
        for user in self.users:
            self.maildir(user)  # created now so a first login finds it
        chown_tree(self.mail_dir, uid, gid)
        passwd = "".join(f"{user}:{{PLAIN}}{password}::::::\n"
                         for user, password in self.users.items())
        (self.dir / "passwd").write_text(passwd)
        (self.dir / "passwd").chmod(0o644)  # read by the auth process, which runs as dovecot
        inside = PEER_MOUNT  # this folder as dovecot sees it (peer_command)
        if self.tls:
            self._make_certificate()
            ssl = f"ssl = yes\nssl_cert = <{inside}/cert.pem\nssl_key = <{inside}/key.pem\n"
        else:
            ssl = "ssl = no\n"
        listen = "*" if self.address == "0.0.0.0" else self.address
        self.conf_path.write_text(f"""\
instance_name = dovecot-{self.dir.name}
base_dir = {inside}/run
state_dir = {inside}/state
log_path = {inside}/dovecot.log
info_log_path = {inside}/dovecot.log
protocols = pop3
listen = {listen}
{ssl}disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{inside}/mail/%u/Maildir
pop3_uidl_format = %08Xu%08Xv
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {inside}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={inside}/mail/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {listen}
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")

    def _make_certificate(self) -> None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=pop.lab.example", "-keyout", str(self.key_path),
                        "-out", str(self.cert_path)], check=True, capture_output=True)

    def start(self, timeout: float = 15.0) -> DovecotInstance:
        self._write_config()
        if self.pid_file.exists():
            # A previous run in this folder that did not finish stopping: dovecot would
            # refuse with "already running".
            self._wait_pid_file_gone(STOP_TIMEOUT)
        started = time.monotonic()
        with (self.dir / "dovecot.out").open("ab") as out:
            argv = ["dovecot", "-F", "-c", f"{PEER_MOUNT}/dovecot.conf"]
            self.process = self.lab.spawn(self.host, peer_command(self.dir, argv),
                                          stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        logs = (self.dir / "dovecot.out", self.log_path)
        probe = {"0.0.0.0": "127.0.0.1", "*": "127.0.0.1", "::": "::1"}.get(self.address,
                                                                            self.address)
        wait_until(lambda: self._greets(probe), f"dovecot in {self.host.role}", timeout,
                   self.process, logs)
        self.startup_seconds = time.monotonic() - started
        return self

    def _greets(self, address: str) -> bool:
        """Ready once the POP3 greeting comes: the login process and auth are up."""
        with connect(self.host, address, self.port, timeout=2.0) as sock:
            return read_reply_line(sock).startswith(b"+OK")

    def maildir(self, user: str) -> mailbox.Maildir:
        (self.mail_dir / user).mkdir(parents=True, exist_ok=True)
        return mailbox.Maildir(self.mail_dir / user / "Maildir", create=True)

    def deliver(self, user: str, content: bytes) -> Path:
        """Put a message into `user`'s Maildir (new/); return its file. POP3 serves the bytes
        as they are here, so give CRLF or LF line ends as the test wants them read back."""
        box = self.maildir(user)
        key = box.add(content)
        path = self.mail_dir / user / "Maildir" / "new" / key  # where Maildir.add puts it
        uid, gid = user_ids(MAIL_USER)
        chown_tree(self.mail_dir / user, uid, gid)
        return path

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the master and wait for its pid file to vanish (about 1.2 s): a restart
        before that says 'already running'."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            wait_exit(self.process, timeout)
        self.process = None
        self._wait_pid_file_gone(timeout)

    def _wait_pid_file_gone(self, timeout: float) -> None:
        try:
            wait_until(lambda: not self.pid_file.exists(), "dovecot master pid file gone",
                       timeout)
        except Exception:
            # Killed hard (SIGKILL at lab.down()): nothing removes the file; the pid in it is
            # dead, so it is stale and safe to remove.
            pid = self.pid_file.read_text().strip()
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                self.pid_file.unlink(missing_ok=True)
            else:
                raise failure("dovecot did not stop", self.log_path) from None


class Dovecot:
    @staticmethod
    def start(lab: Lab, host: Host, users: Mapping[str, str], dir: Path, *,
              address: str = "0.0.0.0", port: int = 110, tls: bool = False) -> DovecotInstance:
        return DovecotInstance(lab, host, dir, users, address, port, tls).start()
