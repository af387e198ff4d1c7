"""What a test does when something it needs is not there (a system tool, a dataset, an optional package):
skip with the reason on a developer's machine, but fail under CI (``CI=true``), where every test must run and a
tool that could not be installed must not turn into a quietly green run."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(reason: str) -> NoReturn:
    """Skip this test for ``reason``; under CI=true, fail it."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing requirement fails the run instead of skipping)", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, reason: str) -> ModuleType:
    """The imported module, or :func:`missing` with ``reason`` if it cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(reason)


def local_datasets() -> Path:
    """The local copies of MNIST, Fashion-MNIST and CIFAR-10: ``CONVSERVE_DATA_DIR``, else ``../shared/datasets``
    beside the checkout (see its README.md); :func:`missing` if neither is there."""
    configured = os.environ.get("CONVSERVE_DATA_DIR")
    if configured:
        path = Path(configured)
        if not path.is_dir():
            missing(f"no local datasets: CONVSERVE_DATA_DIR={configured} is not a directory")
        return path
    shared = Path(__file__).resolve().parents[3] / "shared" / "datasets"
    if shared.is_dir():
        return shared
    missing("no local datasets: set CONVSERVE_DATA_DIR or provide ../shared/datasets "
            "(these tests never download through the network)")
