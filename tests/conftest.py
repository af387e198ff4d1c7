"""Settings for the whole test suite.

The gRPC server starts with every app (its lifespan) on port 8001 by default, with SO_REUSEPORT; in-process
apps of parallel test runs would all share that port, and a second server process would be refused it. So tests
run with gRPC off (``CONVSERVE_GRPC_PORT=0``, inherited by the server processes they start) and the gRPC tests
give their servers a free port of their own.
"""

import os
import re
import tempfile

import pytest

from tests.support.missing import in_ci

os.environ["CONVSERVE_GRPC_PORT"] = "0"
# The state store's default file (data/ under the working directory) is the user's, not the suite's: in-process
# apps share one file of this run's own; each server process gets one of its own (tests/support/server.py).
STATE_DIR = tempfile.mkdtemp(prefix="convserve-state-")
os.environ.setdefault("CONVSERVE_STATE_URL", f"sqlite:///{STATE_DIR}/in-process.sqlite")


# Skips that CI accepts, each with why. Any other skip under CI fails the run: a test that quietly stopped
# running is a regression too. Keep this short.
ALLOWED_SKIPS = {
    r"trains a model \(minutes to hours of CPU\)": "README examples that train a model: tests/training covers training",
    r"needs a checkpoint of a training run": "the README's export example needs a training run's output",
    r"needs labelled production traffic": "the README's refresh example: tests/training/test_refresh.py runs the loop",
    r"docker compose v2 plugin is not installed": "Debian packages docker-compose v1, which validates the file",
}
_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        _skips.append((report.nodeid, str(report.longrepr[2]).removeprefix("Skipped: ")))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not in_ci():
        return
    unexpected = [(node, why) for node, why in _skips if not any(re.search(p, why) for p in ALLOWED_SKIPS)]
    if unexpected:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"CI=true: {len(unexpected)} skip(s) not on tests/conftest.py's ALLOWED_SKIPS fail the run:",
                 *(f"  {node}: {why}" for node, why in unexpected)]
        if reporter is not None:
            reporter.write_line("\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
