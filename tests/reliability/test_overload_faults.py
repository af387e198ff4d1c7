"""Overload, deadlines, vanished clients and broken model versions on real server processes: every request is
answered, the refused ones say so exactly (503 + Retry-After, 504), nothing is computed late, nothing stays
blocked, and a bad publish never interrupts serving.

Graceful shutdown under load (SIGTERM: in-flight requests complete, exit 0) is covered by
tests/deploy/test_graceful_shutdown.py and not repeated here.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.waiting import wait_for

ROWS = 64  # one request = one full batch of the bundled mnist (its config.pbtxt max_batch_size)
SERIES = '{model="mnist",version="1"}'


@pytest.fixture(scope="module")
def batch(digits) -> tuple[np.ndarray, list[int]]:
    """64 real digits as raw pixel rows [64, 28, 28, 1] (what the model takes) and their labels."""
    chosen = [digits[i % len(digits)] for i in range(ROWS)]
    rows = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.float32) for png, _ in chosen])
    return rows[..., None], [label for _, label in chosen]


def binary_request(rows: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "image", "shape": list(rows.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": rows.nbytes}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    return header + rows.tobytes(), {"inference-header-content-length": str(len(header)),
                                     "content-type": "application/octet-stream"}


def predicted(response: httpx.Response) -> list[int]:
    length = int(response.headers["inference-header-content-length"])
    probabilities = np.frombuffer(response.content[length:], np.float32).reshape(-1, 10)
    return probabilities.argmax(axis=1).tolist()


def burst(url: str, content: bytes, headers: dict[str, str], clients: int) -> list[httpx.Response]:
    """``clients`` concurrent requests released together; every one's response (an exception fails the test)."""
    barrier = threading.Barrier(clients)

    def call(_: int) -> httpx.Response:
        with httpx.Client(timeout=120) as client:
            barrier.wait()
            return client.post(f"{url}/v2/models/mnist/infer", content=content, headers=headers)

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(call, range(clients)))


@pytest.fixture(scope="module")
def small_queue_server(request, start_server, models_root):
    """At most one full batch may wait: CONVSERVE_MAX_QUEUE_SIZE=64 rows."""
    return start_server(models_root, stop_with=request, CONVSERVE_MAX_QUEUE_SIZE=str(ROWS))


@pytest.fixture(scope="module")
def short_deadline_server(request, start_server, models_root):
    """Requests may wait 20 ms in the queue (a few 64-row batches); the queue itself is practically unbounded."""
    return start_server(models_root, stop_with=request, CONVSERVE_REQUEST_TIMEOUT_SECONDS="0.02",
                        CONVSERVE_MAX_QUEUE_SIZE="1000000")


# --- Overload ----------------------------------------------------------------------------------

def bursts_until_refused(server, content: bytes, headers: dict[str, str], bursts: int = 5) -> list[httpx.Response]:
    """Bursts of 32 concurrent requests, up to ``bursts`` of them, until some were answered and some refused."""
    responses: list[httpx.Response] = []
    for _ in range(bursts):
        responses += burst(server.url, content, headers, clients=32)
        statuses = {r.status_code for r in responses}
        if 503 in statuses and 200 in statuses:
            break
    return responses


def test_overload_beyond_the_queue_is_answered_503_with_retry_after_exactly_for_the_rejected(
        small_queue_server, batch, assert_error, assert_still_serving):
    server = small_queue_server
    rows, labels = batch
    content, headers = binary_request(rows)
    rejected = 'convserve_rejected_requests_total{model="mnist",reason="queue_full",version="1"}'
    before = server.metric(rejected)
    responses = bursts_until_refused(server, content, headers)  # a busy machine may serialise one burst
    statuses = [r.status_code for r in responses]
    print(f"{len(responses)} requests of {ROWS} rows: {statuses.count(200)} x 200, {statuses.count(503)} x 503")
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) + statuses.count(503) == len(responses)
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert_error(response, 503, "model mnist:1 is overloaded", "rows queued); retry later")
        else:
            assert predicted(response) == labels
    assert server.metric(rejected) - before == statuses.count(503)
    assert_still_serving(server)


@pytest.fixture(scope="module")
def short_target_server(request, start_server, models_root):
    """Admission refuses a request expected to wait more than 1 ms before its batch starts
    (CONVSERVE_QUEUE_TARGET_MS=1): a 64-row batch of the bundled mnist takes longer than that, so a request that
    arrives behind one is refused; the queue itself (1024 rows) is never full."""
    return start_server(models_root, stop_with=request, CONVSERVE_QUEUE_TARGET_MS="1")


