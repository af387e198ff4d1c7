"""Fixtures for the service tests: tiny ONNX models built in code, apps, clients and a real server."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.support.missing import missing
from tests.support.models import CIFAR10_LABELS, DIGIT_LABELS, write_version
from tests.support.server import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_DATA = REPO_ROOT / "tests" / "data"
BUNDLED_MODELS = REPO_ROOT / "models"


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits (versions 1 and 2, grayscale 28x28, digit preprocessing) and colors (RGB 32x32)."""
    root = tmp_path_factory.mktemp("models")
    write_version(root, "digits", 1, (28, 28, 1), DIGIT_LABELS, digit=True, seed=1)
    write_version(root, "digits", 2, (28, 28, 1), DIGIT_LABELS, digit=True, seed=2)
    write_version(root, "colors", 1, (32, 32, 3), CIFAR10_LABELS, digit=False, seed=3)
    (root / "digits" / "config.pbtxt").write_text('name: "digits"\nversion_policy: { all: {} }\nmax_batch_size: 16\n')
    return root


def make_settings(models_dir: Path, **overrides: object) -> Settings:
    """Test settings; admission by queueing time is off unless a test turns it on (tests/service/test_admission.py)."""
    overrides.setdefault("queue_target_ms", 0)
    overrides.setdefault("inference_on_loop", False)  # the fake slow runtimes block their thread, not the loop
    return Settings(models_dir=models_dir, access_log=False, inference_threads=1, **overrides)


@pytest.fixture(params=[False, True], ids=["on-thread", "on-loop"])
def on_loop(request: pytest.FixtureRequest) -> bool:
    """Each batching mode in turn: batches on the version's inference thread, then on the worker's event loop
    (``inference_on_loop``, the shipped default where a worker has one CPU). While a batch runs on the loop nothing
    else does, so a gate that the test would open later never opens: hold requests in the queue instead (behind a
    batch of a fixed length, or while the first one waits for company)."""
    return request.param


@pytest.fixture()
def client(model_repo: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(model_repo)), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture()
def app_client_factory() -> Iterator:
    """Build a client for any models dir and settings; closes them all at the end."""
    clients: list[TestClient] = []

    def factory(models_dir: Path, **overrides: object) -> TestClient:
        c = TestClient(create_app(make_settings(models_dir, **overrides)), raise_server_exceptions=False)
        c.__enter__()
        clients.append(c)
        return c

    yield factory
    for c in clients:
        c.__exit__(None, None, None)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def mnist_pngs() -> list[tuple[bytes, int]]:
    """Real MNIST test digits, committed as PNG files with their labels."""
    labels = json.loads((TEST_DATA / "mnist" / "labels.json").read_text())
    return [((TEST_DATA / "mnist" / name).read_bytes(), label) for name, label in sorted(labels.items())]


@pytest.fixture(scope="session")
def cifar_jpegs() -> list[tuple[bytes, str]]:
    labels = json.loads((TEST_DATA / "cifar10" / "labels.json").read_text())
    return [((TEST_DATA / "cifar10" / name).read_bytes(), label) for name, label in sorted(labels.items())]


@pytest.fixture(scope="session")
def server(model_repo: Path) -> Iterator[ServiceProcess]:
    """A real uvicorn process on a loopback port, serving the tiny test models."""
    running = ServiceProcess(model_repo)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def bundled_mnist() -> Path:
    if not (BUNDLED_MODELS / "mnist").is_dir():
        missing("the bundled models/mnist is not in this checkout")
    return BUNDLED_MODELS


@pytest.fixture(scope="session")
def bundled_server(bundled_mnist: Path) -> Iterator[ServiceProcess]:
    """A real server on the bundled, trained models."""
    running = ServiceProcess(bundled_mnist)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def make_version():
    """``make_version(root, name, version, shape, labels, digit, seed=0)`` writes a tiny model version."""
    return write_version


@pytest.fixture()
def server_factory() -> Iterator:
    """Start real servers on any models dir, with extra environment; all are stopped at the end."""
    started: list[ServiceProcess] = []

    def factory(models_dir: Path, wait_for: str = "/v2/health/ready", **env: str) -> ServiceProcess:
        running = ServiceProcess(models_dir, env=env, wait_for=wait_for)
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()
