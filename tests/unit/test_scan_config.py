"""[scan], [policy], [quarantine]: defaults, a full config, and every mistake reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from netsetup.configfile import ConfigError, Section
from proxies.scan.config import (
    ScanConfig,
    SocketAddress,
    parse_socket_address,
    scan_from_sections,
)


def load(scan: dict[str, Any] | None = None, policy: dict[str, Any] | None = None,
         quarantine: dict[str, Any] | None = None) -> ScanConfig:
    sections = [Section(Path("/etc/mailgate.toml"), name, data)
                for name, data in (("scan", scan), ("policy", policy),
                                   ("quarantine", quarantine))]
    config = scan_from_sections(*sections)
    problems = [p for s in sections for p in s.finish()]
    if problems:
        raise ConfigError(problems)
    return config


def problems_of(**sections: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(**sections)
    return [f"{p.key}: {p.message}" for p in info.value.problems]


def test_defaults() -> None:
    config = load()
    assert config.scanners == ()
    assert not config.enabled
    assert (config.timeout, config.max_size, config.concurrency) == (30.0, 25 * 2**20, 8)
    assert config.fail_mode == "tempfail" and config.oversize_action == "pass"
    policy = config.policy
    assert (policy.virus, policy.banned, policy.spam) == ("reject", "reject", "tag")
    assert policy.spam_reject_score is None and not policy.add_scan_header
    assert config.quarantine.dir == Path("/var/lib/mailgate/quarantine")
    assert config.quarantine.retention == 30 * 86400


def test_full_config() -> None:
    config = load(
        scan={"clamd": "unix:/run/clamav/clamd.ctl", "spamd": "127.0.0.1:783",
              "rspamd": "http://127.0.0.1:11333", "timeout": "10s", "max_size": "5M",
              "concurrency": 4, "fail_mode": "pass", "oversize_action": "quarantine",
              "max_timeouts": 2, "timeout_memory": "2h"},
        policy={"virus": "quarantine", "banned": "drop", "spam": "reject",
                "spam_reject_score": 15, "subject_prefix": "[SPAM] ",
                "banned_extensions": ["EXE", ".scr"], "banned_mime_types": ["application/*"],
                "max_attachment_size": "1M", "add_scan_header": True,
                "header_rules": [{"header": "Subject", "regex": "(?i)lottery",
                                  "action": "quarantine"}]},
        quarantine={"dir": "/srv/q", "retention": "7d"})
    assert config.clamd is not None and config.clamd.address == SocketAddress(
        path=Path("/run/clamav/clamd.ctl"))
    assert config.clamd.timeout == 10.0 and config.clamd.max_size == 5 * 2**20
    assert config.spamd is not None and config.spamd.address == SocketAddress(
        host="127.0.0.1", port=783)
    assert config.rspamd is not None and config.rspamd.address.port == 11333
    assert [n for n, _ in config.scanners] == ["clamd", "spamd", "rspamd"]
    assert config.fail_mode == "pass" and config.max_timeouts == 2
    assert config.timeout_memory == 7200.0
    policy = config.policy
    assert policy.spam_reject_score == 15.0
    assert policy.banned_extensions == ("exe", "scr")
    assert policy.max_attachment_size == 2**20
    assert policy.header_rules[0].regex.search("You won the LOTTERY")
    assert policy.header_rules[0].action == "quarantine"
    assert config.quarantine.retention == 7 * 86400


def test_a_scanner_as_a_table_overrides_the_shared_limits() -> None:
    config = load(scan={"clamd": {"address": "tcp:127.0.0.1:3310", "timeout": "2s",
                                  "concurrency": 2}, "timeout": "30s"})
    assert config.clamd is not None
    assert config.clamd.address == SocketAddress(host="127.0.0.1", port=3310)
    assert (config.clamd.timeout, config.clamd.concurrency) == (2.0, 2)
    assert config.clamd.max_size == 25 * 2**20


@pytest.mark.parametrize(("text", "expected"), [
    ("unix:/run/x.sock", SocketAddress(path=Path("/run/x.sock"))),
    ("/run/x.sock", SocketAddress(path=Path("/run/x.sock"))),
    ("tcp:127.0.0.1:3310", SocketAddress(host="127.0.0.1", port=3310)),
    ("[::1]:783", SocketAddress(host="::1", port=783)),
    ("127.0.0.1", SocketAddress(host="127.0.0.1", port=99)),
])
def test_socket_addresses(text: str, expected: SocketAddress) -> None:
    assert parse_socket_address(text, 99) == expected


def test_every_mistake_is_reported_with_its_key() -> None:
    problems = problems_of(
        scan={"clamd": "unix:relative", "spamd": 783, "rspamd": "https://x:1",
              "fail_mode": "open", "timeout": "soon", "concurency": 3,
              "oversize_action": "tag"},
        policy={"virus": "ignore", "spam_reject_score": "high", "banned_extensions": "exe",
                "banned_mime_types": ["exe"], "subject_prefix": "[S]\r\nBcc: x",
                "header_rules": [{"header": "Subject", "regex": "(", "action": "reject"},
                                 {"header": "Subject", "regex": "x", "action": "explode"},
                                 {"header": "Subject", "regex": "x", "action": "tag",
                                  "extra": 1}]},
        quarantine={"dir": "relative", "retention": "forever", "purge": True})
    text = "\n".join(problems)
    for key in ("scan.clamd", "scan.spamd", "scan.rspamd", "scan.fail_mode", "scan.timeout",
                "scan.concurency: unknown key", "scan.oversize_action", "policy.virus",
                "policy.spam_reject_score", "policy.banned_extensions",
                "policy.banned_mime_types[0]", "policy.subject_prefix",
                "policy.header_rules[0]: regex", "policy.header_rules[1]: action",
                "policy.header_rules[2]: unknown key(s) extra", "quarantine.dir",
                "quarantine.retention", "quarantine.purge: unknown key"):
        assert key in text, f"{key} missing from:\n{text}"


def test_scanner_table_problems_name_the_nested_key() -> None:
    problems = problems_of(scan={"clamd": {"timeout": "1s", "adress": "unix:/x"}})
    assert "scan.clamd.address: is required" in problems
    assert "scan.clamd.adress: unknown key" in problems


def test_the_whole_config_file_loads(tmp_path: Path) -> None:
    from proxies.config import load_config

    path = tmp_path / "mailgate.toml"
    path.write_text('[scan]\nclamd = "tcp:127.0.0.1:3310"\n[policy]\nspam = "quarantine"\n'
                    '[quarantine]\ndir = "/tmp/q"\n')
    config = load_config(path)
    assert config.scan.clamd is not None and config.scan.policy.spam == "quarantine"
    path.write_text('[scan]\nclamd = "tcp:127.0.0.1:3310"\nspam = "tag"\n')
    with pytest.raises(ConfigError, match=r"scan\.spam: unknown key"):
        load_config(path)
