"""A tiny authoritative DNS server for MX tests, run inside a lab host.

    python -m netsetup.lab.peers.dns --listen 198.51.100.53:53 --zone '{"example.com.": ...}'

The zone is a JSON object {name: {TYPE: [values]}}; MX values are [preference, exchange]
pairs, every other type takes its usual text form ("198.51.100.25", "2001:db8:2::25",
"v=spf1 -all" for TXT...). A name in the zone answers its records (NOERROR and no records
when it has none of the type asked); any other name is NXDOMAIN. Every answer is
authoritative (AA), except for the names given with --servfail, which get SERVFAIL (a broken
zone, as a recursive resolver reports it). UDP and TCP (RFC 7766: a 2-byte length before each
message) on the same address and port. Parsing and building messages is dnspython's; only the
lookup is ours.
"""

from __future__ import annotations

import argparse
import json
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from netsetup.lab.peers._common import family_of, udp_socket, wait_exit, wait_until
from netsetup.lab.topology import Host, Lab

TTL = 60
REPO_ROOT = Path(__file__).resolve().parents[3]

# As given in JSON: {"example.com.": {"MX": [[10, "mx.example.com."]], "A": ["192.0.2.1"]}}
ZoneData = Mapping[str, Mapping[str, Sequence[Any]]]
Zone = dict[dns.name.Name, dict[dns.rdatatype.RdataType, list[dns.rdata.Rdata]]]


def load_zone(data: ZoneData) -> Zone:
    """The JSON zone as dnspython rdata, checked once at start (a typo fails loudly)."""
    zone: Zone = {}
    for name, types in data.items():
        records = zone.setdefault(dns.name.from_text(name), {})
        for type_text, values in types.items():
            rdtype = dns.rdatatype.from_text(type_text)
            for value in values:
                text = " ".join(str(v) for v in value) if isinstance(value, list | tuple) \
                    else str(value)
                if rdtype == dns.rdatatype.MX and not text.rstrip().endswith("."):
                    text += "."  # an exchange is always a full name here
                rdata = dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)
                records.setdefault(rdtype, []).append(rdata)
    return zone


def answer(zone: Zone, wire: bytes,
           servfail: frozenset[dns.name.Name] = frozenset()) -> bytes | None:
    """The response to one query in wire form; None for something that is not a query.
    Questions for a name in `servfail` get SERVFAIL, whatever the zone holds."""
    try:
        query = dns.message.from_wire(wire)
    except Exception:
        return None  # not DNS: no answer, like any server facing garbage
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    if len(query.question) != 1:
        response.set_rcode(dns.rcode.FORMERR)
        return response.to_wire()
    question = query.question[0]
    records = zone.get(question.name)
    if question.name in servfail:
        response.flags &= ~dns.flags.AA
        response.set_rcode(dns.rcode.SERVFAIL)
    elif records is None:
        response.set_rcode(dns.rcode.NXDOMAIN)
    else:
        wanted = list(records) if question.rdtype == dns.rdatatype.ANY else [question.rdtype]
        for rdtype in wanted:
            if rdtype in records:
                response.answer.append(dns.rrset.from_rdata_list(question.name, TTL,
                                                                 records[rdtype]))
    return response.to_wire()


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        reply = answer(self.server.zone, data, self.server.servfail)
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TCPHandler(socketserver.StreamRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        while True:
            size = self.rfile.read(2)
            if len(size) < 2:
                return
            data = self.rfile.read(int.from_bytes(size, "big"))
            reply = answer(self.server.zone, data, self.server.servfail)
            if reply is None:
                return
            self.wfile.write(len(reply).to_bytes(2, "big") + reply)


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], zone: Zone,
                 servfail: frozenset[dns.name.Name] = frozenset()) -> None:
        self.address_family = family_of(address[0])
        self.zone = zone
        self.servfail = servfail
        super().__init__(address, _UDPHandler)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], zone: Zone,
                 servfail: frozenset[dns.name.Name] = frozenset()) -> None:
        self.address_family = family_of(address[0])
        self.zone = zone
        self.servfail = servfail
        super().__init__(address, _TCPHandler)


