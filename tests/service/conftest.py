"""Fixtures for the service tests: tiny ONNX models built in code, apps, clients and a real server."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from service.app import create_app
from service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_DATA = REPO_ROOT / "tests" / "data"
BUNDLED_MODELS = REPO_ROOT / "models"
DIGIT_LABELS = [str(i) for i in range(10)]
COLOR_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def tiny_classifier(height: int, width: int, channels: int, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """image [N,H,W,C] raw pixels -> /255 -> flatten -> dense -> softmax, like the real exports."""
    rng = np.random.default_rng(seed)
    features = height * width * channels
    weights = rng.normal(0, 0.05, (features, classes)).astype(np.float32)
    bias = rng.normal(0, 0.1, classes).astype(np.float32)
    nodes = [
        helper.make_node("Div", ["image", "scale"], ["scaled"]),
        helper.make_node("Reshape", ["scaled", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", height, width, channels])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        initializer=[
            numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "flat_shape"),
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_version(root: Path, name: str, version: int, shape: tuple[int, int, int], labels: list[str],
                  digit: bool, seed: int = 0) -> Path:
    directory = root / name / str(version)
    directory.mkdir(parents=True)
    onnx.save(tiny_classifier(*shape, classes=len(labels), seed=seed), directory / "model.onnx")
    metadata = {"name": name, "version": version, "labels": labels, "digit": digit,
                "input": {"name": "image", "datatype": "FP32", "shape": [-1, *shape]}}
    (directory / "metadata.json").write_text(json.dumps(metadata))
    return directory


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits (versions 1 and 2, grayscale 28x28, digit preprocessing) and colors (RGB 32x32)."""
    root = tmp_path_factory.mktemp("models")
    write_version(root, "digits", 1, (28, 28, 1), DIGIT_LABELS, digit=True, seed=1)
    write_version(root, "digits", 2, (28, 28, 1), DIGIT_LABELS, digit=True, seed=2)
    write_version(root, "colors", 1, (32, 32, 3), COLOR_LABELS, digit=False, seed=3)
    (root / "digits" / "config.pbtxt").write_text('name: "digits"\nversion_policy: { all: {} }\nmax_batch_size: 16\n')
    return root


def make_settings(models_dir: Path, **overrides: object) -> Settings:
    return Settings(models_dir=models_dir, access_log=False, inference_threads=1, **overrides)


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, models_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"convserve-{self.port}.log", "w+")
        command = [sys.executable, "-m", "service", "--models-dir", str(models_dir),
                   "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "CONVSERVE_INFERENCE_THREADS": "1", **(env or {})})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become ready: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture(scope="session")
def server(model_repo: Path) -> Iterator[RunningServer]:
    """A real uvicorn process on a loopback port, serving the tiny test models."""
    running = RunningServer(model_repo)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def bundled_mnist() -> Path:
    if not (BUNDLED_MODELS / "mnist").is_dir():
        pytest.skip("the bundled models/mnist is not in this checkout")
    return BUNDLED_MODELS


@pytest.fixture(scope="session")
def bundled_server(bundled_mnist: Path) -> Iterator[RunningServer]:
    """A real server on the bundled, trained models."""
    running = RunningServer(bundled_mnist)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def make_version():
    """``make_version(root, name, version, shape, labels, digit, seed=0)`` writes a tiny model version."""
    return write_version


@pytest.fixture()
def server_factory() -> Iterator:
    """Start real servers on any models dir, with extra environment; all are stopped at the end."""
    started: list[RunningServer] = []

    def factory(models_dir: Path, **env: str) -> RunningServer:
        running = RunningServer(models_dir, env)
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()
