"""Shared test plumbing.

Three tiers: tests/unit (no privilege, no sockets beyond loopback), tests/lab (root, network
namespaces, the real programs); tests/image is collected only by `make image-test`
(tests/image/conftest.py). Outside CI a lab test may skip, saying why. Under CI every test
collected must run, so nothing CI is meant to check is silently left out. The run fails, with
a list of what did not run and why, when:

- a test skipped at run time (a skip mark, `pytest.skip()` in a test or fixture, an
  `xfail(run=False)`, a `pytest.xfail()` call, which stops the test just as a skip does);
- a module or package skipped at collection time (module-level `pytest.skip(...,
  allow_module_level=True)`, `pytest.importorskip`): pytest reports those through
  `pytest_collectreport`, never through `pytest_runtest_logreport`;
- tests were deselected (`-k`, `-m`, `--deselect`, and plugins such as `--lf` that
  deselect through `pytest_deselected`), or paths were left out with `--ignore` /
  `--ignore-glob`. Choosing which paths to run (`pytest tests/unit`) is not deselection.

CI is on when the CI variable is set to anything but an explicit false ("0", "false", "no",
"off", any case); unset or empty, it is off. Some CI systems set CI=on or CI=1: a check that
switched off on a value it did not expect would let the skips through unseen.

Always, CI or not, xfail is strict: an xfail-marked test that passes fails the run
([XPASS(strict)]), `strict=False` included, so a fixed bug shows at once. An xfail that fails
as it predicted, in the test itself, is a check that held and is allowed under CI.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator, Mapping

import pytest

CI_FALSE = frozenset({"0", "false", "no", "off"})

# Set on a test's report when an xfail mark predicted a failure of the test itself and the
# test failed: that outcome shows as "xfailed" (report.skipped) but the test did run.
XFAIL_HELD = "mailgate_xfail_held"


def ci_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    value = environ.get("CI", "").strip().lower()
    return value != "" and value not in CI_FALSE


def lab_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces)"
    if shutil.which("ip") is None:
        return "lab tests need iproute2's 'ip'"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = lab_unavailable_reason()
    for item in items:
        if "/tests/lab/" in str(item.fspath):
            item.add_marker(pytest.mark.lab)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # A wrapper registered after pytest's skipping plugin, so it sees the report that plugin
    # made: a non-strict XPASS has outcome "passed" and carries `wasxfail`.
    report = yield
    if not hasattr(report, "wasxfail"):
        return report
    if report.passed:
        report.outcome = "failed"
        report.longrepr = f"[XPASS(strict)] {report.wasxfail}"
        del report.wasxfail
    elif (call.when == "call" and call.excinfo is not None
          and not call.excinfo.errisinstance(pytest.xfail.Exception)):
        setattr(report, XFAIL_HELD, True)
    return report


class CIGate:
    """Collects, under CI, every test or collector that did not run, and fails the run."""

    def __init__(self, config: pytest.Config) -> None:
        self.left_out: list[tuple[str, str]] = []  # (node id or option, why)
        for option, flag in (("ignore", "--ignore"), ("ignore_glob", "--ignore-glob")):
            for path in config.getoption(option) or ():
                self.left_out.append((str(path), f"left out with {flag}"))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:
            self.left_out.append((report.nodeid or "(session)",
                                  f"skipped at collection: {skip_reason(report)}"))

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.left_out.extend((item.nodeid, "deselected") for item in items)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not getattr(report, XFAIL_HELD, False):
            self.left_out.append((report.nodeid, f"skipped in {report.when}: "
                                                 f"{skip_reason(report)}"))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.left_out and session.exitstatus in (pytest.ExitCode.OK,
                                                    pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.left_out:
            return
        terminalreporter.section("CI: not everything ran", sep="=", red=True, bold=True)
        terminalreporter.line(
            f"CI={os.environ.get('CI', '')!r} counts as CI (only unset, empty or "
            f"{'/'.join(sorted(CI_FALSE))} do not): every collected test must run.")
        terminalreporter.line(f"{len(self.left_out)} did not:")
        for nodeid, why in self.left_out:
            terminalreporter.line(f"  {nodeid}: {why}")


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    wasxfail = getattr(report, "wasxfail", None)
    if wasxfail is not None:
        return f"xfail: {wasxfail}"
    if isinstance(report.longrepr, tuple):  # (path, line, "Skipped: reason")
        return report.longrepr[2].removeprefix("Skipped: ")
    return str(report.longrepr)


def pytest_configure(config: pytest.Config) -> None:
    # Read at configure time, not import time, so the value is the one this run was given.
    if ci_enabled():
        config.pluginmanager.register(CIGate(config), "mailgate-ci-gate")


@pytest.fixture
def lab_factory() -> Iterator[object]:
    """Build labs inside a test; every one is torn down when the test ends, pass or fail."""
    from netsetup.lab.topology import Lab

    made: list[Lab] = []

    def make(mode: str = "router", **kwargs: object) -> Lab:
        lab = Lab(mode, **kwargs)  # type: ignore[arg-type]
        made.append(lab)
        return lab.up()

    yield make
    for lab in made:
        lab.down()
