"""OpenTelemetry traces (``CONVSERVE_TRACING=true``, service/tracing.py): the span tree of a request on every
protocol, the batch's span linked to each request in it, W3C propagation, error status, exemplars, logs, and the
export itself: OTLP/HTTP from a real server process with two workers to a receiver here that decodes the
protobuf, and OTLP/gRPC to a real gRPC receiver. Off, nothing is traced and the SDK is not even imported."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from PIL import Image

from service import tracing
from service.app import create_app
from tests.service.conftest import make_settings
from tests.support.models import DIGIT_LABELS
from tests.support.server import REPO_ROOT, ServiceProcess, free_port
from tests.support.waiting import wait_for

MODES = [pytest.param(True, id="batches-on-the-loop"), pytest.param(False, id="batches-on-a-thread")]


def png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def traceparent() -> tuple[str, str, str]:
    """A caller's ``traceparent`` (sampled), its trace id and its span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def hex_trace(span: ReadableSpan) -> str:
    return format(span.context.trace_id, "032x")


def by_name(spans: list[ReadableSpan], trace_id: str) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        if hex_trace(span) == trace_id:
            found.setdefault(span.name, []).append(span)
    return found


@pytest.fixture()
def repo(tmp_path: Path, make_version) -> Path:
    make_version(tmp_path, "digits", 1, (28, 28, 1), DIGIT_LABELS, digit=True, seed=1)
    make_version(tmp_path, "tinycnn", 1, (16, 12, 3), DIGIT_LABELS, digit=False, seed=5, conv=True)
    return tmp_path


