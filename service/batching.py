"""Dynamic batching: concurrent requests for one model version are queued and run together.

One worker task per model version takes whatever is waiting (up to ``max_batch_size`` rows,
waiting at most ``max_queue_delay`` for more) and runs it on the version's inference thread,
then hands each caller its own rows back. While a batch computes, new requests queue up, so
batches grow with load on their own.

Where a worker process has only one CPU to itself (``BatchingConfig.on_loop``), the batch runs on
the event loop instead: the thread would buy no parallelism there, and its hand-offs (a wakeup,
a GIL transfer and a context switch each way, per batch) cost more than it overlaps. Requests
that arrive while such a batch computes wait in the socket buffers and form the next batch, so
batching still grows with load. The queue is bounded twice: by its length (a full queue
refuses at once) and by the time a new request would wait (see :meth:`Batcher.expected_wait`).

A request may carry its rows, or a ``prepare`` function that makes them (image decoding):
that runs where the batch runs (the inference thread, or the loop), so with a thread the event
loop only speaks HTTP and one thread hop serves the whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import tracing
from service.errors import (
    ClientDisconnected,
    DeadlineExceeded,
    InferenceFailed,
    ModelNotReady,
    Overloaded,
    ServingError,
)

Prepare = Callable[[], np.ndarray]
Gone = Callable[[], bool]  # True once the client has disconnected
Outputs = dict[str, np.ndarray]  # a model's outputs by name, each [rows, ...]
Predict = Callable[[np.ndarray], Outputs]
log = logging.getLogger("service.batching")
client_deadline: ContextVar[float | None] = ContextVar("client_deadline", default=None)
"""The caller's own deadline (``time.monotonic()``), when it has one tighter than ``timeout_s``: a gRPC client's.
Set by the protocol for the request's task; a request still queued past it is dropped unrun."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 32
    """Most rows run together in one batch; a bigger request runs on its own."""
    max_queue_delay_us: int = 0
    """How long the first queued request may wait for others (0: batch only what is waiting)."""
    max_queue_size: int = 512
    """Most rows waiting; beyond it requests are refused with 503."""
    timeout_s: float = 30.0
    """A request still queued after this long is answered 504 and never run."""
    queue_target_s: float = 0.0
    """Admission refuses a request expected to wait longer than this before its batch starts (0: off)."""
    on_loop: bool = False
    """Run batches on the event loop rather than on the version's inference thread."""


@dataclass
class _Item:
    n: int
    rows: np.ndarray | None
    prepare: Prepare | None
    future: asyncio.Future[Outputs]
    enqueued: float
    deadline: float
    gone: Gone | None
    span: Any = None  # the request's span, when it is traced (service.tracing)
    enqueued_ns: int = 0  # when it was queued, for its queue span


@dataclass
class _Executed:
    outputs: Outputs | None
    failures: dict[int, ServingError]
    rows: int
    compute_seconds: float


