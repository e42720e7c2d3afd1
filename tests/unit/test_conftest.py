"""tests/conftest.py itself: under CI nothing collected may go unrun, and xfail is strict.

Each test runs a small inner pytest session (pytester, in process) whose conftest is a copy of
ours and whose settings are our pyproject's [tool.pytest.ini_options] (so `-ra` prints skip
reasons as in a real run). The inner session is told CI's value explicitly, whatever the outer
run was given.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
CONFTEST = (ROOT / "tests" / "conftest.py").read_text()
PYTEST_SETTINGS = "[tool.pytest.ini_options]" + (
    (ROOT / "pyproject.toml").read_text().split("[tool.pytest.ini_options]", 1)[1]
    .split("\n[", 1)[0])

CI_ON = ["1", "true", "yes", "on", "TRUE"]
CI_OFF = [None, "", "0", "false", "no", "off", "False"]


def run(pytester: pytest.Pytester, ci: str | None, files: dict[str, str], *args: str,
        ) -> pytest.RunResult:
    """An inner session with our conftest and pytest settings, CI set to `ci` (None: unset).

    `files` go under tests/, our testpaths.
    """
    pytester.makeconftest(CONFTEST)
    pytester.makepyprojecttoml(PYTEST_SETTINGS)
    for name, source in files.items():
        path = pytester.path / "tests" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    with pytest.MonkeyPatch.context() as env:
        if ci is None:
            env.delenv("CI", raising=False)
        else:
            env.setenv("CI", ci)
        return pytester.runpytest(*args)


def fails_naming(result: pytest.RunResult, *lines: str) -> None:
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(["*= CI: not everything ran =*", *lines])


def passes(result: pytest.RunResult) -> None:
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.no_fnmatch_line("*CI: not everything ran*")


RUNTIME_SKIP = {"test_skip.py": """
import pytest

def test_runs() -> None:
    pass

def test_skipped() -> None:
    pytest.skip("no frobnicator here")
"""}


def test_a_runtime_skip_fails_under_ci(pytester: pytest.Pytester) -> None:
    fails_naming(run(pytester, "true", RUNTIME_SKIP),
                 "*test_skip.py::test_skipped: skipped in call: *no frobnicator here")


@pytest.mark.parametrize("ci", CI_ON)
def test_these_values_count_as_ci(pytester: pytest.Pytester, ci: str) -> None:
    fails_naming(run(pytester, ci, RUNTIME_SKIP), f"CI={ci!r} counts as CI*")


@pytest.mark.parametrize("ci", CI_OFF)
def test_these_do_not_and_a_skip_says_why(pytester: pytest.Pytester, ci: str | None) -> None:
    result = run(pytester, ci, RUNTIME_SKIP)
    passes(result)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] tests/test_skip.py:*: no frobnicator here",
                                 "*1 passed, 1 skipped*"])


@pytest.mark.parametrize("source", [
    'import pytest\npytest.skip("module needs a frobnicator", allow_module_level=True)\n',
    'import pytest\npytest.importorskip("mailgate_no_such_module")\n',
], ids=["module-level-skip", "importorskip"])
def test_a_collection_time_skip_fails_under_ci(pytester: pytest.Pytester, source: str) -> None:
    files = {"test_fine.py": "def test_runs() -> None:\n    pass\n",
             "test_gone.py": source + "\ndef test_never() -> None:\n    pass\n"}
    fails_naming(run(pytester, "true", files), "*test_gone.py: skipped at collection: *")
    # Outside CI the same module is skipped, with its reason.
    result = run(pytester, "false", files)
    passes(result)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] tests/test_gone.py*", "*1 passed, 1 skipped*"])


DESELECTABLE = {"test_pick.py": """
import pytest

def test_kept() -> None:
    pass

@pytest.mark.lab
def test_dropped() -> None:
    pass
