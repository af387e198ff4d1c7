"""Batching seen from HTTP: concurrent requests share batches, answers go to the right caller,
and overload and deadlines are answered 503 and 504.

The tests that set a batching option serve a model without config.pbtxt (a model's config.pbtxt overrides the
service settings), and check from ``convserve_batch_rows`` that the option was in effect."""

from __future__ import annotations

import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.support.waiting import wait_for

SERIES = '{model="digits",version="2"}'


def metric(text, name):
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def batch_rows(text: str) -> tuple[int, int, int]:
    """(batches executed, rows computed, the largest batch's bucket bound) of digits:2, from /metrics."""
    count = int(metric(text, f"convserve_batch_rows_count{SERIES}"))
    bounds = [float(b) for b in re.findall(r'^convserve_batch_rows_bucket\{le="([0-9.]+)",model="digits",'
                                           r'version="2"\} ', text, re.MULTILINE)]
    largest = min(b for b in bounds if metric(text, f'convserve_batch_rows_bucket{{le="{b}",model="digits",'
                                                    f'version="2"}}') == count) if count else 0
    return count, int(metric(text, f"convserve_batch_rows_sum{SERIES}")), int(largest)


def infer_json(x):
    return {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


@pytest.fixture()
def unconfigured_repo(tmp_path, make_version):
    """digits version 2 (the same tiny model as the shared repository's), with no config.pbtxt."""
    make_version(tmp_path, "digits", 2, (28, 28, 1), [str(i) for i in range(10)], digit=True, seed=2)
    return tmp_path


def test_concurrent_callers_each_get_their_own_answer(server, model_repo):
    rng = np.random.default_rng(11)
    inputs = [rng.integers(0, 256, (1 + i % 3, 28, 28, 1)).astype(np.float32) for i in range(48)]
    session = ort.InferenceSession(str(model_repo / "digits" / "2" / "model.onnx"))
    expected = [session.run(None, {"image": x})[0] for x in inputs]

    def call(x):
        response = httpx.post(f"{server.url}/v2/models/digits/infer", json=infer_json(x), timeout=30)
        assert response.status_code == 200
        return np.array(response.json()["outputs"][0]["data"]).reshape(len(x), 10)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, inputs))
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_requests_waiting_together_share_a_batch_up_to_max_batch_size(app_client_factory, unconfigured_repo):
    # The first request waits up to 10 s for company: the batch runs as soon as 64 rows (16 x 4) are queued.
    client = app_client_factory(unconfigured_repo, max_batch_size=64, max_queue_delay_us=10_000_000)
    rng = np.random.default_rng(3)
    inputs = [rng.integers(0, 256, (4, 28, 28, 1)).astype(np.float32) for _ in range(16)]
    session = ort.InferenceSession(str(unconfigured_repo / "digits" / "2" / "model.onnx"))

    def call(x):
        response = client.post("/v2/models/digits/infer", json=infer_json(x))
        assert response.status_code == 200, response.text
        return np.array(response.json()["outputs"][0]["data"]).reshape(len(x), 10)

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, inputs))
    took = time.monotonic() - started
    for x, got in zip(inputs, results):
        np.testing.assert_allclose(got, session.run(None, {"image": x})[0], atol=1e-6)
    assert batch_rows(client.get("/metrics").text) == (1, 64, 64)  # one batch of all 64 rows
    assert took < 5, f"{took:.1f} s: the full batch waited out the 10 s delay"


def slow_down(client, seconds, model="digits", version=2):
    """Make one loaded version's inference slow (the runtime sleeps before computing)."""
    mv = client.app.state.dataplane.repository.get(model, version)
    original = mv.batcher._predict

    def slow(rows):
        time.sleep(seconds)
        return original(rows)

    mv.batcher._predict = slow


def infer_body(n=1):
    return {"inputs": [{"name": "image", "shape": [n, 28, 28, 1], "datatype": "FP32", "data": [0.0] * 784 * n}]}


def test_full_queue_answers_503_with_retry_after_and_every_other_request_succeeds(app_client_factory,
                                                                                   unconfigured_repo, on_loop):
    # Twelve requests come while the first waits half a second for company: four fill the queue (four rows) and
    # run as one batch, and the other eight are refused. Waiting for company holds no thread and no loop, so the
    # story is the same with batches on the loop. (A batch that computes would not do there: the requests that
    # come meanwhile wait unread, and how many are read before the next batch starts is up to the scheduler.)
    client = app_client_factory(unconfigured_repo, max_queue_size=4, max_batch_size=16, max_queue_delay_us=500_000,
                                inference_on_loop=on_loop)
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: client.post("/v2/models/digits/infer", json=infer_body()), range(12)))
    statuses = [r.status_code for r in responses]
    assert sorted(statuses) == [200] * 4 + [503] * 8
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 503)
    text = client.get("/metrics").text
    assert metric(text, 'convserve_rejected_requests_total{model="digits",reason="queue_full",version="2"}') == 8
    assert batch_rows(text) == (1, 4, 4)  # the queued four, in one batch


