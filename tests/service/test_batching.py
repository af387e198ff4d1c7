"""Dynamic batching: grouping, ordering, oversized requests, overload and deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

from service.batching import Batcher, BatchingConfig, client_deadline
from service.errors import DeadlineExceeded, InferenceFailed, ModelNotReady, Overloaded, ServingError

SLOW_BATCH_S = 0.2
"""How long each batch of :func:`slow_batcher` takes."""
ROW = np.ones((1, 2), dtype=np.float32)


class RecordingModel:
    """Doubles its input; records the batch sizes it was called with; can be made slow."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        self.gate.wait(5)
        time.sleep(self.delay)
        self.batches.append(len(rows))
        return {"double": rows * 2, "sum": rows.sum(axis=1).astype(np.int64)}


def run(coro):
    return asyncio.run(coro)


def slow_batcher(on_loop: bool, **config: Any) -> tuple[RecordingModel, Batcher, asyncio.Future]:
    """A started batcher of one row per batch, each batch taking ``SLOW_BATCH_S``, and its first request: the
    requests a test submits before it first awaits are queued with that one, and wait behind its batch.

    A fixed delay and not a gate the test opens: with batches on the loop, the test's coroutine could not run to
    open it."""
    model = RecordingModel(delay=SLOW_BATCH_S)
    batcher = Batcher(model, BatchingConfig(max_batch_size=1, on_loop=on_loop, **config), "m")
    batcher.start()
    return model, batcher, asyncio.ensure_future(batcher.submit(np.zeros((1, 2), dtype=np.float32)))


def test_concurrent_requests_are_batched_and_answered_in_order():
    async def scenario():
        model = RecordingModel()
        batcher = Batcher(model, BatchingConfig(max_batch_size=8, max_queue_delay_us=20_000), "m")
        batcher.start()
        inputs = [np.full((1, 2), i, dtype=np.float32) for i in range(8)]
        outputs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.close()
        return model, inputs, outputs

    model, inputs, outputs = run(scenario())
    for x, y in zip(inputs, outputs):
        np.testing.assert_array_equal(y["double"], x * 2)
        np.testing.assert_array_equal(y["sum"], x.sum(axis=1).astype(np.int64))  # every output, sliced alike
    assert max(model.batches) > 1
    assert sum(model.batches) == 8


def test_multi_row_requests_count_their_rows_and_big_requests_run_alone():
    async def scenario():
        model = RecordingModel()
        batcher = Batcher(model, BatchingConfig(max_batch_size=4, max_queue_delay_us=10_000), "m")
        batcher.start()
        big = np.arange(20, dtype=np.float32).reshape(10, 2)
        small = np.ones((3, 2), dtype=np.float32)
        results = await asyncio.gather(batcher.submit(big), batcher.submit(small), batcher.submit(small))
        await batcher.close()
        return model, big, small, results

    model, big, small, (r_big, r_small1, r_small2) = run(scenario())
    np.testing.assert_array_equal(r_big["double"], big * 2)
    np.testing.assert_array_equal(r_small1["double"], small * 2)
    assert r_small2["double"].shape == (3, 2)
    assert 10 in model.batches  # the oversized request ran on its own, never rejected
    assert all(b <= 4 for b in model.batches if b != 10)


