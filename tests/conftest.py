"""Shared test plumbing.

Three tiers: tests/unit (no privilege, no sockets beyond loopback), tests/lab (root, network
namespaces, the real programs). Outside CI a lab test may skip, saying why; under CI=true a
skipped test fails the run, so nothing CI is meant to check is silently left out.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if IN_CI and _skipped:
        print(f"\nCI: {len(_skipped)} test(s) skipped; under CI every test must run:")
        for nodeid in _skipped:
            print(f"  {nodeid}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
