"""Fixtures for the reliability and security suite: real ``python -m service`` processes on loopback ports,
serving a copy of the bundled, trained mnist model (the original is never touched) plus tiny models built in
code, and the checks every case ends with: the error is JSON naming the problem, with no traceback or
internal path in it, and the server still classifies a real digit correctly.

Shared helpers are fixtures (the suite runs with ``--import-mode=importlib``, so test files cannot import
each other or this file).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.missing import missing
from tests.support.models import tiny_classifier, write_digit_version
from tests.support.server import ServiceProcess, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_DATA = REPO_ROOT / "tests" / "data"
BUNDLED_MNIST = REPO_ROOT / "models" / "mnist"
# Small enough that an over-limit body is cheap to send, big enough for a 64-row binary batch (200 KB).
MAX_BODY_BYTES = 2 * 1024 * 1024
MAX_REQUEST_ROWS = 64
# Every server of the suite: no access log, and no polling of the models directory (only at start and on request).
SERVER_ENV = {"CONVSERVE_ACCESS_LOG": "false", "CONVSERVE_REPOSITORY_POLL_SECONDS": "0"}


# --- Models ------------------------------------------------------------------------------------

def copy_bundled_mnist(root: Path) -> Path:
    """Copy the trained models/mnist (config, labels, each version's model.onnx and metadata.json) under root."""
    if not (BUNDLED_MNIST / "1" / "model.onnx").is_file():
        missing("the bundled models/mnist/1 is not in this checkout")
    target = root / "mnist"
    target.mkdir(parents=True)
    for name in ("config.pbtxt", "labels.txt"):
        if (BUNDLED_MNIST / name).is_file():
            shutil.copy(BUNDLED_MNIST / name, target / name)
    for version in sorted(p for p in BUNDLED_MNIST.iterdir() if p.name.isdigit()):
        (target / version.name).mkdir()
        for name in ("model.onnx", "metadata.json"):
            shutil.copy(version / name, target / version.name / name)
    return target


@pytest.fixture(scope="session")
def mnist_version_files() -> dict[str, bytes]:
    """The bundled mnist version 1's model.onnx and metadata.json, to publish as new versions."""
    if not (BUNDLED_MNIST / "1" / "model.onnx").is_file():
        missing("the bundled models/mnist/1 is not in this checkout")
    return {name: (BUNDLED_MNIST / "1" / name).read_bytes() for name in ("model.onnx", "metadata.json")}


@pytest.fixture(scope="session")
def write_tiny():
    """``write_tiny(root, name, version, seed=0)`` writes a tiny digit model version."""
    return write_digit_version


@pytest.fixture(scope="session")
def tiny_onnx():
    """``tiny_onnx(seed=0)``: the tiny model as an onnx.ModelProto, to alter before saving."""
    return functools.partial(tiny_classifier, 28, 28, 1)


@pytest.fixture()
def mnist_repo(tmp_path: Path) -> Path:
    """A fresh models directory holding a copy of the bundled mnist, for a test that changes it."""
    copy_bundled_mnist(tmp_path / "models")
    return tmp_path / "models"


# --- Data --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def digits() -> list[tuple[bytes, int]]:
    """The 40 real MNIST test digits committed as PNG files, with their labels."""
    labels = json.loads((TEST_DATA / "mnist" / "labels.json").read_text())
    return [((TEST_DATA / "mnist" / name).read_bytes(), int(label)) for name, label in sorted(labels.items())]


@pytest.fixture(scope="session")
def cifar_jpegs() -> list[bytes]:
    return [path.read_bytes() for path in sorted((TEST_DATA / "cifar10").glob("*.jpg"))]


# --- Real servers ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServiceProcess]]:
    """``start_server(models_dir, stop_with=request, **env)``: a real server process, once ready, stopped when the
    scope of ``request`` ends (the requesting fixture's or test's ``request``: a class fixture's server stops after
    its class). Without ``stop_with`` it runs to the session's end: for the servers the whole suite shares."""
    shared: list[ServiceProcess] = []
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(models_dir: Path, stop_with: pytest.FixtureRequest | None = None, **env: str) -> ServiceProcess:
        running = ServiceProcess(models_dir, log_dir, {**SERVER_ENV, **env}, timeout=90)
        if stop_with is None:
            shared.append(running)
        else:
            stop_with.addfinalizer(running.stop)
        return running

    yield start
    for running in shared:
        running.stop()


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main server's models directory: a copy of the bundled mnist, and a tiny model ``tiny``."""
    root = tmp_path_factory.mktemp("reliability") / "models"
    copy_bundled_mnist(root)
    write_digit_version(root, "tiny", 1, seed=1)
    return root


@pytest.fixture(scope="session")
def server(start_server, models_root: Path) -> ServiceProcess:
    """The main server (admin API off, default queue and deadline), with a small body limit and row limit so
    that over-limit requests are cheap to make."""
    return start_server(models_root, CONVSERVE_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
                        CONVSERVE_MAX_REQUEST_ROWS=str(MAX_REQUEST_ROWS))


@pytest.fixture()
def http(server: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


BATCHING_MODES = {"batches-on-loop": "true", "batches-on-thread": "false"}


@pytest.fixture(scope="session", params=list(BATCHING_MODES.values()), ids=list(BATCHING_MODES))
def server_in_each_mode(request: pytest.FixtureRequest, start_server, models_root: Path) -> ServiceProcess:
    """A server like the main one, once with each model's batches on the worker's event loop and once on a thread
    of their own (CONVSERVE_INFERENCE_ON_LOOP, which ``auto`` sets by the CPU count), gRPC on ``grpc_url``: a test
    that takes it runs in both modes, whatever the runner's CPUs. One at a time, stopped when the mode changes."""
    grpc_port = free_port()
    running = start_server(models_root, stop_with=request, CONVSERVE_INFERENCE_ON_LOOP=request.param,
                           CONVSERVE_GRPC_PORT=str(grpc_port), CONVSERVE_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
                           CONVSERVE_MAX_REQUEST_ROWS=str(MAX_REQUEST_ROWS))
    running.grpc_url = f"127.0.0.1:{grpc_port}"
    return running


@pytest.fixture()
def http_in_each_mode(server_in_each_mode: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_in_each_mode.url, timeout=30) as client:
        yield client


# --- The checks every case ends with -----------------------------------------------------------

@pytest.fixture(scope="session")
def assert_still_serving(digits) -> Callable[[ServiceProcess], None]:
    """``assert_still_serving(server)``: the server answers a normal upload of a real MNIST digit (a different
    one each time) with the digit's label, and is ready."""
    cycle = itertools.cycle(digits)

    def check(running: ServiceProcess) -> None:
        png, label = next(cycle)
        assert running.alive(), running.output()[-4000:]
        response = httpx.post(f"{running.url}/models/mnist/predict", files={"file": ("digit.png", png, "image/png")},
                              timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["class_id"] == label
        assert httpx.get(f"{running.url}/v2/health/ready", timeout=10).status_code == 200

    return check


FORBIDDEN_IN_ERRORS = ("Traceback", 'File "', "site-packages", str(REPO_ROOT))
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])/(?:tmp|work|root|home|usr|etc|var|proc)/")


def check_error_hygiene(text: str, *extra_forbidden: str) -> None:
    """No stack trace, no source location and no absolute path of this machine in a client-visible text."""
    for needle in (*FORBIDDEN_IN_ERRORS, *extra_forbidden):
        assert needle not in text, f"{needle!r} leaked in {text!r}"
    assert not ABSOLUTE_PATH.search(text), f"an absolute path leaked in {text!r}"


@pytest.fixture(scope="session")
def assert_error(models_root: Path) -> Callable[..., str]:
    """``assert_error(response, status, *fragments)``: the response has that status and the JSON body
    ``{"error": "..."}`` whose message contains every fragment, and nothing internal; returns the message."""

    def check(response: httpx.Response, status: int, *fragments: str) -> str:
        assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
        assert response.headers["content-type"].startswith("application/json"), response.headers
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str), body
        for fragment in fragments:
            assert fragment in body["error"], f"{fragment!r} not in {body['error']!r}"
        check_error_hygiene(response.text, str(models_root), str(models_root.parent))
        return body["error"]

    return check


@pytest.fixture(scope="session")
def no_internals():
    """``no_internals(text, *also_forbidden)``: the hygiene check of assert_error, for any client-visible text."""
    return check_error_hygiene