"""}


@pytest.mark.parametrize("args", [
    ("-k", "kept"),
    ("-m", "not lab"),
    ("--deselect", "tests/test_pick.py::test_dropped"),
], ids=["-k", "-m", "--deselect"])
def test_deselection_fails_under_ci(pytester: pytest.Pytester, args: tuple[str, ...]) -> None:
    fails_naming(run(pytester, "true", DESELECTABLE, *args),
                 "*test_pick.py::test_dropped: deselected")
    passes(run(pytester, "0", DESELECTABLE, *args))


def test_ignoring_a_path_fails_under_ci(pytester: pytest.Pytester) -> None:
    files = {**DESELECTABLE, "test_other.py": "def test_other() -> None:\n    pass\n"}
    fails_naming(run(pytester, "true", files, "--ignore", "tests/test_other.py"),
                 "*test_other.py: left out with --ignore")
    # Naming the paths to run is choosing a tier, not leaving tests out.
    passes(run(pytester, "true", files, "tests/test_pick.py"))


XFAILS = {"test_xfail.py": """
import pytest

@pytest.mark.xfail(reason="bug 1")
def test_default_passes() -> None:
    pass

@pytest.mark.xfail(reason="bug 2", strict=False)
def test_non_strict_passes() -> None:
    pass

@pytest.mark.xfail(reason="bug 3")
def test_still_broken() -> None:
    assert False
"""}


@pytest.mark.parametrize("ci", ["true", None])
def test_xfail_is_strict(pytester: pytest.Pytester, ci: str | None) -> None:
    result = run(pytester, ci, XFAILS)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines([
        "FAILED tests/test_xfail.py::test_default_passes*XPASS(strict)*bug 1*",
        "FAILED tests/test_xfail.py::test_non_strict_passes*XPASS(strict)*bug 2*",
    ])
    result.assert_outcomes(failed=2, xfailed=1)


def test_an_xfail_that_fails_as_predicted_is_allowed_under_ci(pytester: pytest.Pytester,
                                                              ) -> None:
    files = {"test_xfail.py": XFAILS["test_xfail.py"].split("@pytest.mark.xfail", 1)[0]
             + '@pytest.mark.xfail(reason="bug 3")\ndef test_still_broken() -> None:\n'
               "    assert False\n"}
    result = run(pytester, "true", files)
    passes(result)
    result.assert_outcomes(xfailed=1)


@pytest.mark.parametrize("source", [
    'import pytest\n\ndef test_gives_up() -> None:\n    pytest.xfail("not today")\n',
    'import pytest\n\n@pytest.mark.xfail(run=False, reason="not today")\n'
    "def test_gives_up() -> None:\n    pass\n",
    'import pytest\n\n@pytest.fixture\ndef broken() -> None:\n    raise OSError("no lab")\n\n'
    '@pytest.mark.xfail(reason="not today")\ndef test_gives_up(broken: None) -> None:\n'
    "    assert False\n",
], ids=["pytest.xfail-call", "xfail-run-false", "xfail-setup-error"])
def test_an_xfail_that_never_ran_the_test_fails_under_ci(pytester: pytest.Pytester,
                                                        source: str) -> None:
    fails_naming(run(pytester, "true", {"test_gave_up.py": source}),
                 "*test_gave_up.py::test_gives_up: skipped in *: xfail: *not today")


LAB_TEST = {"lab/test_lab.py": "def test_needs_a_lab() -> None:\n    pass\n"}


def test_a_lab_test_skips_with_its_reason_outside_ci_and_fails_under_ci(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(pytester.mkdir("no-ip-here")))  # no iproute2: no lab
    result = run(pytester, None, LAB_TEST)
    passes(result)
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] *: lab tests need *"])
    fails_naming(run(pytester, "true", LAB_TEST),
                 "*tests/lab/test_lab.py::test_needs_a_lab: skipped in setup: lab tests need *")


IMAGE_TIER = {"image/conftest.py": (ROOT / "tests/image/conftest.py").read_text(),
              "image/test_boot.py": "def test_boots() -> None:\n    pass\n",
              "unit/test_unit.py": "def test_unit() -> None:\n    pass\n"}


def test_the_image_tier_is_left_out_of_make_test_without_a_skip(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILGATE_IMAGE_TEST", raising=False)
    result = run(pytester, "true", IMAGE_TIER, "tests")  # `make test` under .ci/run
    passes(result)
    result.assert_outcomes(passed=1)
    monkeypatch.setenv("MAILGATE_IMAGE_TEST", "1")  # `make image-test`
    result = run(pytester, "true", IMAGE_TIER, "tests/image")
    passes(result)
    result.assert_outcomes(passed=1)
