"""The Open Inference Protocol over gRPC, through Triton's own ``tritonclient.grpc`` (sync and asyncio) against a
real server process, and against in-process apps where a test must hold requests in the queue."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
import tritonclient.http as th
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.support.models import DIGIT_LABELS
from tests.support.oracle import Oracle
from tests.support.server import ServiceProcess, free_port

TOKEN = "grpc-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
TYPED = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
         "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
         "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}


@pytest.fixture(scope="module")
def grpc_repo(tmp_path_factory, bundled_mnist: Path, make_version) -> Path:
    """The bundled mnist (ONNX only) and a tiny model ``digits`` (no config.pbtxt) to unload and load."""
    root = tmp_path_factory.mktemp("grpc-models")
    shutil.copytree(bundled_mnist / "mnist", root / "mnist",
                    ignore=shutil.ignore_patterns("variables", "saved_model.pb", "fingerprint.pb", "report"))
    make_version(root, "digits", 1, (28, 28, 1), DIGIT_LABELS, digit=True, seed=1)
    return root


@pytest.fixture(scope="module")
def grpc_server(grpc_repo: Path):
    port = free_port()
    running = ServiceProcess(grpc_repo, env={"CONVSERVE_GRPC_PORT": str(port), "CONVSERVE_ADMIN_TOKEN": TOKEN})
    running.grpc_url = f"127.0.0.1:{port}"
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(grpc_server):
    c = tg.InferenceServerClient(grpc_server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def digit_rows(grpc_repo: Path, mnist_pngs) -> tuple[np.ndarray, list[int]]:
    """The committed MNIST test digits as the mnist model takes them, MNIST-normalised by the oracle of
    tests/support/oracle.py (not the server's code): [N, 28, 28, 1] float32, and their labels. The one digit
    whose ink touches the edge (0026.png, a border the contract cannot tell from a photo's) is left out, so the
    rows keep the files' order up to it."""
    oracle = Oracle(grpc_repo / "mnist" / "1")
    kept = [mnist_pngs[i] for i in oracle.reproducible([data for data, _ in mnist_pngs])]
    return oracle.rows([data for data, _ in kept]), [int(label) for _, label in kept]


def tensor(x: np.ndarray, datatype: str = "FP32", name: str = "image") -> tg.InferInput:
    inp = tg.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def status_of(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


def test_health_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mnist") and client.is_model_ready("mnist", "1")
    assert not client.is_model_ready("nope")
    metadata = client.get_server_metadata()
    assert metadata.name == "convserve"
    assert {"classification", "model_repository"} <= set(metadata.extensions)


def test_model_metadata_and_config(client):
    metadata = client.get_model_metadata("mnist")
    assert metadata.name == "mnist" and list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("image", "FP32", [-1, 28, 28, 1])]
    assert [(t.name, list(t.shape)) for t in metadata.outputs] == [("probabilities", [-1, 10])]

    config = client.get_model_config("mnist").config  # the bundled config.pbtxt
    assert config.name == "mnist" and config.max_batch_size == 64
    assert [(i.name, list(i.dims)) for i in config.input] == [("image", [28, 28, 1])]
    assert config.output[0].label_filename == "labels.txt"

    built = client.get_model_config("digits").config  # no config.pbtxt: from the runtime
    assert built.name == "digits" and built.platform == "onnxruntime_onnx" and built.max_batch_size > 0
    assert [(i.name, i.data_type, list(i.dims)) for i in built.input] == [("image", 11, [28, 28, 1])]  # TYPE_FP32
    assert [(o.name, list(o.dims)) for o in built.output] == [("probabilities", [10])]


def test_mnist_digits_through_raw_contents_match_rest_v2(client, grpc_server, digit_rows):
    rows, labels = digit_rows
    result = client.infer("mnist", [tensor(rows)], request_id="digits-1")
    probabilities = result.as_numpy("probabilities")
    assert result.get_response().id == "digits-1" and result.get_response().model_version == "1"

    rest = th.InferenceServerClient(grpc_server.url.removeprefix("http://"))
    image = th.InferInput("image", list(rows.shape), "FP32")
    image.set_data_from_numpy(rows)
    expected = rest.infer("mnist", [image]).as_numpy("probabilities")
    rest.close()
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)
    accuracy = np.mean(probabilities.argmax(axis=1) == np.array(labels))
    assert accuracy >= 0.95, accuracy


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_as_raw_and_typed_contents(grpc_server, client, datatype):
    """Pixels of 0 and 1 are exact in every datatype: each gives the FP32 answer, raw and (where the protocol has
    a typed field) as typed contents."""
    x = np.random.default_rng(7).integers(0, 2, (2, 28, 28, 1))
    expected = client.infer("mnist", [tensor(x.astype(np.float32))]).as_numpy("probabilities")
    dtype = {"BOOL": np.bool_, "FP16": np.float16}.get(datatype) or np.dtype(datatype.lower().replace("fp", "float"))
    raw = client.infer("mnist", [tensor(x.astype(dtype), datatype)]).as_numpy("probabilities")
    np.testing.assert_allclose(raw, expected, atol=1e-6)
    if datatype not in TYPED:
        return
    request = service_pb2.ModelInferRequest(model_name="mnist")
    inp = request.inputs.add(name="image", datatype=datatype, shape=x.shape)
    getattr(inp.contents, TYPED[datatype]).extend(x.astype(dtype).ravel().tolist())
    with grpc.insecure_channel(grpc_server.grpc_url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    typed = np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(typed, expected, atol=1e-6)


def test_encoded_images_as_bytes_go_through_image_preprocessing(client, mnist_pngs, digit_rows):
    pngs = np.array([data for data, _ in mnist_pngs[:8]], dtype=np.object_)
    result = client.infer("mnist", [tensor(pngs, "BYTES")])
    expected = client.infer("mnist", [tensor(digit_rows[0][:8])]).as_numpy("probabilities")
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)


def test_classification_extension(client, digit_rows):
    rows = digit_rows[0][:4]
    probabilities = client.infer("mnist", [tensor(rows)]).as_numpy("probabilities")
    result = client.infer("mnist", [tensor(rows)], outputs=[tg.InferRequestedOutput("probabilities", class_count=3)])
    classes = result.as_numpy("probabilities")
    assert classes.shape == (4, 3)
    for row, entries in zip(probabilities, classes):
        parsed = [entry.decode().split(":") for entry in entries]
        assert [int(index) for _, index, _ in parsed] == np.argsort(-row, kind="stable")[:3].tolist()
        assert [label for *_, label in parsed] == [str(int(index)) for _, index, _ in parsed]
        np.testing.assert_allclose([float(score) for score, *_ in parsed], np.sort(row)[::-1][:3], atol=1e-6)


def test_asyncio_client(grpc_server, client, digit_rows):
    rows = digit_rows[0]

    async def scenario():
        async with tga.InferenceServerClient(grpc_server.grpc_url) as aclient:
            assert await aclient.is_server_ready()
            results = await asyncio.gather(*(aclient.infer("mnist", [tensor(rows[i:i + 1])]) for i in range(16)))
            return np.concatenate([r.as_numpy("probabilities") for r in results])

    expected = client.infer("mnist", [tensor(rows[:16])]).as_numpy("probabilities")
    np.testing.assert_allclose(asyncio.run(scenario()), expected, atol=1e-6)


def test_client_mistakes_get_triton_status_codes(client, grpc_server):
    x = np.zeros((1, 28, 28, 1), np.float32)
    cases = {
        "unknown model": (lambda: client.infer("nope", [tensor(x)]), "StatusCode.NOT_FOUND", "model 'nope' not found"),
        "unknown version": (lambda: client.infer("mnist", [tensor(x)], model_version="7"),
                            "StatusCode.NOT_FOUND", "no version 7"),
        "metadata of an unknown model": (lambda: client.get_model_metadata("nope"), "StatusCode.NOT_FOUND", "nope"),
        "config of an unknown model": (lambda: client.get_model_config("nope"), "StatusCode.NOT_FOUND", "nope"),
        "bad shape": (lambda: client.infer("mnist", [tensor(np.zeros((1, 28, 27, 1), np.float32))]),
                      "StatusCode.INVALID_ARGUMENT", "must have shape [N, 28, 28, 1]"),
        "unknown input": (lambda: client.infer("mnist", [tensor(x, name="pixels")]),
                          "StatusCode.INVALID_ARGUMENT", "unknown input 'pixels'"),
        "unknown output": (lambda: client.infer("mnist", [tensor(x)], outputs=[tg.InferRequestedOutput("logits")]),
                           "StatusCode.INVALID_ARGUMENT", "unknown output 'logits'"),
        "not an image": (lambda: client.infer("mnist", [tensor(np.array([b"not a png"], np.object_), "BYTES")]),
                         "StatusCode.INVALID_ARGUMENT", ""),
        "unimplemented RPC": (lambda: client.get_inference_statistics("mnist"), "StatusCode.UNIMPLEMENTED", ""),
    }
    for case, (call, code, fragment) in cases.items():
        status, message = status_of(call)
        assert status == code, (case, status, message)
        assert fragment in message, (case, message)
    assert client.is_server_ready()
    counted = 'convserve_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"}'
    assert grpc_server.metric(counted) >= 4
    assert "ServerLive" not in grpc_server.metrics()  # probes are not traffic


def test_repository_rpcs_need_the_admin_token(client):
    status, message = status_of(lambda: client.get_model_repository_index())
    assert status == "StatusCode.UNAUTHENTICATED" and "Bearer" in message
    status, _ = status_of(lambda: client.unload_model("digits", headers={"authorization": "Bearer wrong"}))
    assert status == "StatusCode.PERMISSION_DENIED"
    assert client.is_model_ready("digits")

    index = client.get_model_repository_index(headers=AUTH)
    assert {(m.name, m.version, m.state) for m in index.models} == {("mnist", "1", "READY"), ("digits", "1", "READY")}
    client.unload_model("digits", headers=AUTH)
    assert not client.is_model_ready("digits")
    assert status_of(lambda: client.infer("digits", [tensor(np.zeros((1, 28, 28, 1), np.float32))]))[0] \
        == "StatusCode.NOT_FOUND"
    client.load_model("digits", headers=AUTH)
    assert client.is_model_ready("digits")
    status, message = status_of(lambda: client.load_model("../etc", headers=AUTH))
    assert status == "StatusCode.INVALID_ARGUMENT" and "invalid model name" in message


# --- In-process apps, where a test holds requests in the queue ----------------------------------

def record_batches(app_client, model="digits", version=2) -> list[int]:
    """The rows of each batch that one version executes from now on."""
    batcher = app_client.app.state.dataplane.repository.get(model, version).batcher
    original, batches = batcher._predict, []

    def recorded(rows):
        batches.append(len(rows))
        return original(rows)

    batcher._predict = recorded
    return batches


def raw_infer_request(x: np.ndarray, model: str = "digits") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


def test_overload_is_unavailable_and_a_deadline_passed_in_the_queue_is_deadline_exceeded(app_client_factory,
                                                                                        model_repo, on_loop):
    # The first request fills one of the queue's two rows while it waits 0.8 s for company; the second, whose
    # client gives up after 0.3 s, fills the other; the third finds the queue full. Waiting for company holds no
    # thread and no loop, so the story is the same with batches on the loop, which no test could hold still.
    port = free_port()
    app = app_client_factory(model_repo, grpc_port=port, max_batch_size=3, max_queue_size=2,
                             max_queue_delay_us=800_000, inference_on_loop=on_loop)
    batcher = app.app.state.dataplane.repository.get("digits", 2).batcher
    batches = record_batches(app)
    x = np.zeros((1, 28, 28, 1), np.float32)

    async def queued(rows: int) -> None:
        while batcher.queued_rows < rows:
            await asyncio.sleep(0.01)

    async def scenario():
        async with tga.InferenceServerClient(f"127.0.0.1:{port}") as aclient, \
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            first = asyncio.ensure_future(aclient.infer("digits", [tensor(x)]))
            await asyncio.wait_for(queued(1), 0.5)
            expiring = asyncio.ensure_future(aclient.infer("digits", [tensor(x)], client_timeout=0.3))
            await asyncio.wait_for(queued(2), 0.25)
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # raw gRPC: tritonclient drops trailing metadata
                await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(raw_infer_request(x))
            with pytest.raises(InferenceServerException) as expired:
                await expiring
            await first
            return expired.value, refused.value

    expired, refused = asyncio.run(scenario())
    assert expired.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "overloaded" in refused.details()
    assert ("retry-after", "1") in tuple(refused.trailing_metadata())  # as REST's Retry-After
    assert batches == [1]  # the expired request never ran


def test_a_grpc_and_a_rest_request_share_one_batch(app_client_factory, model_repo, on_loop):
    """Both protocols go through the one data plane into the version's one queue: while a request over one
    waits for company, a request over the other joins its batch, and each gets its own rows back."""
    port = free_port()
    app = app_client_factory(model_repo, grpc_port=port, max_batch_size=2, max_queue_delay_us=500_000,
                             inference_on_loop=on_loop)
    batches = record_batches(app)
    rng = np.random.default_rng(17)
    over_rest, over_grpc = (rng.integers(0, 256, (1, 28, 28, 1)).astype(np.float32) for _ in range(2))
    rest_body = {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32",
                             "data": over_rest.ravel().tolist()}]}
    with tg.InferenceServerClient(f"127.0.0.1:{port}") as grpc_client, ThreadPoolExecutor(2) as pool:
        rest_call = pool.submit(app.post, "/v2/models/digits/infer", json=rest_body)
        grpc_call = pool.submit(grpc_client.infer, "digits", [tensor(over_grpc)])
        rest_response, grpc_result = rest_call.result(), grpc_call.result()
    assert batches == [2]  # one batch held both
    assert rest_response.status_code == 200, rest_response.text
    session = ort.InferenceSession(str(model_repo / "digits" / "2" / "model.onnx"))
    np.testing.assert_allclose(rest_response.json()["outputs"][0]["data"],
                               session.run(None, {"image": over_rest})[0].ravel(), atol=1e-6)
    np.testing.assert_allclose(grpc_result.as_numpy("probabilities"), session.run(None, {"image": over_grpc})[0],
                               atol=1e-6)


