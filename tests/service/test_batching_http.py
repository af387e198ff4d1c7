"""Batching seen from HTTP: concurrent requests share batches, answers go to the right caller,
and overload and deadlines are answered 503 and 504."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort


def metric(text, name):
    return float(re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE).group(1))


def infer_json(x):
    return {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


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


def test_requests_waiting_together_share_a_batch(app_client_factory, model_repo):
    client = app_client_factory(model_repo, max_batch_size=64)
    slow_down(client, 0.05)  # while one batch computes, the others queue up
    rng = np.random.default_rng(3)
    inputs = [rng.integers(0, 256, (1 + i % 3, 28, 28, 1)).astype(np.float32) for i in range(12)]
    session = ort.InferenceSession(str(model_repo / "digits" / "2" / "model.onnx"))
    series = '{model="digits",version="2"}'

    def call(x):
        response = client.post("/v2/models/digits/infer", json=infer_json(x))
        assert response.status_code == 200
        return np.array(response.json()["outputs"][0]["data"]).reshape(len(x), 10)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, inputs))
    for x, got in zip(inputs, results):
        np.testing.assert_allclose(got, session.run(None, {"image": x})[0], atol=1e-6)
    text = client.get("/metrics").text
    assert metric(text, f"convserve_batch_rows_sum{series}") == sum(len(x) for x in inputs)
    assert metric(text, f"convserve_batch_rows_count{series}") < len(inputs)  # mean batch > one request


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


def test_full_queue_answers_503_with_retry_after_and_every_other_request_succeeds(app_client_factory, model_repo):
    client = app_client_factory(model_repo, max_queue_size=4, max_batch_size=1)
    slow_down(client, 0.2)
    statuses: list[int] = []
    headers: list[httpx.Headers] = []
    lock = threading.Lock()

    def call():
        response = client.post("/v2/models/digits/infer", json=infer_body())
        with lock:
            statuses.append(response.status_code)
            headers.append(response.headers)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(statuses) == 12
    assert set(statuses) <= {200, 503}
    assert 503 in statuses and 200 in statuses
    assert all(h["retry-after"] == "1" for s, h in zip(statuses, headers) if s == 503)
    text = client.get("/metrics").text
    assert metric(text, 'convserve_rejected_requests_total{model="digits",reason="queue_full",version="2"}') \
        == statuses.count(503)


def test_request_past_its_deadline_answers_504(app_client_factory, model_repo):
    client = app_client_factory(model_repo, request_timeout_seconds=0.1, max_batch_size=1)
    slow_down(client, 0.3)
    results = []

    def call():
        results.append(client.post("/v2/models/digits/infer", json=infer_body()))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.02)
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in results)
    assert statuses[0] == 200 and 504 in statuses
    late = next(r for r in results if r.status_code == 504)
    assert "waited longer than 0.1s" in late.json()["error"]


def test_zero_delay_and_batching_off_modes_answer_correctly(app_client_factory, model_repo):
    for overrides in ({"max_queue_delay_us": 0}, {"batching": False}, {"max_queue_delay_us": 2000}):
        client = app_client_factory(model_repo, **overrides)
        response = client.post("/v2/models/digits/infer", json=infer_body(3))
        assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [3, 10]


def test_clients_that_disconnect_leave_nothing_behind(server, mnist_pngs):
    import socket

    image = mnist_pngs[0][0]
    host, port = "127.0.0.1", server.port
    for _ in range(5):  # gone mid-upload: the body never completes
        with socket.create_connection((host, port)) as s:
            s.sendall(b"POST /models/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 100000\r\n\r\n" + image[:50])
    for _ in range(5):  # gone while the request is being answered
        with socket.create_connection((host, port)) as s:
            s.sendall(b"POST /models/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      + f"Content-Length: {len(image)}\r\n\r\n".encode() + image)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        if metric(text, 'convserve_inflight_requests{model="digits",version="2"}') == 0:
            break
        time.sleep(0.1)
    assert metric(text, 'convserve_inflight_requests{model="digits",version="2"}') == 0
    assert metric(text, 'convserve_queue_rows{model="digits",version="2"}') == 0
    response = httpx.post(f"{server.url}/models/digits/predict", content=image, headers={"content-type": "image/png"})
    assert response.status_code == 200


def test_full_queue_refuses_before_reading_the_body(app_client_factory, model_repo):
    client = app_client_factory(model_repo, max_queue_size=1, max_batch_size=1)
    slow_down(client, 0.5)
    threads = [threading.Thread(target=client.post, args=("/v2/models/digits/infer",), kwargs={"json": infer_body()})
               for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)  # one running, one queued: the queue is full
    response = client.post("/v2/models/digits/infer", content=b"{not even json",
                           headers={"content-type": "application/json"})
    for thread in threads:
        thread.join()
    assert response.status_code == 503  # not 400: refused before the body was parsed
    assert response.headers["retry-after"] == "1"
