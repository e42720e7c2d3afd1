"""One source for each fact, the cross-checks, and `mailgate config check`."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from netsetup.commands import load_config as netsetup_load_config
from netsetup.configfile import ConfigError
from proxies.cli import main
from proxies.config import Config, load_config

SAMPLE = """\
[network]
intercept = ["smtp", "pop3"]
bypass_sources = ["192.0.2.99/32"]
[smtp]
listen = 2525
hostname = "gw.example.net"
relay_domains = ["example.com"]
retry_min = "5m"          # the default: not printed
retry_max = "2h"
transport = { "example.org" = "198.51.100.25:2525" }
[pop3]
enabled = true
listen = 1110
[policy]
subject_prefix = "***SPAM*** "
[scan]
clamd = { address = "unix:/run/clamav/clamd.ctl", timeout = "20s" }
[interceptor]
enabled = true
services = ["smtp"]
"""


def write(tmp_path: Path, text: str, name: str = "mailgate.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def check(path: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["config", "check", "--config", str(path), *extra])
    return status, capsys.readouterr().out


def same(a: Config, b: Config) -> bool:
    return dataclasses.replace(a, path=b.path) == b


def test_one_listen_port_for_netsetup_and_the_proxy(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SAMPLE))
    assert config.smtp.listen_port == 2525 and config.pop3.listen_port == 1110
    # netsetup steers to where the proxies listen: the same key, so they cannot differ.
    assert {i.service: i.listen_port for i in config.network.intercept} == {
        "smtp": 2525, "pop3": 1110}


def test_intercepting_pop3_without_its_proxy_is_refused_naming_both_keys(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[network]\nintercept = ["smtp", "pop3"]\n')
    for load in (load_config, netsetup_load_config):
        with pytest.raises(ConfigError) as caught:
            load(path)
        (problem,) = caught.value.problems
        assert problem.key == "network.intercept" and "pop3.enabled is false" in problem.message
    status, out = check(path, capsys=capsys)
    assert status == 2
    assert ("# PROBLEM  intercepted pop3 has its proxy running: network.intercept: names 'pop3' "
            "but pop3.enabled is false") in out
    assert "# ok       intercepted smtp has its proxy running" in out
    assert out.endswith("# 1 problem(s)\n")


def test_netsetup_refuses_what_mailgate_run_would_refuse(tmp_path: Path) -> None:
    path = write(tmp_path, '[network]\n[smtp]\nretry_min = "2h"\nretry_max = "1h"\n'
                           '[scan]\nclam = 1\n')
    with pytest.raises(ConfigError) as caught:
        netsetup_load_config(path)
    assert sorted(p.key for p in caught.value.problems) == ["scan.clam", "smtp.retry_min"]


def test_the_interceptor_only_handles_intercepted_services(tmp_path: Path) -> None:
    path = write(tmp_path, '[network]\nintercept = ["smtp"]\n[interceptor]\nenabled = true\n'
                           'services = ["smtp", "pop3"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert [p.key for p in caught.value.problems] == ["interceptor.services"]


def test_one_subject_prefix_with_an_explicit_pop3_override(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[pop3]\nenabled = true\n"))
    assert config.scan.policy.subject_prefix == config.pop3.subject_prefix == "[SPAM] "
    config = load_config(write(tmp_path, '[policy]\nsubject_prefix = "[S] "\n'))
    assert config.pop3.subject_prefix == "[S] "
    config = load_config(write(tmp_path, '[policy]\nsubject_prefix = "[S] "\n'
                                         '[pop3]\nsubject_prefix = ""\n'))
    assert (config.scan.policy.subject_prefix, config.pop3.subject_prefix) == ("[S] ", "")
    for section in ("policy", "pop3"):
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, f'[{section}]\nsubject_prefix = "[S]\\r\\nBcc: x"\n'))
        assert [str(p).split(": ", 1)[1] for p in caught.value.problems] == [
            f"{section}.subject_prefix: must be one line"]


def test_config_check_prints_what_differs_from_the_defaults(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, SAMPLE)
    status, out = check(path, capsys=capsys)
    assert status == 0, out
    settings = [line for line in out.splitlines() if not line.startswith("#")]
    # network.intercept names what runs anyway (pop3 is enabled): the default, not printed.
    assert settings == [
        'network.bypass_sources = ["192.0.2.99/32"]',
        "smtp.listen = 2525",
        'smtp.transport = { "example.org" = "198.51.100.25:2525" }',
        'smtp.hostname = "gw.example.net"',
        'smtp.relay_domains = ["example.com"]',
        'smtp.retry_max = "2h"',
        "pop3.enabled = true",
        "pop3.listen = 1110",
        'scan.clamd = { address = "unix:/run/clamav/clamd.ctl", timeout = "20s" }',
        'policy.subject_prefix = "***SPAM*** "',
        'interceptor.services = ["smtp"]',
        "interceptor.enabled = true",
    ]
    assert "# ok       the interceptor's smtp is intercepted" in out
    assert "PROBLEM" not in out and out.endswith("# config is ok\n")


@pytest.mark.parametrize("extra", [(), ("--all",)])
def test_config_check_output_is_toml_that_loads_to_the_same_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...]) -> None:
    path = write(tmp_path, SAMPLE)
    status, out = check(path, *extra, capsys=capsys)
    assert status == 0
    tomllib.loads(out)
    again = write(tmp_path, out, "pasted.toml")
    assert same(load_config(again), load_config(path))


def test_config_check_all_lists_every_default(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = check(write(tmp_path, "[smtp]\n"), "--all", capsys=capsys)
    assert status == 0
    for line in ("smtp.listen = 10025", "smtp.retry_min = 300", "pop3.enabled = false",
                 'policy.subject_prefix = "[SPAM] "', 'network.intercept = ["smtp"]',
                 "# smtp.next_hop is not set"):
        assert line in out.splitlines()


def test_config_check_reports_an_unreadable_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out = check(tmp_path / "absent.toml", capsys=capsys)
    assert status == 2
    assert f"# PROBLEM  {tmp_path / 'absent.toml'}: -: no such file" in out
    status, out = check(write(tmp_path, "[smtp\n"), capsys=capsys)
    assert status == 2 and "not valid TOML" in out


def test_min_data_rate_is_read_and_a_negative_one_is_refused_by_key(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "[smtp]\nmin_data_rate = 2000\n")).smtp.min_data_rate \
        == 2000
    assert load_config(write(tmp_path, "")).smtp.min_data_rate == 500  # Postfix's default
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "[smtp]\nmin_data_rate = -1\n"))
    (problem,) = caught.value.problems
    assert problem.key == "smtp.min_data_rate"


def test_scan_ahead_takes_a_mode_and_the_old_booleans(tmp_path: Path) -> None:
    for written, mode in (('"top"', "top"), ('"retr"', "retr"), ("true", "retr"),
                          ("false", "off")):
        config = load_config(write(tmp_path, f"[pop3]\nscan_ahead = {written}\n"))
        assert config.pop3.scan_ahead == mode
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, '[pop3]\nscan_ahead = "always"\n'))
    assert [str(p).split(": ", 1)[1] for p in caught.value.problems] == [
        "pop3.scan_ahead: must be one of 'off', 'top', 'retr', got 'always'"]