def test_a_request_expected_to_wait_past_the_queue_target_is_refused_at_once_with_retry_after(
        short_target_server, batch, assert_error, assert_still_serving):
    server = short_target_server
    rows, labels = batch
    content, headers = binary_request(rows)
    refused = 'convserve_rejected_requests_total{model="mnist",reason="queue_delay",version="1"}'
    full = 'convserve_rejected_requests_total{model="mnist",reason="queue_full",version="1"}'
    before, full_before = server.metric(refused), server.metric(full)
    # until each worker has timed a batch (it admits everything before) and refused behind one
    responses = bursts_until_refused(server, content, headers)
    statuses = [r.status_code for r in responses]
    print(f"{len(responses)} requests of {ROWS} rows: {statuses.count(200)} x 200, {statuses.count(503)} x 503")
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    for response in responses:
        if response.status_code == 503:
            message = assert_error(response, 503)
            assert re.fullmatch(r"model mnist:1 is overloaded \(expected wait \d+ ms, target 1 ms\); retry later",
                                message), message
            assert re.fullmatch(r"[1-9]\d*", response.headers["retry-after"]), response.headers
        else:
            assert predicted(response) == labels
    assert server.metric(refused) - before == statuses.count(503)
    assert server.metric(full) == full_before
    assert_still_serving(server)


# --- Deadlines ---------------------------------------------------------------------------------

def test_requests_past_their_deadline_are_answered_504_and_never_computed(
        short_deadline_server, batch, assert_error, assert_still_serving):
    server = short_deadline_server
    rows, labels = batch
    content, headers = binary_request(rows)
    computed = f"convserve_batch_rows_sum{SERIES}"
    before = server.metric(computed)
    responses: list[httpx.Response] = []
    for _ in range(5):
        responses += burst(server.url, content, headers, clients=40)
        if 504 in [r.status_code for r in responses]:
            break
    statuses = [r.status_code for r in responses]
    print(f"{len(responses)} requests of {ROWS} rows: {statuses.count(200)} x 200, {statuses.count(504)} x 504, "
          f"{statuses.count(503)} x 503")
    # On the defaults the admission gate also refuses, at once, what it expects to wait past its target (503);
    # what it admits either runs or times out queued (504).
    assert set(statuses) <= {200, 503, 504}, statuses
    assert statuses.count(504) > 0 and statuses.count(200) > 0
    for response in responses:
        if response.status_code == 504:
            assert_error(response, 504, "request waited longer than 0.02s in the queue of mnist:1")
        elif response.status_code == 503:
            assert_error(response, 503, "expected wait")
            assert response.headers["retry-after"].isdigit()
        else:
            assert predicted(response) == labels
    # No late work: the rows computed are exactly those of the answered requests.
    assert server.metric(computed) - before == ROWS * statuses.count(200)
    assert_still_serving(server)


# --- Clients that vanish -----------------------------------------------------------------------

def settled(server) -> bool:
    return (server.metric(f"convserve_inflight_requests{SERIES}") == 0
            and server.metric(f"convserve_queue_rows{SERIES}") == 0)


def server_errors(server) -> float:
    """HTTP requests the server counted as answered with a 5xx."""
    return sum(float(value) for value in re.findall(
        r'^convserve_http_requests_total\{[^}]*status="5\d\d"[^}]*\} ([0-9.e+-]+)$', server.metrics(), re.MULTILINE))


