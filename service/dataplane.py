"""The one handler every protocol goes through: model lookup, validation, timing, metrics, inference.

Routes (image uploads, KServe v2, TF Serving REST) only translate HTTP into calls here and
results back into their wire format.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass

import numpy as np

from service.batching import Gone
from service.errors import ClientDisconnected, DeadlineExceeded, InvalidInput, Overloaded, ServingError
from service.metrics import Metrics
from service.preprocessing import ImageLimits, preprocess
from service.repository import ModelRepository, ModelVersion
from service.settings import Settings


@dataclass
class Prediction:
    """The outcome of one inference request: the version that ran it and its probabilities."""

    model: ModelVersion
    outputs: np.ndarray


def ranked_classes(probabilities: np.ndarray, k: int) -> list[list[int]]:
    """Per row, the ids of the k most probable classes, most probable first (ties by class id)."""
    k = max(1, min(k, probabilities.shape[1]))
    return np.argsort(-probabilities, axis=1, kind="stable")[:, :k].tolist()


def top_k(mv: ModelVersion, probabilities: np.ndarray, k: int) -> list[dict[str, object]]:
    """Per row: the winning class and the k most probable classes, in input order."""
    results = []
    for row, classes in zip(probabilities.tolist(), ranked_classes(probabilities, k)):
        ranked = [{"class_id": c, "label": mv.label(c), "score": row[c]} for c in classes]
        results.append({**ranked[0], "top_k": ranked})
    return results


class DataPlane:
    def __init__(self, repository: ModelRepository, metrics: Metrics, settings: Settings) -> None:
        self.repository = repository
        self.metrics = metrics
        self.settings = settings
        self.image_limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)

    def version(self, name: str, version: str | None = None) -> ModelVersion:
        return self.repository.get(name, version)

    def check_rows(self, mv: ModelVersion, rows: np.ndarray) -> np.ndarray:
        """Validate a tensor against the model input: [N, H, W, C] float32, finite, within limits."""
        expected = mv.input.shape[1:]
        if rows.ndim == len(expected) and rows.shape == tuple(expected):
            rows = rows[None]  # a single row without its batch dimension
        if rows.ndim == 3 and expected[-1] == 1 and rows.shape[1:] == tuple(expected[:-1]):
            rows = rows[..., None]  # grayscale rows sent without the channel axis
        if rows.ndim != len(expected) + 1 or rows.shape[1:] != tuple(expected):
            raise InvalidInput(f"input {mv.input.name} must have shape [N, {', '.join(map(str, expected))}], "
                               f"got {list(rows.shape)}")
        if len(rows) == 0:
            raise InvalidInput("the request has no rows")
        if len(rows) > self.settings.max_request_rows:
            raise InvalidInput(f"{len(rows)} rows exceed the limit of {self.settings.max_request_rows} per request")
        if rows.dtype != np.float32:
            rows = rows.astype(np.float32)
        if not np.isfinite(rows).all():
            raise InvalidInput("input contains NaN or Inf values")
        return rows

    def admit(self, mv: ModelVersion) -> None:
        """Refuse a request for a full queue before its body is read or parsed."""
        assert mv.batcher is not None and mv.metrics is not None
        try:
            mv.batcher.check_capacity()
        except Overloaded:
            mv.metrics.rejected("queue_full")
            mv.metrics.outcome("rejected")
            raise

    async def infer(self, mv: ModelVersion, rows: np.ndarray, gone: Gone | None = None) -> Prediction:
        """Run validated rows [N, H, W, C] through a version's batching queue, with metrics."""
        return await self._run(mv, len(rows), mv.predict(rows, gone))

    async def _run(self, mv: ModelVersion, n: int, outputs_of: Awaitable[np.ndarray]) -> Prediction:
        m = mv.metrics
        assert m is not None
        m.inflight.inc()
        try:
            outputs = await outputs_of
        except Overloaded:
            m.rejected("queue_full")
            m.outcome("rejected")
            raise
        except DeadlineExceeded:
            m.rejected("deadline")
            m.outcome("timeout")
            raise
        except ClientDisconnected:
            m.outcome("abandoned")
            raise
        except ServingError as exc:
            m.outcome("invalid" if exc.status < 500 else "error")
            raise
        finally:
            m.inflight.dec()
        m.outcome("success")
        m.request_rows.observe(n)
        if outputs.ndim == 2:
            winners = outputs.argmax(axis=1)
            for class_id, confidence in zip(winners.tolist(), outputs[np.arange(len(winners)), winners].tolist()):
                m.predicted(class_id, mv.label(class_id), confidence)
        return Prediction(mv, outputs)

    async def infer_images(self, mv: ModelVersion, images: list[bytes], gone: Gone | None = None) -> Prediction:
        """Infer on encoded images as one request; they are decoded on the model's inference thread."""
        if not images:
            raise InvalidInput("no images in the request")
        if len(images) > self.settings.max_images_per_request:
            raise InvalidInput(f"{len(images)} images exceed the limit of "
                               f"{self.settings.max_images_per_request} per request")
        metrics = mv.metrics
        assert metrics is not None

        def prepare() -> np.ndarray:
            started = time.perf_counter()
            rows = self._decode_all(mv, images)
            metrics.preprocess_latency.observe(time.perf_counter() - started)
            return rows

        return await self._run(mv, len(images), mv.predict_prepared(len(images), prepare, gone))

    def _decode_all(self, mv: ModelVersion, images: list[bytes]) -> np.ndarray:
        spec = mv.image_spec
        assert spec is not None
        rows = np.empty((len(images), spec.height, spec.width, spec.channels), dtype=np.float32)
        for i, data in enumerate(images):
            try:
                rows[i] = preprocess(data, spec, self.image_limits)
            except ServingError as exc:
                if len(images) > 1:
                    exc.message = f"image {i}: {exc.message}"
                raise
        return rows
