"""The prediction log's writer: records are queued on the request path and written in batches by a thread.

The request path only appends one tuple per request to a bounded queue (:meth:`PredictionLog.record`); a
background thread per process takes what is queued every ``flush_seconds`` and writes it in one transaction,
in the column order of :data:`service.state.store.PREDICTION_COLUMNS`.
If the store is slow or down, the queue fills and further records are dropped and counted
(``convserve_prediction_log_dropped_total``); a failed write drops its batch, counted the same way.
Predictions keep answering either way. The same thread applies retention (age, then row count) now and then.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from service.metrics import Metrics
from service.state.store import StateStore

log = logging.getLogger("service.state")

# One queued request: model, version, arm, request id, time, predicted classes, their scores, kept inputs.
Entry = tuple[str, str, str | None, str, float, Sequence[int], Sequence[float], np.ndarray | None]


def encoded_input(row: np.ndarray) -> tuple[bytes, str]:
    """A model input row as stored: uint8 when its values are whole numbers 0..255 (what image decoding
    gives), float32 otherwise (a tensor a client sent)."""
    as_bytes = row.astype(np.uint8)
    if np.array_equal(as_bytes, row):
        return as_bytes.tobytes(), "uint8"
    return np.ascontiguousarray(row, dtype=np.float32).tobytes(), "float32"


class PredictionLog:
    """A bounded queue of predictions to log and the thread that writes them."""

    def __init__(self, store: StateStore, metrics: Metrics, *, keep_inputs: float, queue_size: int,
                 max_age_seconds: float, max_rows: int, flush_seconds: float = 0.1,
                 prune_seconds: float = 600.0, max_batch: int = 2000) -> None:
        self.store = store
        self.keep_inputs = keep_inputs
        self.flush_seconds = flush_seconds
        self.prune_seconds = prune_seconds
        self.max_age_seconds, self.max_rows = max_age_seconds, max_rows
        self.max_batch = max_batch
        self.queue_size = queue_size
        # A deque, not a queue.Queue: appending and popping are atomic under the GIL, so the request path takes
        # no lock and wakes no thread; the writer looks every flush_seconds.
        self._queue: deque[Entry] = deque()
        self._queued = 0  # entries appended so far (by the event loop's thread only)
        self._done = 0  # entries written or dropped by the writer
        self._written = metrics.prediction_log_written
        self._dropped_full = metrics.prediction_log_dropped.labels("queue_full")
        self._dropped_error = metrics.prediction_log_dropped.labels("store_error")
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._stop = threading.Event()
        self._last_error_logged = 0.0

    def start(self) -> None:
        self._thread.start()

    def keep(self) -> bool:
        """Whether the next request's model inputs are kept (a ``keep_inputs`` fraction of requests)."""
        return self.keep_inputs > 0 and (self.keep_inputs >= 1 or random.random() < self.keep_inputs)

    def record(self, model: str, version: str, request_id: str, classes: Sequence[int], scores: Sequence[float],
               rows: np.ndarray | None = None, arm: str | None = None) -> None:
        """Queue one answered request's predictions (on the request path: no I/O, no lock, never blocks)."""
        if len(self._queue) >= self.queue_size:
            self._dropped_full.inc(len(classes))
            return
        self._queue.append((model, version, arm, request_id, time.time(), classes, scores, rows))
        self._queued += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is written (or dropped); False if that took longer than ``timeout``."""
        target, deadline = self._queued, time.monotonic() + timeout
        while self._done < target:
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (at most ``timeout``), then stop the thread."""
        if not self._thread.is_alive():
            return
        self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout)

    # The writer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        next_prune = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_prune:
                self._prune()
                next_prune = time.monotonic() + self.prune_seconds
            batch: list[Entry] = []
            while self._queue and len(batch) < self.max_batch:
                batch.append(self._queue.popleft())
            if batch:
                self._write(batch)
                self._done += len(batch)
            if len(self._queue) < self.max_batch:  # a full batch waiting is written at once
                self._stop.wait(self.flush_seconds)  # one transaction per tick, not per request

    def _write(self, batch: list[Entry]) -> None:
        rows: list[tuple[object, ...]] = []
        for model, version, arm, request_id, at, classes, scores, inputs in batch:
            if inputs is None:
                rows.extend((model, request_id, i, version, arm, at, class_id, score, None, None, None)
                            for i, (class_id, score) in enumerate(zip(classes, scores)))
                continue
            shape = ",".join(map(str, inputs.shape[1:]))
            for i, (class_id, score) in enumerate(zip(classes, scores)):
                data, dtype = encoded_input(inputs[i])
                rows.append((model, request_id, i, version, arm, at, class_id, score, data, dtype, shape))
        try:
            self.store.write_rows(rows)
        except Exception as exc:  # the store is down or refuses: drop the batch, count it, keep serving
            self._dropped_error.inc(len(rows))
            self._log_error("prediction log write failed; records dropped", exc, len(rows))
        else:
            self._written.inc(len(rows))

    def _prune(self) -> None:
        try:
            removed = self.store.prune(self.max_age_seconds, self.max_rows)
        except Exception as exc:
            self._log_error("prediction log retention failed", exc, 0)
            return
        if removed:
            log.info("prediction log retention", extra={"removed": removed})

    def _log_error(self, message: str, exc: Exception, records: int) -> None:
        now = time.monotonic()
        if now - self._last_error_logged >= 10:  # a store that is down must not flood the log
            self._last_error_logged = now
            log.warning(message, extra={"records": records, "error": f"{type(exc).__name__}: {exc}"[:500]})
