"""Security properties on real server processes: the admin API is off by default and token-protected when on,
models come only from the models directory (never from a request, never from files outside a version's
directory), nothing unsafe is deserialised, and client-visible text carries no trace of the host."""

from __future__ import annotations

import errno
import inspect
import json
import os
import re
from pathlib import Path

import httpx
import onnx
import pytest
from onnx import numpy_helper
from onnx.external_data_helper import set_external_data

import service
from service import grpc_api
from service.dataplane import DataPlane
from service.rest import repository as repository_api

TOKEN = "s3cret-admin-token"
ADMIN_ROUTES = ["/v2/repository/index", "/v2/repository/models/mnist/load", "/v2/repository/models/mnist/unload"]


@pytest.fixture(scope="module")
def admin_server(request, start_server, models_root):
    return start_server(models_root, stop_with=request, CONVSERVE_ADMIN_TOKEN=TOKEN)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# --- The repository (admin) API ----------------------------------------------------------------

@pytest.mark.parametrize("path", ADMIN_ROUTES)
def test_admin_api_is_off_by_default_with_403(path, http, server, assert_error, assert_still_serving):
    response = http.post(path, headers=bearer("anything"))
    assert_error(response, 403, "the repository API is off; set CONVSERVE_ADMIN_TOKEN to enable it")
    assert_still_serving(server)


@pytest.mark.parametrize("path", ADMIN_ROUTES)
def test_admin_api_without_a_token_is_401(path, admin_server, assert_error, assert_still_serving):
    response = httpx.post(f"{admin_server.url}{path}")
    assert_error(response, 401, "the repository API needs an 'Authorization: Bearer <token>' header")
    assert response.headers["www-authenticate"] == "Bearer"
    assert_still_serving(admin_server)


@pytest.mark.parametrize("token", ["wrong", TOKEN[:-1], TOKEN + "x", TOKEN.upper(), "x" * 4096])
def test_admin_api_with_a_wrong_token_is_403(token, admin_server, assert_error, assert_still_serving):
    response = httpx.post(f"{admin_server.url}/v2/repository/index", headers=bearer(token))
    assert_error(response, 403, "wrong admin token")
    assert_still_serving(admin_server)


def test_admin_api_with_another_auth_scheme_is_401(admin_server, assert_error, assert_still_serving):
    response = httpx.post(f"{admin_server.url}/v2/repository/index", headers={"authorization": f"Basic {TOKEN}"})
    assert_error(response, 401, "Authorization: Bearer <token>")
    assert_still_serving(admin_server)


def test_admin_api_with_the_token_answers(admin_server, assert_still_serving):
    response = httpx.post(f"{admin_server.url}/v2/repository/index", headers=bearer(TOKEN))
    assert response.status_code == 200
    assert {(e["name"], e["state"]) for e in response.json()} == {("mnist", "READY"), ("tiny", "READY")}
    assert_still_serving(admin_server)


def test_admin_token_is_compared_in_constant_time():
    # one check for both protocols: REST's authorize and the gRPC repository RPCs call DataPlane.authorize_admin
    assert "authorize_admin(" in inspect.getsource(repository_api.authorize)
    assert "authorize_admin(" in inspect.getsource(grpc_api.InferenceServicer._authorize)
    source = inspect.getsource(DataPlane.authorize_admin)
    assert "hmac.compare_digest(" in source
    assert not re.search(r"(supplied|token\b[^\n]*)\s*[!=]=", source), "the token must not be compared with =="


@pytest.mark.parametrize("parameters", [
    {"config": json.dumps({"backend": "onnxruntime"})},
    {"file:1/model.onnx": "AAAA"},
    {"uri": "http://example.com/model.onnx"},
    {"path": "/tmp/model.onnx"},
], ids=["config", "file", "url", "path"])
def test_repository_load_refuses_configs_files_urls_and_paths_in_the_request(
        parameters, admin_server, assert_error, assert_still_serving):
    response = httpx.post(f"{admin_server.url}/v2/repository/models/mnist/load", headers=bearer(TOKEN),
                          json={"parameters": parameters})
    assert_error(response, 400, "load and unload take no parameters: models are only read from the model repository")
    assert_still_serving(admin_server)


@pytest.mark.parametrize(("name", "status", "error"), [
    (".hidden", 400, "invalid model name '.hidden'"),
    ("%2e%2e", 400, "invalid model name '..'"),
    ("a%20b", 400, "invalid model name 'a b'"),
    ("file:..", 400, "invalid model name 'file:..'"),
    ("..", 404, "Not Found"),  # the client resolves it: /v2/repository/load
    ("..%2Foutside", 404, "Not Found"),  # a '/' in a name never matches a route
    ("%2Ftmp", 404, "Not Found"),
    ("http:%2F%2Fexample.com", 404, "Not Found"),
])
def test_repository_load_refuses_names_that_are_paths_or_urls(name, status, error, admin_server, assert_error,
                                                              assert_still_serving):
    response = httpx.post(f"{admin_server.url}/v2/repository/models/{name}/load", headers=bearer(TOKEN))
    assert_error(response, status, error)
    assert_still_serving(admin_server)