class Batcher:
    """Queues requests for one runtime and executes them in batches on a dedicated thread."""

    def __init__(self, predict: Predict, config: BatchingConfig, name: str,
                 on_batch: Callable[[int, list[float], float], None] | None = None) -> None:
        self._predict = predict
        self.config = config
        self._name = name
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()  # a full batch is queued: the wait for company (max_queue_delay) ends
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._running: list[_Item] = []  # the batch being executed, failed too if the worker dies
        self._running_rows = 0
        self._seconds_per_row = 0.0  # moving average of the recent service time per row (0: none seen yet)
        self._idle = asyncio.Event()  # set whenever nothing is queued or running (close() waits on it)
        self._idle.set()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self._name}")
            self._task.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        """The worker task ended: if it died, nobody would ever answer the queue, so fail it now."""
        if task.cancelled():
            error: ServingError = ModelNotReady(f"model {self._name} is unloading")
        else:
            exc = task.exception()
            if exc is None:
                return
            log.error("batching worker died", exc_info=exc, extra={"model": self._name})
            error = InferenceFailed(f"the batching worker of {self._name} failed ({exc.__class__.__name__})")
        self._closed = True
        for item in [*self._running, *self._queue]:
            if not item.future.done():
                item.future.set_exception(error)
        self._queue.clear()
        self._running, self._running_rows = [], 0
        self._queued_rows = 0
        self._idle.set()

    # Admission ---------------------------------------------------------------------------------
    #
    # Why an estimate from the service rate and not CoDel's minimum sojourn time: admission has to
    # decide before a request is queued (so that a refusal costs no body read and no decoding),
    # and CoDel judges requests already in the queue, reacting only after a full interval of
    # standing delay. The wait a newcomer faces is the work ahead of it divided by the rate the
    # batcher drains it at, and both are known here: the rows queued or running, and a moving
    # average of the measured seconds per row of recent batches. Under a backlog a batch is timed
    # from its start to the next one's, not by its compute alone: that is the rate the queue
    # really drains at, with whatever else takes the CPU meanwhile (the HTTP work of a worker
    # whose batches run on its event loop, other processes). Otherwise its own duration is used.
    # The average follows a change in service speed within a few batches.
    #
    # Less than one full batch ahead is always admitted: refusing it could only leave the model
    # idle. Without that floor, a storm of refused clients that retry at once starves the
    # batches of CPU, the measured rate falls, and ever fewer requests are admitted until
    # goodput collapses; with it, the model always has a full batch to run.

    SPEED_SMOOTHING = 0.3
    """Weight of the newest batch in the moving average of seconds per row."""

    def expected_wait(self) -> float:
        """Seconds a request admitted now would wait before its batch starts (0 until a batch has run)."""
        return (self._queued_rows + self._running_rows) * self._seconds_per_row

    def check_capacity(self) -> None:
        """Refuse at once, before a request's body is even read, when the queue is full or when the
        request would wait longer than ``queue_target_s``; Retry-After says when to come back."""
        if self._queued_rows >= self.config.max_queue_size:
            raise Overloaded(f"model {self._name} is overloaded ({self._queued_rows} rows queued); retry later",
                             retry_after=self._retry_after(), reason="queue_full")
        target = self.config.queue_target_s
        if target > 0 and self._queued_rows + self._running_rows >= self.config.max_batch_size:
            wait = self.expected_wait()
            if wait > target:
                raise Overloaded(f"model {self._name} is overloaded (expected wait {wait * 1000:.0f} ms, target "
                                 f"{target * 1000:.0f} ms); retry later", retry_after=self._retry_after(),
                                 reason="queue_delay")

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.expected_wait()))

    def _observe_speed(self, rows: int, seconds: float) -> None:
        if rows <= 0:
            return
        sample = seconds / rows
        if self._seconds_per_row == 0.0:
            self._seconds_per_row = sample
        else:
            self._seconds_per_row += self.SPEED_SMOOTHING * (sample - self._seconds_per_row)

    async def submit(self, rows: np.ndarray, gone: Gone | None = None) -> Outputs:
        """Queue ``rows`` (a batch of one or more inputs) and wait for their outputs."""
        return await self._enqueue(len(rows), rows, None, gone)

    async def submit_prepared(self, n: int, prepare: Prepare, gone: Gone | None = None) -> Outputs:
        """Queue a request of ``n`` rows that ``prepare()`` makes where the batch runs."""
        return await self._enqueue(n, None, prepare, gone)

    async def _enqueue(self, n: int, rows: np.ndarray | None, prepare: Prepare | None,
                       gone: Gone | None) -> Outputs:
        return await self.enqueue(n, rows, prepare, gone)

    def enqueue(self, n: int, rows: np.ndarray | None, prepare: Prepare | None = None,
                gone: Gone | None = None) -> asyncio.Future[Outputs]:
        """Queue a request and return the future of its outputs (for a caller that does not wait on it)."""
        if self._closed:
            raise ModelNotReady(f"model {self._name} is unloading")
        if self._queued_rows + n > self.config.max_queue_size and self._queued_rows:
            raise Overloaded(f"model {self._name} is overloaded ({self._queued_rows} rows queued); retry later")
        now = time.monotonic()
        deadline = now + self.config.timeout_s
        own = client_deadline.get()
        item = _Item(n, rows, prepare, asyncio.get_running_loop().create_future(), now,
                     deadline if own is None else min(deadline, own), gone)
        if tracing.tracer is not None and (span := tracing.current_span()) is not None:
            item.span, item.enqueued_ns = span, time.time_ns()
        self._queue.append(item)
        self._queued_rows += n
        self._idle.clear()
        self._wakeup.set()
        if self._queued_rows >= self.config.max_batch_size:
            self._full.set()
        return item.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        max_rows = self.config.max_batch_size
        delay = self.config.max_queue_delay_us / 1e6
        backlogged: tuple[float, int, float] | None = None  # (start, rows, seconds) of a batch a backlog followed
        while True:
            if not self._queue:
                if backlogged is not None:  # the backlog was gone after all: that batch's own duration
                    self._observe_speed(backlogged[1], backlogged[2])
                    backlogged = None
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
            if delay and self._queued_rows < max_rows:  # wait for company, but not once a full batch is here
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._full.wait()
            elif self.config.on_loop:
                await asyncio.sleep(0)  # the loop's other ready requests join this batch (and answers go out)
            batch = self._take(max_rows)
            if not batch:
                continue
            started = time.monotonic()
            if backlogged is not None:  # start to start: the rate the queue drained at
                self._observe_speed(backlogged[1], started - backlogged[0])
                backlogged = None
            self._running = batch
            self._running_rows = sum(item.n for item in batch)
            span = self._trace(batch) if tracing.tracer is not None else None
            try:
                if self.config.on_loop:
                    result = self._execute(batch)
                else:
                    result = await loop.run_in_executor(self._executor, self._execute, batch)
            except Exception as exc:  # a runtime failure fails this batch only
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(InferenceFailed(f"inference failed: {exc.__class__.__name__}"))
                self._running, self._running_rows = [], 0
                if span is not None:
                    tracing.end_batch(span, "error", len(batch))
                continue
            if span is not None:
                tracing.end_batch(span, "partial" if result.failures else "success", len(result.failures))
            elapsed = time.monotonic() - started
            if self._queue:
                backlogged = (started, self._running_rows, elapsed)
            else:
                self._observe_speed(self._running_rows, elapsed)
            if self._on_batch is not None and result.rows:
                try:
                    self._on_batch(result.rows, [started - i.enqueued for i in batch], result.compute_seconds)
                except Exception:  # metrics must never cost a client its answer
                    log.exception("batch hook failed", extra={"model": self._name})
            offset = 0
            for index, item in enumerate(batch):
                failure = result.failures.get(index)
                if failure is not None:
                    if not item.future.done():
                        item.future.set_exception(failure)
                    continue
                if not item.future.done() and result.outputs is not None:
                    item.future.set_result({name: array[offset:offset + item.n]
                                            for name, array in result.outputs.items()})
                offset += item.n
            self._running, self._running_rows = [], 0

    def _trace(self, batch: list[_Item]) -> Any:
        """The batch's span, when a request in it is traced, and each traced request's queue span (linked to it)."""
        traced = [item for item in batch if item.span is not None]
        if not traced:
            return None
        started_ns = time.time_ns()
        model, _, version = self._name.rpartition(":")
        span = tracing.batch_span(model, version, [item.span for item in traced], self._running_rows, started_ns)
        span.set_attribute("convserve.batch.on_loop", self.config.on_loop)
        context = span.get_span_context()
        for item in traced:
            tracing.queue_span(item.span, item.enqueued_ns, started_ns, context)
        return span

    def _execute(self, batch: list[_Item]) -> _Executed:
        """Where batches run (the inference thread or the loop): prepare what needs it, then run the rows as one
        batch."""
        failures: dict[int, ServingError] = {}
        arrays = []
        for index, item in enumerate(batch):
            if item.rows is None:
                try:
                    item.rows = item.prepare()  # type: ignore[misc]
                except ServingError as exc:  # a bad image fails its own request only
                    failures[index] = exc
                    continue
                except Exception as exc:  # so does an unforeseen decoder error: the batch's others still run
                    log.exception("preparing a request failed", extra={"model": self._name})
                    failures[index] = InferenceFailed(f"preprocessing failed: {exc.__class__.__name__}")
                    continue
            arrays.append(item.rows)
        if not arrays:
            return _Executed(None, failures, 0, 0.0)
        inputs = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        started = time.perf_counter()
        outputs = self._predict(inputs)
        return _Executed(outputs, failures, len(inputs), time.perf_counter() - started)

    def _take(self, max_rows: int) -> list[_Item]:
        """Pop requests up to ``max_rows`` rows (always at least one); drop abandoned or expired ones."""
        batch: list[_Item] = []
        rows = 0
        now = time.monotonic()
        while self._queue:
            item = self._queue[0]
            if batch and rows + item.n > max_rows:
                break
            gone = item.gone is not None and item.gone()  # asked while queued, so a failing probe fails it too
            self._queue.popleft()
            self._queued_rows -= item.n
            if item.future.done():  # the caller was cancelled
                continue
            if gone:  # the client disconnected: nobody reads the answer
                item.future.set_exception(ClientDisconnected("client disconnected before the request ran"))
                continue
            if now > item.deadline:
                # the wait it was allowed: a client's own deadline may have passed before it was even queued
                waited = max(0.0, min(self.config.timeout_s, item.deadline - item.enqueued))
                item.future.set_exception(DeadlineExceeded(
                    f"request waited longer than {waited:.3g}s in the queue of {self._name}"))
                continue
            batch.append(item)
            rows += item.n
        return batch

    async def close(self) -> None:
        """Stop taking work, let queued and running requests finish, then stop the thread."""
        self._closed = True
        if self._task is not None and not self._task.done():
            await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # the worker died earlier; _worker_done logged it and failed its requests
                pass
        self._executor.shutdown(wait=True)
