"""The model repository: discovery, version policies, config.pbtxt, and failures that stay contained."""

from __future__ import annotations

import json

import pytest

from service.model_config import ConfigError, config_version_policy, model_settings, read_model_config
from service.repository import select_versions
from service.settings import Settings
from tests.support.missing import require_module

LABELS = [str(i) for i in range(10)]
SHAPE = (28, 28, 1)


def test_select_versions_policies():
    assert select_versions([1, 2, 3], "latest:1") == [3]
    assert select_versions([1, 2, 3], "latest:2") == [2, 3]
    assert select_versions([3, 1, 2], "all") == [1, 2, 3]
    assert select_versions([1, 2, 3], "specific:1,3,9") == [1, 3]
    assert select_versions([], "latest:1") == []


def _config(tmp_path, text):
    (tmp_path / "config.pbtxt").write_text(text)
    return read_model_config(tmp_path)


def test_config_pbtxt_is_read_as_a_triton_model_config(tmp_path):
    config = _config(tmp_path, 'name: "m"\nbackend: "onnxruntime"\nmax_batch_size: 8\n'
                               "version_policy: { latest: { num_versions: 2 } }\n"
                               "dynamic_batching { max_queue_delay_microseconds: 250 }\n")
    assert config.max_batch_size == 8 and config.backend == "onnxruntime"
    effective = model_settings(config, Settings(max_batch_size=32))
    assert effective.batching.max_batch_size == 8  # the model's limit is below the setting
    assert effective.batching.max_queue_delay_us == 250
    assert effective.version_policy == "latest:2"
    assert effective.sources == {"version_policy": "config.pbtxt", "max_batch_size": "config.pbtxt (the model's limit)",
                                 "max_queue_delay_us": "config.pbtxt"}
    assert config_version_policy(_config(tmp_path, "version_policy: { all { } }")) == "all"
    assert config_version_policy(_config(tmp_path, "version_policy: { specific: { versions: [1, 3] } }")) == \
        "specific:1,3"


def test_commented_out_config_lines_are_comments(tmp_path):
    config = _config(tmp_path, 'name: "m"\n# max_batch_size: 8\nmax_batch_size: 64\n'
                               "# version_policy: { all { } }\n"
                               "dynamic_batching {\n  # max_queue_delay_microseconds: 9000\n}\n")
    effective = model_settings(config, Settings(max_batch_size=16, max_queue_delay_us=100))
    assert effective.batching.max_batch_size == 16
    assert effective.batching.max_queue_delay_us == 100
    assert effective.version_policy == "latest:1"
    assert effective.sources == {"version_policy": "default", "max_batch_size": "environment",
                                 "max_queue_delay_us": "environment"}


def test_settings_apply_where_config_pbtxt_is_silent_or_absent(tmp_path):
    assert read_model_config(tmp_path) is None
    effective = model_settings(None, Settings(max_batch_size=4, max_queue_delay_us=700, version_policy="all"))
    assert (effective.batching.max_batch_size, effective.batching.max_queue_delay_us) == (4, 700)
    assert effective.version_policy == "all"
    assert model_settings(None, Settings()).sources["max_batch_size"] == "default"
    off = model_settings(_config(tmp_path, "max_batch_size: 64"), Settings(batching=False))
    assert (off.batching.max_batch_size, off.batching.max_queue_delay_us) == (1, 0)


@pytest.mark.parametrize("text, fragment", [
    ("max_batch_size: eight\n", "max_batch_size"),
    ("no_such_field: 1\n", "no_such_field"),
    ("dynamic_batching { max_queue_delay_microseconds: 5\n", 'Expected "}"'),  # unclosed at the end
])
def test_malformed_config_pbtxt_raises_the_parsers_message(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match="config.pbtxt is malformed") as error:
        _config(tmp_path, text)
    assert fragment in str(error.value)


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
    client = app_client_factory(tmp_path, admin_token="t0ken", repository_poll_seconds=0)
    body = {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": [0.0] * 784}]}
    assert client.get("/v2/models/m/versions/1/ready").status_code == 200
    assert client.post("/v2/models/m/versions/1/infer", json=body).status_code == 200
    make_version(tmp_path, "m", 2, SHAPE, LABELS, digit=True, seed=2)
    # Loading version 2 unloads version 1 (the default policy serves the newest only).
    assert client.post("/v2/repository/models/m/load", headers={"authorization": "Bearer t0ken"}).status_code == 200
    gone = {"error": "model 'm' has no version 1"}
    for response in (client.get("/v2/models/m/versions/1/ready"), client.get("/v2/models/m/versions/1"),
                     client.post("/v2/models/m/versions/1/infer", json=body),
                     client.post("/models/m/versions/1/predict", content=b"x", headers={"content-type": "image/png"}),
                     client.get("/v1/models/m/versions/1"),
                     client.post("/v1/models/m/versions/1:predict", json={"instances": [[0]]})):
        assert (response.status_code, response.json()) == (404, gone), response.request.url
    assert client.post("/v2/models/m/infer", json=body).json()["model_version"] == "2"


def test_a_version_that_is_not_a_number_is_404(tmp_path, make_version, app_client_factory):
    make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)
    client = app_client_factory(tmp_path)
    assert client.get("/v2/models/m/versions/abc").status_code == 404


def test_empty_models_dir_serves_nothing_but_stays_up(tmp_path, app_client_factory):
    client = app_client_factory(tmp_path)  # a models dir that does not exist stops the start (test_settings.py)
    assert client.get("/models").json() == {"models": []}
    assert client.get("/v2/health/live").status_code == 200


@pytest.mark.parametrize("runtime", ["tensorflow"])
def test_tensorflow_runtime_serves_a_savedmodel(tmp_path, runtime):
    require_module("tensorflow", "the TensorFlow runtime needs the [tf] extra")
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
    expected = serve(tf.constant(x))["probabilities"].numpy()
    np.testing.assert_allclose(loaded.predict(x)["probabilities"], expected, atol=1e-6)


def test_metrics_are_fresh_per_app(tmp_path, make_version, app_client_factory):
    make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)
    busy, idle = app_client_factory(tmp_path), app_client_factory(tmp_path)
    body = {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": [0.0] * 784}]}
    for _ in range(3):
        assert busy.post("/v2/models/m/infer", json=body).status_code == 200
    series = 'convserve_inference_requests_total{model="m",outcome="success",version="1"}'
    assert f"{series} 3.0" in busy.get("/metrics").text
    assert f"{series} 0.0" in idle.get("/metrics").text  # the other app counted nothing


def test_a_models_rollout_parameters_are_read_and_checked(tmp_path):
    config = _config(tmp_path, 'parameters { key: "rollout" value { string_value: "Canary" } }\n'
                               'parameters { key: "rollout_min_agreement" value { string_value: "0.95" } }')
    assert config.parameters["rollout"].string_value == "Canary"  # the mode is read case-blind
    for bad, message in [('parameters { key: "rollout" value { string_value: "blue" } }', "shadow, canary, off"),
                         ('parameters { key: "rollout_min_agreement" value { string_value: "high" } }', "0 to 1"),
                         ('parameters { key: "rollout_min_agreement" value { string_value: "1.5" } }', "0 to 1")]:
        with pytest.raises(ConfigError, match=message):
            _config(tmp_path, bad)
