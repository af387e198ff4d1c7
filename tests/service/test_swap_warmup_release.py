"""A new version is warmed up before it is swapped in, and an unloaded version's runtime is released.

ONNX Runtime's session class is wrapped to see, from outside the service, which sessions exist, how often each
has run, and whether anything still holds one."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from tests.support.models import tiny_classifier, write_digit_version
from tests.support.waiting import wait_for

BODY = {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": [0.0] * 784}]}


@dataclass
class Sessions:
    """Every ONNX Runtime session created, by model file: a weak reference to it and its number of runs."""

    refs: dict[str, weakref.ref] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)

    def of(self, version: int) -> str:
        [path] = [p for p in self.refs if p.endswith(f"/m/{version}/model.onnx")]
        return path


@pytest.fixture()
def sessions(monkeypatch) -> Sessions:
    seen = Sessions()

    class RecordingSession(ort.InferenceSession):
        def __init__(self, path, *args, **kwargs):
            super().__init__(path, *args, **kwargs)
            self.recorded_path = str(path)
            seen.refs[str(path)] = weakref.ref(self)
            seen.runs[str(path)] = 0

        def run(self, *args, **kwargs):
            seen.runs[self.recorded_path] += 1
            return super().run(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    return seen


def served(client) -> list[str] | None:
    response = client.get("/v2/models/m")
    return response.json()["versions"] if response.status_code == 200 else None


def test_a_new_version_has_run_before_it_is_swapped_in_and_the_old_runtime_is_released(
        tmp_path, sessions, app_client_factory):
    write_digit_version(tmp_path, "m", 1, seed=1)
    client = app_client_factory(tmp_path, repository_poll_seconds=0.1)
    assert client.post("/v2/models/m/infer", json=BODY).json()["model_version"] == "1"
    write_digit_version(tmp_path, "m", 2, seed=2)
    assert wait_for(lambda: served(client) == ["2"])
    # No client request has reached version 2 yet, but its session has already computed (the warm-up).
    assert 'convserve_batch_rows_count{model="m",version="2"} 0.0' in client.get("/metrics").text
    assert sessions.runs[sessions.of(2)] > 0
    assert client.post("/v2/models/m/infer", json=BODY).json()["model_version"] == "2"
    # Version 1 left the policy: nothing keeps its ONNX Runtime session alive any more.
    old = sessions.refs[sessions.of(1)]
    assert wait_for(lambda: gc.collect() is not None and old() is None), gc.get_referrers(old())
    assert sessions.refs[sessions.of(2)]() is not None


def test_a_version_that_cannot_compute_fails_its_warm_up_and_is_never_swapped_in(tmp_path, app_client_factory):
    write_digit_version(tmp_path, "m", 1, seed=1)
    client = app_client_factory(tmp_path, repository_poll_seconds=0.1)
    # Version 2 loads (a valid graph, input and output shapes as declared) but no run succeeds: before its dense
    # layer it gathers pixel 784 of a 784-pixel row, which only computing finds out.
    model = tiny_classifier(28, 28, 1, seed=2)
    indices = np.arange(784, dtype=np.int64)
    indices[-1] = 784
    model.graph.initializer.append(numpy_helper.from_array(indices, "out_of_range"))
    [matmul] = [node for node in model.graph.node if node.op_type == "MatMul"]
    matmul.input[0] = "gathered"
    model.graph.node.insert(list(model.graph.node).index(matmul),
                            helper.make_node("Gather", ["flat", "out_of_range"], ["gathered"], axis=1))
    directory = write_digit_version(tmp_path / ".staging", "m", 2)
    onnx.save(model, directory / "model.onnx")
    directory.rename(tmp_path / "m" / "2")

    def state() -> dict:
        versions = client.get("/models").json()["models"][0]["versions"]
        return {v["version"]: v for v in versions}

    assert wait_for(lambda: state().get(2, {}).get("state") == "FAILED"), state()
    assert "Non-zero status code returned while running" in state()[2]["error"]  # it failed computing, not loading
    assert served(client) == ["1"]
    assert client.post("/v2/models/m/infer", json=BODY).json()["model_version"] == "1"
    assert client.get("/v2/models/m/versions/2/ready").status_code == 503
