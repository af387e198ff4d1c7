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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.batching import Batcher, BatchingConfig, Gone, Prepare
from service.errors import ModelNotFound, ModelNotReady
from service.metrics import Metrics, VersionMetrics
from service.preprocessing import ImageSpec
from service.runtimes import RUNTIME_FILES, Runtime, TensorSpec, load_runtime
from service.settings import Settings

log = logging.getLogger("service.repository")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")
ABSOLUTE_PATH_RE = re.compile(r"(?<![\w.:/-])/[\w.+-]+(?:/[\w.+-]*)*")
READY, LOADING, UNAVAILABLE, FAILED = "READY", "LOADING", "UNAVAILABLE", "FAILED"
WARMUP_BATCHES = (1, 8, 1)


def valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name)) and ".." not in name


# --- config.pbtxt (the few Triton fields we honour) --------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    version_policy: str | None = None


def parse_config_pbtxt(text: str) -> ModelConfig:
    """Read max_batch_size, dynamic_batching's queue delay and version_policy from a Triton config."""
    def number(pattern: str) -> int | None:
        match = re.search(pattern, text)
        return int(match.group(1)) if match else None

    policy = None
    if re.search(r"version_policy\s*:?\s*\{\s*all\s*:?\s*\{", text):
        policy = "all"
    elif (latest := number(r"latest\s*:?\s*\{\s*num_versions\s*:\s*(\d+)")) is not None:
        policy = f"latest:{latest}"
    elif match := re.search(r"specific\s*:?\s*\{\s*versions\s*:\s*\[?([\d,\s]+)\]?", text):
        policy = "specific:" + ",".join(v.strip() for v in match.group(1).split(",") if v.strip())
    return ModelConfig(
        max_batch_size=number(r"max_batch_size\s*:\s*(\d+)"),
        max_queue_delay_us=number(r"max_queue_delay_microseconds\s*:\s*(\d+)"),
        version_policy=policy,
    )


def select_versions(available: list[int], policy: str) -> list[int]:
    """Apply a version policy (``latest:N``, ``all``, ``specific:1,3``) to the versions on disk."""
    kind, _, arg = policy.partition(":")
    if kind == "all":
        return sorted(available)
    if kind == "specific":
        wanted = {int(v) for v in arg.split(",") if v.strip().isdigit()}
        return sorted(v for v in available if v in wanted)
    count = int(arg) if arg.strip().isdigit() else 1
    return sorted(available)[-max(1, count):]


# --- One loaded version ------------------------------------------------------------------------

