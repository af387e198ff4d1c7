"""The model repository: finds ``<models_dir>/<name>/<version>/``, loads versions, tracks their state.

Client-supplied names never reach the filesystem: requests look models up in the in-memory
table built by :meth:`ModelRepository.refresh`, which itself only lists plain directory
names under ``models_dir``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.batching import Batcher, BatchingConfig, Gone, Outputs, Prepare
from service.errors import ModelNotFound, ModelNotReady
from service.metrics import Metrics, VersionMetrics
from service.model_config import (
    ConfigError,
    ModelConfig,
    ModelSettings,
    model_settings,
    probabilities_output,
    read_model_config,
)
from service.preprocessing import ImageSpec
from service.runtimes import RUNTIME_FILES, Runtime, TensorSpec, load_runtime
from service.settings import Settings

log = logging.getLogger("service.repository")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
VERSION_RE = re.compile(r"[1-9][0-9]{0,8}")
ABSOLUTE_PATH_RE = re.compile(r"(?<![\w.:/-])/[\w.+-]+(?:/[\w.+-]*)*")
VERSION_LABELS = ("stable", "canary")
"""Names of versions by role (TF Serving's version labels): the one serving, and a rollout's candidate."""
READY, LOADING, UNAVAILABLE, FAILED = "READY", "LOADING", "UNAVAILABLE", "FAILED"
WARMUP_BATCHES = (1, 8, 1)


def valid_name(name: str) -> bool:
    return NAME_RE.fullmatch(name) is not None and ".." not in name


def valid_version(text: str) -> bool:
    return VERSION_RE.fullmatch(text) is not None


def select_versions(available: list[int], policy: str) -> list[int]:
    """Apply a version policy (``latest:N``, ``all``, ``specific:1,3``) to the versions on disk."""
    kind, _, arg = policy.partition(":")
    if kind == "all":
        return sorted(available)
    if kind == "specific":
        wanted = {int(v) for v in arg.split(",") if re.fullmatch(r"\s*[0-9]+\s*", v)}
        return sorted(v for v in available if v in wanted)
    count = int(arg) if re.fullmatch(r"\s*[0-9]+\s*", arg) else 1
    return sorted(available)[-max(1, count):]


# --- One loaded version ------------------------------------------------------------------------

@dataclass
class VersionStatus:
    """What a client may learn about a version on disk: its state and, when it failed, why."""

    version: int
    state: str = LOADING
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "state": self.state}
        if self.error:
            out["error"] = self.error
        return out


class _Hold:
    """An admitted request's claim on a version (a class, not a generator: it is taken on every request)."""

    __slots__ = ("version",)

    def __init__(self, version: ModelVersion) -> None:
        self.version = version

    def __enter__(self) -> ModelVersion:
        self.version._acquire()
        return self.version

    def __exit__(self, *exc: object) -> None:
        self.version._release()


class ModelVersion:
    """A loaded version, whole from the moment it exists: runtime, batcher, metrics and image spec.

    Requests hold it between admission and their answer (:meth:`hold`); unloading stops new
    admissions at once and tears the version down only when the last admitted request is done.
    """

    def __init__(self, name: str, version: int, path: Path, runtime: Runtime, metadata: dict[str, Any],
                 labels: list[str], probabilities: TensorSpec, batching: BatchingConfig,
                 metrics: VersionMetrics, load_seconds: float) -> None:
        self.name, self.version, self.path = name, version, path
        self.version_label = str(version)
        self.runtime = runtime
        self.metadata = metadata
        self.labels = labels
        self.input = runtime.inputs[0]
        self.output = probabilities
        """The class-probabilities output: what the image endpoints, TF Serving and metrics use."""
        _, height, width, channels = self.input.shape
        self.image_spec = ImageSpec(height, width, channels, digit=bool(metadata.get("digit", False)))
        self.metrics = metrics
        self.batcher = Batcher(runtime.predict, batching, f"{name}:{version}", on_batch=metrics.batch)
        self.batcher.start()
        metrics.queue_depth.set_function(lambda: self.batcher.queued_rows)
        self.status = VersionStatus(version, READY)
        self.load_seconds = load_seconds
        self._holders = 0
        self._released = asyncio.Event()
        self._released.set()
        self._on_close: list[Callable[[], None]] = []

    @property
    def ready(self) -> bool:
        return self.status.state == READY

    def label(self, class_id: int) -> str:
        return self.labels[class_id] if 0 <= class_id < len(self.labels) else str(class_id)

    def hold(self) -> _Hold:
        """Keep this version loaded while an admitted request uses it (``with mv.hold(): ...``)."""
        if not self.ready:
            raise ModelNotReady(f"model {self.name!r} version {self.version} is not ready "
                                f"({self.status.state.lower()})")
        return _Hold(self)

    def _acquire(self) -> None:
        self._holders += 1
        self._released.clear()

    def _release(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._released.set()

    async def predict(self, rows: np.ndarray, gone: Gone | None = None) -> Outputs:
        """Run a float32 batch through this version's batching queue."""
        return await self.batcher.submit(rows, gone)

    async def predict_prepared(self, n: int, prepare: Prepare, gone: Gone | None = None) -> Outputs:
        """Like :meth:`predict`, for ``n`` rows that ``prepare()`` makes where the batch runs."""
        return await self.batcher.submit_prepared(n, prepare, gone)

    def on_close(self, release: Callable[[], None]) -> None:
        """Have ``release`` called when this version is unloaded (what was built for it on demand)."""
        self._on_close.append(release)

    async def close(self, grace_seconds: float) -> None:
        """Refuse new requests, wait (at most ``grace_seconds``) for admitted ones, then release all."""
        was_ready = self.ready
        self.status.state = UNAVAILABLE
        try:
            await asyncio.wait_for(self._released.wait(), grace_seconds)
        except TimeoutError:
            log.warning("unloading with requests still admitted", extra={
                "model": self.name, "version": self.version, "requests": self._holders})
        await self.batcher.close()
        self.runtime.close()
        self.metrics.queue_depth.set_function(lambda: 0)  # drops the gauge's reference to this version
        for release in self._on_close:
            release()
        if was_ready:
            log.info("model version unloaded", extra={"model": self.name, "version": self.version})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# v2 datatypes a response can carry for a model output (every numeric type the protocol has).
SERVABLE_OUTPUT_TYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                         "FP16", "FP32", "FP64"}


def _probabilities_output(runtime: Runtime, metadata: dict[str, Any], config: ModelConfig | None) -> TensorSpec:
    """The class-probabilities output: named in metadata.json or config.pbtxt, or the only one."""
    outputs = {o.name: o for o in runtime.outputs}
    named = (metadata.get("output") or {}).get("name") or probabilities_output(config)
    if named is None:
        named = "probabilities" if "probabilities" in outputs else (next(iter(outputs)) if len(outputs) == 1 else None)
    if named is None or named not in outputs:
        raise ValueError(f"cannot tell which of the outputs {sorted(outputs)} holds the class probabilities; "
                         "name it in metadata.json (\"output\": {\"name\": ...}) or give it a label_filename "
                         "in config.pbtxt")
    spec = outputs[named]
    if len(spec.shape) != 2 or not spec.datatype.startswith("FP"):
        raise ValueError(f"output {named} must be floating-point class scores [N, classes], "
                         f"got {spec.datatype} {list(spec.shape)}")
    return spec


def _check_io(runtime: Runtime) -> None:
    """Refuse at load what the service could only serve wrongly: several inputs, unbatched outputs."""
    if len(runtime.inputs) != 1:
        raise ValueError(f"the model has {len(runtime.inputs)} inputs ({', '.join(i.name for i in runtime.inputs)}); "
                         "convserve serves single-input image models")
    spec = runtime.inputs[0]
    if len(spec.shape) != 4 or any(d <= 0 for d in spec.shape[1:]):
        raise ValueError(f"input {spec.name} has shape {list(spec.shape)}; expected [N, H, W, C]")
    bad = [f"{o.name} ({o.datatype} {list(o.shape)})" for o in runtime.outputs
           if o.datatype not in SERVABLE_OUTPUT_TYPES or not o.shape or o.shape[0] != -1]
    if bad:
        raise ValueError(f"outputs the service cannot serve: {', '.join(bad)}; every output needs a numeric "
                         "datatype and a leading batch dimension")


@dataclass
class LoadedParts:
    """What loading a version directory yields, before it is put into service."""

    runtime: Runtime
    metadata: dict[str, Any]
    labels: list[str]
    probabilities: TensorSpec
    seconds: float


def load_parts(name: str, version: int, path: Path, settings: Settings, config: ModelConfig | None) -> LoadedParts:
    """Load and check one version directory (in a worker thread); any problem raises a client-safe error."""
    started = time.perf_counter()
    runtime: Runtime | None = None
    try:
        artifact = path / RUNTIME_FILES[settings.runtime]
        if not artifact.is_file():
            raise ValueError(f"missing {artifact.name}")
        metadata_path = path / "metadata.json"
        metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
        if not isinstance(metadata, dict):
            raise ValueError("metadata.json is not a JSON object")
        expected = (metadata.get("sha256") or {}).get(artifact.name)
        if expected and _sha256(artifact) != expected:
            raise ValueError(f"{artifact.name} does not match the sha256 in metadata.json")
        runtime = load_runtime(settings.runtime, path, settings.inference_threads)
        _check_io(runtime)
        spec = runtime.inputs[0]
        declared = (metadata.get("input") or {}).get("shape")
        if declared and [int(d) for d in declared[1:]] != list(spec.shape[1:]):
            raise ValueError(f"model input shape {list(spec.shape)} does not match metadata.json's {declared}")
        probabilities = _probabilities_output(runtime, metadata, config)
        classes = probabilities.shape[-1]
        labels = [str(x) for x in metadata.get("labels") or range(classes)]
        if classes > 0 and len(labels) != classes:
            raise ValueError(f"metadata.json has {len(labels)} labels for {classes} outputs")
        _, height, width, channels = spec.shape
        for rows in WARMUP_BATCHES:  # first runs allocate; do them before a client waits on them
            runtime.predict(np.random.default_rng(rows).uniform(0, 255, (rows, height, width, channels))
                            .astype(np.float32))
        return LoadedParts(runtime, metadata, labels, probabilities, round(time.perf_counter() - started, 4))
    except Exception as exc:
        if runtime is not None:
            runtime.close()
        # Runtime errors quote file paths: keep them relative to the repository for clients, and no other
        # absolute path (a resolved external-data location, a build path) reaches them either.
        reason = ABSOLUTE_PATH_RE.sub("<path>", str(exc).replace(str(path), f"{name}/{version}"))
        raise LoadError(f"failed to load: {reason}") from None


class LoadError(Exception):
    """A version directory that cannot be served; the message is safe to show to clients."""


# --- The repository ----------------------------------------------------------------------------

@dataclass
class Model:
    name: str
    config: ModelConfig | None = None
    settings: ModelSettings | None = None
    error: str | None = None
    """Why the model's config.pbtxt cannot be used (its loaded versions, if any, keep serving)."""
    loaded: dict[int, ModelVersion] = field(default_factory=dict)
    failed: dict[int, VersionStatus] = field(default_factory=dict)
    serving: ModelVersion | None = None
    """What unversioned routes use: the rollout's stable version when it is ready, else the newest ready one
    (neither blocked nor a candidate). Recomputed on every change."""
    stable: int | None = None
    candidate: int | None = None
    blocked: frozenset[int] = frozenset()
    """The rollout's pins (service/rollout.py): stable and candidate stay loaded whatever the version policy
    says; blocked versions (rolled back) are not loaded."""

    def ready_versions(self) -> list[ModelVersion]:
        return [v for _, v in sorted(self.loaded.items()) if v.ready]

    def statuses(self) -> list[VersionStatus]:
        """Every version the repository knows of (loaded or failed), oldest first."""
        known = {**self.failed, **{v: mv.status for v, mv in self.loaded.items()}}
        return [known[v] for v in sorted(known)]

    def status(self, version: int) -> VersionStatus | None:
        mv = self.loaded.get(version)
        return mv.status if mv is not None else self.failed.get(version)

    def update_serving(self) -> None:
        ready = self.ready_versions()
        pinned = self.loaded.get(self.stable) if self.stable is not None else None
        if pinned is not None and pinned.ready:
            self.serving = pinned
            return
        usable = [mv for mv in ready if mv.version not in self.blocked]
        settled = [mv for mv in usable if mv.version != self.candidate]
        self.serving = (settled or usable or [None])[-1]

    def pinned(self) -> set[int]:
        return {v for v in (self.stable, self.candidate) if v is not None}


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and mtimes of a version's files: a failed version is retried when they change."""
    try:
        return tuple(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                            for p in path.rglob("*") if p.is_file()))
    except OSError:
        return ()