def parse_listen(text: str) -> tuple[str, int]:
    """'ADDR:PORT' or '[V6]:PORT' (port 53 when left out)."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        return host, int(port.lstrip(":") or 53)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, 53


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m netsetup.lab.peers.dns",
        description="Authoritative DNS for a lab: answers from a JSON zone, NXDOMAIN otherwise.")
    parser.add_argument("--listen", action="append", required=True,
                        help="ADDR:PORT or [V6ADDR]:PORT, UDP and TCP; may be repeated")
    parser.add_argument("--zone", required=True,
                        help='JSON object, or @FILE: {"example.com.": {"MX": [[10, '
                             '"mx.example.com."]], "A": ["198.51.100.25"]}}')
    parser.add_argument("--servfail", action="append", default=[], metavar="NAME",
                        help="answer SERVFAIL for NAME (may be repeated)")
    args = parser.parse_args(argv)
    try:
        text = Path(args.zone[1:]).read_text() if args.zone.startswith("@") else args.zone
        zone = load_zone(json.loads(text))
        listens = [parse_listen(item) for item in args.listen]
        servfail = frozenset(dns.name.from_text(name) for name in args.servfail)
    except (OSError, ValueError, dns.exception.DNSException) as exc:
        print(f"{parser.prog}: bad zone or address: {exc}", file=sys.stderr)
        return 2
    servers: list[socketserver.BaseServer] = []
    try:
        for address in listens:
            servers.append(_UDPServer(address, zone, servfail))
            servers.append(_TCPServer(address, zone, servfail))
    except OSError as exc:
        print(f"{parser.prog}: cannot listen: {exc}", file=sys.stderr)
        return 1
    threads = [threading.Thread(target=s.serve_forever, name=f"dns-{i}", daemon=True)
               for i, s in enumerate(servers)]
    for thread in threads:
        thread.start()
    print(f"serving {len(zone)} name(s) on {', '.join(args.listen)}", flush=True)
    try:
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        pass
    return 0


# --- the helper that runs it in a lab host --------------------------------------------------


class DnsServer:
    def __init__(self, lab: Lab, host: Host, process: subprocess.Popen[bytes],
                 address: tuple[str, int], log_path: Path) -> None:
        self.lab = lab
        self.host = host
        self.process: subprocess.Popen[bytes] | None = process
        self.address = address
        self.log_path = log_path
        self.startup_seconds = 0.0

    @classmethod
    def start(cls, lab: Lab, host: Host, zone: ZoneData,
              dir: Path, *, address: str | None = None, port: int = 53,
              servfail: Sequence[str] = (), timeout: float = 15.0) -> DnsServer:
        """Serve `zone` on address:port in `host` (default: the host's own IPv4 address);
        the names in `servfail` answer SERVFAIL."""
        load_zone(zone)  # fail here, not in the child, on a bad zone
        dir.mkdir(parents=True, exist_ok=True)
        zone_path = dir / "zone.json"
        zone_path.write_text(json.dumps(zone))
        log_path = dir / "dns.log"
        listen_host = address or host.ipv4 or "127.0.0.1"
        listen = f"[{listen_host}]:{port}" if ":" in listen_host else f"{listen_host}:{port}"
        argv = [sys.executable, "-m", "netsetup.lab.peers.dns", "--listen", listen,
                "--zone", f"@{zone_path}", *(f"--servfail={name}" for name in servfail)]
        started = time.monotonic()
        with log_path.open("ab") as log:
            process = lab.spawn(host, argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO_ROOT)
        server = cls(lab, host, process, (listen_host, port), log_path)
        wait_until(server._answers, f"dns server in {host.role}", timeout, process, (log_path,))
        server.startup_seconds = time.monotonic() - started
        return server

    def query(self, name: str, rdtype: str = "MX", from_host: Host | None = None,
              timeout: float = 2.0) -> dns.message.Message:
        """One UDP query from `from_host` (default: the server's own host)."""
        sock = udp_socket(from_host or self.host, self.address[0], timeout)
        with sock:
            sock.sendto(dns.message.make_query(name, rdtype).to_wire(), self.address)
            data, _ = sock.recvfrom(65535)
        return dns.message.from_wire(data)

    def _answers(self) -> bool:
        try:
            self.query("ready.invalid.", "A", timeout=0.5)
        except (TimeoutError, ConnectionRefusedError):
            return False
        return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            wait_exit(self.process, 5)
            self.process = None


if __name__ == "__main__":
    sys.exit(main())
