"""The service's one settings object: environment variables prefixed ``CONVSERVE_``, CLI flags on top."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The forms of a version policy, as Triton's config.pbtxt has them: the newest N, every one, or a list.
ROLLOUT_MODES = ("shadow", "canary", "off")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
VERSION_POLICY_RE = re.compile(r"latest:[1-9][0-9]*|all|specific:[0-9]+(,[0-9]+)*")


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


class Settings(BaseSettings):
    """Configuration of one convserve process. Every field is also ``CONVSERVE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="CONVSERVE_", env_file=None, extra="ignore")

    models_dir: Path = Path("models")
    """Model repository: ``<models_dir>/<name>/<version>/model.onnx`` (+ SavedModel, metadata.json)."""
    host: str = "127.0.0.1"
    """Interface to bind. The default only accepts local clients; use 0.0.0.0 in a container."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port to listen on."""
    grpc_port: int = Field(8001, ge=0, le=65535)
    """TCP port of the Open Inference Protocol over gRPC (Triton's default, 8001), on the same host; 0 disables it."""
    runtime: Literal["onnx", "tensorflow"] = "onnx"
    """Backend that runs the models: ONNX Runtime, or TensorFlow SavedModel (needs the [tf] extra)."""
    workers: int | Literal["auto"] = "auto"
    """Worker processes serving on the one port (auto: the usable CPUs; 1: a single process, no supervisor)."""
    inference_threads: int = Field(0, ge=0)
    """Threads each model's runtime may use for one batch (intra-op). 0: half the CPUs / workers, at least 1."""
    inference_on_loop: bool | Literal["auto"] = "auto"
    """Run each model's batches on the worker's event loop (true) or on a thread of their own (false). auto: on
    the loop when a worker has at most one CPU to itself (workers >= usable CPUs), where a thread buys no
    parallelism and its hand-offs cost more than they overlap; on a thread otherwise."""
    version_policy: str = "latest:1"
    """Versions to serve per model unless its config.pbtxt has a version_policy: latest:N, all, or specific:1,3."""

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    """Largest request body accepted (413 above)."""
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    """Largest single encoded image accepted (413 above)."""
    max_image_pixels: int = Field(25_000_000, ge=1)
    """Largest decoded image, width x height; bigger images (decompression bombs) are refused with 413."""
    max_images_per_request: int = Field(64, ge=1)
    """Most images one image-endpoint request may carry (400 above)."""
    max_request_rows: int = Field(1024, ge=1)
    """Most rows (images) one tensor request (KServe v2, TF Serving) may carry (400 above)."""
    max_request_pixels: int = Field(50_000_000, ge=1)
    """Most declared pixels (width x height, summed over its images) one request may decode (413 above)."""
    max_jpeg_scans: int = Field(32, ge=1)
    """Most scans one JPEG may have; encoders write at most about a dozen, and each scan costs a full pass
    over the image when it is decoded (a small progressive JPEG with thousands of scans takes minutes)."""
    decode_threads: int = Field(0, ge=0)
    """Threads per worker that decode large images (beyond inline_decode_pixels), away from the models' inference
    threads. 0 (the default): half the usable CPUs shared among the workers, at least 1."""
    inline_decode_pixels: int = Field(1_000_000, ge=0)
    """Requests whose images declare at most this much decode work (pixels x JPEG scans, summed) are decoded on
    the model's inference thread in the batch, at no extra cost; larger ones go to the decode threads."""
    max_response_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    """Largest answer a tensor request may ask for, estimated before inference (400 above)."""
    repository_poll_seconds: float = Field(5.0, ge=0)
    """How often to look for new, changed or removed model versions (0: only at start and on request)."""
    batching: bool = True
    """Dynamic batching: run concurrent requests for a model version together."""
    max_batch_size: int = Field(32, ge=1)
    """Most rows per executed batch; a model's config.pbtxt max_batch_size (its limit) lowers it for that model."""
    max_queue_delay_us: int = Field(0, ge=0)
    """Microseconds the first queued request may wait for company (0: batch only what is waiting); a model's
    config.pbtxt dynamic_batching.max_queue_delay_microseconds, when non-zero, replaces it for that model."""
    max_queue_size: int = Field(1024, ge=1)
    """Most rows waiting per model version; more is refused with 503 and Retry-After."""
    queue_target_ms: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"
    """Admission bound on queueing time: a request expected to wait longer than this (milliseconds) before
    its batch starts is refused at once with 503 and Retry-After; 0: off, only the length bound applies.
    auto (the default): 100 ms where batches run on the event loop (a worker per CPU, the default), off where
    each model has an inference thread, where a storm of refusals was measured to starve that thread of the
    interpreter and lose two thirds of the goodput (docs/benchmarks.md)."""
    request_timeout_seconds: float = Field(30.0, gt=0)
    """A request still queued after this long is answered 504 and not executed."""
    default_top_k: int = Field(5, ge=1)
    """Classes returned per image by the image endpoints when the request does not say."""
    header_timeout_seconds: float = Field(10.0, ge=0)
    """A request's headers must arrive within this long of its first byte (a new connection's first request: of the
    connection), else 408 and the connection closes; 0: no bound. Against connections that send nothing or half a
    header block (slowloris)."""
    body_timeout_seconds: float = Field(30.0, ge=0)
    """Longest wait for the next piece of a request body, else 408; 0: no bound. A stalled upload otherwise holds
    its connection, its admission and its model version for as long as the client likes."""
    max_connections: int = Field(4096, ge=1)
    """Connections and requests in progress per worker beyond which new requests are answered 503 (uvicorn's
    limit_concurrency): a bound on what stalled clients can hold (file descriptors, memory)."""
    drain_seconds: float = Field(20.0, ge=0)
    """On SIGTERM, longest wait for in-flight requests before exiting; keep below the orchestrator's grace period."""
    shutdown_delay_seconds: float = Field(0.0, ge=0)
    """On SIGTERM, how long to keep accepting requests with readiness failing before the listener closes
    (Kubernetes removes a terminating pod from its Service a few seconds after the signal)."""
    worker_sync_seconds: float = Field(60.0, gt=0)
    """With several workers, how long a repository API call waits for every worker to apply it."""

    state_url: str = "sqlite:///data/convserve.sqlite"
    """The state store (prediction log, feedback): sqlite:///PATH (a relative PATH is under the working directory;
    the image uses /var/lib/convserve) or postgresql://user:password@host:port/database, which several replicas
    share. Empty: no store (no prediction log, feedback or live quality)."""
    prediction_log: bool = True
    """Log every answered prediction (id, model, version, time, top-1 class and score) in the state store."""
    keep_inputs: float = Field(0.1, ge=0, le=1)
    """Fraction of requests whose model inputs (as the model saw them, after preprocessing) are kept in the
    prediction log, for retraining on labelled production traffic (python -m training refresh); 0 keeps none."""
    prediction_log_queue: int = Field(10_000, ge=1)
    """Answered requests waiting to be written per worker; beyond it their records are dropped and counted."""
    state_retention_days: float = Field(30.0, gt=0)
    """Predictions (and their feedback) older than this are deleted."""
    state_max_predictions: int = Field(1_000_000, ge=1)
    """Most predictions kept; the oldest beyond it are deleted (with their feedback)."""
    max_feedback_items: int = Field(1000, ge=1)
    """Most labels one feedback request may carry (413 above)."""
    quality_refresh_seconds: float = Field(30.0, ge=0)
    """How often each worker recomputes the live-quality gauges (accuracy, drift) from the store; 0: never."""

    rollout: Literal["shadow", "canary", "off"] = "shadow"
    """What a newly published version of a served model goes through before it serves (a model's config.pbtxt
    parameter ``rollout`` overrides it): shadow (it answers copies of requests, then canary, then it serves),
    canary (it answers a share of requests, then it serves), or off (it serves at once). Needs the state store."""
    rollout_shadow_fraction: float = Field(0.25, ge=0, le=1)
    """Share of stable's answers copied to the candidate in shadow (and of the candidate's copied to stable in
    canary), off the client's path, to compare their answers."""
    rollout_traffic: float = Field(0.1, ge=0, le=1)
    """Share of unversioned requests a canary answers (a client's X-Rollout-Key keeps it on one arm)."""
    rollout_after_shadow: Literal["canary", "promote"] = "canary"
    """What a shadow whose guards held moves to: a canary, or straight to promotion."""
    rollout_min_requests: int = Field(300, ge=1)
    """Candidate answers (shadow copies, or canary answers) a phase needs before it can pass."""
    rollout_max_seconds: float = Field(86_400.0, gt=0)
    """A phase still undecided after this long is rolled back."""
    rollout_min_agreement: float = Field(0.8, ge=0, le=1)
    """Least share of compared rows on which the candidate gives stable's top-1 class (a model's config.pbtxt
    parameter rollout_min_agreement overrides it). Good retrains of the bundled CIFAR-10 model agree on 87-93% of
    its test set, Fashion-MNIST's on 97%; another network under the same name, on about 10%."""
    rollout_max_error_increase: float = Field(0.01, ge=0, le=1)
    """Most the candidate's error rate may exceed stable's."""
    rollout_max_latency_ratio: float = Field(2.0, gt=0)
    """Most the candidate's p99 latency may be, as a multiple of stable's (stable's floored at 2 ms)."""
    rollout_max_accuracy_drop: float = Field(0.02, ge=0, le=1)
    """Most the candidate's live accuracy (on feedback labels) may fall below stable's."""
    rollout_min_labels: int = Field(30, ge=1)
    """Labelled predictions each arm needs before the accuracy guard counts."""
    rollout_sync_seconds: float = Field(1.0, gt=0)
    """How often each worker reads the rollouts from the store, writes its counts, and decides."""

    access_log: bool = True
    """Write one JSON log line per request."""
    tracing: bool = False
    """Export OpenTelemetry traces of requests (needs the [tracing] extra); configured by the standard OTEL_*
    variables (endpoint, protocol, sampler, service name). See docs/tracing.md."""
    log_level: str = "info"
    """Python logging level for the service's own logs."""
    admin_token: SecretStr | None = None
    """Bearer token for the repository API (/v2/repository/...). Unset: that API is off (403)."""

    @field_validator("version_policy")
    @classmethod
    def _known_version_policy(cls, value: str) -> str:
        # A typo must stop the start, not quietly serve only the newest version.
        policy = value.replace(" ", "")
        if not VERSION_POLICY_RE.fullmatch(policy):
            raise ValueError(f"CONVSERVE_VERSION_POLICY={value!r} is not a version policy: "
                             "use latest:N (N >= 1), all, or specific:V1,V2,...")
        return policy

    @field_validator("workers")
    @classmethod
    def _positive_workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{value} is not a worker count: use auto or a number >= 1")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        if value.strip().lower() not in LOG_LEVELS:
            raise ValueError(f"{value[:32]!r} is not a log level: use {', '.join(LOG_LEVELS)}")
        return value.strip().lower()

    @model_validator(mode="after")
    def _split_cores(self) -> Settings:
        """Workers x inference threads stay within the usable CPUs: half of them for inference by default,
        the other half for HTTP and image decoding, which run beside it in every worker."""
        if self.inference_threads == 0:
            self.inference_threads = max(1, available_cpus() // (2 * self.worker_count))
        if self.decode_threads == 0:
            self.decode_threads = max(1, available_cpus() // (2 * self.worker_count))
        return self

    @property
    def batches_on_loop(self) -> bool:
        """``inference_on_loop`` with ``auto`` resolved."""
        if self.inference_on_loop == "auto":
            return self.worker_count >= available_cpus()
        return self.inference_on_loop

    @property
    def queue_target_seconds(self) -> float:
        """``queue_target_ms`` with its default resolved, in seconds (0: off)."""
        if self.queue_target_ms == "auto":
            return 0.1 if self.batches_on_loop else 0.0
        return self.queue_target_ms / 1000

    @property
    def worker_count(self) -> int:
        """``workers`` with ``auto`` resolved."""
        return available_cpus() if self.workers == "auto" else self.workers