class ModelRepository:
    """Loaded models, kept in line with ``models_dir`` by :meth:`refresh` (at start, by the
    poller, and through the repository API). New versions are loaded and warmed up before
    they become visible; removed ones stop taking requests at once and are drained."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.root = Path(settings.models_dir)
        self._models: dict[str, Model] = {}
        self._failed: dict[tuple[str, int], tuple[tuple[str, int, int], ...]] = {}
        self._unloaded: set[str] = set()  # unloaded through the API: the poller leaves them alone
        self._pins: dict[str, tuple[int | None, int | None, frozenset[int]]] = {}
        self._lock = asyncio.Lock()  # one refresh or unload at a time

    # Discovery ---------------------------------------------------------------------------------

    def discover(self) -> dict[str, list[int]]:
        """Model names and version numbers present on disk (plain directory names only)."""
        found: dict[str, list[int]] = {}
        if not self.root.is_dir():
            return found
        for model_dir in sorted(self.root.iterdir()):
            if not model_dir.is_dir() or not valid_name(model_dir.name):
                continue
            found[model_dir.name] = sorted(
                int(v.name) for v in model_dir.iterdir() if v.is_dir() and valid_version(v.name))
        return found

    # Loading -----------------------------------------------------------------------------------

    async def refresh(self, only: str | None = None) -> None:
        """Bring loaded versions in line with the disk: load new ones, unload removed ones.

        ``only`` limits the work to one model (the repository API's load).
        """
        async with self._lock:
            on_disk = await asyncio.to_thread(self.discover)
            for name, versions in on_disk.items():
                if (only is not None and name != only) or (only is None and name in self._unloaded):
                    continue
                await self._sync_model(name, versions)
            for name in [n for n in self._models if n not in on_disk and (only is None or n == only)]:
                await self._drop(name)

    def pin(self, name: str, stable: int | None, candidate: int | None, blocked: set[int]) -> bool:
        """Set a model's rollout pins; True when what should be loaded changed (a refresh applies it)."""
        pins = (stable, candidate, frozenset(blocked))
        if self._pins.get(name, (None, None, frozenset())) == pins:
            return False
        self._pins[name] = pins
        model = self._models.get(name)
        if model is not None:
            model.stable, model.candidate, model.blocked = pins
            model.update_serving()
        return True

    async def _sync_model(self, name: str, versions: list[int]) -> None:
        model = self._models.get(name)
        if model is None:
            model = self._models[name] = Model(name)
            # Present from first sight, at 0 (a version's own series start when it loads): a dashboard or an
            # absent() alert on the model sees 0, not "no data", even when no version of it ever loads.
            self.metrics.load_failures.labels(name, "config")
        model.stable, model.candidate, model.blocked = self._pins.get(name, (None, None, frozenset()))
        try:
            config = await asyncio.to_thread(read_model_config, self.root / name)
        except ConfigError as exc:
            if model.error != str(exc):
                log.warning("model config rejected", extra={"model": name, "error": str(exc)})
                self.metrics.load_failures.labels(name, "config").inc()
            model.error = str(exc)
            for version in versions:  # nothing new loads under a broken config; what serves keeps serving
                if version not in model.loaded:
                    model.failed[version] = VersionStatus(version, FAILED, str(exc))
            return
        model.error = None
        model.config, model.settings = config, model_settings(config, self.settings)
        pinned = model.pinned() & set(versions)
        wanted = sorted(set(select_versions([v for v in versions if v not in model.blocked],
                                            model.settings.version_policy)) | pinned)
        for version in wanted:
            if version in model.loaded:
                continue
            path = self.root / name / str(version)
            signature = await asyncio.to_thread(_signature, path)
            if version in model.failed and self._failed.get((name, version)) == signature:
                continue  # still the same broken files
            try:
                parts = await asyncio.to_thread(load_parts, name, version, path, self.settings, config)
            except LoadError as exc:
                self._failed[(name, version)] = signature
                model.failed[version] = VersionStatus(version, FAILED, str(exc))
                self.metrics.load_failures.labels(name, str(version)).inc()
                log.warning("model version failed to load",
                            extra={"model": name, "version": version, "error": str(exc)})
                continue
            self._failed.pop((name, version), None)
            model.failed.pop(version, None)
            model.loaded[version] = ModelVersion(  # the swap: one assignment, seen by the next request
                name, version, path, parts.runtime, parts.metadata, parts.labels, parts.probabilities,
                model.settings.batching, self.metrics.for_version(name, version), parts.seconds)
            model.update_serving()
            batching = model.settings.batching
            log.info("model version loaded", extra={
                "model": name, "version": version, "load_seconds": parts.seconds,
                "max_batch_size": batching.max_batch_size, "max_queue_delay_us": batching.max_queue_delay_us,
                "version_policy": model.settings.version_policy, "sources": model.settings.sources})
        keep = set(wanted)
        missing = len(wanted) - sum(v in model.loaded and model.loaded[v].ready for v in wanted)
        if missing > 0:
            # A selected version failed (corrupt, half-written): the newest ready ones that are still on disk
            # keep serving in its place until it is fixed, so a bad publish never takes a model down.
            fallback = sorted((v for v, mv in model.loaded.items()
                               if v not in keep and mv.ready and v in versions and v not in model.blocked),
                              reverse=True)
            keep.update(fallback[:missing])
        for version in [v for v in model.failed if v not in keep]:
            del model.failed[version]
        for version in [v for v in model.loaded if v not in keep]:
            mv = model.loaded.pop(version)
            model.update_serving()
            await mv.close(self.settings.request_timeout_seconds)
        self.metrics.versions_loaded.labels(name).set(len(model.ready_versions()))

    async def _drop(self, name: str) -> None:
        model = self._models.pop(name)
        model.serving = None
        for mv in model.loaded.values():
            await mv.close(self.settings.request_timeout_seconds)
        self.metrics.versions_loaded.labels(name).set(0)

    async def close(self) -> None:
        for name in list(self._models):
            await self._drop(name)

    # Repository API ----------------------------------------------------------------------------

    async def load(self, name: str) -> None:
        """(Re)load a model from its directory under models_dir (the repository API)."""
        if name not in await asyncio.to_thread(self.discover):
            raise ModelNotFound(f"no model directory {name!r} in the model repository")
        self._unloaded.discard(name)
        await self.refresh(only=name)

    async def unload(self, name: str) -> None:
        """Unload every version of a model; the poller leaves it alone until it is loaded again."""
        if name not in self._models:
            raise ModelNotFound(f"model {name!r} is not loaded")
        self._unloaded.add(name)
        async with self._lock:
            if name in self._models:
                await self._drop(name)

    def keep_unloaded(self, names: Iterable[str]) -> None:
        """Models unloaded through the API (in another worker, before this one started): do not load them."""
        self._unloaded.update(names)

    async def index(self) -> list[dict[str, Any]]:
        """Every model on disk and its versions' states (Triton's repository index)."""
        on_disk = await asyncio.to_thread(self.discover)
        entries: list[dict[str, Any]] = []
        for name, versions in on_disk.items():
            model = self._models.get(name)
            for version in versions:
                status = model.status(version) if model else None
                entry: dict[str, Any] = {"name": name, "version": str(version),
                                         "state": status.state if status else UNAVAILABLE}
                if status is not None and status.error:
                    entry["reason"] = status.error
                elif status is None:
                    entry["reason"] = "unloaded" if name in self._unloaded else "not selected by the version policy"
                entries.append(entry)
        return entries

    # Lookup ------------------------------------------------------------------------------------

    def models(self) -> list[Model]:
        return [self._models[n] for n in sorted(self._models)]

    def model(self, name: str) -> Model:
        model = self._models.get(name) if valid_name(name) else None
        if model is None:
            raise ModelNotFound(f"model {name!r} not found")
        return model

    def get(self, name: str, version: str | int | None = None) -> ModelVersion:
        """The version to serve: the one asked for, else the newest ready one."""
        model = self.model(name)
        if version is None or version == "":
            if model.serving is None:
                raise ModelNotReady(f"model {name!r} has no ready version")
            return model.serving
        text = str(version)
        if text in VERSION_LABELS:
            pinned = model.serving if text == "stable" else (
                model.loaded.get(model.candidate) if model.candidate is not None else None)
            if pinned is None:
                raise ModelNotFound(f"model {name!r} has no {text} version"
                                    + (" (no rollout is running)" if text == "canary" else ""))
            text = str(pinned.version)
        if not valid_version(text):
            raise ModelNotFound(f"model {name!r} has no version {text!r} (versions are positive integers, "
                                "or the labels stable and canary)")
        mv = model.loaded.get(int(text))
        if mv is None:
            status = model.failed.get(int(text))
            if status is not None:
                raise ModelNotReady(f"model {name!r} version {text} is not ready ({status.error})")
            raise ModelNotFound(f"model {name!r} has no version {text}")
        if not mv.ready:
            raise ModelNotReady(f"model {name!r} version {text} is not ready ({mv.status.state.lower()})")
        return mv

    def ready(self) -> bool:
        """Models are being served, and every model meant to be served has a ready version."""
        return bool(self._models) and all(m.serving is not None for m in self._models.values())