def test_repository_load_of_a_model_outside_the_models_directory_is_404(admin_server, models_root, write_tiny,
                                                                        assert_error, assert_still_serving):
    if not (models_root.parent / "outside").exists():
        write_tiny(models_root.parent, "outside", 1)
    response = httpx.post(f"{admin_server.url}/v2/repository/models/outside/load", headers=bearer(TOKEN))
    assert_error(response, 404, "no model directory 'outside' in the model repository")
    assert httpx.get(f"{admin_server.url}/v2/models/outside").status_code == 404
    assert_still_serving(admin_server)


# --- What the service loads and how ------------------------------------------------------------

UNSAFE = {
    "pickle": re.compile(r"\bc?pickle\b"),
    "Keras unsafe mode": re.compile(r"safe_mode\s*=\s*False"),
    "eval": re.compile(r"(?<![\w.])eval\("),
    "exec": re.compile(r"(?<![\w.])exec\("),
    "numpy allow_pickle": re.compile(r"allow_pickle\s*=\s*True"),
    "yaml.load": re.compile(r"yaml\.(unsafe_)?load\("),
    "marshal": re.compile(r"\bmarshal\b"),
    "shell": re.compile(r"shell\s*=\s*True|os\.system\("),
}


def test_service_source_has_no_pickle_eval_or_unsafe_deserialisation():
    package = Path(service.__file__).parent
    sources = sorted(package.rglob("*.py"))
    assert len(sources) > 10
    found = [f"{path.relative_to(package)}:{n}: {what}" for path in sources
             for n, line in enumerate(path.read_text().splitlines(), 1)
             for what, pattern in UNSAFE.items() if pattern.search(line)]
    assert found == []


def external_data_model(directory: Path, location: str, tiny_onnx) -> None:
    """The tiny model with its weights moved to external data at ``location`` (relative to ``directory``);
    the weights file itself is written only where it is inside ``directory`` and not there yet."""
    directory.mkdir(parents=True, exist_ok=True)
    model = tiny_onnx(seed=3)
    tensor = next(t for t in model.graph.initializer if t.name == "weights")
    weights = numpy_helper.to_array(tensor).astype("<f4").tobytes()
    set_external_data(tensor, location=location, offset=0, length=len(weights))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    if not location.startswith(("/", "..")) and not (directory / location).exists():
        (directory / location).write_bytes(weights)
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    metadata = {"labels": [str(i) for i in range(10)], "digit": True,
                "input": {"name": "image", "datatype": "FP32", "shape": [-1, 28, 28, 1]}}
    (directory / "metadata.json").write_text(json.dumps(metadata))


