"""Fixtures for the reliability and security suite: real ``python -m service`` processes on loopback ports,
serving a copy of the bundled, trained mnist model (the original is never touched) plus tiny models built in
code, and the checks every case ends with: the error is JSON naming the problem, with no traceback or
internal path in it, and the server still classifies a real digit correctly.

Shared helpers are fixtures (the suite runs with ``--import-mode=importlib``, so test files cannot import
each other or this file).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_DATA = REPO_ROOT / "tests" / "data"
BUNDLED_MNIST = REPO_ROOT / "models" / "mnist"
DIGITS = [str(i) for i in range(10)]
# Small enough that an over-limit body is cheap to send, big enough for a 64-row binary batch (200 KB).
MAX_BODY_BYTES = 2 * 1024 * 1024
MAX_REQUEST_ROWS = 64


# --- Models ------------------------------------------------------------------------------------

def tiny_classifier(height: int = 28, width: int = 28, channels: int = 1, classes: int = 10,
                    seed: int = 0) -> onnx.ModelProto:
    """image [N,H,W,C] raw pixels -> /255 -> flatten -> dense -> softmax: the real exports' interface, tiny."""
    rng = np.random.default_rng(seed)
    features = height * width * channels
    graph = helper.make_graph(
        [helper.make_node("Div", ["image", "scale"], ["scaled"]),
         helper.make_node("Reshape", ["scaled", "flat_shape"], ["flat"]),
         helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", height, width, channels])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
                     numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "flat_shape"),
                     numpy_helper.from_array(rng.normal(0, 0.05, (features, classes)).astype(np.float32),
                                             "weights")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_tiny_version(root: Path, name: str, version: int, seed: int = 0) -> Path:
    """A tiny 28x28 grayscale digit model version with its metadata.json."""
    directory = root / name / str(version)
    directory.mkdir(parents=True)
    onnx.save(tiny_classifier(seed=seed), directory / "model.onnx")
    metadata = {"name": name, "version": version, "labels": DIGITS, "digit": True,
                "input": {"name": "image", "datatype": "FP32", "shape": [-1, 28, 28, 1]}}
    (directory / "metadata.json").write_text(json.dumps(metadata))
    return directory


def copy_bundled_mnist(root: Path) -> Path:
    """Copy the trained models/mnist (config, labels, each version's model.onnx and metadata.json) under root."""
    if not (BUNDLED_MNIST / "1" / "model.onnx").is_file():
        pytest.skip("the bundled models/mnist/1 is not in this checkout")
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
        pytest.skip("the bundled models/mnist/1 is not in this checkout")
    return {name: (BUNDLED_MNIST / "1" / name).read_bytes() for name in ("model.onnx", "metadata.json")}


@pytest.fixture(scope="session")
def write_tiny():
    """``write_tiny(root, name, version, seed=0)`` writes a tiny digit model version."""
    return write_tiny_version


@pytest.fixture(scope="session")
def tiny_onnx():
    """``tiny_onnx(seed=0)``: the tiny model as an onnx.ModelProto, to alter before saving."""
    return tiny_classifier


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

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m service`` on a loopback port, as deployed: one process, uvicorn, no worker pool."""

    def __init__(self, models_dir: Path, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.models_dir = models_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"convserve-{self.port}.log"
        self.log = open(self.log_path, "w+")
        command = [sys.executable, "-m", "service", "--models-dir", str(models_dir), "--host", "127.0.0.1",
                   "--port", str(self.port)]
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "CONVSERVE_INFERENCE_THREADS": "1", "CONVSERVE_ACCESS_LOG": "false",
                 "CONVSERVE_REPOSITORY_POLL_SECONDS": "0", **(env or {})})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become ready: {self.output()}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def rss_bytes(self) -> int:
        """Resident memory of the server process (VmRSS)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def metric(self, series: str) -> float:
        """The value of one series of /metrics, e.g. ``convserve_inflight_requests{model="mnist",version="1"}``;
        0 for a labelled series nobody has touched yet."""
        match = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", self.metrics(), re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """``start_server(models_dir, **env)``: a real server process, once ready; all stopped at the session's end
    (stop one earlier with ``.stop()``)."""
    started: list[ServerProcess] = []
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(models_dir: Path, **env: str) -> ServerProcess:
        running = ServerProcess(models_dir, log_dir, env)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main server's models directory: a copy of the bundled mnist, and a tiny model ``tiny``."""
    root = tmp_path_factory.mktemp("reliability") / "models"
    copy_bundled_mnist(root)
    write_tiny_version(root, "tiny", 1, seed=1)
    return root


@pytest.fixture(scope="session")
def server(start_server, models_root: Path) -> ServerProcess:
    """The main server (admin API off, default queue and deadline), with a small body limit and row limit so
    that over-limit requests are cheap to make."""
    return start_server(models_root, CONVSERVE_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
                        CONVSERVE_MAX_REQUEST_ROWS=str(MAX_REQUEST_ROWS))


@pytest.fixture()
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


# --- The checks every case ends with -----------------------------------------------------------

@pytest.fixture(scope="session")
def assert_still_serving(digits) -> Callable[[ServerProcess], None]:
    """``assert_still_serving(server)``: the server answers a normal upload of a real MNIST digit (a different
    one each time) with the digit's label, and is ready."""
    cycle = itertools.cycle(digits)

    def check(running: ServerProcess) -> None:
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
