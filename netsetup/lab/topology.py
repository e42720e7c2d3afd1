"""A lab of network namespaces: a sender host, a gateway host and server hosts.

Router mode: the sender (192.0.2.0/24, 2001:db8:1::/64) and each server (198.51.100.0/24,
2001:db8:2::/64; a second one 203.0.113.0/24, 2001:db8:3::/64) sit on their own links and the
gateway routes between them. Bridge mode: sender and servers share 192.0.2.0/24 and
2001:db8:1::/64 (or the `bridge_subnet` asked for) and the gateway bridges its ports (`eth0`
towards the sender, `eth1`... towards the servers) without an address of its own. Variants of
bridge mode for the networks an appliance meets: `second_subnet` gives sender and server an
address in another subnet too (two subnets on one link); `routed_server` puts a router host on
the bridged link (.1 / ::1, the sender's default gateway) with the server behind it on a link
of its own (203.0.113.0/24, 2001:db8:6::/64), so the gateway sees the server only through the
router's link-layer address.

Only documentation ranges are used and no namespace has a link to the host's own interfaces,
so nothing a test sends can leave the lab. Every namespace gets its own resolv.conf pointing at
loopback (where nothing answers), so a peer that tries to look up a name fails at once instead
of asking the host's resolver.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NETNS_PREFIX = "mglab-"
REGISTRY_DIR = Path("/run/mailgate-lab")
NETNS_ETC = Path("/etc/netns")


class LabError(Exception):
    pass


@dataclass(frozen=True)
class Host:
    role: str  # "sender", "gateway", "server", "server2", "router"
    netns: str
    ipv4: str | None  # the host's address on the lab link, without prefix
    ipv6: str | None
    interfaces: tuple[str, ...] = ()
    # Bridge mode with `second_subnet`: the host's address in the other subnet of the link.
    extra_ipv4: str | None = None
    extra_ipv6: str | None = None


@dataclass
class _Plan:
    """Addresses of one lab, derived from its mode."""

    mode: str
    hosts: list[Host] = field(default_factory=list)


ROUTER_SUBNETS = [
    # (v4 prefix, v6 prefix) per link; the gateway is .1 / ::1 on each.
    ("192.0.2", "2001:db8:1:"),
    ("198.51.100", "2001:db8:2:"),
    ("203.0.113", "2001:db8:3:"),
]
SENDER_HOST = 10
SERVER_HOSTS = (25, 26)
GATEWAY_HOST = 1
# `routed_server`: the server's own link behind the router.
ROUTED_SUBNET = ("203.0.113", "2001:db8:6:")


def _run(argv: Sequence[str], check: bool = True,
         **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


class Lab:
    """Create with `Lab(mode)`, then `up()`; `down()` removes every trace, also after failures.

    Use as a context manager in tests: the namespaces and every process inside them are gone
    when the block exits, however it exits.
    """

    def __init__(self, mode: str = "router", name: str | None = None, servers: int = 1,
                 make_bridge: bool = True, bridge_subnet: tuple[str, str] = ROUTER_SUBNETS[0],
                 second_subnet: tuple[str, str] | None = None,
                 routed_server: bool = False) -> None:
        if mode not in ("router", "bridge"):
            raise LabError(f"unknown lab mode {mode!r} (router or bridge)")
        if not 1 <= servers <= 2:
            raise LabError("a lab has one or two server hosts")
        if mode == "router" and (second_subnet or routed_server
                                 or bridge_subnet != ROUTER_SUBNETS[0]):
            raise LabError("bridge_subnet, second_subnet and routed_server are for bridge mode")
        if routed_server and (servers != 1 or second_subnet):
            raise LabError("routed_server: one server, one subnet on the bridged link")
        self.bridge_subnet = bridge_subnet
        self.second_subnet = second_subnet
        self.routed_server = routed_server
        self.mode = mode
        self.name = name or secrets.token_hex(3)
        if not self.name.isalnum() or len(self.name) > 8:
            raise LabError(f"lab name must be 1-8 letters or digits: {self.name!r}")
        self.servers = servers
        self.make_bridge = make_bridge
        self._processes: list[subprocess.Popen[bytes]] = []
        self.hosts = self._addresses()

    # --- description -----------------------------------------------------------------------

    def _ns(self, role: str) -> str:
        return f"{NETNS_PREFIX}{self.name}-{role}"

    def _addresses(self) -> dict[str, Host]:
        hosts: dict[str, Host] = {}
        server_roles = ["server", "server2"][: self.servers]
        gw_ifaces = tuple(f"eth{i}" for i in range(1 + self.servers))
        if self.mode == "router":
            v4, v6 = ROUTER_SUBNETS[0]
            hosts["sender"] = Host("sender", self._ns("sender"), f"{v4}.{SENDER_HOST}",
                                   f"{v6}:{SENDER_HOST}", ("eth0",))
            for index, role in enumerate(server_roles):
                v4, v6 = ROUTER_SUBNETS[index + 1]
                host = SERVER_HOSTS[0]
                hosts[role] = Host(role, self._ns(role), f"{v4}.{host}", f"{v6}:{host}", ("eth0",))
            hosts["gateway"] = Host("gateway", self._ns("gateway"), None, None, gw_ifaces)
        else:
            v4, v6 = self.bridge_subnet

            def extra(host: int) -> dict[str, str]:
                if self.second_subnet is None:
                    return {}
                x4, x6 = self.second_subnet
                return {"extra_ipv4": f"{x4}.{host}", "extra_ipv6": f"{x6}:{host}"}

            hosts["sender"] = Host("sender", self._ns("sender"), f"{v4}.{SENDER_HOST}",
                                   f"{v6}:{SENDER_HOST}", ("eth0",), **extra(SENDER_HOST))
            for index, role in enumerate(server_roles):
                host = SERVER_HOSTS[index]
                if self.routed_server:
                    r4, r6 = ROUTED_SUBNET
                    hosts[role] = Host(role, self._ns(role), f"{r4}.{host}", f"{r6}:{host}",
                                       ("eth0",))
                else:
                    hosts[role] = Host(role, self._ns(role), f"{v4}.{host}", f"{v6}:{host}",
                                       ("eth0",), **extra(host))
            if self.routed_server:
                hosts["router"] = Host("router", self._ns("router"), f"{v4}.{GATEWAY_HOST}",
                                       f"{v6}:{GATEWAY_HOST}", ("eth0", "eth1"))
            hosts["gateway"] = Host("gateway", self._ns("gateway"), None, None, gw_ifaces)
        return hosts

    @property
    def sender(self) -> Host:
        return self.hosts["sender"]

    @property
    def gateway(self) -> Host:
        return self.hosts["gateway"]

    @property
    def server(self) -> Host:
        return self.hosts["server"]

    @property
    def bridge_ports(self) -> tuple[str, ...]:
        return self.gateway.interfaces

    def gateway_address(self, role: str = "sender", family: int = 4) -> str:
        """The gateway's address facing `role` (router mode), or its management address
        on the bridge (bridge mode, as `bridge_management_addresses` gives it)."""
        if self.mode == "router":
            index = 0 if role == "sender" else (1 if role == "server" else 2)
            v4, v6 = ROUTER_SUBNETS[index]
            return f"{v4}.{GATEWAY_HOST}" if family == 4 else f"{v6}:{GATEWAY_HOST}"
        v4, v6 = ROUTER_SUBNETS[0]
        return f"{v4}.2" if family == 4 else f"{v6}:2"

    def bridge_management_addresses(self) -> tuple[str, str]:
        v4, v6 = ROUTER_SUBNETS[0]
        return (f"{v4}.2/24", f"{v6}:2/64")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "hosts": {role: asdict(host) for role, host in self.hosts.items()},
        }

    # --- building ---------------------------------------------------------------------------

    def up(self) -> Lab:
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
        (REGISTRY_DIR / f"{self.name}.json").write_text(json.dumps(self.describe(), indent=2))
        for host in self.hosts.values():
            _run(["ip", "netns", "add", host.netns])
            etc = NETNS_ETC / host.netns
            etc.mkdir(parents=True, exist_ok=True)
            # Loopback, where nothing listens: a stray lookup fails at once, nothing leaves.
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
            (etc / "hosts").write_text(self._hosts_file())
            self.ip(host, "link", "set", "lo", "up")
            # Duplicate address detection would hold every IPv6 address back for a second or two.
            self.sysctl(host, "net.ipv6.conf.all.accept_dad", "0")
            self.sysctl(host, "net.ipv6.conf.default.accept_dad", "0")
            self.sysctl(host, "net.ipv6.conf.default.accept_ra", "0")
        gw = self.gateway
        peers = [self.sender] + [self.hosts[r] for r in ("server", "server2") if r in self.hosts]
        # With a routed server the gateway's server-side port leads to the router instead.
        linked = [self.sender, self.hosts["router"]] if self.routed_server else peers
        for index, peer in enumerate(linked):
            # Created straight inside the namespaces: the host's own namespace never sees them.
            _run(["ip", "link", "add", f"eth{index}", "netns", gw.netns, "type", "veth",
                  "peer", "name", "eth0", "netns", peer.netns])
            self.ip(peer, "link", "set", "eth0", "up")
            self.ip(gw, "link", "set", f"eth{index}", "up")
            self.ip(peer, "addr", "add", f"{peer.ipv4}/24", "dev", "eth0")
            self.ip(peer, "-6", "addr", "add", f"{peer.ipv6}/64", "dev", "eth0", "nodad")
            if peer.extra_ipv4 and peer.extra_ipv6:
                self.ip(peer, "addr", "add", f"{peer.extra_ipv4}/24", "dev", "eth0")
                self.ip(peer, "-6", "addr", "add", f"{peer.extra_ipv6}/64", "dev", "eth0",
                        "nodad")
        if self.routed_server:
            self._route_server()
        if self.mode == "router":
            self.sysctl(gw, "net.ipv4.ip_forward", "1")
            self.sysctl(gw, "net.ipv6.conf.all.forwarding", "1")
            for index, peer in enumerate(peers):
                v4, v6 = ROUTER_SUBNETS[index]
                self.ip(gw, "addr", "add", f"{v4}.{GATEWAY_HOST}/24", "dev", f"eth{index}")
                self.ip(gw, "-6", "addr", "add", f"{v6}:{GATEWAY_HOST}/64", "dev", f"eth{index}",
                        "nodad")
                # Routes only to the other lab subnets, never a default route.
                for other, (ov4, ov6) in enumerate(ROUTER_SUBNETS[: len(peers)]):
                    if other == index:
                        continue
                    self.ip(peer, "route", "add", f"{ov4}.0/24", "via", f"{v4}.{GATEWAY_HOST}")
                    self.ip(peer, "-6", "route", "add", f"{ov6}:/64", "via",
                            f"{v6}:{GATEWAY_HOST}")
        elif self.make_bridge:
            self.ip(gw, "link", "add", "br0", "type", "bridge", "forward_delay", "0",
                    "stp_state", "0")
            for index in range(len(peers)):
                self.ip(gw, "link", "set", f"eth{index}", "master", "br0")
            self.ip(gw, "link", "set", "br0", "up")
        self.wait_reachable()

    def _route_server(self) -> None:
        """The router between the bridged link and the server's own link; only lab routes."""
        router, server = self.hosts["router"], self.server
        _run(["ip", "link", "add", "eth1", "netns", router.netns, "type", "veth",
              "peer", "name", "eth0", "netns", server.netns])
        r4, r6 = ROUTED_SUBNET
        self.ip(router, "link", "set", "eth1", "up")
        self.ip(server, "link", "set", "eth0", "up")
        self.ip(router, "addr", "add", f"{r4}.{GATEWAY_HOST}/24", "dev", "eth1")
        self.ip(router, "-6", "addr", "add", f"{r6}:{GATEWAY_HOST}/64", "dev", "eth1", "nodad")
        self.ip(server, "addr", "add", f"{server.ipv4}/24", "dev", "eth0")
        self.ip(server, "-6", "addr", "add", f"{server.ipv6}/64", "dev", "eth0", "nodad")
        self.sysctl(router, "net.ipv4.ip_forward", "1")
        self.sysctl(router, "net.ipv6.conf.all.forwarding", "1")
        v4, v6 = self.bridge_subnet
        self.ip(self.sender, "route", "add", f"{r4}.0/24", "via", f"{v4}.{GATEWAY_HOST}")
        self.ip(self.sender, "-6", "route", "add", f"{r6}:/64", "via", f"{v6}:{GATEWAY_HOST}")
        self.ip(server, "route", "add", f"{v4}.0/24", "via", f"{r4}.{GATEWAY_HOST}")
        self.ip(server, "-6", "route", "add", f"{v6}:/64", "via", f"{r6}:{GATEWAY_HOST}")

    def _hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        for role, host in self.hosts.items():
            if host.ipv4:
                lines.append(f"{host.ipv4} {role}.lab.example {role}")
            if host.ipv6:
                lines.append(f"{host.ipv6} {role}.lab.example {role}")
        return "\n".join(lines) + "\n"

    def wait_reachable(self, timeout: float = 5.0) -> None:
        """Links come up asynchronously; wait until the veth carriers are on."""
        deadline = time.monotonic() + timeout
        for host in self.hosts.values():
            for iface in host.interfaces:
                while True:
                    out = self.ip(host, "-j", "link", "show", iface, check=False).stdout
                    if '"operstate":"UP"' in out.replace(" ", "") or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)

    # --- using ------------------------------------------------------------------------------

    def ip(self, host: Host, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(["ip", "-n", host.netns, *args], check=check)

    def sysctl(self, host: Host, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        self.run(host, ["sh", "-c", f"echo {value} > {path}"])

    def command(self, host: Host, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", host.netns, *argv]

    def run(self, host: Host, argv: Sequence[str], check: bool = True,
            timeout: float | None = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a program in a host and wait for it; output captured as text."""
        return _run(self.command(host, argv), check=check, timeout=timeout, **kwargs)

    def spawn(self, host: Host, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a program in a host; it is killed at `down()` if still running."""
        kwargs.setdefault("start_new_session", True)
        process = subprocess.Popen(self.command(host, argv), **kwargs)
        self._processes.append(process)
        return process

    # --- removing ---------------------------------------------------------------------------

    def down(self) -> None:
        for process in self._processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                process.wait(timeout=5)
        self._processes.clear()
        remove_namespaces([h.netns for h in self.hosts.values()])
        with contextlib.suppress(FileNotFoundError):
            (REGISTRY_DIR / f"{self.name}.json").unlink()

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def _netns_pids(netns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", netns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def remove_namespaces(names: Sequence[str]) -> None:
    """Kill every process inside, then delete the namespaces and their /etc/netns files."""
    existing = set(list_lab_namespaces(prefix=""))
    for _attempt in range(50):
        pids = [pid for ns in names if ns in existing for pid in _netns_pids(ns)]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    for ns in names:
        if ns in existing:
            _run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def list_lab_namespaces(prefix: str = NETNS_PREFIX) -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def running_labs() -> dict[str, list[str]]:
    """Lab name -> its namespaces, for every lab namespace present."""
    labs: dict[str, list[str]] = {}
    for ns in list_lab_namespaces():
        name = ns[len(NETNS_PREFIX):].split("-", 1)[0]
        labs.setdefault(name, []).append(ns)
    return labs


def remove_all_labs() -> list[str]:
    removed = []
    for name, namespaces in running_labs().items():
        remove_namespaces(namespaces)
        removed.append(name)
    if REGISTRY_DIR.exists():
        for entry in REGISTRY_DIR.glob("*.json"):
            entry.unlink(missing_ok=True)
    return removed


def load_lab(name: str) -> Lab:
    """A handle on a lab brought up by another process (the CLI), from its registry file."""
    path = REGISTRY_DIR / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LabError(f"no lab named {name!r} (see 'mailgate lab status')") from None
    servers = len([role for role in data["hosts"] if role.startswith("server")])
    return Lab(data["mode"], name=name, servers=servers)


@contextlib.contextmanager
def lab(mode: str = "router", **kwargs: Any) -> Iterator[Lab]:
    with Lab(mode, **kwargs) as built:
        yield built