@pytest.fixture()
def escape_repo(tmp_path, tiny_onnx, write_tiny):
    """``escape``: version 1 is a plain tiny model; 2 keeps its weights in a file beside it (allowed); 3, 4 and 5
    point their external data outside their version directory: ``../../../secret.bin``, an absolute path, and a
    symlink inside the directory that leads out. The secret is a FIFO: opening it for reading would block until
    a writer came, so a version that finished loading (or failing) cannot have opened it."""
    root = tmp_path / "models"
    secret = tmp_path / "secret.bin"
    os.mkfifo(secret)
    write_tiny(root, "escape", 1)
    external_data_model(root / "escape" / "2", "weights.bin", tiny_onnx)
    external_data_model(root / "escape" / "3", "../../../secret.bin", tiny_onnx)
    external_data_model(root / "escape" / "4", str(secret), tiny_onnx)
    (root / "escape" / "5").mkdir(parents=True)
    (root / "escape" / "5" / "weights.bin").symlink_to(secret)
    external_data_model(root / "escape" / "5", "weights.bin", tiny_onnx)
    (root / "escape" / "config.pbtxt").write_text("version_policy: { all: {} }\n")
    yield root, secret
    try:  # had a loader opened the FIFO it would hang there: let it go (the test has failed already)
        os.close(os.open(secret, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def fifo_has_a_reader(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as exc:
        assert exc.errno == errno.ENXIO
        return False
    return True


def test_onnx_external_data_outside_the_version_directory_is_refused_and_never_read(
        request, escape_repo, start_server, no_internals, digits):
    root, secret = escape_repo
    server = start_server(root, stop_with=request)
    versions = {v["version"]: v for v in httpx.get(f"{server.url}/models").json()["models"][0]["versions"]}
    assert versions[1]["state"] == versions[2]["state"] == "READY"
    for version in (3, 4, 5):
        assert versions[version]["state"] == "FAILED"
        assert "External data path validation failed" in versions[version]["error"]
        no_internals(versions[version]["error"], str(root), str(root.parent))
    assert "escapes model directory" in versions[3]["error"]
    assert "Absolute path not allowed" in versions[4]["error"]
    assert "escapes model directory" in versions[5]["error"]
    assert not fifo_has_a_reader(secret)
    for version in (3, 4, 5):
        response = httpx.post(f"{server.url}/models/escape/versions/{version}/predict", content=digits[0][0],
                              headers={"content-type": "image/png"})
        assert response.status_code == 503
        assert f"model 'escape' version {version} is not ready (failed to load: " in response.json()["error"]
    tf_status = httpx.get(f"{server.url}/v1/models/escape").json()["model_version_status"]
    for entry in tf_status:
        no_internals(entry["status"]["error_message"], str(root), str(root.parent))
    ok = httpx.post(f"{server.url}/models/escape/versions/2/predict", content=digits[0][0],
                    headers={"content-type": "image/png"})
    assert ok.status_code == 200


# --- What clients see --------------------------------------------------------------------------

HOSTILE = [
    ("POST", "/models/mnist/predict", {"content": b"\x89PNG garbage", "headers": {"content-type": "image/png"}}),
    ("POST", "/models/mnist/predict", {"content": b"{", "headers": {"content-type": "application/json"}}),
    ("POST", "/v2/models/mnist/infer", {"content": b'{"inputs": [{"name": "image", "shape": [2, 2], '
                                                   b'"datatype": "FP32", "data": [1, 2, 3]}]}'}),
    ("POST", "/v1/models/mnist:predict", {"content": b'{"instances": [[1, [2]]]}'}),
    ("GET", "/v2/models/nope", {}),
    ("GET", "/v2/models/mnist/versions/99", {}),
    ("GET", "/v1/models/..%2F..%2Fetc", {}),
    ("GET", "/static/..%2F__init__.py", {}),
    ("DELETE", "/models", {}),
    ("POST", "/v2/repository/index", {}),
    ("GET", "/nope" * 100, {}),
]


def test_no_error_body_carries_a_traceback_or_an_internal_path(http, server, models_root, no_internals,
                                                               assert_still_serving):
    for method, path, kwargs in HOSTILE:
        response = http.request(method, path, **kwargs)
        assert 400 <= response.status_code < 500, (path, response.status_code)
        assert set(response.json()) == {"error"}
        no_internals(response.text, str(models_root), str(models_root.parent))
    assert_still_serving(server)


def test_model_listings_carry_no_internal_path(http, server, models_root, no_internals, assert_still_serving):
    for path in ("/models", "/v2/models/mnist", "/v1/models/mnist", "/v1/models/mnist/metadata", "/openapi.json"):
        response = http.get(path)
        assert response.status_code == 200
        no_internals(response.text, str(models_root), str(models_root.parent))
    assert_still_serving(server)


def test_responses_carry_no_server_header(http, server, assert_still_serving):
    for method, path in (("GET", "/"), ("GET", "/v2"), ("GET", "/metrics"), ("GET", "/nope"),
                         ("POST", "/v2/models/mnist/infer")):
        response = http.request(method, path)
        assert "server" not in response.headers, (path, response.headers)
        assert "x-powered-by" not in response.headers
    assert_still_serving(server)


def test_web_page_is_served_with_nosniff_and_a_same_origin_content_security_policy(http, server,
                                                                                    assert_still_serving):
    response = http.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert_still_serving(server)


def test_errors_are_json_not_sniffable_html(http, server, assert_still_serving):
    response = http.get("/v2/models/<img src=x onerror=alert(1)>")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "model '<img src=x onerror=alert(1)>' not found"}
    assert_still_serving(server)


def test_the_service_starts_only_its_workers(server, assert_still_serving):
    """On the defaults: a supervisor and one worker per usable CPU (and multiprocessing's resource tracker);
    nothing a request could make it start."""
    from service.settings import available_cpus

    children = [c for task in os.listdir(f"/proc/{server.pid}/task")
                for c in Path(f"/proc/{server.pid}/task/{task}/children").read_text().split()]
    commands = [Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode() for c in children]
    workers = [c for c in commands if "spawn_main" in c]
    assert len(workers) == available_cpus(), commands
    assert all("spawn_main" in c or "resource_tracker" in c for c in commands), commands
    assert_still_serving(server)


def test_the_loopback_default_and_the_admin_api_off_are_the_settings_defaults(monkeypatch):
    from service.settings import Settings

    for name in ("CONVSERVE_HOST", "CONVSERVE_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.admin_token is None