@pytest.fixture()
def traced() -> Iterator:
    """``traced(models_dir, **settings)``: an app with tracing on whose spans go to an in-memory exporter."""
    clients: list[TestClient] = []

    def factory(models_dir: Path, **overrides: object) -> tuple[TestClient, InMemorySpanExporter]:
        exporter = InMemorySpanExporter()
        client = TestClient(create_app(make_settings(models_dir, tracing=True, **overrides), span_exporter=exporter),
                            raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client, exporter

    yield factory
    for client in clients:
        client.__exit__(None, None, None)
    assert tracing.tracer is None  # the app's end stops tracing in this process


ROUTES = {
    "images": lambda c, h: c.post("/models/digits/predict", files={"file": ("a.png", png(), "image/png")}, headers=h),
    "v2": lambda c, h: c.post("/v2/models/digits/infer", headers=h, json={"inputs": [
        {"name": "image", "shape": [2, 28, 28, 1], "datatype": "FP32", "data": [0.5] * 784 * 2}]}),
    "tfserving": lambda c, h: c.post("/v1/models/digits:predict", headers=h,
                                     json={"instances": np.full((1, 28, 28, 1), 0.5).tolist()}),
}


@pytest.mark.parametrize("on_loop", MODES)
@pytest.mark.parametrize("route", ROUTES)
def test_a_request_is_one_trace_under_the_callers_span_with_a_span_per_stage(traced, repo, route, on_loop):
    client, exporter = traced(repo, inference_on_loop=on_loop)
    header, trace_id, caller = traceparent()
    response = ROUTES[route](client, {"traceparent": header, "tracestate": "vendor=1"})
    assert response.status_code == 200, response.text
    spans = by_name(exporter.get_finished_spans(), trace_id)

    (server,) = [s for group in spans.values() for s in group if s.kind is SpanKind.SERVER]
    assert format(server.parent.span_id, "016x") == caller and server.parent.is_remote
    assert server.context.trace_state.get("vendor") == "1"  # tracestate travels with it
    template = {"images": "/models/{name}/predict", "v2": "/v2/models/{name}/infer",
                "tfserving": "/v1/models/{name}:predict"}[route]
    assert server.name == f"POST {template}"
    attributes = dict(server.attributes)
    assert attributes["http.request.method"] == "POST" and attributes["http.route"] == template
    assert attributes["http.response.status_code"] == 200 and attributes["url.path"].startswith(("/models", "/v"))
    assert attributes["convserve.model"] == "digits" and attributes["convserve.model.version"] == 1
    assert attributes["convserve.request_id"] == response.headers["x-request-id"]
    assert server.status.status_code is StatusCode.UNSET

    stages = {"admission", "read body", "queue", "inference"} | ({"preprocess"} if route == "images" else set())
    assert stages <= set(spans), sorted(spans)
    for name in stages - {"inference"}:
        (span,) = spans[name]
        assert span.parent.span_id == server.context.span_id, name  # children of the request
        assert server.start_time <= span.start_time <= span.end_time <= server.end_time, name
    (batch,) = spans["inference"]
    assert batch.parent.span_id == server.context.span_id  # the child of its (only) request...
    assert [link.context.span_id for link in batch.links] == [server.context.span_id]  # ...and linked to it
    assert dict(batch.attributes) == {
        "convserve.model": "digits", "convserve.model.version": 1, "convserve.batch.requests": 1,
        "convserve.batch.rows": 2 if route == "v2" else 1, "convserve.batch.on_loop": on_loop,
        "convserve.batch.outcome": "success"}
    (queue,) = spans["queue"]
    assert queue.end_time <= batch.start_time + 1 and [link.context.span_id for link in queue.links] == [
        batch.context.span_id]
    assert dict(spans["admission"][0].attributes) == {"convserve.model": "digits", "convserve.model.version": 1}
    if route == "images":
        assert spans["preprocess"][0].attributes["convserve.images"] == 1


def test_without_a_traceparent_a_request_starts_a_new_trace(traced, repo):
    client, exporter = traced(repo)
    assert ROUTES["images"](client, {}).status_code == 200
    (server,) = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert server.parent is None and server.context.trace_flags.sampled
    assert {s.name for s in exporter.get_finished_spans() if s.context.trace_id == server.context.trace_id} >= {
        "admission", "read body", "preprocess", "queue", "inference"}


def test_an_unsampled_caller_makes_no_spans_and_probes_are_not_traced(traced, repo):
    client, exporter = traced(repo)
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    assert ROUTES["images"](client, {"traceparent": f"00-{trace_id}-{span_id}-00"}).status_code == 200
    for path in ("/v2/health/ready", "/v2/health/live", "/metrics"):
        assert client.get(path).status_code == 200
    assert exporter.get_finished_spans() == ()  # parentbased: the caller said not sampled


def test_requests_batched_together_share_one_inference_span_linked_to_each(traced, repo):
    # Thread mode: the first request holds the model at a gate while four more queue up behind it.
    client, exporter = traced(repo, max_batch_size=8, max_queue_delay_us=0, inference_on_loop=False)
    batcher = client.app.state.dataplane.repository.get("digits").batcher
    original, gate = batcher._predict, threading.Event()
    batcher._predict = lambda rows: (gate.wait(30), original(rows))[1]
    callers = [traceparent() for _ in range(5)]

    def call(index: int) -> int:
        return ROUTES["images"](client, {"traceparent": callers[index][0]}).status_code

    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(call, 0)
        assert wait_for(lambda: batcher._running, 10)
        rest = [pool.submit(call, i) for i in range(1, 5)]
        assert wait_for(lambda: len(batcher._queue) == 4, 10)
        gate.set()
        assert [f.result() for f in [first, *rest]] == [200] * 5

    spans = exporter.get_finished_spans()
    servers = {hex_trace(s): s for s in spans if s.kind is SpanKind.SERVER}
    assert set(servers) == {trace_id for _, trace_id, _ in callers}  # five traces, one per caller
    batches = [s for s in spans if s.name == "inference"]
    shared = max(batches, key=lambda s: len(s.links))
    assert len(batches) == 2 and shared.attributes["convserve.batch.requests"] == 4
    assert shared.attributes["convserve.batch.rows"] == 4
    linked = {link.context.span_id for link in shared.links}
    assert linked == {servers[t].context.span_id for _, t, _ in callers[1:]}  # one inference, four requests
    # It lives in the trace of the first of them; each of the four has its queue wait, linked to that batch.
    assert shared.parent.span_id in linked and hex_trace(shared) in servers
    for _, trace_id, _ in callers[1:]:
        (queue,) = by_name(spans, trace_id)["queue"]
        assert [link.context.span_id for link in queue.links] == [shared.context.span_id]
        assert queue.end_time - queue.start_time > 0


def test_errors_set_the_status_of_the_spans_where_they_happened(traced, repo):
    client, exporter = traced(repo, inference_on_loop=False)
    header, trace_id, _ = traceparent()
    assert ROUTES["images"](client, {"traceparent": header}).status_code == 200
    missing, missing_id, _ = traceparent()
    assert client.post("/models/nope/predict", files={"file": ("a.png", png(), "image/png")},
                       headers={"traceparent": missing}).status_code == 404
    garbage, garbage_id, _ = traceparent()
    assert client.post("/models/digits/predict", files={"file": ("a.png", b"not an image", "image/png")},
                       headers={"traceparent": garbage}).status_code == 400
    batcher = client.app.state.dataplane.repository.get("digits").batcher

    def broken(rows):
        raise RuntimeError("the runtime failed")

    batcher._predict = broken
    failing, failing_id, _ = traceparent()
    response = ROUTES["v2"](client, {"traceparent": failing})
    assert response.status_code == 500 and "Traceback" not in response.text
    spans = exporter.get_finished_spans()

    def server(trace_id: str) -> ReadableSpan:
        (span,) = [s for s in spans if hex_trace(s) == trace_id and s.kind is SpanKind.SERVER]
        return span

    assert server(trace_id).status.status_code is StatusCode.UNSET
    # A client's mistake (4xx) is not the server's failure: the status stays unset, the error type names it.
    for trace, status in ((missing_id, 404), (garbage_id, 400)):
        assert server(trace).status.status_code is StatusCode.UNSET
        assert server(trace).attributes["error.type"] == str(status)
        assert server(trace).attributes["http.response.status_code"] == status
    (admission,) = by_name(spans, missing_id)["admission"]
    assert admission.status.status_code is StatusCode.ERROR and admission.attributes["error.type"] == "ModelNotFound"
    assert "inference" not in by_name(spans, missing_id)
    assert "inference" not in by_name(spans, garbage_id)  # refused while opening the image, before the queue
    # The server's failure: ERROR on the request and on the batch, whose outcome says so.
    assert server(failing_id).status.status_code is StatusCode.ERROR
    assert server(failing_id).attributes["error.type"] == "500"
    (batch,) = by_name(spans, failing_id)["inference"]
    assert batch.status.status_code is StatusCode.ERROR and batch.attributes["convserve.batch.outcome"] == "error"


def test_a_full_queue_refusal_is_an_error_span(traced, repo):
    client, exporter = traced(repo, max_batch_size=1, max_queue_size=1, inference_on_loop=False)
    batcher = client.app.state.dataplane.repository.get("digits").batcher
    original, gate = batcher._predict, threading.Event()
    batcher._predict = lambda rows: (gate.wait(30), original(rows))[1]
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(ROUTES["tfserving"], client, {})
        assert wait_for(lambda: batcher._running, 10)
        queued = pool.submit(ROUTES["tfserving"], client, {})
        assert wait_for(lambda: len(batcher._queue) == 1, 10)
        header, trace_id, _ = traceparent()
        refused = ROUTES["tfserving"](client, {"traceparent": header})
        gate.set()
        assert held.result().status_code == 200 and queued.result().status_code == 200
    assert refused.status_code == 503
    spans = by_name(exporter.get_finished_spans(), trace_id)
    (server,) = [s for group in spans.values() for s in group if s.kind is SpanKind.SERVER]
    assert server.status.status_code is StatusCode.ERROR and server.attributes["http.response.status_code"] == 503
    (admission,) = spans["admission"]  # refused there, before its body was read
    assert admission.status.status_code is StatusCode.ERROR and admission.attributes["error.type"] == "Overloaded"
    assert "read body" not in spans and "inference" not in spans


def test_an_explanation_is_a_span_of_its_own(traced, repo):
    client, exporter = traced(repo)
    header, trace_id, _ = traceparent()
    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(image, "PNG")
    response = client.post("/models/tinycnn/explain", content=image.getvalue(),
                           headers={"content-type": "image/png", "traceparent": header})
    assert response.status_code == 200, response.text
    spans = by_name(exporter.get_finished_spans(), trace_id)
    (server,) = spans["POST /models/{name}/explain"]
    (explain,) = spans["explain"]
    assert explain.parent.span_id == server.context.span_id
    (batch,) = spans["inference"]
    assert batch.parent.span_id == explain.context.span_id  # the explanation's own inference, inside it
    assert batch.attributes["convserve.model"] == "tinycnn"


def test_grpc_calls_are_traced_from_their_metadata(traced, repo):
    port = free_port()
    client, exporter = traced(repo, grpc_port=port)
    grpc_client = tg.InferenceServerClient(f"127.0.0.1:{port}")
    header, trace_id, caller = traceparent()
    x = tg.InferInput("image", [3, 28, 28, 1], "FP32")
    x.set_data_from_numpy(np.full((3, 28, 28, 1), 0.25, np.float32))
    grpc_client.infer("digits", [x], headers={"traceparent": header})
    missing, missing_id, _ = traceparent()
    with pytest.raises(Exception, match="unknown model|not found"):
        grpc_client.infer("nope", [x], headers={"traceparent": missing})
    grpc_client.is_server_ready()  # a probe: not traced
    grpc_client.close()
    spans = exporter.get_finished_spans()

    found = by_name(spans, trace_id)
    (server,) = found["inference.GRPCInferenceService/ModelInfer"]
    assert server.kind is SpanKind.SERVER and format(server.parent.span_id, "016x") == caller
    assert {k: server.attributes[k] for k in ("rpc.system", "rpc.service", "rpc.method", "rpc.grpc.status_code")} == {
        "rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService", "rpc.method": "ModelInfer",
        "rpc.grpc.status_code": 0}
    assert server.attributes["convserve.model.version"] == 1
    (batch,) = found["inference"]
    assert batch.attributes["convserve.batch.rows"] == 3 and batch.links[0].context.span_id == server.context.span_id
    assert {"admission", "decode", "queue"} <= set(found)
    assert found["decode"][0].parent.span_id == server.context.span_id
    (refused,) = by_name(spans, missing_id)["inference.GRPCInferenceService/ModelInfer"]
    assert refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert refused.status.status_code is StatusCode.UNSET  # NOT_FOUND is the caller's mistake
    assert not [s for s in spans if "ServerReady" in s.name]


def test_exemplars_lead_from_a_latency_bucket_to_the_trace(traced, repo, app_client_factory):
    client, _ = traced(repo)
    header, trace_id, _ = traceparent()
    assert ROUTES["images"](client, {"traceparent": header}).status_code == 200
    scrape = client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
    assert scrape.headers["content-type"].startswith("application/openmetrics-text")
    lines = [line for line in scrape.text.splitlines() if f'trace_id="{trace_id}"' in line]
    assert len(lines) == 1 and lines[0].startswith(
        'convserve_http_request_duration_seconds_bucket{le="') and 'route="/models/{name}/predict"' in lines[0]
    assert scrape.text.rstrip().endswith("# EOF")
    # The plain text format, which is what a scraper gets unless it asks: no exemplars.
    text = client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain") and "trace_id" not in text.text
    # Tracing off: text whatever the scraper asks for.
    plain = app_client_factory(repo).get("/metrics", headers={"accept": "application/openmetrics-text"})
    assert plain.headers["content-type"].startswith("text/plain")


def test_tracing_off_does_not_import_the_sdk(repo):
    # FastAPI itself depends on the OpenTelemetry API (its own telemetry stays off: convserve sets no global
    # provider); the SDK and the exporters are what the [tracing] extra adds, and what tracing off never loads.
    script = f"""
import sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings
with TestClient(create_app(Settings(models_dir={str(repo)!r}, grpc_port=0, state_url=""))) as client:
    response = client.post("/v2/models/digits/infer", headers={{"traceparent": "00-{'1' * 32}-{'2' * 16}-01"}},
                           json={{"inputs": [{{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32",
                                              "data": [0.0] * 784}}]}})
    assert response.status_code == 200, response.text
print(sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "CONVSERVE_TRACING": "false"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def blocked_opentelemetry(tmp_path: Path) -> dict[str, str]:
    """An environment in which the SDK and the exporters cannot be imported, as where the [tracing] extra is not
    installed (the OpenTelemetry API stays: FastAPI needs it)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['opentelemetry.sdk'] = sys.modules['opentelemetry.exporter'] = None\n")
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}


