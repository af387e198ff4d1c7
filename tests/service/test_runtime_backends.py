"""The two runtimes as a user runs them, each in a real ``python -m service`` process on the bundled mnist:
the default ONNX Runtime serving in an environment where TensorFlow cannot be imported at all, and
``CONVSERVE_RUNTIME=tensorflow`` serving the bundled SavedModel. Both answer like the exported model.onnx."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.missing import require_module
from tests.support.oracle import Oracle
from tests.support.server import ServiceProcess, free_port

# `python -c` this, then the service's own arguments: `import tensorflow` (and keras, which would bring it in)
# fails as in an environment without the [tf] extra; each attempt is reported on stderr.
WITHOUT_TENSORFLOW = """
import runpy, sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
            print(f"blocked import of {name}", file=sys.stderr, flush=True)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoTensorFlow())
sys.argv = ["service", *sys.argv[1:]]
runpy.run_module("service", run_name="__main__", alter_sys=True)
"""
SERVER_ENV = {"CONVSERVE_ACCESS_LOG": "false", "CONVSERVE_REPOSITORY_POLL_SECONDS": "0"}


@pytest.fixture(scope="module")
def mnist_only(bundled_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with a copy of the bundled mnist alone (model.onnx and the SavedModel)."""
    root = tmp_path_factory.mktemp("bundled") / "models"
    shutil.copytree(bundled_mnist / "mnist", root / "mnist", ignore=shutil.ignore_patterns("report"))
    return root


def check_answers_like_the_onnx_model(server: ServiceProcess, models_dir: Path, mnist_pngs) -> None:
    """Real digits through the upload endpoint and raw rows through KServe v2, against the exported model.onnx
    (run by the oracle of tests/support/oracle.py on the digits as its metadata.json documents its input)."""
    oracle = Oracle(models_dir / "mnist" / "1")
    images = [png for png, _ in mnist_pngs[:8]]
    rows = oracle.rows(images)
    expected = oracle.run(rows)
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(images)]
    response = httpx.post(f"{server.url}/models/mnist/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["class_id"] for p in predictions] == expected.argmax(axis=1).tolist()
    assert [p["class_id"] for p in predictions] == [int(label) for _, label in mnist_pngs[:8]]
    np.testing.assert_allclose([p["score"] for p in predictions], expected.max(axis=1), atol=1e-5)
    body = {"inputs": [{"name": "image", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}
    response = httpx.post(f"{server.url}/v2/models/mnist/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    got = np.array(response.json()["outputs"][0]["data"], dtype=np.float32).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_onnx_runtime_serves_where_tensorflow_cannot_be_imported(mnist_only, mnist_pngs, tmp_path):
    port = free_port()
    argv = [sys.executable, "-c", WITHOUT_TENSORFLOW, "--models-dir", str(mnist_only), "--host", "127.0.0.1",
            "--port", str(port)]
    server = ServiceProcess(mnist_only, tmp_path, SERVER_ENV, argv=argv, port=port, timeout=90)
    try:
        check_answers_like_the_onnx_model(server, mnist_only, mnist_pngs)
        assert httpx.get(f"{server.url}/v2/models/mnist", timeout=10).json()["platform"] == "onnxruntime_onnx"
        assert "blocked import of tensorflow" not in server.output()  # serving never even tried
    finally:
        server.stop()


def test_tensorflow_runtime_serves_the_bundled_savedmodel_over_http(mnist_only, mnist_pngs, tmp_path):
    require_module("tensorflow", "CONVSERVE_RUNTIME=tensorflow needs the [tf] extra")
    server = ServiceProcess(mnist_only, tmp_path, {**SERVER_ENV, "CONVSERVE_RUNTIME": "tensorflow"}, timeout=180)
    try:
        assert httpx.get(f"{server.url}/v2/models/mnist", timeout=10).json()["platform"] == "tensorflow_savedmodel"
        check_answers_like_the_onnx_model(server, mnist_only, mnist_pngs)
    finally:
        server.stop()
