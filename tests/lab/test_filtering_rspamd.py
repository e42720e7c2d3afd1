"""Content filtering with the REAL rspamd: `mailgate run` in the gateway intercepts swaks in the
sender on its way to smtp-sink in the server and asks rspamd's normal worker (`/checkv2`),
running offline in the gateway, with `[scan] rspamd` alone (no clamd, no spamd).

One lab, rspamd and smtp-sink for the module; the gateway helpers are test_filtering's.

Time: the first rspamd start on a machine compiles its hyperscan databases (about 16 s on 2
cores; a clean CI machine pays it once) into netsetup.lab.peers.rspamd.CACHE_DIR, which later
starts reuse (about 1 s); the whole module then takes a few seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from netsetup.lab.peers._common import in_netns
from netsetup.lab.peers.rspamd import GTUBE, Rspamd, RspamdInstance
from netsetup.lab.peers.sink import SmtpSink
from netsetup.lab.topology import Lab
from proxies.scan.api import ScanResult
from proxies.scan.config import ScannerConfig, SocketAddress
from proxies.scan.rspamd import RspamdClient
from tests.lab.test_filtering import (
    NETWORK,
    PYTHON,
    ROOT,
    Gateway,
    assert_byte_identical,
    mailgate,
    reply_to_dot,
)
from tests.unit.scan_messages import plain

RSPAMD_PORT = 11333
Setup = tuple[Gateway, RspamdInstance]


@pytest.fixture(scope="module")
def lab_rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("filtering-rspamd")
    lab = Lab("router")
    try:
        lab.up()
        sink = SmtpSink.start(lab, lab.server, base / "sink", port=25, dump=True)
        rspamd = Rspamd.start(lab, lab.gateway, base / "rspamd", port=RSPAMD_PORT)
        config = base / "network.toml"
        config.write_text(NETWORK)
        result = lab.run(lab.gateway, [PYTHON, "-m", "netsetup.cli", "--config", str(config),
                                       "--state-file", str(base / "netsetup.json"), "apply"],
                         check=False, cwd=ROOT, timeout=60)
        assert result.returncode == 0, f"netsetup apply:\n{result.stdout}\n{result.stderr}"
        # No clamd here: the gateway helpers never touch it when given their [scan] section.
        yield Gateway(lab, base, clamd=None, sink=sink), rspamd  # type: ignore[arg-type]
        rspamd.stop()
    finally:
        lab.down()


def test_gtube_is_rejected_and_clean_mail_delivered_untouched(lab_rspamd: Setup) -> None:
    gateway, rspamd = lab_rspamd
    scan = f'[scan]\nrspamd = "{rspamd.url}"\ntimeout = "20s"\n'
    assert rspamd.url == f"http://127.0.0.1:{RSPAMD_PORT}"
    with mailgate(gateway, "gtube", scan):
        # rspamd's SPF, DKIM and DMARC modules are off here: no results, so no
        # Authentication-Results field, and the message goes out byte for byte.
        clean = plain(subject="clean one", body="Hello.\r\n.A dot line.\r\n")
        assert reply_to_dot(gateway.send(clean)).startswith("250 2.0.0 Ok: queued as ")
        assert_byte_identical(gateway.delivered()[0], clean)

        # rspamd's action for GTUBE is "reject", and its actions mean what they say
        # (proxies.mail.actions; tagging by rspamd's "add header": test_rspamd_actions).
        spam = plain(subject="buy", body=GTUBE.decode() + "\r\n")
        assert reply_to_dot(gateway.send(spam)).startswith("554 5.7.1 Message rejected as spam")
        gateway.nothing_delivered()


def test_client_reads_action_score_and_symbols(lab_rspamd: Setup) -> None:
    gateway, rspamd = lab_rspamd
    config = ScannerConfig(SocketAddress(host=rspamd.address[0], port=rspamd.address[1]),
                           timeout=20.0, max_size=25 * 1024 * 1024, concurrency=2)

    # One after another on one client: rspamd 3.4's normal worker answers every request with
    # `Connection: close` (its keep-alive is client-side only), so the client must not reuse
    # the connection. rspamd finds GTUBE only when a line end follows it.
    async def scan_three() -> list[ScanResult]:
        client = RspamdClient(config)
        try:
            return [await client.scan(plain(subject="buy", body=GTUBE.decode() + "\r\n")),
                    await client.scan(plain(subject="hello")),
                    await client.scan(plain(subject="buy again", body=GTUBE.decode() + "\r\n"))]
        finally:
            client.close()

    # The client's sockets must be made inside the gateway, where rspamd listens on loopback.
    spam, clean, again = in_netns(gateway.lab.gateway, lambda: asyncio.run(scan_three()))
    assert spam.verdict == "spam", spam
    assert "GTUBE" in spam.rules
    assert spam.score is not None and spam.threshold is not None
    assert spam.score >= spam.threshold
    assert spam.scanners == ("rspamd",)
    assert spam.output[0].startswith("rspamd: action='reject' score=")
    assert clean.verdict == "clean", clean
    assert clean.rules and "GTUBE" not in clean.rules
    assert again.verdict == "spam" and "GTUBE" in again.rules
