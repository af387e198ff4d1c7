"""The one handler every protocol goes through: lookup, admission, validation, metrics, inference,
and the metadata and readiness the protocols report.

Routes (image uploads, KServe v2, TF Serving REST, and any later protocol) only translate their
wire format into calls here and results back. An inference request is admitted once::

    async with dataplane.admitted(name, version) as mv:   # 404/503 before the body is read
        body = ...                                        # the protocol reads and parses it
        prediction = await dataplane.infer(mv, rows, gone)

and the version it was admitted to stays loaded until the block ends.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import tracing
from service.batching import Gone, Outputs
from service.decoding import DecodePool
from service.errors import (
    ClientDisconnected,
    DeadlineExceeded,
    Forbidden,
    InvalidInput,
    Overloaded,
    ServingError,
    Unauthorized,
)
from service.json_bodies import JsonDecoder
from service.limits import check_images, finite_outputs
from service.metrics import Metrics
from service.preprocessing import ImageLimits
from service.repository import VERSION_LABELS, Model, ModelRepository, ModelVersion, VersionStatus
from service.rollout import Rollouts
from service.settings import Settings
from service.state import State


@dataclass
class Prediction:
    """The outcome of one inference request: the version that ran it and every output by name."""

    model: ModelVersion
    outputs: Outputs

    @property
    def probabilities(self) -> np.ndarray:
        """The class-probabilities output [N, classes]."""
        return self.outputs[self.model.output.name]


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


def error_outcome(exc: ServingError) -> tuple[str, str | None]:
    """A failed request's outcome label, and its rejection reason when it was refused or timed out queued."""
    if isinstance(exc, Overloaded):
        return "rejected", exc.reason
    if isinstance(exc, DeadlineExceeded):
        return "timeout", "deadline"
    if isinstance(exc, ClientDisconnected):
        return "abandoned", None
    return ("invalid" if exc.status < 500 else "error"), None


class Admission:
    """``async with dataplane.admitted(...) as mv``: an admitted request's hold on its version."""

    __slots__ = ("_hold",)

    def __init__(self, hold: AbstractContextManager[ModelVersion]) -> None:
        self._hold = hold

    async def __aenter__(self) -> ModelVersion:
        return self._hold.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self._hold.__exit__(None, None, None)


