"""One request path: every output by name, outputs the service refuses at load, config.pbtxt through
protobuf, and the inference routes behaving as ordinary routes of the one router."""

from __future__ import annotations

import json
import struct

import numpy as np
import onnxruntime as ort
import pytest
from fastapi import Query
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from onnx import TensorProto, helper
from starlette.requests import Request

from service.app import create_app
from service.rest.routing import InferenceRoute
from tests.service.conftest import make_settings
from tests.support.models import DIGIT_LABELS, tiny_classifier, two_output_classifier, write_model

SHAPE = (28, 28, 1)


@pytest.fixture()
def two_outputs(tmp_path):
    model = two_output_classifier(*SHAPE, seed=3)
    write_model(tmp_path, "two", 1, model, {"labels": DIGIT_LABELS, "digit": True})
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return tmp_path, session


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, *SHAPE)).astype(np.float32)


def test_v2_answers_each_requested_output_with_its_own_data_shape_and_datatype(two_outputs, app_client_factory):
    models_dir, session = two_outputs
    client = app_client_factory(models_dir)
    x = _image(1)
    expected_probabilities, expected_ink = session.run(["probabilities", "ink"], {"image": x})
    body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "ink"}, {"name": "probabilities"}]}
    response = client.post("/v2/models/two/infer", json=body)
    assert response.status_code == 200, response.text
    ink, probabilities = response.json()["outputs"]
    assert ink == {"name": "ink", "datatype": "INT64", "shape": [1, 1], "data": [int(expected_ink[0, 0])]}
    assert probabilities["name"] == "probabilities" and probabilities["datatype"] == "FP32"
    assert probabilities["shape"] == [1, 10]
    np.testing.assert_allclose(probabilities["data"], expected_probabilities.ravel(), atol=1e-6)


def test_v2_binary_outputs_keep_each_outputs_datatype(two_outputs, app_client_factory):
    models_dir, session = two_outputs
    client = app_client_factory(models_dir)
    x = _image(2)
    expected_probabilities, expected_ink = session.run(["probabilities", "ink"], {"image": x})
    header = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    response = client.post("/v2/models/two/infer", content=header + x.astype("<f4").tobytes(),
                           headers={"Inference-Header-Content-Length": str(len(header)),
                                    "Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    entries = {o["name"]: o for o in json.loads(response.content[:length])["outputs"]}  # no outputs asked: all
    assert set(entries) == {"ink", "probabilities"}
    blobs, offset = {}, length
    for entry in json.loads(response.content[:length])["outputs"]:
        size = entry["parameters"]["binary_data_size"]
        blobs[entry["name"]] = response.content[offset:offset + size]
        offset += size
    assert entries["ink"]["datatype"] == "INT64" and len(blobs["ink"]) == 8
    assert struct.unpack("<q", blobs["ink"])[0] == int(expected_ink[0, 0])
    np.testing.assert_allclose(np.frombuffer(blobs["probabilities"], "<f4"), expected_probabilities.ravel(), atol=1e-6)


def test_image_and_tf_serving_routes_use_the_probabilities_output(two_outputs, app_client_factory):
    models_dir, session = two_outputs
    client = app_client_factory(models_dir)
    x = _image(3)
    expected = session.run(["probabilities"], {"image": x})[0][0]
    tf = client.post("/v1/models/two:predict", json={"instances": x.tolist()})
    assert tf.status_code == 200, tf.text
    np.testing.assert_allclose(tf.json()["predictions"][0], expected, atol=1e-6)
    listing = client.get("/models").json()["models"][0]
    assert listing["output"] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    metadata = client.get("/v2/models/two").json()
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "ink"]


def test_the_probabilities_output_may_be_named_in_metadata(tmp_path, app_client_factory):
    model = two_output_classifier(*SHAPE, probabilities="scores")
    write_model(tmp_path, "named", 1, model, {"labels": DIGIT_LABELS, "output": {"name": "scores"}})
    client = app_client_factory(tmp_path)
    assert client.get("/models").json()["models"][0]["output"]["name"] == "scores"
    x = _image(4)
    response = client.post("/v1/models/named:predict", json={"instances": x.tolist()})
    assert response.status_code == 200 and len(response.json()["predictions"][0]) == 10


def _extra_output(output_type: int, shape: list, name: str = "extra") -> object:
    model = tiny_classifier(*SHAPE)
    model.graph.node.append(helper.make_node("Shape", ["image"], [name]))
    if output_type != TensorProto.INT64:
        model.graph.node[-1].output[0] = "shape_raw"
        model.graph.node.append(helper.make_node("Cast", ["shape_raw"], [name], to=output_type))
    model.graph.output.append(helper.make_tensor_value_info(name, output_type, shape))
    return model


@pytest.mark.parametrize("model, fragment", [
    (two_output_classifier(*SHAPE, probabilities="scores"),
     "cannot tell which of the outputs ['ink', 'scores'] holds the class probabilities"),
    (_extra_output(TensorProto.INT64, [4]), "outputs the service cannot serve: extra (INT64 [4])"),
    (_extra_output(TensorProto.STRING, [4]), "outputs the service cannot serve: extra (BYTES [4])"),
])
def test_outputs_the_service_cannot_serve_are_refused_at_load_by_name(tmp_path, app_client_factory, model, fragment):
    write_model(tmp_path, "odd", 1, model, {"labels": DIGIT_LABELS})
    client = app_client_factory(tmp_path)
    (entry,) = client.get("/models").json()["models"]
    assert entry["versions"][0]["state"] == "FAILED"
    assert fragment in entry["versions"][0]["error"]
    ready = client.get("/v2/models/odd/versions/1/ready")
    assert ready.status_code == 503
    assert ready.json()["state"] == "FAILED" and fragment in ready.json()["reason"]


def test_a_malformed_config_pbtxt_marks_the_model_failed_with_the_parsers_message(tmp_path, make_version,
                                                                                 app_client_factory):
    make_version(tmp_path, "m", 1, SHAPE, DIGIT_LABELS, digit=True)
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"\nmax_batch_size: lots\n')
    client = app_client_factory(tmp_path)
    (entry,) = client.get("/models").json()["models"]
    assert entry["default_version"] is None
    assert entry["error"].startswith("config.pbtxt is malformed: 2:")
    assert entry["versions"] == [{"version": 1, "state": "FAILED", "error": entry["error"]}]
    assert client.get("/v2/models/m/ready").status_code == 503
    assert client.get("/v2/health/ready").status_code == 503


def test_a_config_broken_after_load_keeps_the_loaded_version_serving(tmp_path, make_version, app_client_factory):
    make_version(tmp_path, "m", 1, SHAPE, DIGIT_LABELS, digit=True)
    client = app_client_factory(tmp_path, admin_token="t")
    (tmp_path / "m" / "config.pbtxt").write_text("max_batch_size: {\n")
    index = client.post("/v2/repository/index", headers={"Authorization": "Bearer t"})
    assert index.status_code == 200
    (entry,) = client.get("/models").json()["models"]
    assert entry["default_version"] == 1 and "config.pbtxt is malformed" in entry["error"]
    assert client.get("/v2/models/m/ready").status_code == 200


def test_commented_out_config_lines_do_not_change_the_batching(tmp_path, make_version, app_client_factory, capfd):
    make_version(tmp_path, "m", 1, SHAPE, DIGIT_LABELS, digit=True)
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"\nmax_batch_size: 64\n# max_batch_size: 1\n'
                                                 "dynamic_batching { }\n")
    app_client_factory(tmp_path, max_batch_size=8)
    logs = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    (loaded,) = [r for r in logs if r["msg"] == "model version loaded"]  # the effective settings, logged once
    assert (loaded["max_batch_size"], loaded["sources"]["max_batch_size"]) == (8, "environment")
    assert loaded["sources"]["version_policy"] == "default"