def test_repository_rpcs_are_off_without_a_token(app_client_factory, model_repo):
    port = free_port()
    app_client_factory(model_repo, grpc_port=port)
    with tg.InferenceServerClient(f"127.0.0.1:{port}") as c:
        status, message = status_of(lambda: c.get_model_repository_index(headers=AUTH))
        assert status == "StatusCode.PERMISSION_DENIED" and "CONVSERVE_ADMIN_TOKEN" in message
        status, _ = status_of(lambda: c.load_model("digits", headers=AUTH))
        assert status == "StatusCode.PERMISSION_DENIED"
        assert c.is_model_ready("digits")


def test_a_second_instance_on_the_same_grpc_port_is_refused_and_the_first_keeps_serving(grpc_server, grpc_repo):
    """The workers share the gRPC port (SO_REUSEPORT); an unrelated instance must not quietly share it too."""
    port = grpc_server.grpc_url.rsplit(":", 1)[1]
    second = subprocess.run([sys.executable, "-m", "service", "--models-dir", str(grpc_repo), "--host", "127.0.0.1",
                             "--port", str(free_port()), "--grpc-port", port],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    (line,) = second.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"error: CONVSERVE_GRPC_PORT: cannot bind 127.0.0.1:{port}: "), line
    assert line.endswith("(another process holds it)"), line
    for _ in range(8):  # new connections, each one to the first instance's workers
        with tg.InferenceServerClient(grpc_server.grpc_url) as c:
            assert c.is_server_ready() and c.is_model_ready("digits")
    assert grpc_server.alive()


def test_grpc_port_setting(monkeypatch):
    from service.__main__ import parse_args
    from service.settings import Settings

    monkeypatch.delenv("CONVSERVE_GRPC_PORT")
    assert Settings().grpc_port == 8001  # Triton's
    monkeypatch.setenv("CONVSERVE_GRPC_PORT", "0")
    assert Settings().grpc_port == 0  # off
    assert parse_args(["--grpc-port", "9001"]).grpc_port == 9001
