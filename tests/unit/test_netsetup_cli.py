"""The CLI's user errors: one line per problem, `netsetup: <file>: <key>: <message>`, exit 2.

Only paths that stop before the live system is read are run here; the lab tests run the rest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from netsetup.cli import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_config_exits_2_naming_file_and_key(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text('[network]\nmode = "router"\nports = ["eth0"]\nipv6 = 1\n')
    for verb in ("plan", "apply", "status"):
        code, out, err = run(["--config", str(path), verb], capsys)
        assert code == 2 and out == ""
        assert err.splitlines() == [
            f"netsetup: {path}: network.ipv6: expected true or false, got int",
            f'netsetup: {path}: network.ports: only used in bridge mode (mode = "bridge")',
        ]


def test_options_may_follow_the_verb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[network\n")
    code, _, err = run(["plan", "--config", str(path), "--json"], capsys)
    assert code == 2
    assert err.startswith(f"netsetup: {path}: -: not valid TOML")
    assert "Traceback" not in err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["--config", str(tmp_path / "nope.toml"), "apply"], capsys)
    assert (code, err) == (2, f"netsetup: {tmp_path / 'nope.toml'}: -: no such file\n")


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for verb in ("plan", "apply", "status", "teardown"):
        assert verb in text
    assert "examples:" in text and "exit status: 0" in text
    with pytest.raises(SystemExit):
        main(["status", "--help"])
    assert "Exit status 0 when everything matches" in capsys.readouterr().out
