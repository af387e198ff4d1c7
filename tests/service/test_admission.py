"""Admission by expected queueing time: a request that would wait longer than the target before its
batch starts is refused at once (503, Retry-After, reason queue_delay), before its body is read.

The fake runtimes sleep a fixed time per batch, so every bound below holds however fast the machine
is: a slower machine only measures a slower service, which makes the refusals more certain, and the
admissions are checked with a wide margin or with nothing ahead.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batching import Batcher, BatchingConfig
from service.errors import Overloaded

SLOW = 0.2  # seconds per batch of the slow fake runtime


class FakeRuntime:
    """Sleeps ``delay`` seconds per batch (changeable), and can be held on a gate."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        self.gate.wait(10)
        time.sleep(self.delay)
        return {"y": rows}


ROW = np.zeros((1, 2), np.float32)


async def measured_batcher(target_s: float, delay: float = SLOW) -> tuple[FakeRuntime, Batcher]:
    """A started batcher (one row per batch) that has run one batch, so it knows its speed."""
    runtime = FakeRuntime(delay)
    batcher = Batcher(runtime, BatchingConfig(max_batch_size=1, queue_target_s=target_s), "m:1")
    batcher.start()
    await batcher.submit(ROW)
    return runtime, batcher


async def hold(batcher: Batcher, runtime: FakeRuntime, queued: int) -> list[asyncio.Future]:
    """One request running (held on the gate) and ``queued`` more waiting behind it."""
    runtime.gate.clear()
    waiting = [asyncio.ensure_future(batcher.submit(ROW)) for _ in range(queued + 1)]
    while batcher.queued_rows != queued:  # the first has been taken off the queue to run
        await asyncio.sleep(0.001)
    return waiting


async def release(batcher: Batcher, runtime: FakeRuntime, waiting: list[asyncio.Future]) -> None:
    runtime.gate.set()
    await asyncio.gather(*waiting)
    await batcher.close()