class DataPlane:
    def __init__(self, repository: ModelRepository, metrics: Metrics, settings: Settings,
                 state: State | None = None) -> None:
        self.repository = repository
        self.state = state
        self.prediction_log = state.log if state is not None else None
        self.metrics = metrics
        self.settings = settings
        self.image_limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels, settings.max_jpeg_scans,
                                        settings.max_request_pixels)
        self.decoder = DecodePool(settings.decode_threads, self.image_limits, settings.inline_decode_pixels,
                                  settings.request_timeout_seconds)
        self.json_decoder = JsonDecoder()
        self.rollouts = Rollouts(settings, repository, metrics, state, self.decoder)

    def close(self) -> None:
        self.decoder.close()
        self.json_decoder.close()

    # Lookup, metadata and readiness -----------------------------------------------------------

    def version(self, name: str, version: str | None = None) -> ModelVersion:
        """The version a request names (or the newest ready one): 404 or 503 otherwise."""
        return self.repository.get(name, version)

    def model(self, name: str) -> Model:
        return self.repository.model(name)

    def models(self) -> list[Model]:
        return self.repository.models()

    def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Open Inference Protocol model metadata: name, versions, platform, inputs and outputs."""
        mv = self.version(name, version)
        versions = [mv.version] if version else [v.version for v in self.model(name).ready_versions()]
        return {"name": mv.name, "versions": [str(v) for v in versions], "platform": mv.runtime.platform,
                "inputs": [s.to_dict() for s in mv.runtime.inputs],
                "outputs": [s.to_dict() for s in mv.runtime.outputs]}

    def version_statuses(self, name: str, version: str | None = None) -> list[VersionStatus]:
        """The state of every known version of a model (newest first), or of the one named (404 if unknown)."""
        model = self.model(name)
        if version is None:
            return list(reversed(model.statuses()))
        if version in VERSION_LABELS:  # stable, canary: the version the label names now (404 if none)
            version = str(self.version(name, version).version)
        statuses = [s for s in model.statuses() if str(s.version) == version]
        if not statuses:
            self.version(name, version)  # raises the 404 with its message
        return statuses

    def model_ready(self, name: str, version: str | None = None) -> tuple[bool, VersionStatus | None]:
        """Whether a model (or one version) serves, and the version's status when one is named."""
        model = self.model(name)
        if version is None:
            return model.serving is not None, None
        status = self.version_statuses(name, version)[0]
        return status.state == "READY", status

    def ready(self) -> bool:
        return self.repository.ready()

    def version_metadata(self, model: Model, version: str) -> dict[str, Any]:
        """A version's metadata.json: the loaded version's, else the file's if it is still on disk."""
        if not version.isdigit():
            return {}
        loaded = model.loaded.get(int(version))
        if loaded is not None:
            return loaded.metadata
        path = self.settings.models_dir / model.name / str(int(version)) / "metadata.json"
        try:
            metadata = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return metadata if isinstance(metadata, dict) else {}

    def version_labels(self, model: Model, version: str) -> list[str]:
        """A version's class labels (those of the version serving now when it is not known any more)."""
        if version.isdigit() and int(version) in model.loaded:
            return model.loaded[int(version)].labels
        labels = self.version_metadata(model, version).get("labels")
        if isinstance(labels, list) and labels:
            return [str(x) for x in labels]
        return model.serving.labels if model.serving is not None else []

    def authorize_admin(self, authorization: str) -> None:
        """Check an ``Authorization`` value against the admin token (repository API): 401 or 403 unless it matches."""
        token = self.settings.admin_token
        if token is None or not token.get_secret_value():
            raise Forbidden("the repository API is off; set CONVSERVE_ADMIN_TOKEN to enable it")
        scheme, _, supplied = authorization.partition(" ")
        if scheme.lower() != "bearer" or not supplied:
            raise Unauthorized("the repository API needs an 'Authorization: Bearer <token>' header")
        if not hmac.compare_digest(supplied.strip().encode(), token.get_secret_value().encode()):
            raise Forbidden("wrong admin token")

    # Inference ---------------------------------------------------------------------------------

    def check_admission(self, name: str, version: str | None = None, key: str | None = None) -> ModelVersion:
        """The version a request names (unversioned: stable, or a canary's candidate, by the rollout ``key`` when
        the client sent one), if it takes the request now: 404 if unknown, 503 if not ready or overloaded (a
        refusal is counted here)."""
        if version is None and self.rollouts.active:
            version = self.rollouts.route(name, key)
        mv = self.version(name, version)
        try:
            mv.batcher.check_capacity()
        except Overloaded as exc:
            mv.metrics.rejected(exc.reason)
            mv.metrics.outcome("rejected")
            raise
        return mv

    def admitted(self, name: str, version: str | None = None, key: str | None = None) -> Admission:
        """Look the version up and admit a request to it before its body is read (404, 503 otherwise);
        ``async with`` it. The version stays loaded until the block ends, even if it is unloaded meanwhile."""
        if tracing.tracer is None:
            return Admission(self.check_admission(name, version, key).hold())
        with tracing.stage("admission", {"convserve.model": name}) as span:
            mv = self.check_admission(name, version, key)
            if span is not None:  # what the request was admitted to: on this span and on the request's
                chosen: dict[str, Any] = {"convserve.model": mv.name, "convserve.model.version": mv.version}
                arm = self.rollouts.arm(mv) if self.rollouts.active else None
                if arm is not None:
                    chosen["convserve.rollout.arm"] = arm
                span.set_attributes(chosen)
        if span is not None:
            tracing.annotate(**chosen)
        return Admission(mv.hold())

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

    async def infer(self, mv: ModelVersion, rows: np.ndarray, gone: Gone | None = None,
                    request_id: str | None = None) -> Prediction:
        """Run validated rows [N, H, W, C] through a version's batching queue, with metrics; with a
        ``request_id``, the answer is logged under it (the prediction log)."""
        kept = rows if request_id is not None and self._keep_inputs() else None
        target = self.rollouts.mirror_target(mv) if self.rollouts.active else None
        mirror = (target, rows, None) if target is not None else None
        return await self._run(mv, len(rows), mv.predict(rows, gone), request_id, kept, mirror)

    def _keep_inputs(self) -> bool:
        return self.prediction_log is not None and self.prediction_log.keep()

    async def _run(self, mv: ModelVersion, n: int, outputs_of: Awaitable[Outputs], request_id: str | None = None,
                   rows: np.ndarray | list[np.ndarray] | None = None,
                   mirror: tuple[ModelVersion, Any, list[bytes] | None] | None = None) -> Prediction:
        m = mv.metrics
        rollouts = self.rollouts
        in_rollout = bool(rollouts.active) and rollouts.arm(mv) is not None
        started = time.perf_counter()
        m.inflight.inc()
        try:
            outputs = finite_outputs(await outputs_of, f"{mv.name}:{mv.version}")
        except ServingError as exc:
            outcome, reason = error_outcome(exc)
            if reason is not None:
                m.rejected(reason)
            m.outcome(outcome)
            if in_rollout and outcome in ("error", "timeout"):
                rollouts.answered(mv, time.perf_counter() - started, True)
            raise
        finally:
            m.inflight.dec()
        m.outcome("success")
        m.request_rows.observe(n)
        prediction = Prediction(mv, outputs)
        probabilities = prediction.probabilities
        winners = probabilities.argmax(axis=1)
        classes, scores = winners.tolist(), probabilities[np.arange(len(winners)), winners].tolist()
        for class_id, confidence in zip(classes, scores):
            m.predicted(mv.label(class_id), confidence)
        arm = None
        if in_rollout:
            rollouts.answered(mv, time.perf_counter() - started, False)
            arm = rollouts.arm(mv)
            if mirror is not None:
                target, copy, images = mirror
                if isinstance(copy, list):  # the rows an image request's decoding made
                    copy = copy[0] if copy else None
                if copy is not None or images is not None:
                    rollouts.mirror(mv, target, classes, copy, images)
        if request_id is not None and self.prediction_log is not None:
            if isinstance(rows, list):  # the rows an image request's decoding made, when they were kept
                rows = rows[0] if rows else None
            self.prediction_log.record(mv.name, mv.version_label, request_id, classes, scores, rows, arm)
        return prediction

    async def infer_images(self, mv: ModelVersion, images: list[bytes], gone: Gone | None = None,
                           request_id: str | None = None) -> Prediction:
        """Infer on encoded images as one request; see :mod:`service.decoding` for where they are decoded."""
        if not images:
            raise InvalidInput("no images in the request")
        check_images(len(images), self.settings.max_images_per_request)
        metrics = mv.metrics
        keep = request_id is not None and self._keep_inputs()
        target = self.rollouts.mirror_target(mv) if self.rollouts.active else None
        # A copy to a version that preprocesses as this one does takes the rows made for this one; another
        # decodes the images itself.
        share_rows = target is not None and target.image_spec == mv.image_spec
        made: list[np.ndarray] | None = [] if keep or share_rows else None
        mirror = None
        if target is not None:
            mirror = (target, made, None) if share_rows else (target, None, images)
        outputs = self.decoder.outputs(images, mv.image_spec, metrics.preprocess_latency.observe,
                                       lambda rows: mv.predict(rows, gone),
                                       lambda n, prepare: mv.predict_prepared(n, prepare, gone), gone,
                                       made.append if made is not None else None)
        return await self._run(mv, len(images), outputs, request_id, made if keep else None, mirror)
