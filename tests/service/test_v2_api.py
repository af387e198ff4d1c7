"""Open Inference Protocol (KServe v2): health, metadata, JSON and binary inference, classification."""

from __future__ import annotations

import json
import struct

import numpy as np
import onnxruntime as ort

from tests.support.checks import assert_classification


def digits_batch(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1)).astype(np.float32)


def reference(model_repo, version, rows):
    session = ort.InferenceSession(str(model_repo / "digits" / str(version) / "model.onnx"))
    return session.run(None, {"image": rows})[0]


def test_server_metadata_lists_extensions(client):
    body = client.get("/v2").json()
    assert body["name"] == "convserve"
    assert {"binary_tensor_data", "classification"} <= set(body["extensions"])


def test_health_live_and_ready(client):
    assert client.get("/v2/health/live").status_code == 200
    response = client.get("/v2/health/ready")
    assert response.status_code == 200 and response.json() == {"ready": True}


def test_model_metadata_describes_tensors(client):
    body = client.get("/v2/models/digits").json()
    assert body["name"] == "digits"
    assert body["versions"] == ["1", "2"]
    assert body["platform"] == "onnxruntime_onnx"
    assert body["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 28, 28, 1]}]
    assert body["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]


def test_model_version_metadata_and_ready(client):
    assert client.get("/v2/models/digits/versions/1").json()["versions"] == ["1"]
    assert client.get("/v2/models/digits/versions/1/ready").status_code == 200
    assert client.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}


def test_model_metadata_unknown_model_is_404(client):
    response = client.get("/v2/models/nope")
    assert response.status_code == 404 and response.json() == {"error": "model 'nope' not found"}


def test_infer_json_flat_data(client, model_repo):
    rows = digits_batch(3)
    request = {"id": "req-1", "inputs": [{"name": "image", "shape": [3, 28, 28, 1], "datatype": "FP32",
                                          "data": rows.ravel().tolist()}]}
    response = client.post("/v2/models/digits/infer", json=request)
    assert response.status_code == 200
    body = response.json()
    assert body["model_name"] == "digits" and body["model_version"] == "2" and body["id"] == "req-1"
    [output] = body["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32" and output["shape"] == [3, 10]
    np.testing.assert_allclose(np.array(output["data"]).reshape(3, 10), reference(model_repo, 2, rows), atol=1e-6)


def test_infer_json_nested_uint8_data_on_a_version(client, model_repo):
    rows = digits_batch(2).astype(np.uint8)
    request = {"inputs": [{"name": "image", "shape": [2, 28, 28, 1], "datatype": "UINT8", "data": rows.tolist()}]}
    response = client.post("/v2/models/digits/versions/1/infer", json=request)
    assert response.status_code == 200
    data = np.array(response.json()["outputs"][0]["data"]).reshape(2, 10)
    np.testing.assert_allclose(data, reference(model_repo, 1, rows.astype(np.float32)), atol=1e-6)


def binary_request(rows, outputs=None, parameters=None):
    header = {"inputs": [{"name": "image", "shape": list(rows.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": rows.nbytes}}]}
    if outputs is not None:
        header["outputs"] = outputs
    if parameters is not None:
        header["parameters"] = parameters
    head = json.dumps(header).encode()
    return head + rows.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                   "content-type": "application/octet-stream"}


def split_binary_response(response):
    n = int(response.headers["inference-header-content-length"])
    return json.loads(response.content[:n]), response.content[n:]


def test_infer_binary_input_and_binary_output(client, model_repo):
    rows = digits_batch(5)
    body, headers = binary_request(rows, outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}])
    response = client.post("/v2/models/digits/infer", content=body, headers=headers)
    assert response.status_code == 200
    header, blob = split_binary_response(response)
    [output] = header["outputs"]
    assert output["parameters"]["binary_data_size"] == 5 * 10 * 4 == len(blob)
    np.testing.assert_allclose(np.frombuffer(blob, "<f4").reshape(5, 10), reference(model_repo, 2, rows), atol=1e-6)


def test_infer_binary_data_output_request_parameter(client):
    body, headers = binary_request(digits_batch(2), parameters={"binary_data_output": True})
    response = client.post("/v2/models/digits/infer", content=body, headers=headers)
    header, blob = split_binary_response(response)
    assert header["outputs"][0]["parameters"]["binary_data_size"] == len(blob) == 80


def test_infer_classification_extension_json(client, model_repo):
    rows = digits_batch(2)
    request = {"inputs": [{"name": "image", "shape": [2, 28, 28, 1], "datatype": "FP32",
                           "data": rows.ravel().tolist()}],
               "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}
    output = client.post("/v2/models/digits/infer", json=request).json()["outputs"][0]
    assert output["datatype"] == "BYTES" and output["shape"] == [2, 3]
    assert_classification(np.array(output["data"]).reshape(2, 3).tolist(), reference(model_repo, 2, rows), 3)


def test_infer_classification_extension_binary(client, model_repo):
    rows = digits_batch(2)
    body, headers = binary_request(rows, outputs=[
        {"name": "probabilities", "parameters": {"classification": 2, "binary_data": True}}])
    header, blob = split_binary_response(client.post("/v2/models/digits/infer", content=body, headers=headers))
    assert header["outputs"][0]["datatype"] == "BYTES" and header["outputs"][0]["shape"] == [2, 2]
    entries = []
    while blob:  # BYTES tensors in binary: each element a 4-byte little-endian length, then its bytes
        (length,) = struct.unpack("<I", blob[:4])
        entries.append(blob[4:4 + length].decode())
        blob = blob[4 + length:]
    assert_classification([entries[:2], entries[2:]], reference(model_repo, 2, rows), 2)


# --- errors ------------------------------------------------------------------------------------

def infer_error(client, request, headers=None, content=None):
    if content is None:
        response = client.post("/v2/models/digits/infer", json=request)
    else:
        response = client.post("/v2/models/digits/infer", content=content, headers=headers)
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_infer_rejects_wrong_shape(client):
    request = {"inputs": [{"name": "image", "shape": [1, 27, 28, 1], "datatype": "FP32", "data": [0.0] * 27 * 28}]}
    assert "must have shape [N, 28, 28, 1]" in infer_error(client, request)


def test_infer_rejects_data_not_matching_shape(client):
    request = {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": [1.0, 2.0]}]}
    assert "2 values for shape" in infer_error(client, request)


def test_infer_rejects_unknown_datatype(client):
    request = {"inputs": [{"name": "image", "shape": [1], "datatype": "COMPLEX", "data": [1]}]}
    assert "unsupported datatype" in infer_error(client, request)


def test_infer_rejects_unknown_input_name(client):
    request = {"inputs": [{"name": "pixels", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": [0.0] * 784}]}
    assert "unknown input 'pixels'" in infer_error(client, request)


def test_infer_rejects_unknown_output_name(client):
    request = {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": [0.0] * 784}],
               "outputs": [{"name": "logits"}]}
    assert "unknown output 'logits'" in infer_error(client, request)


def test_infer_rejects_nan_values(client):
    rows = digits_batch(1)
    rows[0, 0, 0, 0] = np.nan
    body, headers = binary_request(rows)
    assert "NaN or Inf" in infer_error(client, None, headers, body)


def test_infer_rejects_binary_size_mismatch(client):
    rows = digits_batch(1)
    body, headers = binary_request(rows)
    assert "does not fit" in infer_error(client, None, headers, body[:-8])


def test_infer_rejects_header_length_beyond_body(client):
    assert "byte count" in infer_error(client, None, {"Inference-Header-Content-Length": "999999"}, b"{}")


def test_infer_rejects_non_numeric_data(client):
    request = {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": ["a"] * 784}]}
    assert "not a regular array" in infer_error(client, request)


def test_infer_rejects_too_many_rows(app_client_factory, model_repo):
    client = app_client_factory(model_repo, max_request_rows=2)
    body, headers = binary_request(digits_batch(3))
    response = client.post("/v2/models/digits/infer", content=body, headers=headers)
    assert response.status_code == 400
    assert "3 rows exceed the limit of 2" in response.json()["error"]


def test_infer_unknown_version_is_404(client):
    response = client.post("/v2/models/digits/versions/7/infer", json={"inputs": []})
    assert response.status_code == 404
