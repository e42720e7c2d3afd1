"""proxies/notready.py: one line saying why a unit's run leaves the appliance not ready."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from proxies import notready
from proxies.notready import NETSETUP_UNIT, PROXIES_UNIT, Ending, announce, announced, explain

CONFIG = "/etc/mailgate/mailgate.toml"
FAILED_2 = Ending("exit-code", "exited", "2")
FAILED_1 = Ending("exit-code", "exited", "1")


def test_a_run_that_went_well_says_nothing() -> None:
    assert explain(NETSETUP_UNIT, Ending("success", "exited", "0"), []) is None
    assert explain(PROXIES_UNIT, Ending("success", "exited", "0"), ["mailgate: x"]) is None


def test_a_failed_teardown_is_not_about_readiness() -> None:
    # netsetup apply (the main process) succeeded: only ExecStop= can have failed.
    ending = Ending("exit-code", "exited", "0")
    assert explain(NETSETUP_UNIT, ending, ["netsetup: teardown failed: boom"]) is None


def test_missing_interface_is_wait_interfaces_own_words() -> None:
    reason = notready.missing_interfaces(["enp1s0"], ["eth0", "eth1"])
    assert reason == "no network interface for [network] ports: enp1s0 (there are: eth0, eth1)"
    # ExecStartPre= failed: systemd gives no main process status.
    lines = [f"MAILGATE-NOT-READY: {reason}", f"wait-interfaces: {reason}"]
    assert explain(NETSETUP_UNIT, Ending("exit-code"), lines) == reason
    assert notready.missing_interfaces(["eth0", "eth1"], []).endswith("(there are: none)")


def test_config_refused_by_netsetup_lists_every_problem() -> None:
    lines = ["Applying...", f"netsetup: {CONFIG}: network.bridge: lo exists but is not a bridge",
             f"netsetup: {CONFIG}: network.ipv6: must be true or false"]
    assert explain(NETSETUP_UNIT, FAILED_2, lines) == (
        f"config rejected: {CONFIG}: network.bridge: lo exists but is not a bridge; "
        f"{CONFIG}: network.ipv6: must be true or false")


def test_failed_apply_keeps_netsetups_line() -> None:
    line = "netsetup: apply failed: step 3/9 (link: add br0) failed: File exists"
    assert explain(NETSETUP_UNIT, FAILED_1, ["plan:", line]) == f"network setup failed: {line}"
    assert explain(NETSETUP_UNIT, Ending("signal", "killed", "KILL"), []) == (
        "network setup failed: was killed by signal KILL")


def test_proxies_config_rejected_is_said_like_report_ready_says_it() -> None:
    problems = [f"{CONFIG}: smtp.relay_domain: unknown key"]
    lines = [f"mailgate: {problem}" for problem in problems]
    assert explain(PROXIES_UNIT, FAILED_2, lines) == notready.config_rejected(problems)


def test_proxies_startup_error() -> None:
    lines = ["ts=2024-01-01T00:00:00.000Z level=info event=starting",
             "mailgate: cannot listen on port 10025 (smtp.listen): Address already in use"]
    assert explain(PROXIES_UNIT, FAILED_1, lines) == (
        "mailgate run exited with status 1: mailgate: cannot listen on port 10025 "
        "(smtp.listen): Address already in use")


@pytest.mark.parametrize("line", [
    'ts=x level=error event=workers_failing worker=smtp exits=10 within=60 '
    'reason="workers keep exiting; the master gives up and exits"',
    '{"ts": "x", "level": "error", "event": "workers_failing", '
    '"reason": "workers keep exiting; the master gives up and exits"}',
])
def test_proxies_structured_error_record(line: str) -> None:
    lines = ["ts=x level=warning event=worker_exited slot=0 exit_code=1", line]
    assert explain(PROXIES_UNIT, FAILED_1, lines) == (
        "mailgate run exited with status 1: workers_failing: workers keep exiting; "
        "the master gives up and exits")


def test_proxies_traceback_gives_its_exception() -> None:
    lines = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
             "    boom()", "RuntimeError: boom", "ts=x level=info event=stopping"]
    assert explain(PROXIES_UNIT, FAILED_1, lines) == (
        "mailgate run exited with status 1: RuntimeError: boom")


def test_proxies_without_words() -> None:
    assert explain(PROXIES_UNIT, Ending("signal", "killed", "KILL"), []) == (
        "mailgate run was killed by signal KILL")
    assert explain(PROXIES_UNIT, Ending("core-dump", "dumped", "SEGV"), []) == (
        "mailgate run was killed by signal SEGV (core dumped)")
    assert explain(PROXIES_UNIT, Ending("timeout", "killed", "TERM"), []) == (
        "mailgate run timed out")


def test_announce_says_a_reason_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    console = tmp_path / "console"
    state = tmp_path / "state"
    assert announce(PROXIES_UNIT, "mailgate run exited with status 1", console, state)
    assert not announce(PROXIES_UNIT, "mailgate run exited with status 1", console, state)
    assert announce(PROXIES_UNIT, "mailgate run timed out", console, state)
    said = ["MAILGATE-NOT-READY: mailgate run exited with status 1",
            "MAILGATE-NOT-READY: mailgate run timed out"]
    assert capsys.readouterr().out.splitlines() == said
    assert console.read_text().splitlines() == said[1:]  # opened for each line, as a tty is
    assert announced(state) == said[1:]
    assert announced(tmp_path / "nothing") == []


def test_announce_marks_its_priority_for_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "stdout"
    with out.open("w") as handle:
        stat = Path(out).stat()
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        monkeypatch.setattr("sys.stdout", handle)
        announce(NETSETUP_UNIT, "reason", None, tmp_path / "state")
    assert out.read_text() == "<3>MAILGATE-NOT-READY: reason\n"
    monkeypatch.setattr("sys.stdout", io.StringIO())
    monkeypatch.delenv("JOURNAL_STREAM")
    assert notready._journal_priority() == ""


def test_main_refuses_other_units() -> None:
    assert notready.main(["sshd.service"], {}) == 2
    # A clean stop: nothing to read, nothing to say.
    assert notready.main([PROXIES_UNIT], {"SERVICE_RESULT": "success"}) == 0
