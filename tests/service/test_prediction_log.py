"""The prediction log's writer: off the request path, bounded, and harmless when the store is slow or down."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.metrics import Metrics
from service.state.log import PredictionLog, encoded_input
from service.state.store import StateStore


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class SlowStore(StateStore):
    """A store whose writes wait until released: a database that hangs."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.release = threading.Event()

    def write_rows(self, rows: list[tuple]) -> int:
        self.release.wait(10)
        return super().write_rows(rows)


class BrokenStore(StateStore):
    def write_rows(self, rows: list[tuple]) -> int:
        raise ConnectionError("the database went away")


def opened(store: StateStore) -> StateStore:
    store.open()
    return store


def test_records_are_written_in_batches_by_the_thread(tmp_path: Path):
    store, metrics = opened(StateStore(f"sqlite:///{tmp_path}/s.sqlite")), Metrics()
    log = PredictionLog(store, metrics, keep_inputs=0, queue_size=100, max_age_seconds=1e9, max_rows=10**6)
    log.start()
    for i in range(50):
        log.record("digits", "1", f"r{i}", [i % 10, 3], [0.9, 0.8])
    assert log.flush(10)
    assert store.count_predictions("digits") == 100
    assert sample(metrics, "convserve_prediction_log_written_total") == 100
    log.close()


def test_a_hanging_store_never_blocks_the_request_path_and_the_excess_is_counted(tmp_path: Path):
    store, metrics = opened(SlowStore(f"sqlite:///{tmp_path}/s.sqlite")), Metrics()
    log = PredictionLog(store, metrics, keep_inputs=0, queue_size=10, max_age_seconds=1e9, max_rows=10**6,
                        max_batch=5, flush_seconds=0.01)
    log.start()
    started = time.perf_counter()
    for i in range(200):
        log.record("digits", "1", f"r{i}", [1], [0.5])
    # 200 calls while the writer is stuck for 10 s: each a queue append or a counted drop, never a wait on it
    assert time.perf_counter() - started < 2
    dropped = sample(metrics, "convserve_prediction_log_dropped_total", reason="queue_full")
    assert 200 - 10 - 5 <= dropped <= 200 - 10  # the queue holds 10, the stuck batch at most 5 more
    store.release.set()
    assert log.flush(10)
    assert store.count_predictions() == 200 - dropped
    log.close()


def test_a_failing_store_drops_and_counts_its_batches(tmp_path: Path):
    store, metrics = opened(BrokenStore(f"sqlite:///{tmp_path}/s.sqlite")), Metrics()
    log = PredictionLog(store, metrics, keep_inputs=0, queue_size=100, max_age_seconds=1e9, max_rows=10**6)
    log.start()
    for i in range(20):
        log.record("digits", "1", f"r{i}", [1, 2], [0.5, 0.4])
    assert log.flush(10)
    assert sample(metrics, "convserve_prediction_log_dropped_total", reason="store_error") == 40
    assert sample(metrics, "convserve_prediction_log_written_total") == 0
    log.close()


def test_kept_inputs_are_stored_as_the_model_saw_them(tmp_path: Path):
    store = opened(StateStore(f"sqlite:///{tmp_path}/s.sqlite"))
    log = PredictionLog(store, Metrics(), keep_inputs=1, queue_size=100, max_age_seconds=1e9, max_rows=10**6)
    log.start()
    rows = np.stack([np.full((2, 2, 1), 7, np.float32), np.full((2, 2, 1), 250, np.float32)])
    log.record("digits", "1", "r", [3, 4], [0.9, 0.8], rows)
    assert log.flush(10)
    from service.state.store import Label

    store.add_feedback("digits", [Label("r", 0, 3), Label("r", 1, 4)])
    examples = store.labelled_examples("digits")
    assert [np.frombuffer(e.input, np.uint8).tolist() for e in examples] == [[7] * 4, [250] * 4]
    assert {e.input_shape for e in examples} == {"2,2,1"}
    log.close()


@pytest.mark.parametrize(("values", "dtype"), [([0.0, 12.0, 255.0], "uint8"), ([0.5, 1.0, 2.0], "float32"),
                                               ([-1.0, 0.0, 1.0], "float32"), ([0.0, 256.0, 1.0], "float32")])
def test_inputs_are_uint8_only_when_that_loses_nothing(values, dtype):
    data, kind = encoded_input(np.array(values, np.float32))
    assert kind == dtype
    assert np.array_equal(np.frombuffer(data, np.uint8 if dtype == "uint8" else np.float32), values)


def test_keep_inputs_keeps_about_its_fraction(tmp_path: Path):
    store = StateStore(f"sqlite:///{tmp_path}/s.sqlite")
    assert not any(PredictionLog(store, Metrics(), keep_inputs=0, queue_size=1, max_age_seconds=1,
                                 max_rows=1).keep() for _ in range(1000))
    assert all(PredictionLog(store, Metrics(), keep_inputs=1, queue_size=1, max_age_seconds=1,
                             max_rows=1).keep() for _ in range(1000))
    tenth = PredictionLog(store, Metrics(), keep_inputs=0.1, queue_size=1, max_age_seconds=1, max_rows=1)
    kept = sum(tenth.keep() for _ in range(20000))
    assert 1700 < kept < 2300  # 2000 expected; a binomial's sd is 42
