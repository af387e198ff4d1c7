"""TensorFlow Serving REST API: status, metadata, row and columnar predict, b64 images, errors."""

from __future__ import annotations

import base64

import numpy as np
import onnxruntime as ort

from tests.support.oracle import Oracle


def rows(n=2):
    return np.random.default_rng(1).integers(0, 256, (n, 28, 28, 1)).astype(np.float32)


def reference(model_repo, version, x):
    session = ort.InferenceSession(str(model_repo / "digits" / str(version) / "model.onnx"))
    return session.run(None, {"image": x})[0]


def test_model_status_lists_every_version(client):
    response = client.get("/v1/models/digits")
    assert response.status_code == 200
    statuses = response.json()["model_version_status"]
    assert [s["version"] for s in statuses] == ["2", "1"]
    assert all(s["state"] == "AVAILABLE" and s["status"]["error_code"] == "OK" for s in statuses)


def test_model_version_status(client):
    statuses = client.get("/v1/models/digits/versions/1").json()["model_version_status"]
    assert [s["version"] for s in statuses] == ["1"]


def test_model_metadata_has_serving_default_signature(client):
    body = client.get("/v1/models/digits/metadata").json()
    assert body["model_spec"] == {"name": "digits", "signature_name": "", "version": "2"}
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["image"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in signature["inputs"]["image"]["tensor_shape"]["dim"]] == ["-1", "28", "28", "1"]
    assert "probabilities" in signature["outputs"]


def test_predict_row_format(client, model_repo):
    x = rows(2)
    response = client.post("/v1/models/digits:predict", json={"instances": x.tolist()})
    assert response.status_code == 200
    np.testing.assert_allclose(np.array(response.json()["predictions"]), reference(model_repo, 2, x), atol=1e-6)


def test_predict_row_format_with_named_inputs_on_a_version(client, model_repo):
    x = rows(2)
    response = client.post("/v1/models/digits/versions/1:predict",
                           json={"signature_name": "serving_default", "instances": [{"image": r.tolist()} for r in x]})
    assert response.status_code == 200
    np.testing.assert_allclose(np.array(response.json()["predictions"]), reference(model_repo, 1, x), atol=1e-6)


def test_predict_columnar_format(client, model_repo):
    x = rows(3)
    response = client.post("/v1/models/digits:predict", json={"inputs": {"image": x.tolist()}})
    assert response.status_code == 200
    np.testing.assert_allclose(np.array(response.json()["outputs"]), reference(model_repo, 2, x), atol=1e-6)


def test_predict_b64_encoded_images(client, model_repo, mnist_pngs):
    images = [img for img, _ in mnist_pngs[:2]]
    instances = [{"b64": base64.b64encode(img).decode()} for img in images]
    response = client.post("/v1/models/digits:predict", json={"instances": instances})
    assert response.status_code == 200
    # The images become the model's documented input first (a digit model: MNIST normalisation): the oracle's.
    expected = Oracle(model_repo / "digits" / "2").probabilities(images)
    np.testing.assert_allclose(np.array(response.json()["predictions"]), expected, atol=1e-6)


def test_predict_needs_instances_or_inputs(client):
    response = client.post("/v1/models/digits:predict", json={"rows": []})
    assert response.status_code == 400
    assert response.json() == {"error": 'request must be a JSON object with either "instances" or "inputs"'}


def test_predict_rejects_ragged_instances(client):
    response = client.post("/v1/models/digits:predict", json={"instances": [[1, 2], [3]]})
    assert response.status_code == 400
    assert "not a regular numeric array" in response.json()["error"]


def test_predict_rejects_wrong_input_name(client):
    response = client.post("/v1/models/digits:predict", json={"instances": [{"pixels": [0]}]})
    assert response.status_code == 400
    assert "exactly the input 'image'" in response.json()["error"]


def test_predict_unknown_model_is_404(client):
    response = client.post("/v1/models/nope:predict", json={"instances": [[0]]})
    assert response.status_code == 404
    assert response.json() == {"error": "model 'nope' not found"}
