"""The model repository: discovery, version policies, config.pbtxt, and failures that stay contained."""

from __future__ import annotations

import json

import pytest

from service.metrics import Metrics
from service.repository import parse_config_pbtxt, select_versions

LABELS = [str(i) for i in range(10)]
SHAPE = (28, 28, 1)


def test_select_versions_policies():
    assert select_versions([1, 2, 3], "latest:1") == [3]
    assert select_versions([1, 2, 3], "latest:2") == [2, 3]
    assert select_versions([3, 1, 2], "all") == [1, 2, 3]
    assert select_versions([1, 2, 3], "specific:1,3,9") == [1, 3]
    assert select_versions([], "latest:1") == []


def test_parse_config_pbtxt_reads_batching_and_version_policy():
    config = parse_config_pbtxt(
        'name: "m"\nbackend: "onnxruntime"\nmax_batch_size: 64\n'
        "version_policy: { latest: { num_versions: 2 } }\n"
        "dynamic_batching { max_queue_delay_microseconds: 250 }\n")
    assert config.max_batch_size == 64
    assert config.max_queue_delay_us == 250
    assert config.version_policy == "latest:2"
    assert parse_config_pbtxt("version_policy: { all { } }").version_policy == "all"
    assert parse_config_pbtxt("version_policy: { specific: { versions: [1, 3] } }").version_policy == "specific:1,3"
    assert parse_config_pbtxt("").max_batch_size is None


def test_default_policy_serves_only_the_newest_version(tmp_path, make_version, app_client_factory):
    for version in (1, 2, 3):
        make_version(tmp_path, "m", version, SHAPE, LABELS, digit=True, seed=version)
    client = app_client_factory(tmp_path)
    assert [v["version"] for v in client.get("/models").json()["models"][0]["versions"]] == [3]
    assert client.get("/v2/models/m/versions/1").status_code == 404


def test_version_policy_setting_all(tmp_path, make_version, app_client_factory):
    for version in (1, 2):
        make_version(tmp_path, "m", version, SHAPE, LABELS, digit=True)
    client = app_client_factory(tmp_path, version_policy="all")
    assert client.get("/v2/models/m").json()["versions"] == ["1", "2"]


def test_hidden_and_invalid_entries_are_ignored(tmp_path, make_version, app_client_factory):
    make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)
    make_version(tmp_path, ".hidden", 1, SHAPE, LABELS, digit=True)
    (tmp_path / "m" / ".staging-1234").mkdir()
    (tmp_path / "m" / "latest").mkdir()
    (tmp_path / "m" / "0").mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    client = app_client_factory(tmp_path)
    models = client.get("/models").json()["models"]
    assert [m["name"] for m in models] == ["m"]
    assert [v["version"] for v in models[0]["versions"]] == [1]


def test_corrupt_version_fails_alone_and_is_reported(tmp_path, make_version, app_client_factory):
    make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)
    (tmp_path / "m" / "config.pbtxt").write_text("version_policy: { all: {} }")
    broken = make_version(tmp_path, "m", 2, SHAPE, LABELS, digit=True)
    (broken / "model.onnx").write_bytes(b"this is not onnx")
    client = app_client_factory(tmp_path)
    versions = {v["version"]: v for v in client.get("/models").json()["models"][0]["versions"]}
    assert versions[1]["state"] == "READY"
    assert versions[2]["state"] == "FAILED" and versions[2]["error"].startswith("failed to load")
    assert client.get("/v2/models/m/versions/2/ready").status_code == 503
    assert client.get("/v2/models/m").json()["versions"] == ["1"]  # the good version keeps serving
    assert client.get("/v2/health/ready").status_code == 200
    status = client.get("/v1/models/m/versions/2").json()["model_version_status"][0]
    assert status["state"] == "END" and "failed to load" in status["status"]["error_message"]
    assert 'convserve_model_load_failures_total{model="m",version="2"} 1.0' in client.get("/metrics").text


def test_checksum_mismatch_fails_the_version(tmp_path, make_version, app_client_factory):
    directory = make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)
    metadata = json.loads((directory / "metadata.json").read_text())
    metadata["sha256"] = {"model.onnx": "0" * 64}
    (directory / "metadata.json").write_text(json.dumps(metadata))
    client = app_client_factory(tmp_path)
    [version] = client.get("/models").json()["models"][0]["versions"]
    assert version["state"] == "FAILED" and "sha256" in version["error"]
    assert client.get("/v2/health/ready").status_code == 503  # a model with no ready version


def test_metadata_shape_mismatch_fails_the_version(tmp_path, make_version, app_client_factory):
    directory = make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)
    metadata = json.loads((directory / "metadata.json").read_text())
    metadata["input"]["shape"] = [-1, 32, 32, 3]
    (directory / "metadata.json").write_text(json.dumps(metadata))
    client = app_client_factory(tmp_path)
    [version] = client.get("/models").json()["models"][0]["versions"]
    assert version["state"] == "FAILED" and "does not match metadata.json" in version["error"]


def test_missing_model_file_fails_the_version(tmp_path, make_version, app_client_factory):
    directory = make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)
    (directory / "model.onnx").unlink()
    client = app_client_factory(tmp_path)
    [version] = client.get("/models").json()["models"][0]["versions"]
    assert version["state"] == "FAILED" and "missing model.onnx" in version["error"]
    response = client.post("/models/m/predict", content=b"x", headers={"content-type": "image/png"})
    assert response.status_code == 503
    assert "no ready version" in response.json()["error"]


def test_unloaded_version_requests_are_not_ready(tmp_path, make_version, app_client_factory):
    make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)
    client = app_client_factory(tmp_path)
    assert client.get("/v2/models/m/versions/abc").status_code == 404


def test_empty_models_dir_serves_nothing_but_stays_up(tmp_path, app_client_factory):
    client = app_client_factory(tmp_path / "missing")
    assert client.get("/models").json() == {"models": []}
    assert client.get("/v2/health/live").status_code == 200


@pytest.mark.parametrize("runtime", ["tensorflow"])
def test_tensorflow_runtime_serves_a_savedmodel(tmp_path, runtime):
    pytest.importorskip("tensorflow")
    import numpy as np
    import tensorflow as tf

    from service.runtimes import load_runtime

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 1], tf.float32, name="image")])
    def serve(image):
        return {"probabilities": tf.nn.softmax(tf.reshape(image, [-1, 16])[:, :3])}

    module = tf.Module()
    tf.saved_model.save(module, str(tmp_path), signatures={"serving_default": serve})
    loaded = load_runtime(runtime, tmp_path, threads=1)
    assert loaded.inputs[0].name == "image" and loaded.inputs[0].shape == (-1, 4, 4, 1)
    assert loaded.outputs[0].name == "probabilities"
    x = np.random.default_rng(0).random((2, 4, 4, 1), dtype=np.float32)
    np.testing.assert_allclose(loaded.predict(x), serve(tf.constant(x))["probabilities"].numpy(), atol=1e-6)


def test_metrics_object_is_fresh_per_app():
    assert Metrics().registry is not Metrics().registry