@pytest.mark.parametrize(("env", "message"), [
    ({}, "pip install 'convserve[tracing]'"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL='http/json' is not supported"),
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin' is not supported"),
], ids=["extra-missing", "protocol", "exporter"])
def test_a_tracing_setup_that_cannot_work_stops_the_start_with_its_reason(tmp_path, repo, env, message):
    if not env:
        env = blocked_opentelemetry(tmp_path)
    done = subprocess.run([sys.executable, "-m", "service", "--models-dir", str(repo), "--port", str(free_port())],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CONVSERVE_TRACING": "true", **env})
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_without_the_extra_the_service_serves_with_tracing_off(tmp_path, repo):
    server = ServiceProcess(repo, env={**blocked_opentelemetry(tmp_path), "CONVSERVE_WORKERS": "1"})
    try:
        response = httpx.post(f"{server.url}/models/digits/predict", files={"file": ("a.png", png(), "image/png")})
        assert response.status_code == 200
    finally:
        server.stop()


# --- the export itself ---------------------------------------------------------------------------------------


def log_entries(server: ServiceProcess) -> list[dict]:
    entries = []
    for line in server.output().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
    return entries


class Receiver:
    """An OTLP/HTTP trace receiver: decodes each ``ExportTraceServiceRequest`` (opentelemetry-proto)."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, object], object]] = []  # (resource attributes, span)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path != "/v1/traces" or self.headers["content-type"] != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.take(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: getattr(a.value, a.value.WhichOneof("value"))
                            for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((resource, span) for span in scope_spans.spans)

    def servers(self) -> dict[str, tuple[dict[str, object], object]]:
        """Each received server span by its trace id (hex)."""
        with self.lock:
            return {span.trace_id.hex(): (resource, span) for resource, span in self.spans
                    if span.kind == span.SPAN_KIND_SERVER}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_server_with_two_workers_exports_each_workers_spans_over_otlp_http(repo):
    receiver = Receiver()
    server = ServiceProcess(repo, env={
        "CONVSERVE_WORKERS": "2", "CONVSERVE_TRACING": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "digits-api", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test"})
    try:
        callers: list[tuple[str, str, str]] = []

        def call(caller: tuple[str, str, str]) -> int:  # a connection each: the workers share the listening socket
            return httpx.post(f"{server.url}/models/digits/predict", files={"file": ("a.png", png(), "image/png")},
                              headers={"traceparent": caller[0]}, timeout=30).status_code

        def answered_by() -> set[int]:  # the workers whose access log lines show one of these requests
            sent = {trace_id for _, trace_id, _ in callers}
            return {entry["pid"] for entry in log_entries(server) if entry.get("msg") == "request"
                    and entry.get("status") == 200 and entry.get("trace_id") in sent}

        with ThreadPoolExecutor(8) as pool:
            for _ in range(20):  # until both workers have answered some (which one accepts is the kernel's choice)
                batch = [traceparent() for _ in range(24)]
                callers += batch
                assert list(pool.map(call, batch)) == [200] * len(batch)
                if wait_for(lambda: len(answered_by()) == 2, 1):
                    break
        time.sleep(1.5)  # each worker writes its exemplars every second
        exemplars = set()
        for _ in range(4):  # whichever worker answers the scrape shows both workers' exemplars
            scrape = httpx.get(f"{server.url}/metrics", headers={"accept": "application/openmetrics-text"})
            exemplars |= set(re.findall(r'trace_id="([0-9a-f]{32})"', scrape.text))
        sent = {trace_id for _, trace_id, _ in callers}
        assert exemplars and exemplars <= sent
        workers = answered_by()
        logged = {entry.get("trace_id") for entry in log_entries(server) if entry.get("msg") == "request"}
        assert sent <= logged  # each access log line names its trace
    finally:
        server.stop()  # a graceful stop exports what the workers still buffered (the default delay is 5 s)

    try:
        servers = receiver.servers()
        assert sent <= set(servers)  # every request's server span arrived, none lost at the stop
        resources = [resource for trace_id, (resource, _) in servers.items() if trace_id in sent]
        assert {r["service.name"] for r in resources} == {"digits-api"}
        assert {r["deployment.environment"] for r in resources} == {"test"}
        pids = {r["process.pid"] for r in resources}
        assert len(workers) == 2 and pids == workers  # each worker exported its own requests' spans
        for trace_id in sent:
            _, span = servers[trace_id]
            assert span.parent_span_id.hex() == next(c for _, t, c in callers if t == trace_id)
            assert span.name == "POST /models/{name}/predict"
        with receiver.lock:
            names = {span.name for _, span in receiver.spans if span.trace_id.hex() in sent}
        assert names >= {"admission", "read body", "preprocess", "queue", "inference"}
    finally:
        receiver.close()


class GrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):  # noqa: N802 (the service's name)
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_are_exported_over_otlp_grpc_when_the_protocol_says_so(repo, monkeypatch):
    receiver = GrpcReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    header, trace_id, _ = traceparent()
    try:
        with TestClient(create_app(make_settings(repo, tracing=True))) as client:
            assert ROUTES["images"](client, {"traceparent": header}).status_code == 200
        # The app's end flushed the batch processor: the spans are there.
        names = {span.name for request in receiver.requests for rs in request.resource_spans
                 for ss in rs.scope_spans for span in ss.spans if span.trace_id.hex() == trace_id}
        assert names >= {"POST /models/{name}/predict", "admission", "read body", "preprocess", "queue", "inference"}
    finally:
        server.stop(None)