def test_request_past_its_deadline_answers_504(app_client_factory, unconfigured_repo, on_loop):
    # Three requests of 2 rows come while the first waits up to 1 s for company, under a batch limit of 5 rows: no
    # two of them fill a batch and all three overfill it, so the batch starts once all three are queued, whatever
    # their order, with the first two (0.6 s); the third is still queued when its 0.5 s are up. All three are
    # queued before the batch starts and waiting for company holds no thread and no loop, so the story is the same
    # with batches on the loop, which no test could hold still from outside.
    client = app_client_factory(unconfigured_repo, request_timeout_seconds=0.5, max_batch_size=5,
                                max_queue_delay_us=1_000_000, inference_on_loop=on_loop)
    slow_down(client, 0.6)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: client.post("/v2/models/digits/infer", json=infer_body(2)), range(3)))
    assert sorted(r.status_code for r in results) == [200, 200, 504]
    (late,) = (r for r in results if r.status_code == 504)
    assert late.json() == {"error": "request waited longer than 0.5s in the queue of digits:2"}
    assert batch_rows(client.get("/metrics").text) == (1, 4, 4)  # the late one was never computed


@pytest.mark.parametrize("overrides", [{"max_queue_delay_us": 0}, {"batching": False},
                                       {"max_queue_delay_us": 2000}, {"inference_on_loop": True},
                                       {"inference_on_loop": True, "max_queue_delay_us": 2000}],
                         ids=["zero-delay", "off", "2ms-delay", "on-loop", "on-loop-2ms-delay"])
def test_zero_delay_and_batching_off_modes_answer_correctly(overrides, app_client_factory, unconfigured_repo):
    client = app_client_factory(unconfigured_repo, **overrides)
    session = ort.InferenceSession(str(unconfigured_repo / "digits" / "2" / "model.onnx"))
    rng = np.random.default_rng(5)
    inputs = [rng.integers(0, 256, (1 + i % 3, 28, 28, 1)).astype(np.float32) for i in range(8)]

    def call(x):
        response = client.post("/v2/models/digits/infer", json=infer_json(x))
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["shape"] == [len(x), 10]
        return np.array(response.json()["outputs"][0]["data"]).reshape(len(x), 10)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, inputs))
    for x, got in zip(inputs, results):
        np.testing.assert_allclose(got, session.run(None, {"image": x})[0], atol=1e-6)
    batches, rows, _ = batch_rows(client.get("/metrics").text)
    assert rows == sum(len(x) for x in inputs)
    if overrides.get("batching") is False:
        assert batches == len(inputs)  # batching off: every request is a batch of its own


def test_clients_that_disconnect_leave_nothing_behind(server_factory, unconfigured_repo, mnist_pngs):
    # A request waits up to 3 s in the queue for company: a client can hang up while its request is known to be queued.
    server = server_factory(unconfigured_repo, CONVSERVE_MAX_BATCH_SIZE="1024", CONVSERVE_MAX_QUEUE_DELAY_US="3000000")
    image = mnist_pngs[0][0]
    host, port = "127.0.0.1", server.port
    for _ in range(5):  # gone mid-upload: the body never completes
        with socket.create_connection((host, port)) as s:
            s.sendall(b"POST /models/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 100000\r\n\r\n" + image[:50])
    sockets = [socket.create_connection((host, port)) for _ in range(5)]
    for s in sockets:  # gone while the request waits for its batch
        s.sendall(b"POST /models/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  + f"Content-Length: {len(image)}\r\n\r\n".encode() + image)
    assert wait_for(lambda: server.metric(f"convserve_queue_rows{SERIES}") == 5), server.metrics()
    for s in sockets:
        s.close()
    abandoned = 'convserve_inference_requests_total{model="digits",outcome="abandoned",version="2"}'
    assert wait_for(lambda: server.metric(abandoned) == 5), server.metrics()
    assert wait_for(lambda: server.metric(f"convserve_inflight_requests{SERIES}") == 0)
    # the queued-rows gauge is written on each worker's sync tick (multiprocess mode), not as rows leave
    assert wait_for(lambda: server.metric(f"convserve_queue_rows{SERIES}") == 0), server.metrics()
    assert server.metric(f"convserve_batch_rows_count{SERIES}") == 0  # nothing computed for clients that left
    assert "unhandled error" not in server.output()
    response = httpx.post(f"{server.url}/models/digits/predict", content=image,
                          headers={"content-type": "image/png"}, timeout=30)
    assert response.status_code == 200


def test_full_queue_refuses_before_reading_the_body(app_client_factory, unconfigured_repo, on_loop):
    # The first request fills the queue (one row) while it waits a second for company: a wait that holds no thread
    # and no loop, so the queue stays full while the test looks, with batches on the loop too.
    client = app_client_factory(unconfigured_repo, max_queue_size=1, max_batch_size=2, max_queue_delay_us=1_000_000,
                                inference_on_loop=on_loop)
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(client.post, "/v2/models/digits/infer", json=infer_body())
        assert wait_for(lambda: metric(client.get("/metrics").text, f"convserve_queue_rows{SERIES}") == 1, timeout=1)
        response = client.post("/v2/models/digits/infer", content=b"{not even json",
                               headers={"content-type": "application/json"})
        assert queued.result().status_code == 200  # the request that held the queue was answered
    assert response.status_code == 503  # not 400: refused before the body was parsed
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"].startswith("model digits:2 is overloaded")
