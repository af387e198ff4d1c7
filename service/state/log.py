"""The prediction log's writer: records are queued on the request path and written in batches by a thread.

The request path only appends one tuple per request to a bounded queue (:meth:`PredictionLog.record`); a
background thread per process takes what is queued every ``flush_seconds`` and writes it in one transaction.
If the store is slow or down, the queue fills and further records are dropped and counted
(``convserve_prediction_log_dropped_total``); a failed write drops its batch, counted the same way.
Predictions keep answering either way. The same thread applies retention (age, then row count) now and then.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Sequence

import numpy as np

from service.metrics import Metrics
from service.state.store import Record, StateStore

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
                 prune_seconds: float = 600.0, max_batch: int = 1000) -> None:
        self.store = store
        self.keep_inputs = keep_inputs
        self.flush_seconds = flush_seconds
        self.prune_seconds = prune_seconds
        self.max_age_seconds, self.max_rows = max_age_seconds, max_rows
        self.max_batch = max_batch
        self._queue: queue.Queue[Entry | None] = queue.Queue(queue_size)
        self._written = metrics.prediction_log_written
        self._dropped_full = metrics.prediction_log_dropped.labels("queue_full")
        self._dropped_error = metrics.prediction_log_dropped.labels("store_error")
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._idle = threading.Condition()
        self._pending = 0  # queued or being written
        self._last_error_logged = 0.0

    def start(self) -> None:
        self._thread.start()

    def keep(self) -> bool:
        """Whether the next request's model inputs are kept (a ``keep_inputs`` fraction of requests)."""
        return self.keep_inputs > 0 and (self.keep_inputs >= 1 or random.random() < self.keep_inputs)

    def record(self, model: str, version: str, request_id: str, classes: Sequence[int], scores: Sequence[float],
               rows: np.ndarray | None = None, arm: str | None = None) -> None:
        """Queue one answered request's predictions (on the request path: no I/O, never blocks)."""
        try:
            with self._idle:
                self._pending += 1
            self._queue.put_nowait((model, version, arm, request_id, time.time(), classes, scores, rows))
        except queue.Full:
            with self._idle:
                self._pending -= 1
            self._dropped_full.inc(len(classes))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is written (or dropped); False if that took longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (at most ``timeout``), then stop the thread."""
        if not self._thread.is_alive():
            return
        self.flush(timeout)
        try:
            self._queue.put(None, timeout=1)
        except queue.Full:
            pass
        self._thread.join(timeout)

    # The writer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        next_prune = time.monotonic()
        while True:
            if time.monotonic() >= next_prune:
                self._prune()
                next_prune = time.monotonic() + self.prune_seconds
            try:
                first = self._queue.get(timeout=self.flush_seconds)
            except queue.Empty:
                continue
            entries = [first]
            while len(entries) < self.max_batch:
                try:
                    entries.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in entries
            batch = [e for e in entries if e is not None]
            if batch:
                self._write(batch)
                with self._idle:
                    self._pending -= len(batch)
                    self._idle.notify_all()
            if stop:
                return
            time.sleep(self.flush_seconds)  # let the next batch gather: one transaction per tick, not per request

    def _write(self, batch: list[Entry]) -> None:
        records = []
        for model, version, arm, request_id, at, classes, scores, rows in batch:
            shape = ",".join(map(str, rows.shape[1:])) if rows is not None else None
            for i, (class_id, score) in enumerate(zip(classes, scores)):
                data, dtype = encoded_input(rows[i]) if rows is not None else (None, None)
                records.append(Record(model, request_id, i, version, at, int(class_id), float(score), arm,
                                      data, dtype, shape))
        try:
            self.store.write(records)
        except Exception as exc:  # the store is down or refuses: drop the batch, count it, keep serving
            self._dropped_error.inc(len(records))
            self._log_error("prediction log write failed; records dropped", exc, len(records))
        else:
            self._written.inc(len(records))

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

