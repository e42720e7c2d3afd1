"""A private clamd in a lab host, with a virus database the helper writes itself.

No freshclam here (no internet): the database is one `.hdb` line, the MD5 signature of the
68-byte EICAR test string, which is all a test needs. clamd still unpacks archives and MIME
by itself, so EICAR in a zip or a base64 attachment is found too. Signatures from a local
database file are reported with a `.UNOFFICIAL` suffix: `Eicar-Test-Signature.UNOFFICIAL`.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import subprocess
import time
from pathlib import Path

from netsetup.lab.peers._common import PeerError, connect, wait_exit, wait_until
from netsetup.lab.topology import Host, Lab

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_NAME = "Eicar-Test-Signature"
EICAR_FOUND = f"{EICAR_NAME}.UNOFFICIAL"
CHUNK = 64 * 1024


def instream(sock: socket.socket, data: bytes, chunk: int = CHUNK) -> str:
    """Scan `data` with clamd's INSTREAM command on a connected socket; return the reply
    without the 'stream: ' prefix: 'OK', 'NAME FOUND' or '... ERROR'.

    z-prefixed commands end with NUL; the data goes in chunks, each after its length as a
    4-byte big-endian number, and a zero length ends it (clamd's own protocol doc).
    """
    sock.sendall(b"zINSTREAM\0")
    for start in range(0, len(data), chunk):
        piece = data[start:start + chunk]
        sock.sendall(struct.pack("!L", len(piece)) + piece)
    sock.sendall(struct.pack("!L", 0))
    reply = b""
    while not reply.endswith(b"\0"):
        part = sock.recv(4096)
        if not part:
            break
        reply += part
    return reply.rstrip(b"\0").decode(errors="replace").removeprefix("stream: ")


def _command(sock: socket.socket, command: bytes) -> bytes:
    sock.sendall(b"z" + command + b"\0")
    reply = b""
    while not reply.endswith(b"\0"):
        part = sock.recv(4096)
        if not part:
            break
        reply += part
    return reply.rstrip(b"\0")


class ClamdInstance:
    def __init__(self, lab: Lab, host: Host, dir: Path, tcp: tuple[str, int] | None,
                 stream_max_length: str, read_timeout: int | None = None,
                 max_file_size: str | None = None) -> None:
        self.lab = lab
        self.host = host
        self.dir = dir
        self.address = tcp  # TCP address inside the lab host, or None for the socket only
        self.socket_path = dir / "clamd.sock"
        self.conf_path = dir / "clamd.conf"
        self.log_path = dir / "clamd.log"
        self.stream_max_length = stream_max_length
        self.read_timeout = read_timeout  # seconds; None: clamd's default (120)
        self.max_file_size = max_file_size  # None: clamd's default (100M)
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    def _write_config(self) -> None:
        db = self.dir / "db"
        for folder in (db, self.dir / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)
        # md5:size:name; clamd refuses to start with no database at all.
        (db / "eicar.hdb").write_text(
            f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:{EICAR_NAME}\n")
        tcp = ""
        if self.address is not None:
            tcp = f"TCPSocket {self.address[1]}\nTCPAddr {self.address[0]}\n"
        # How long clamd waits for data, also for the next command of an IDSESSION.
        idle = "" if self.read_timeout is None else f"ReadTimeout {self.read_timeout}\n"
        max_file = "" if self.max_file_size is None else f"MaxFileSize {self.max_file_size}\n"
        # Runs as root (no User line): it reads only folders the test made.
        self.conf_path.write_text(f"""\
Foreground yes
DatabaseDirectory {db}
LocalSocket {self.socket_path}
LocalSocketMode 666
FixStaleSocket yes
{tcp}PidFile {self.dir / "clamd.pid"}
LogFile {self.log_path}
LogTime yes
TemporaryDirectory {self.dir / "tmp"}
SelfCheck 0
StreamMaxLength {self.stream_max_length}
{idle}{max_file}""")

    def start(self, timeout: float = 30.0) -> ClamdInstance:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        started = time.monotonic()
        with (self.dir / "clamd.out").open("ab") as out:
            self.process = self.lab.spawn(self.host, ["clamd", "-c", str(self.conf_path)],
                                          stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        logs = (self.dir / "clamd.out", self.log_path)
        wait_until(self._pongs, f"clamd in {self.host.role}", timeout, self.process, logs)
        self.startup_seconds = time.monotonic() - started
        return self

    def _pongs(self) -> bool:
        """Ready when PING answers PONG on the local socket and, if set, on TCP."""
        with self.unix_connection(timeout=2.0) as sock:
            if _command(sock, b"PING") != b"PONG":
                return False
        if self.address is not None:
            with self.tcp_connection(timeout=2.0) as sock:
                return _command(sock, b"PING") == b"PONG"
        return True

    def unix_connection(self, timeout: float = 10.0) -> socket.socket:
        """A connection to the local socket (a filesystem path: no namespace needed)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.socket_path))
        except BaseException:
            sock.close()
            raise
        return sock

    def tcp_connection(self, timeout: float = 10.0) -> socket.socket:
        """A TCP connection to clamd made from inside its lab host."""
        if self.address is None:
            raise PeerError("this clamd has no TCP socket")
        return connect(self.host, self.address[0], self.address[1], timeout)

    def scan(self, data: bytes) -> str:
        """INSTREAM over the local socket: 'OK', '<name> FOUND' or '... ERROR'."""
        with self.unix_connection() as sock:
            return instream(sock, data)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()  # clamd removes its socket and pid file on SIGTERM
            wait_exit(self.process, timeout)
        self.process = None


class Clamd:
    @staticmethod
    def start(lab: Lab, host: Host, dir: Path, *,
              tcp: tuple[str, int] | None = ("127.0.0.1", 3310),
              stream_max_length: str = "25M",
              read_timeout: int | None = None,
              max_file_size: str | None = None) -> ClamdInstance:
        return ClamdInstance(lab, host, dir, tcp, stream_max_length, read_timeout,
                             max_file_size).start()
