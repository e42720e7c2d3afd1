"""The `[metrics]` section: typed, validated, unknown keys rejected (with file and key).

    [metrics]
    listen = "127.0.0.1:9100"   # where Prometheus scrapes /metrics; a bare port (9100 or
                                # "9100") means loopback; absent: no metrics at all
    # dir = "/var/spool/mailgate-metrics"  # the processes' shared counts (default: beside
                                           # [smtp] queue_dir, `<queue_dir>-metrics`)

Off unless `listen` is given, and then on loopback unless an address is named: the figures
say how much mail flows from where, which is nobody's business off the box by default.
Addresses are IP literals only, so starting never waits for a name lookup.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from netsetup.configfile import Section

__all__ = ["LOOPBACK", "MetricsConfig", "metrics_from_section", "parse_listen"]

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class MetricsConfig:
    # (address, port) the exporter listens on; None: metrics are off.
    listen: tuple[str, int] | None = None
    # None: beside the queue directory (proxies.metrics.exporter.shared_dir).
    dir: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.listen is not None

    @property
    def listen_text(self) -> str:
        if self.listen is None:
            return ""
        host, port = self.listen
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(text: str, value: object) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in {value!r}")
    return int(text)


def parse_listen(value: object) -> tuple[str, int]:
    """`9100`, `"9100"` (loopback), `"192.0.2.1:9100"`, `"[::1]:9100"` or `"0.0.0.0:9100"`."""
    if isinstance(value, bool):
        raise ValueError("expected a port or 'address:port', got a boolean")
    if isinstance(value, int):
        return LOOPBACK, _port(str(value), value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a port or 'address:port', got {value!r}")
    text = value.strip()
    if text.isdigit():
        return LOOPBACK, _port(text, value)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if not rest.startswith(":"):
            raise ValueError(f"expected '[address]:port', got {value!r}")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or ":" in host:
            raise ValueError(f"expected 'address:port' (IPv6 in brackets), got {value!r}")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r} (names are not looked up)") from None
    return str(address), _port(port_text, value)


def _path(value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a directory path, got {value!r}")
    return Path(value)


def metrics_from_section(section: Section) -> MetricsConfig:
    return MetricsConfig(
        listen=section.converted("listen", parse_listen, None),
        dir=section.converted("dir", _path, None),
    )