# --- the inference routes are ordinary routes ---------------------------------------------------

def _with_plain_routes(app):
    """The same app with FastAPI's own route class for every InferenceRoute."""
    routes = app.router.routes
    for i, route in enumerate(routes):
        if isinstance(route, InferenceRoute):
            routes[i] = APIRoute(route.path, route.endpoint, methods=route.methods, name=route.name,
                                 response_model=None, include_in_schema=route.include_in_schema)
    return app


REQUESTS = [
    ("POST", "/v2/models/m/infer", {"json": {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32",
                                                           "data": [7.0] * 784}]}}),
    ("POST", "/v2/models/m/infer", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    ("POST", "/v2/models/nope/infer", {"json": {}}),
    ("POST", "/v2/models/m/versions/9/infer", {"json": {}}),
    ("POST", "/v1/models/m:predict", {"json": {"instances": [[[[1.0]] * 28] * 28]}}),
    ("POST", "/v1/models/m:predict", {"json": {"instances": "x"}}),
    ("POST", "/models/m/predict", {"content": b"not an image", "headers": {"content-type": "image/png"}}),
    ("POST", "/models/m/predict?top_k=0", {"content": b"x", "headers": {"content-type": "image/png"}}),
    ("GET", "/v2/models/m", {}),
    ("GET", "/v2/models/m/versions/1/ready", {}),
    ("GET", "/models", {}),
]


def test_inference_routes_answer_exactly_as_plain_fastapi_routes(tmp_path, make_version):
    make_version(tmp_path, "m", 1, SHAPE, DIGIT_LABELS, digit=True)
    with TestClient(create_app(make_settings(tmp_path))) as lean, \
            TestClient(_with_plain_routes(create_app(make_settings(tmp_path)))) as plain:
        for method, path, kwargs in REQUESTS:
            a, b = lean.request(method, path, **kwargs), plain.request(method, path, **kwargs)
            assert (a.status_code, a.content) == (b.status_code, b.content), path
            assert a.headers.get("content-type") == b.headers.get("content-type")
            assert "x-request-id" in a.headers  # the middleware ran on the lean routes too


def test_inference_routes_go_through_the_apps_middleware_and_exception_handlers(tmp_path, make_version):
    make_version(tmp_path, "m", 1, SHAPE, DIGIT_LABELS, digit=True)
    app = create_app(make_settings(tmp_path))

    @app.exception_handler(ZeroDivisionError)
    async def teapot(request, exc):  # an app-level handler added after the routes
        from starlette.responses import JSONResponse
        return JSONResponse({"error": "teapot"}, status_code=418)

    async def divide(request: Request, name: str):
        raise ZeroDivisionError

    app.router.routes.insert(0, InferenceRoute("/models/{name}/divide", divide, methods=["POST"]))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/models/m/divide")
        assert (response.status_code, response.json()) == (418, {"error": "teapot"})
        assert "x-request-id" in response.headers
        metrics = client.get("/metrics").text
        assert 'convserve_http_requests_total{method="POST",route="/models/{name}/divide",status="418"} 1.0' in metrics


def test_an_inference_route_refuses_parameters_it_would_not_parse():
    async def with_query(request: Request, name: str, k: int = Query(1)):
        raise AssertionError

    async def without_request(name: str):
        return None

    with pytest.raises(TypeError, match="takes only `request` and path parameters"):
        InferenceRoute("/x/{name}", with_query, methods=["POST"])
    InferenceRoute("/y/{name}", without_request, methods=["GET"])  # no request parameter is fine