@dataclass
class ModelVersion:
    name: str
    version: int
    path: Path
    state: str = LOADING
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    runtime: Runtime | None = None
    labels: list[str] = field(default_factory=list)
    image_spec: ImageSpec | None = None
    batcher: Batcher | None = None
    metrics: VersionMetrics | None = None
    load_seconds: float = 0.0

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def input(self) -> TensorSpec:
        assert self.runtime is not None
        return self.runtime.inputs[0]

    @property
    def output(self) -> TensorSpec:
        assert self.runtime is not None
        return self.runtime.outputs[0]

    def label(self, class_id: int) -> str:
        return self.labels[class_id] if 0 <= class_id < len(self.labels) else str(class_id)

    async def predict(self, rows: np.ndarray, gone: Gone | None = None) -> np.ndarray:
        """Run a float32 batch through this version's batching queue."""
        if self.batcher is None or not self.ready:
            raise ModelNotReady(f"model {self.name} version {self.version} is not ready")
        return await self.batcher.submit(rows, gone)

    async def predict_prepared(self, n: int, prepare: Prepare, gone: Gone | None = None) -> np.ndarray:
        """Like :meth:`predict`, for ``n`` rows that ``prepare()`` makes on the inference thread."""
        if self.batcher is None or not self.ready:
            raise ModelNotReady(f"model {self.name} version {self.version} is not ready")
        return await self.batcher.submit_prepared(n, prepare, gone)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "state": self.state}
        if self.error:
            out["error"] = self.error
        return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_version(name: str, version: int, path: Path, settings: Settings) -> ModelVersion:
    """Load and check one version directory; any problem leaves it FAILED with a message."""
    mv = ModelVersion(name, version, path)
    started = time.perf_counter()
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
        spec = runtime.inputs[0]
        if len(spec.shape) != 4 or any(d <= 0 for d in spec.shape[1:]):
            raise ValueError(f"input {spec.name} has shape {list(spec.shape)}; expected [N, H, W, C]")
        declared = (metadata.get("input") or {}).get("shape")
        if declared and [int(d) for d in declared[1:]] != list(spec.shape[1:]):
            raise ValueError(f"model input shape {list(spec.shape)} does not match metadata.json's {declared}")
        classes = runtime.outputs[0].shape[-1]
        labels = [str(x) for x in metadata.get("labels") or range(classes)]
        if classes > 0 and len(labels) != classes:
            raise ValueError(f"metadata.json has {len(labels)} labels for {classes} outputs")
        mv.metadata, mv.runtime, mv.labels = metadata, runtime, labels
        _, height, width, channels = spec.shape
        mv.image_spec = ImageSpec(height, width, channels, digit=bool(metadata.get("digit", False)))
        for rows in WARMUP_BATCHES:  # first runs allocate; do them before a client waits on them
            runtime.predict(np.random.default_rng(rows).uniform(0, 255, (rows, height, width, channels))
                            .astype(np.float32))
        mv.state = READY
    except Exception as exc:
        # Runtime errors quote file paths: keep them relative to the repository for clients, and no other
        # absolute path (a resolved external-data location, a build path) reaches them either.
        reason = ABSOLUTE_PATH_RE.sub("<path>", str(exc).replace(str(path), f"{name}/{version}"))
        mv.state, mv.error = FAILED, f"failed to load: {reason}"
    mv.load_seconds = round(time.perf_counter() - started, 4)
    return mv


# --- The repository ----------------------------------------------------------------------------