def test_full_queue_is_refused_with_overloaded_and_retry_after():
    async def scenario():
        model = RecordingModel()
        model.gate.clear()  # the first batch blocks, so the queue fills up
        batcher = Batcher(model, BatchingConfig(max_batch_size=1, max_queue_size=2), "m")
        batcher.start()
        row = np.zeros((1, 2), dtype=np.float32)
        first = asyncio.ensure_future(batcher.submit(row))
        await asyncio.sleep(0.05)  # first is now executing
        queued = [asyncio.ensure_future(batcher.submit(row)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(row)
        model.gate.set()
        done = await asyncio.gather(first, *queued)
        await batcher.close()
        return refused.value, done

    refused, done = run(scenario())
    assert refused.status == 503 and refused.headers == {"Retry-After": "1"}
    assert len(done) == 3  # every accepted request got its answer


def test_request_past_its_deadline_is_not_executed(on_loop):
    async def scenario():
        model, batcher, first = slow_batcher(on_loop, timeout_s=0.05)
        late = asyncio.ensure_future(batcher.submit(ROW))  # its deadline passes while the first batch runs
        await first
        with pytest.raises(DeadlineExceeded):
            await late
        await batcher.close()
        return model

    model = run(scenario())
    assert model.batches == [1]  # only the first request ran


def test_a_tighter_client_deadline_is_the_queue_deadline(on_loop):
    """A gRPC client's own deadline (shorter than timeout_s) expires the request in the queue, unrun."""
    async def scenario():
        model, batcher, first = slow_batcher(on_loop, timeout_s=30)
        client_deadline.set(time.monotonic() + 0.05)  # for the tasks made from here on
        late = asyncio.ensure_future(batcher.submit(ROW))
        await first
        with pytest.raises(DeadlineExceeded, match=r"waited longer than 0(\.0\d*)?s in"):  # 0: gone before queued
            await late
        await batcher.close()
        return model

    model = run(scenario())
    assert model.batches == [1]


def test_abandoned_requests_are_skipped(on_loop):
    async def scenario():
        model, batcher, first = slow_batcher(on_loop)
        gone = asyncio.ensure_future(batcher.submit(ROW))
        await asyncio.sleep(0)
        assert batcher.queued_rows == 2  # both queued, neither taken yet
        gone.cancel()  # the client disconnected
        await first
        await batcher.close()
        return model

    assert run(scenario()).batches == [1]


def test_runtime_failure_fails_only_that_batch(on_loop):
    calls = []

    def flaky(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"y": rows}

    async def scenario():
        batcher = Batcher(flaky, BatchingConfig(max_batch_size=1, on_loop=on_loop), "m")
        batcher.start()
        with pytest.raises(InferenceFailed, match="RuntimeError"):
            await batcher.submit(np.zeros((1, 1), dtype=np.float32))
        result = await batcher.submit(np.ones((1, 1), dtype=np.float32))
        await batcher.close()
        return result

    assert run(scenario())["y"].tolist() == [[1.0]]


def test_closed_batcher_refuses_new_work():
    async def scenario():
        batcher = Batcher(RecordingModel(), BatchingConfig(), "m")
        batcher.start()
        await batcher.close()
        with pytest.raises(ModelNotReady):
            await batcher.submit(np.zeros((1, 1), dtype=np.float32))

    run(scenario())


def test_requests_of_disconnected_clients_are_dropped_not_run(on_loop):
    from service.errors import ClientDisconnected

    async def scenario():
        model, batcher, first = slow_batcher(on_loop)
        gone = asyncio.ensure_future(batcher.submit(ROW, gone=lambda: True))
        await first
        with pytest.raises(ClientDisconnected):
            await gone
        await batcher.close()
        return model

    assert run(scenario()).batches == [1]


def test_check_capacity_refuses_only_a_full_queue():
    async def scenario():
        model = RecordingModel()
        model.gate.clear()
        batcher = Batcher(model, BatchingConfig(max_batch_size=1, max_queue_size=1), "m")
        batcher.start()
        batcher.check_capacity()  # empty: fine
        first = asyncio.ensure_future(batcher.submit(np.zeros((1, 2), dtype=np.float32)))
        await asyncio.sleep(0.02)  # running, queue empty again
        batcher.check_capacity()
        queued = asyncio.ensure_future(batcher.submit(np.zeros((1, 2), dtype=np.float32)))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            batcher.check_capacity()
        model.gate.set()
        await asyncio.gather(first, queued)
        await batcher.close()

    run(scenario())


def test_a_failing_batch_hook_costs_no_client_its_answer():
    def hook(rows, waits, seconds):
        raise RuntimeError("metrics backend broke")

    async def scenario():
        batcher = Batcher(RecordingModel(), BatchingConfig(max_batch_size=4), "m", on_batch=hook)
        batcher.start()
        first = await batcher.submit(np.ones((1, 2), np.float32))
        second = await batcher.submit(np.full((1, 2), 3.0, np.float32))  # the worker survived the first hook
        await batcher.close()
        return first, second

    first, second = run(scenario())
    assert first["double"].tolist() == [[2.0, 2.0]] and second["double"].tolist() == [[6.0, 6.0]]


def test_a_dead_worker_fails_every_waiting_request_instead_of_leaving_it_hanging(on_loop):
    def broken_probe() -> bool:
        raise RuntimeError("probe bug")  # runs on the worker task itself, so it kills the worker

    async def scenario():
        model, batcher, first = slow_batcher(on_loop)
        queued = [asyncio.ensure_future(batcher.submit(ROW, gone)) for gone in (broken_probe, None, None)]
        results = await asyncio.wait_for(asyncio.gather(first, *queued, return_exceptions=True), 5)
        try:
            await batcher.submit(np.ones((1, 2), np.float32))
            late = None
        except ServingError as exc:
            late = exc
        await batcher.close()
        return results, late

    (first, *queued), late = run(scenario())
    assert first["double"].shape == (1, 2)  # the batch already running was answered
    assert len(queued) == 3
    for result in queued:
        assert isinstance(result, InferenceFailed)
        assert result.status == 500 and "batching worker of m failed (RuntimeError)" in result.message
    assert late is not None and late.status == 503  # closed for good: refused, not queued forever


def test_close_waits_for_queued_work_without_polling(on_loop):
    closed_while_computing: list[bool] = []

    async def scenario():
        model, batcher, first = slow_batcher(on_loop)
        queued = asyncio.ensure_future(batcher.submit(ROW))
        closing = asyncio.ensure_future(batcher.close())

        def observed(rows):  # asked where the batch runs, so on the loop too, where the test cannot look meanwhile
            closed_while_computing.append(closing.done())
            return model(rows)

        batcher._predict = observed
        await asyncio.wait_for(closing, 5)
        return await first, await queued

    first, queued = run(scenario())
    assert closed_while_computing == [False, False]  # both batches ran, and close had returned during neither
    assert first["double"].shape == (1, 2) and queued["double"].tolist() == [[2.0, 2.0]]


def test_batches_run_on_the_event_loop_or_on_the_inference_thread_as_configured(on_loop):
    threads: list[int] = []

    def model(rows):
        threads.append(threading.get_ident())
        return {"double": rows * 2}

    async def scenario():
        batcher = Batcher(model, BatchingConfig(max_batch_size=8, on_loop=on_loop), "m")
        batcher.start()
        inputs = [np.full((1, 2), i, dtype=np.float32) for i in range(8)]
        outputs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.close()
        return inputs, outputs

    inputs, outputs = run(scenario())
    for x, y in zip(inputs, outputs):
        np.testing.assert_array_equal(y["double"], x * 2)
    assert (set(threads) == {threading.get_ident()}) is on_loop  # asyncio.run runs the loop on this thread
    if on_loop:
        assert len(threads) == 1  # with no queue delay, what queued in one turn of the loop ran as one batch