def test_clients_gone_mid_upload_leave_nothing_blocked(short_deadline_server, digits, assert_still_serving):
    server = short_deadline_server
    fds_before = server.open_fds()
    errors_before = server_errors(server)
    png = digits[0][0]
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:  # Content-Length promised, not sent
            sock.sendall(b"POST /models/mnist/predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 100000\r\n\r\n" + png[:100])
        with socket.create_connection(("127.0.0.1", server.port)) as sock:  # chunked, never finished
            sock.sendall(b"POST /v2/models/mnist/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"400\r\n" + b"[" * 1024 + b"\r\n")
    assert wait_for(lambda: settled(server))
    assert wait_for(lambda: server.open_fds() <= fds_before + 2), (fds_before, server.open_fds())
    # A client hanging up is not a server error: not counted as a 5xx, nothing logged as unhandled.
    assert server_errors(server) == errors_before
    assert "unhandled error" not in server.output()
    assert_still_serving(server)


@pytest.fixture(scope="module")
def waiting_server(request, start_server, models_root):
    """The tiny model (no config.pbtxt) holds a request 3 s in its queue, waiting for company to batch with:
    a client can hang up while its request is known to be queued."""
    return start_server(models_root, stop_with=request, CONVSERVE_MAX_BATCH_SIZE="1024",
                        CONVSERVE_MAX_QUEUE_DELAY_US="3000000")


def test_clients_gone_mid_inference_leave_nothing_blocked(waiting_server, digits, assert_still_serving):
    server = waiting_server
    tiny = '{model="tiny",version="1"}'
    abandoned = 'convserve_inference_requests_total{model="tiny",outcome="abandoned",version="1"}'
    abandoned_before, errors_before = server.metric(abandoned), server_errors(server)
    png = digits[0][0]
    request = (b"POST /models/tiny/predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
               + f"Content-Length: {len(png)}\r\n\r\n".encode() + png)
    fds_before = server.open_fds()
    sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    for sock in sockets:
        sock.sendall(request)
    # Every request is queued (20 rows wait for the batch to fill) ...
    assert wait_for(lambda: server.metric(f"convserve_queue_rows{tiny}") == 20), server.metrics()
    for sock in sockets:  # ... when its client hangs up without reading a byte
        sock.close()
    assert wait_for(lambda: server.metric(abandoned) - abandoned_before == 20), server.metrics()
    assert wait_for(lambda: server.metric(f"convserve_inflight_requests{tiny}") == 0
                    and server.metric(f"convserve_queue_rows{tiny}") == 0)
    assert server.metric(f"convserve_batch_rows_count{tiny}") == 0  # nothing was computed for nobody
    assert wait_for(lambda: server.open_fds() <= fds_before + 2), (fds_before, server.open_fds())
    assert server_errors(server) == errors_before  # a client hanging up is not a server error
    assert "unhandled error" not in server.output()
    assert_still_serving(server)


# --- Broken model versions under load ----------------------------------------------------------

def test_corrupt_and_half_written_versions_appearing_under_load_never_interrupt_serving(
        request, start_server, mnist_repo, mnist_version_files, digits, assert_still_serving):
    server = start_server(mnist_repo, stop_with=request, CONVSERVE_REPOSITORY_POLL_SECONDS="0.1")
    model_dir = mnist_repo / "mnist"
    results: list[tuple[int, int | None, bool]] = []
    failures: list[str] = []  # every request that was not a correct 200, exceptions included
    sent = 0
    lock = threading.Lock()
    stop = threading.Event()

    def hammer(offset: int) -> None:
        nonlocal sent
        with httpx.Client(base_url=server.url, timeout=30) as client:
            i = offset
            while not stop.is_set():
                png, label = digits[i % len(digits)]
                i += 1
                with lock:
                    sent += 1
                try:
                    response = client.post("/models/mnist/predict", files={"file": ("d.png", png, "image/png")})
                    body = response.json() if response.status_code == 200 else {}
                    ok = response.status_code == 200 and body["predictions"][0]["class_id"] == label
                    result = (response.status_code, body.get("version"), ok)
                except Exception as exc:  # a lost connection or a non-JSON 500 is a failed request too
                    with lock:
                        failures.append(repr(exc))
                    continue
                with lock:
                    results.append(result)
                    if not ok:
                        failures.append(f"{response.status_code} {response.text[:200]}")

    def states() -> dict[int, str]:
        versions = httpx.get(f"{server.url}/models", timeout=10).json()["models"][0]["versions"]
        return {v["version"]: v["state"] for v in versions}

    threads = [threading.Thread(target=hammer, args=(i * 10,)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        # A corrupt version appears in place (not staged): it fails to load and version 1 keeps serving.
        (model_dir / "2").mkdir()
        (model_dir / "2" / "metadata.json").write_bytes(mnist_version_files["metadata.json"])
        (model_dir / "2" / "model.onnx").write_bytes(b"\x08\x07not a model at all" * 100)
        assert wait_for(lambda: states().get(2) == "FAILED"), states()
        count = len(results)
        assert wait_for(lambda: len(results) > count + 10), failures[:5]  # served while 2 is there, broken
        # A version whose model.onnx is still being written: half of it first, then the rest.
        model = mnist_version_files["model.onnx"]
        (model_dir / "3").mkdir()
        (model_dir / "3" / "metadata.json").write_bytes(mnist_version_files["metadata.json"])
        with open(model_dir / "3" / "model.onnx", "wb") as f:
            f.write(model[:len(model) // 2])
            f.flush()
            os.fsync(f.fileno())
            assert wait_for(lambda: states().get(3) == "FAILED"), states()
            count = len(results)
            assert wait_for(lambda: len(results) > count + 10), failures[:5]
            f.write(model[len(model) // 2:])
        # Once complete it loads and takes over; the broken and the old versions go.
        assert wait_for(lambda: states() == {3: "READY"}), states()
        count = len(results)
        assert wait_for(lambda: len(results) > count + 20)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    statuses = [status for status, _, _ in results]
    versions = {version for _, version, _ in results}
    print(f"{sent} requests sent while a corrupt and a half-written version appeared, {len(results)} answered, "
          f"{len(failures)} failed: statuses {sorted(set(statuses))}, versions {sorted(v for v in versions if v)}")
    assert failures == [], failures[:5]
    assert len(results) == sent  # every request sent was answered
    assert len(results) > 50
    assert set(statuses) == {200}, [r for r in results if r[0] != 200][:5]
    assert all(ok for _, _, ok in results)
    assert versions == {1, 3}  # never the broken 2, never an error
    assert_still_serving(server)


# --- A crash while preparing one request -------------------------------------------------------

def test_a_request_whose_preprocessing_crashes_fails_alone_not_its_whole_batch():
    """Defence in depth behind the decoders' own checks: an unforeseen exception while one request's images are
    decoded on the inference thread fails that request (500) and the others in its batch still get answers."""
    import asyncio

    from service.batching import Batcher, BatchingConfig
    from service.errors import InferenceFailed

    def crash() -> np.ndarray:
        raise RuntimeError("a decoder bug")

    batches: list[int] = []

    async def scenario() -> list[object]:
        batcher = Batcher(lambda rows: {"y": rows.sum(axis=(1, 2, 3))[:, None]},
                          BatchingConfig(max_queue_delay_us=50_000), "m:1",
                          on_batch=lambda rows, waits, seconds: batches.append(rows))
        batcher.start()
        calls = [batcher.submit_prepared(1, lambda: np.ones((1, 2, 2, 1), np.float32)),
                 batcher.submit_prepared(1, crash),
                 batcher.submit(np.full((2, 2, 2, 1), 2.0, np.float32))]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await batcher.close()
        return results

    good, crashed, rows = asyncio.run(scenario())
    assert isinstance(crashed, InferenceFailed)
    assert crashed.message == "preprocessing failed: RuntimeError"
    assert good["y"].tolist() == [[4.0]]
    assert rows["y"].tolist() == [[8.0], [8.0]]
    assert batches == [3]  # the three requests shared one batch; the crashed one's row was never computed


# A real server with a decoder bug planted in Pillow: converting an image of 13x17 pixels raises RuntimeError, an
# exception no decoder check anticipates. The rest of the process is the ordinary `python -m service`.
CRASHING_CONVERT = """
import runpy, sys
from PIL import Image
convert = Image.Image.convert
def crashing_convert(self, *args, **kwargs):
    if self.size == (13, 17):
        raise RuntimeError("a decoder bug")
    return convert(self, *args, **kwargs)
Image.Image.convert = crashing_convert
sys.argv = ["service", *sys.argv[1:]]
runpy.run_module("service", run_name="__main__", alter_sys=True)
"""


def test_a_request_whose_preprocessing_crashes_is_answered_500_and_its_batch_200_over_http(
        models_root, digits, tmp_path, assert_error, assert_still_serving):
    from tests.support.oracle import Oracle
    from tests.support.server import ServiceProcess, free_port

    port = free_port()
    argv = [sys.executable, "-c", CRASHING_CONVERT, "--models-dir", str(models_root), "--host", "127.0.0.1",
            "--port", str(port)]
    # Four rows fill the tiny model's batch at once: the four requests below always share one batch.
    # One process: the crash is patched into this interpreter (a worker would import the real code again).
    env = {"CONVSERVE_MAX_BATCH_SIZE": "4", "CONVSERVE_MAX_QUEUE_DELAY_US": "10000000", "CONVSERVE_WORKERS": "1",
           "CONVSERVE_ACCESS_LOG": "false", "CONVSERVE_REPOSITORY_POLL_SECONDS": "0"}
    server = ServiceProcess(models_root, tmp_path, env, argv=argv, port=port, timeout=90)
    try:
        buffer = io.BytesIO()
        Image.new("RGB", (13, 17), (255, 255, 255)).save(buffer, "PNG")  # RGB: the digit model converts it to L
        bodies = [buffer.getvalue()] + [png for png, _ in digits[:3]]
        barrier = threading.Barrier(len(bodies))

        def call(body: bytes) -> httpx.Response:
            barrier.wait()
            return httpx.post(f"{server.url}/models/tiny/predict", content=body,
                              headers={"content-type": "image/png"}, timeout=60)

        with ThreadPoolExecutor(len(bodies)) as pool:
            crashed, *answered = pool.map(call, bodies)
        assert_error(crashed, 500, "preprocessing failed: RuntimeError")
        oracle = Oracle(models_root / "tiny" / "1")  # the model's documented input, not the service's code
        for response, png in zip(answered, bodies[1:]):
            assert response.status_code == 200, response.text
            [expected] = oracle.probabilities([png])
            top = response.json()["predictions"][0]
            assert top["class_id"] == int(expected.argmax())
            assert top["score"] == pytest.approx(float(expected.max()), abs=1e-5)
        series = '{model="tiny",version="1"}'
        assert server.metric(f"convserve_batch_rows_count{series}") == 1  # one batch ...
        assert server.metric(f"convserve_batch_rows_sum{series}") == 3  # ... computed without the crashed row
        assert "Traceback" not in crashed.text
        assert_still_serving(server)
    finally:
        server.stop()
