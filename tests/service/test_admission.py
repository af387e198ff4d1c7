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