def test_refused_once_the_expected_wait_passes_the_target_and_admitted_below_it():
    async def scenario():
        runtime, batcher = await measured_batcher(target_s=2.5 * SLOW)
        batcher.check_capacity()  # nothing ahead: admitted
        waiting = await hold(batcher, runtime, queued=0)
        batcher.check_capacity()  # one row ahead, about SLOW seconds: admitted
        waiting += [asyncio.ensure_future(batcher.submit(ROW)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:  # three rows ahead: at least 3 * SLOW > the target
            batcher.check_capacity()
        wait = batcher.expected_wait()
        await release(batcher, runtime, waiting)
        return refused.value, wait

    refused, wait = asyncio.run(scenario())
    assert wait >= 3 * SLOW
    assert refused.status == 503 and refused.reason == "queue_delay"
    assert "expected wait" in refused.message and "target 500 ms" in refused.message
    assert int(refused.headers["Retry-After"]) == max(1, int(np.ceil(wait)))


def test_the_estimate_follows_a_change_in_service_speed():
    async def scenario():
        runtime, batcher = await measured_batcher(target_s=2.5 * SLOW)
        waiting = await hold(batcher, runtime, queued=3)
        slow_refused = batcher.expected_wait() > batcher.config.queue_target_s
        await release(batcher, runtime, waiting)
        runtime.delay = 0.0  # the service becomes fast (say another model stopped competing)
        batcher = Batcher(runtime, batcher.config, "m:1")
        batcher._seconds_per_row = SLOW  # it remembers being slow
        batcher.start()
        for _ in range(25):
            await batcher.submit(ROW)
        waiting = await hold(batcher, runtime, queued=3)
        fast_wait = batcher.expected_wait()
        batcher.check_capacity()  # admitted again
        await release(batcher, runtime, waiting)
        return slow_refused, fast_wait

    slow_refused, fast_wait = asyncio.run(scenario())
    assert slow_refused
    assert fast_wait < 2.5 * SLOW / 4


def test_a_zero_target_disables_the_time_bound():
    async def scenario():
        runtime, batcher = await measured_batcher(target_s=0)
        waiting = await hold(batcher, runtime, queued=5)
        batcher.check_capacity()  # five seconds-ish ahead, still admitted: only the length bound applies
        await release(batcher, runtime, waiting)

    asyncio.run(scenario())


def test_over_http_the_refusal_is_a_503_before_the_body_is_read(app_client_factory, model_repo):
    slow_batch = 0.5  # one running and one queued wait at least 1 s; one running alone well under 0.75 s
    client = app_client_factory(model_repo, max_batch_size=1, queue_target_ms=1.5 * slow_batch * 1000)
    mv = client.app.state.dataplane.version("digits")
    gate = threading.Event()
    original = mv.batcher._predict

    def slow(rows):
        gate.wait(10)
        time.sleep(slow_batch)
        return original(rows)

    mv.batcher._predict = slow
    body = {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": [0.0] * 784}]}
    gate.set()
    assert client.post("/v2/models/digits/infer", json=body).status_code == 200  # measures the speed
    gate.clear()
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(client.post("/v2/models/digits/infer",
                                                                           json=body).status_code))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while mv.batcher.queued_rows < 1 and time.monotonic() < deadline:  # one running, one queued
        time.sleep(0.005)
    refused = client.post("/v2/models/digits/infer", content=b"{not even json",
                          headers={"content-type": "application/json"})
    gate.set()
    for thread in threads:
        thread.join()
    assert refused.status_code == 503  # not 400: refused before the body was parsed
    assert "expected wait" in refused.json()["error"]
    assert int(refused.headers["retry-after"]) >= 1
    assert answers == [200, 200]
    metrics = client.get("/metrics").text
    assert 'convserve_rejected_requests_total{model="digits",reason="queue_delay",version="2"} 1.0' in metrics


def test_under_a_backlog_the_estimate_is_the_rate_the_queue_drains_at_not_the_compute_alone():
    """Batches on the event loop: 5 ms of compute each, but the loop's other work (here a task that holds it
    60 ms at each turn, as HTTP work does) slows the drain. Timed start to start under a backlog, the estimate
    sees that; with nothing queued behind a batch, its own duration is all there is to see."""
    hog = 0.06

    async def scenario() -> tuple[float, float]:
        runtime = FakeRuntime(0.005)
        batcher = Batcher(runtime, BatchingConfig(max_batch_size=1, on_loop=True), "m:1")
        batcher.start()
        await batcher.submit(ROW)  # alone: its own duration
        alone = batcher._seconds_per_row

        stop = False

        async def busy_loop() -> None:
            while not stop:
                time.sleep(hog)  # blocks the loop, as a burst of requests being parsed does
                await asyncio.sleep(0)

        hogger = asyncio.ensure_future(busy_loop())
        await asyncio.gather(*(batcher.submit(ROW) for _ in range(8)))  # a backlog of 8
        stop = True
        await hogger
        backlogged = batcher._seconds_per_row
        await batcher.close()
        return alone, backlogged

    alone, backlogged = asyncio.run(scenario())
    assert alone < hog  # 5 ms of compute (plus this machine's overhead), no hog in between
    assert backlogged > 0.5 * hog  # most of the recent cycles included a turn of the hog


@pytest.mark.parametrize(("workers", "cpus", "target", "expected"), [
    ("auto", 2, "auto", 0.1),   # a worker per CPU: batches on the loop, the bound on at 100 ms
    ("1", 2, "auto", 0.0),      # an inference thread per model: off (the storm starves the thread)
    ("1", 2, "250", 0.25),      # set: as set
    ("auto", 2, "0", 0.0),
])
def test_the_queue_target_default_depends_on_where_batches_run(workers, cpus, target, expected, monkeypatch):
    import service.settings
    from service.settings import Settings

    monkeypatch.setattr(service.settings, "available_cpus", lambda: cpus)
    monkeypatch.delenv("CONVSERVE_INFERENCE_ON_LOOP", raising=False)
    monkeypatch.setenv("CONVSERVE_WORKERS", workers)
    monkeypatch.setenv("CONVSERVE_QUEUE_TARGET_MS", target)
    assert Settings().queue_target_seconds == expected


@pytest.mark.parametrize(("path", "body", "content_type"), [
    ("/models/digits/predict", b"not an image", "image/png"),
    ("/models/digits/versions/2/predict", b"not an image", "image/png"),
    ("/v2/models/digits/infer", b"{not json", "application/json"),
    ("/v1/models/digits:predict", b"{not json", "application/json"),
    ("/models/digits/explain", b"not an image", "image/png"),
])
def test_the_gate_refuses_before_the_app_with_the_routes_own_answer(path, body, content_type, app_client_factory,
                                                                    model_repo):
    """An overloaded model's requests are refused by the admission gate: the endpoint never runs (the bodies
    here would be a 400 there), and the answer, id and metrics are the route's own."""
    client = app_client_factory(model_repo)
    mv = client.app.state.dataplane.version("digits")
    endpoint_ran = []
    original = client.app.state.dataplane.admitted

    def admitted(*args, **kwargs):
        endpoint_ran.append(args)
        return original(*args, **kwargs)

    client.app.state.dataplane.admitted = admitted

    def full() -> None:
        raise Overloaded("model digits:2 is overloaded (expected wait 900 ms, target 100 ms); retry later",
                         retry_after=1, reason="queue_delay")

    mv.batcher.check_capacity = full
    response = client.post(path, content=body, headers={"content-type": content_type, "x-request-id": "gate-1"})
    assert response.status_code == 503
    assert response.json() == {"error": "model digits:2 is overloaded (expected wait 900 ms, target 100 ms); "
                                        "retry later"}
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-request-id"] == "gate-1"
    assert endpoint_ran == []
    metrics = client.get("/metrics").text
    template = path.replace("digits", "{name}").replace("/2/", "/{version}/")
    assert f'convserve_http_requests_total{{method="POST",route="{template}",status="503"}} 1.0' in metrics
    assert 'convserve_rejected_requests_total{model="digits",reason="queue_delay",version="2"} 1.0' in metrics


def test_the_gate_lets_everything_else_through_to_the_routes(app_client_factory, model_repo):
    client = app_client_factory(model_repo)
    assert client.post("/models/nope/predict", content=b"x", headers={"content-type": "image/png"}).status_code == 404
    assert client.post("/v2/models/digits/versions/9/infer", json={}).status_code == 404
    assert client.post("/v2/models/digits/infer", content=b"{not json",
                       headers={"content-type": "application/json"}).status_code == 400


def test_on_the_shipped_defaults_a_burst_beyond_the_queue_target_is_refused_by_expected_wait(bundled_server):
    """The admission gate is on by default (100 ms where batches run on the event loop, the default): bursts of 64-row
    cifar10 requests, each about 50 ms of compute here, queue far more than 100 ms of work, and the requests behind
    it are refused at once with 503, Retry-After and the expected wait, counted as queue_delay. Nothing but the
    bundled models is configured."""
    import json
    import re
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    rows = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "image", "shape": list(rows.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": rows.nbytes}}]}).encode()
    headers = {"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"}
    refused = 'convserve_rejected_requests_total{model="cifar10",reason="queue_delay",version="4"}'
    before = bundled_server.metric(refused)
    barrier = threading.Barrier(32)

    def call(_: int) -> httpx.Response:
        with httpx.Client(timeout=120) as client:
            barrier.wait()
            return client.post(f"{bundled_server.url}/v2/models/cifar10/infer", content=header + rows.tobytes(),
                               headers=headers)

    responses: list[httpx.Response] = []
    with ThreadPoolExecutor(32) as pool:
        for _ in range(5):  # until each worker has timed a batch (before that it admits everything)
            responses += pool.map(call, range(32))
            if any(r.status_code == 503 for r in responses):
                break
    delayed = [r for r in responses if r.status_code == 503 and "expected wait" in r.text]
    assert {r.status_code for r in responses} <= {200, 503}, [r.text for r in responses if r.status_code >= 500]
    assert delayed, [r.status_code for r in responses]
    for response in delayed:
        assert re.fullmatch(r"model cifar10:4 is overloaded \(expected wait \d+ ms, target 100 ms\); retry later",
                            response.json()["error"]), response.text
        assert re.fullmatch(r"[1-9]\d*", response.headers["retry-after"]), response.headers
    assert bundled_server.metric(refused) - before >= len(delayed)
