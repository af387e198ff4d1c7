"""``make test``'s system-deps step: what it does to the machine as root, and SKIP_SYSTEM_DEPS=1 to avoid it.

The machine is simulated by a PATH holding only bash and stand-ins for ``id`` (root), ``apt-get`` and
``systemctl`` that record their calls, so no package is installed and no service is touched.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.missing import missing

REPO_ROOT = Path(__file__).resolve().parents[2]
RECORDING_STUB = '#!/bin/bash\necho "$(basename "$0") $*" >> "$CALLS"\n'


@pytest.fixture
def root_machine(tmp_path) -> dict[str, str]:
    """Environment of a root shell on a Debian machine with none of the packages: PATH is only stand-ins."""
    if shutil.which("make") is None:
        missing("make is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to(shutil.which("bash"))
    (bin_dir / "basename").symlink_to(shutil.which("basename"))
    (bin_dir / "id").write_text("#!/bin/bash\necho 0\n")
    for name in ("apt-get", "systemctl"):
        (bin_dir / name).write_text(RECORDING_STUB)
    for stub in bin_dir.iterdir():
        if not stub.is_symlink():
            stub.chmod(0o755)
    return {"PATH": str(bin_dir), "CALLS": str(tmp_path / "calls"), "HOME": str(tmp_path)}


def run_system_deps(env: dict[str, str], *make_args: str) -> list[str]:
    """``make system-deps`` (the step ``make test`` runs first); the stand-ins' recorded calls."""
    subprocess.run([shutil.which("make"), "-s", "-C", str(REPO_ROOT), "system-deps", *make_args], env=env,
                   check=True, capture_output=True, timeout=60)
    calls = Path(env["CALLS"])
    return calls.read_text().splitlines() if calls.exists() else []


def test_as_root_it_installs_the_packages_and_stops_the_packaged_prometheus(root_machine):
    calls = run_system_deps(root_machine)
    assert any(c.startswith("apt-get install") and "prometheus" in c and "chromium-driver" in c for c in calls)
    assert "systemctl disable --now prometheus" in calls


@pytest.mark.parametrize("how", ["make variable", "environment"])
def test_skip_system_deps_leaves_the_machine_alone(root_machine, how):
    if how == "environment":
        calls = run_system_deps({**root_machine, "SKIP_SYSTEM_DEPS": "1"})
    else:
        calls = run_system_deps(root_machine, "SKIP_SYSTEM_DEPS=1")
    assert calls == []


def test_the_readme_says_so():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "SKIP_SYSTEM_DEPS=1" in readme and "prometheus" in readme.split("## Endpoints")[0]


@pytest.mark.parametrize("skip", [False, True], ids=["install fails", "SKIP_SYSTEM_DEPS=1"])
def test_under_ci_packages_that_stay_missing_fail_the_step(root_machine, skip):
    # The stand-in apt-get installs nothing: the packages are still missing afterwards.
    env = {**root_machine, "CI": "true", **({"SKIP_SYSTEM_DEPS": "1"} if skip else {})}
    result = subprocess.run([shutil.which("make"), "-s", "-C", str(REPO_ROOT), "system-deps"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    # (the container tools follow in the list unless this machine has them in /usr/sbin, outside the stand-in PATH)
    assert "CI=true, so this fails the run (missing: prometheus chromium chromium-driver docker-compose" \
        in result.stderr
