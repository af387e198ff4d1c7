"""What outlives a process and is shared by replicas: the prediction log, feedback and live quality.

:class:`State` is what the data plane and the routes call: it owns the store (:mod:`service.state.store`),
the prediction log's writer (:mod:`service.state.log`) and a small thread pool for the queries, so nothing
here ever blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from service.errors import Conflict, StateUnavailable, UnknownPrediction
from service.metrics import Metrics
from service.settings import Settings
from service.state.log import PredictionLog
from service.state.quality import version_quality
from service.state.store import (
    FeedbackResult,
    Label,
    LabelConflict,
    PredictionNotFound,
    StateStore,
    StateStoreError,
    VersionCounts,
    redacted,
)

log = logging.getLogger("service.state")
T = TypeVar("T")

FEEDBACK_WAIT_SECONDS = 2.0
"""How long feedback for a prediction not yet in the store waits for it: a prediction reaches the store a
fraction of a second after its answer (the writer's tick), possibly from another worker or replica."""


class State:
    """The store, the prediction log and the queries of one process."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = StateStore(settings.state_url)
        self.log: PredictionLog | None = None
        if settings.prediction_log:
            self.log = PredictionLog(
                self.store, metrics, keep_inputs=settings.keep_inputs, queue_size=settings.prediction_log_queue,
                max_age_seconds=settings.state_retention_days * 86400, max_rows=settings.state_max_predictions)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="state")
        self._feedback = metrics.feedback

    async def open(self) -> None:
        """Open (or create) the schema and start the writer; a store that cannot be used stops the start."""
        version = await self._call(self.store.open)
        log.info("state store open", extra={"url": redacted(self.settings.state_url), "schema": version,
                                            "prediction_log": self.log is not None,
                                            "keep_inputs": self.settings.keep_inputs})
        if self.log is not None:
            self.log.start()

    async def close(self) -> None:
        if self.log is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.log.close)
        self._executor.shutdown(wait=True)
        self.store.close()

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(function, *args))

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run a store method on the state threads; an unusable store is a 503 (:class:`StateUnavailable`)."""
        return await self._query(function, *args)

    async def _query(self, function: Callable[..., T], *args: Any) -> T:
        try:
            return await self._call(function, *args)
        except SQLAlchemyError as exc:
            raise StateUnavailable(f"the state store is unavailable ({type(exc).__name__}); retry later") from None

    # Feedback -----------------------------------------------------------------------------------

    async def add_feedback(self, model: str, labels: Sequence[Label]) -> FeedbackResult:
        """Store labels for logged predictions, all or none (404 unknown id, 409 a different label)."""
        deadline = time.monotonic() + FEEDBACK_WAIT_SECONDS
        while True:
            try:
                result = await self._query(self.store.add_feedback, model, labels)
                break
            except PredictionNotFound as exc:
                if time.monotonic() >= deadline:
                    self._feedback.labels(model, "", "unknown_prediction").inc()
                    raise UnknownPrediction(f"model {model!r} has no logged prediction with id {exc.request_id!r} "
                                            f"and index {exc.index} (predictions are kept for "
                                            f"{self.settings.state_retention_days:g} days)") from None
                await asyncio.sleep(0.1)  # it may still be in a writer's queue, here or in another process
            except LabelConflict as exc:
                self._feedback.labels(model, "", "conflict").inc()
                raise Conflict(str(exc)) from None
        for version, predicted, label in result.outcomes:
            self._feedback.labels(model, version, "correct" if predicted == label else "incorrect").inc()
        return result

    # Quality ------------------------------------------------------------------------------------

    async def counts(self, model: str, since: float | None, recent: int | None = None) -> list[VersionCounts]:
        return await self._query(self.store.version_counts, model, since, recent)

    def quality(self, counts: Sequence[VersionCounts], labels_of: Callable[[str], list[str]],
                metadata_of: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
        """Per version, newest first: live accuracy, its interval, the confusion matrix and drift."""
        ordered = sorted(counts, key=lambda c: int(c.version) if c.version.isdigit() else -1, reverse=True)
        return [version_quality(c, labels_of(c.version), metadata_of(c.version)) for c in ordered]

    def publish(self, model: str, versions: Sequence[dict[str, Any]]) -> None:
        """Set the live-quality gauges of a model's versions."""
        m = self.metrics
        for v in versions:
            if v["accuracy"] is not None:
                m.live_accuracy.labels(model, v["version"]).set(v["accuracy"])
            m.live_labelled.labels(model, v["version"]).set(v["labelled"])
            if v["drift"].get("psi") is not None:
                m.drift_psi.labels(model, v["version"]).set(v["drift"]["psi"])


__all__ = ["State", "StateStore", "StateStoreError", "StateUnavailable", "Label", "FeedbackResult"]
