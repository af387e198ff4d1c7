"""End to end against a real ``python -m service`` process on a loopback port."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support.checks import assert_classification


@pytest.fixture(scope="module")
def triton_client(server):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


def test_tritonclient_health_and_readiness(triton_client):
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("digits")
    assert triton_client.is_model_ready("digits", "1")
    assert not triton_client.is_model_ready("nope")


def test_tritonclient_server_and_model_metadata(triton_client):
    assert triton_client.get_server_metadata()["name"] == "convserve"
    metadata = triton_client.get_model_metadata("digits")
    assert metadata["inputs"][0]["name"] == "image"
    assert metadata["outputs"][0]["shape"] == [-1, 10]


def test_tritonclient_infer_batch_with_binary_defaults(triton_client, model_repo):
    import onnxruntime as ort

    x = np.random.default_rng(5).integers(0, 256, (8, 28, 28, 1)).astype(np.float32)
    image = triton.InferInput("image", list(x.shape), "FP32")
    image.set_data_from_numpy(x)  # binary_data=True is the client's default
    result = triton_client.infer("digits", [image])
    expected = ort.InferenceSession(str(model_repo / "digits" / "2" / "model.onnx")).run(None, {"image": x})[0]
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    assert result.get_response()["model_version"] == "2"


def test_tritonclient_infer_json_and_classification_on_a_version(triton_client, model_repo):
    import onnxruntime as ort

    x = np.random.default_rng(6).integers(0, 256, (2, 28, 28, 1)).astype(np.float32)
    image = triton.InferInput("image", list(x.shape), "FP32")
    image.set_data_from_numpy(x, binary_data=False)
    output = triton.InferRequestedOutput("probabilities", binary_data=True, class_count=3)
    result = triton_client.infer("digits", [image], model_version="1", outputs=[output])
    classes = result.as_numpy("probabilities")
    assert classes.shape == (2, 3)
    expected = ort.InferenceSession(str(model_repo / "digits" / "1" / "model.onnx")).run(None, {"image": x})[0]
    assert_classification([[entry.decode() for entry in row] for row in classes], expected, 3)


def test_tritonclient_sees_errors_as_exceptions_with_messages(triton_client):
    image = triton.InferInput("image", [1, 3], "FP32")
    image.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException, match="must have shape"):
        triton_client.infer("digits", [image])
    with pytest.raises(InferenceServerException, match="not found"):
        triton_client.infer("nope", [image])


def test_real_server_multipart_upload(server, mnist_pngs):
    response = httpx.post(f"{server.url}/models/digits/predict",
                          files={"file": ("digit.png", mnist_pngs[0][0], "image/png")})
    assert response.status_code == 200
    assert response.json()["predictions"][0]["top_k"][0]["label"] in [str(i) for i in range(10)]


def test_real_server_tfserving_and_metrics(server):
    response = httpx.post(f"{server.url}/v1/models/digits:predict", json={"instances": [[[[0.0]] * 28] * 28]})
    assert response.status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'convserve_http_requests_total{method="POST",route="/v1/models/{name}:predict",status="200"}' in metrics


def test_real_server_logs_json_lines_with_request_ids(server):
    httpx.get(f"{server.url}/models", headers={"x-request-id": "e2e-log-check"})

    def entries():  # the line is written just after the response is sent: poll briefly
        lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
        return [e for e in lines if e.get("request_id") == "e2e-log-check"]

    deadline = time.monotonic() + 5
    while not entries() and time.monotonic() < deadline:
        time.sleep(0.05)
    [entry] = entries()
    assert entry["route"] == "/models" and entry["status"] == 200 and entry["level"] == "info"
    assert entry["duration_ms"] > 0


def test_real_server_survives_garbage_and_keeps_answering(server):
    for body in (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, b"GIF89a" + b"\xff" * 50, b"\xff\xd8\xff" + b"\0" * 10):
        response = httpx.post(f"{server.url}/models/digits/predict", content=body,
                              headers={"content-type": "image/png"})
        assert response.status_code == 400
        assert set(response.json()) == {"error"}
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200


def test_bundled_mnist_model_classifies_real_digits(bundled_server, mnist_pngs):
    files = [("files", (f"{i}.png", img, "image/png")) for i, (img, _) in enumerate(mnist_pngs)]
    response = httpx.post(f"{bundled_server.url}/models/mnist/predict", files=files, timeout=30)
    assert response.status_code == 200
    predicted = [p["class_id"] for p in response.json()["predictions"]]
    correct = sum(p == label for p, (_, label) in zip(predicted, mnist_pngs))
    assert correct >= len(mnist_pngs) - 1


@pytest.mark.parametrize("access_log", ["true", "false"])
def test_access_log_setting_alone_decides_request_lines_whatever_the_log_level(server_factory, model_repo, access_log):
    running = server_factory(model_repo, CONVSERVE_LOG_LEVEL="warning", CONVSERVE_ACCESS_LOG=access_log)
    assert httpx.get(f"{running.url}/models", headers={"x-request-id": "level-check"}).status_code == 200
    running.stop()  # the process has exited: every line it wrote is in its log
    lines = [json.loads(line) for line in running.output().splitlines() if line.startswith("{")]
    requests = [e for e in lines if e.get("request_id") == "level-check"]
    if access_log == "true":
        [entry] = requests
        assert (entry["route"], entry["status"], entry["level"]) == ("/models", 200, "info")
    else:
        assert requests == []
    assert not [e for e in lines if e["level"] == "info" and e["logger"].startswith("service.")
                and e["logger"] != "service.access"]  # warning still hides the service's own info lines