@dataclass
class Model:
    name: str
    config: ModelConfig
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    serving: ModelVersion | None = None
    """The newest ready version: what unversioned routes use. Recomputed on every change."""

    def ready_versions(self) -> list[ModelVersion]:
        return [v for _, v in sorted(self.versions.items()) if v.ready]

    def update_serving(self) -> None:
        ready = self.ready_versions()
        self.serving = ready[-1] if ready else None


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
                int(v.name) for v in model_dir.iterdir() if v.is_dir() and VERSION_RE.match(v.name))
        return found

    def _config(self, name: str) -> ModelConfig:
        path = self.root / name / "config.pbtxt"
        try:
            return parse_config_pbtxt(path.read_text()) if path.is_file() else ModelConfig()
        except (OSError, ValueError, UnicodeDecodeError):
            return ModelConfig()

    def _batching(self, config: ModelConfig) -> BatchingConfig:
        s = self.settings
        if not s.batching:
            return BatchingConfig(max_batch_size=1, max_queue_delay_us=0, max_queue_size=s.max_queue_size,
                                  timeout_s=s.request_timeout_seconds)
        delay = s.max_queue_delay_us if config.max_queue_delay_us is None else config.max_queue_delay_us
        return BatchingConfig(max_batch_size=config.max_batch_size or s.max_batch_size, max_queue_delay_us=delay,
                              max_queue_size=s.max_queue_size, timeout_s=s.request_timeout_seconds)

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

    async def _sync_model(self, name: str, versions: list[int]) -> None:
        config = await asyncio.to_thread(self._config, name)
        wanted = select_versions(versions, config.version_policy or self.settings.version_policy)
        model = self._models.setdefault(name, Model(name, config))
        model.config = config
        for version in wanted:
            current = model.versions.get(version)
            path = self.root / name / str(version)
            if current is not None and current.state != FAILED:
                continue
            if current is not None and self._failed.get((name, version)) == await asyncio.to_thread(_signature, path):
                continue  # still the same broken files
            mv = await asyncio.to_thread(load_version, name, version, path, self.settings)
            if mv.ready:
                self._failed.pop((name, version), None)
                mv.metrics = self.metrics.for_version(name, version)
                mv.batcher = Batcher(mv.runtime.predict, self._batching(config),  # type: ignore[union-attr]
                                     f"{name}:{version}", on_batch=mv.metrics.batch)
                mv.batcher.start()
                mv.metrics.queue_depth.set_function(lambda batcher=mv.batcher: batcher.queued_rows)
            else:
                self._failed[(name, version)] = await asyncio.to_thread(_signature, path)
                self.metrics.load_failures.labels(name, str(version)).inc()
            model.versions[version] = mv  # the swap: one assignment, seen by the next request
            model.update_serving()
            log.log(logging.INFO if mv.ready else logging.WARNING,
                    "model version %s", "loaded" if mv.ready else "failed to load",
                    extra={"model": name, "version": version, "state": mv.state, "error": mv.error,
                           "load_seconds": mv.load_seconds})
        keep = set(wanted)
        missing = len(wanted) - sum(model.versions[v].ready for v in wanted)
        if missing > 0:
            # A selected version failed (corrupt, half-written): the newest ready ones that are still on disk
            # keep serving in its place until it is fixed, so a bad publish never takes a model down.
            fallback = sorted((v for v, mv in model.versions.items() if v not in keep and mv.ready and v in versions),
                              reverse=True)
            keep.update(fallback[:missing])
        for version in [v for v in model.versions if v not in keep]:
            mv = model.versions.pop(version)
            model.update_serving()
            await self._unload(mv)
        self.metrics.versions_loaded.labels(name).set(len(model.ready_versions()))

    async def _drop(self, name: str) -> None:
        model = self._models.pop(name)
        for mv in model.versions.values():
            await self._unload(mv)
        self.metrics.versions_loaded.labels(name).set(0)

    async def _unload(self, mv: ModelVersion) -> None:
        """Stop new requests at once, let queued and running ones finish, then release the runtime."""
        was_ready = mv.ready
        mv.state = UNAVAILABLE
        if mv.batcher is not None:
            await mv.batcher.close()
        if mv.runtime is not None:
            mv.runtime.close()
        mv.runtime = None
        if was_ready:
            log.info("model version unloaded", extra={"model": mv.name, "version": mv.version})

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
            await self._drop(name)

    async def index(self) -> list[dict[str, Any]]:
        """Every model on disk and its versions' states (Triton's repository index)."""
        on_disk = await asyncio.to_thread(self.discover)
        entries: list[dict[str, Any]] = []
        for name, versions in on_disk.items():
            model = self._models.get(name)
            for version in versions:
                mv = model.versions.get(version) if model else None
                entry: dict[str, Any] = {"name": name, "version": str(version),
                                         "state": mv.state if mv else UNAVAILABLE}
                if mv is not None and mv.error:
                    entry["reason"] = mv.error
                elif mv is None:
                    entry["reason"] = "unloaded" if name in self._unloaded else "not selected by the version policy"
                entries.append(entry)
        return entries

    # Lookup ------------------------------------------------------------------------------------

    def models(self) -> list[Model]:
        return [self._models[n] for n in sorted(self._models)]

    def model(self, name: str) -> Model:
        model = self._models.get(name)
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
        if not VERSION_RE.match(text):
            raise ModelNotFound(f"model {name!r} has no version {text!r} (versions are positive integers)")
        mv = model.versions.get(int(text))
        if mv is None:
            raise ModelNotFound(f"model {name!r} has no version {text}")
        if not mv.ready:
            raise ModelNotReady(f"model {name!r} version {text} is not ready ({mv.state.lower()})")
        return mv

    def ready(self) -> bool:
        """Every loaded model has at least one ready version."""
        return all(m.serving is not None for m in self._models.values())
