"""Prometheus metrics, one registry per app, every series prefixed ``convserve_``.

Histograms (never summaries) so percentiles aggregate across replicas. Per-version label
children are resolved once per model version (:class:`VersionMetrics`), not per request.

With several worker processes (``PROMETHEUS_MULTIPROC_DIR`` set by the supervisor), every worker writes
its values to files there and a scrape, answered by any worker, reads them all: counters and histograms
are summed over workers (dead ones included, so they never go backwards), in-flight and queued rows are
summed over live workers, loaded versions are the most any live worker has. A dead worker's counters and
histograms are folded into one archive file per type (:func:`compact_dead_process`), so a scrape reads a file per
live worker and type plus two, however many workers have been replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.samples import Exemplar

from service.tracing import Exemplars

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def multiprocess_dir() -> str | None:
    """Where the workers' metric files are, when prometheus_client runs in multiprocess mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


ARCHIVED_KINDS = ("counter", "histogram")  # every gauge of ours is live*: mark_process_dead removes a dead one's


@contextlib.contextmanager
def _files_locked(directory: str, how: int) -> Iterator[None]:
    """The metric files held still: shared by scrapes, exclusive while a dead worker's files are folded away (a
    scrape that listed them must not find one gone, or count one twice)."""
    fd = os.open(os.path.join(directory, ".lock"), os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)  # and the lock with it


def compact_dead_process(directory: str, pid: int) -> None:
    """Fold a dead worker's counter and histogram files into ``<kind>_archive.db``, with prometheus_client's own
    merge (``accumulate=False``, its form for writing merged values back), and remove them; counters keep every
    count. Each dead worker's files otherwise stay for good and cost every scrape: measured, 5.5 ms a scrape with
    two workers, 12.7 ms after ten replacements."""
    with _files_locked(directory, fcntl.LOCK_EX):
        for kind in ARCHIVED_KINDS:
            dead = os.path.join(directory, f"{kind}_{pid}.db")
            if not os.path.exists(dead):
                continue
            archive = os.path.join(directory, f"{kind}_archive.db")
            merged = MultiProcessCollector.merge([f for f in (archive, dead) if os.path.exists(f)], accumulate=False)
            staged = archive + ".new"  # not a *.db file: no scrape reads it before it replaces the archive
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
            out = MmapedDict(staged)
            try:
                for metric in merged:
                    for sample in metric.samples:
                        key = mmap_key(metric.name, sample.name, list(sample.labels), list(sample.labels.values()),
                                       metric.documentation)
                        out.write_value(key, sample.value, 0.0)
            finally:
                out.close()
            os.replace(staged, archive)
            os.unlink(dead)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess = multiprocess_dir() is not None
        # Multiprocess mode collects only written values, so gauges computed on scrape (set_function) are
        # written by poll_functions() instead, on each worker's sync tick.
        self._functions: dict[tuple[str, ...], tuple[Gauge, Callable[[], float]]] = {}
        self.exemplars: Exemplars | None = None  # kept while tracing is on (trace_exemplars)
        r = self.registry
        self.http_requests = Counter("convserve_http_requests_total", "HTTP requests by route template and status",
                                     ["method", "route", "status"], registry=r)
        self.http_latency = Histogram("convserve_http_request_duration_seconds", "HTTP request latency",
                                      ["method", "route"], buckets=LATENCY_BUCKETS, registry=r)
        # gRPC calls get their own series: their labels are the RPC and its status code name, not a route and an
        # HTTP status, and summing them into the HTTP ones would hide which protocol clients use.
        self.grpc_requests = Counter("convserve_grpc_requests_total", "gRPC calls by method and status code",
                                     ["method", "code"], registry=r)
        self.grpc_latency = Histogram("convserve_grpc_request_duration_seconds", "gRPC call latency", ["method"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        labels = ["model", "version"]
        self.inference_requests = Counter("convserve_inference_requests_total", "Inference requests by outcome",
                                          [*labels, "outcome"], registry=r)
        self.inference_latency = Histogram("convserve_inference_duration_seconds",
                                           "Model compute time per executed batch", labels,
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess_latency = Histogram("convserve_preprocess_duration_seconds",
                                            "Image decoding and preprocessing time per request", labels,
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_latency = Histogram("convserve_queue_duration_seconds", "Time a request waited for its batch",
                                       labels, buckets=LATENCY_BUCKETS, registry=r)
        self.request_rows = Histogram("convserve_request_rows", "Rows (images) per inference request", labels,
                                      buckets=ROW_BUCKETS, registry=r)
        self.batch_rows = Histogram("convserve_batch_rows", "Rows per executed batch", labels,
                                    buckets=ROW_BUCKETS, registry=r)
        self.inflight = Gauge("convserve_inflight_requests", "Inference requests being handled", labels,
                              registry=r, multiprocess_mode="livesum")
        self.queue_depth = Gauge("convserve_queue_rows", "Rows waiting in the batching queue", labels, registry=r,
                                 multiprocess_mode="livesum")
        self.rejected = Counter("convserve_rejected_requests_total", "Requests refused before inference, by reason",
                                [*labels, "reason"], registry=r)
        self.predicted_class = Counter("convserve_predicted_class_total", "Predicted (top-1) class counts",
                                       [*labels, "class"], registry=r)
        self.confidence = Histogram("convserve_prediction_confidence", "Top-1 probability of each prediction",
                                    labels, buckets=CONFIDENCE_BUCKETS, registry=r)
        self.explanations = Counter("convserve_explanations_total", "Explanation requests by outcome",
                                    [*labels, "outcome"], registry=r)
        self.explain_latency = Histogram("convserve_explain_duration_seconds",
                                         "Time to answer an explanation, queue included", labels,
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.versions_loaded = Gauge("convserve_model_versions_loaded", "Versions of a model loaded and ready",
                                     ["model"], registry=r, multiprocess_mode="livemax")
        self.load_failures = Counter("convserve_model_load_failures_total", "Model versions that failed to load",
                                     ["model", "version"], registry=r)

        # The prediction log and feedback (service/state). Present from the start, at 0.
        self.prediction_log_written = Counter("convserve_prediction_log_written_total",
                                              "Predictions written to the prediction log", registry=r)
        self.prediction_log_dropped = Counter("convserve_prediction_log_dropped_total",
                                              "Predictions not logged: the writer's queue was full, or the store "
                                              "failed", ["reason"], registry=r)
        for reason in ("queue_full", "store_error"):
            self.prediction_log_dropped.labels(reason)
        self.feedback = Counter("convserve_feedback_total", "Feedback labels by the labelled version and outcome "
                                "(correct, incorrect; unknown_prediction and conflict are refused)",
                                [*labels, "outcome"], registry=r)
        self.live_accuracy = Gauge("convserve_live_accuracy", "Accuracy of a version on its labelled predictions",
                                   labels, registry=r, multiprocess_mode="livemostrecent")
        self.live_labelled = Gauge("convserve_live_labelled", "Labelled predictions behind convserve_live_accuracy",
                                   labels, registry=r, multiprocess_mode="livemostrecent")
        self.drift_psi = Gauge("convserve_prediction_drift_psi", "Population stability index of the predicted "
                               "classes against the version's test set (above 0.25: a significant shift)",
                               labels, registry=r, multiprocess_mode="livemostrecent")

        # Rollouts (service/rollout.py).
        self.rollout_state = Gauge("convserve_rollout_state", "A model's rollout: 0 none running, 1 shadow, 2 canary",
                                   ["model"], registry=r, multiprocess_mode="livemostrecent")
        self.rollout_agreement = Gauge("convserve_rollout_agreement", "Share of compared rows on which a candidate "
                                       "gives stable's top-1 class, in the current phase", labels, registry=r,
                                       multiprocess_mode="livemostrecent")
        self.rollout_decisions = Counter("convserve_rollout_decisions_total", "Rollout decisions by decision "
                                         "(promoted, rolled_back, aborted) and reason", ["model", "decision", "reason"],
                                         registry=r)

    def for_version(self, model: str, version: int) -> VersionMetrics:
        return VersionMetrics(self, model, str(version))

    def trace_exemplars(self) -> Exemplars:
        """Start keeping exemplars (tracing on): the request-latency histograms' newest trace per bucket."""
        self.exemplars = Exemplars({
            "convserve_http_request_duration_seconds": (("method", "route"), LATENCY_BUCKETS),
            "convserve_grpc_request_duration_seconds": (("method",), LATENCY_BUCKETS),
        }, multiprocess_dir())
        return self.exemplars

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """Every series (this process's, or in multiprocess mode every worker's summed) in the format the scraper's
        ``Accept`` asks for, and its content type: Prometheus text, or, while tracing is on, OpenMetrics with the
        traces' exemplars when the scraper asks for it."""
        directory = multiprocess_dir()
        if directory is None:
            return self._exposition(self.registry, accept)
        with _files_locked(directory, fcntl.LOCK_SH):
            return self._exposition(MultiProcessCollector(None, path=directory), accept)

    def _exposition(self, source: Any, accept: str) -> tuple[bytes, str]:
        if self.exemplars is None:  # without tracing there is nothing OpenMetrics would add: the text format
            return generate_latest(source), CONTENT_TYPE_LATEST
        encoder, content_type = choose_encoder(accept)
        if content_type.startswith(OPENMETRICS.split(";")[0]):
            source = _WithExemplars(source, self.exemplars)
        return encoder(source), content_type

    def poll_functions(self) -> None:
        """Write the current value of every function gauge (multiprocess mode only needs it)."""
        for gauge, function in list(self._functions.values()):
            gauge.set(function())


class _WithExemplars:
    """A collector's metrics with the traced exemplars on their buckets."""

    def __init__(self, source: Any, exemplars: Exemplars) -> None:
        self._source, self._exemplars = source, exemplars

    def collect(self) -> Any:
        found: dict[str, dict[tuple[tuple[str, ...], str], Exemplar]] = {}
        for (metric, labels, le), (trace_id, span_id, value, at) in self._exemplars.all().items():
            found.setdefault(metric, {})[labels, le] = Exemplar({"trace_id": trace_id, "span_id": span_id}, value, at)
        for family in self._source.collect():
            mine = found.get(family.name)
            if mine:
                names = self._exemplars.label_names[family.name]
                bucket = family.name + "_bucket"
                family.samples = [
                    sample._replace(exemplar=mine.get((tuple(sample.labels.get(n, "") for n in names),
                                                       sample.labels["le"]), sample.exemplar))
                    if sample.name == bucket else sample
                    for sample in family.samples]
            yield family


class LabelChildren(dict[tuple[Any, ...], Any]):
    """The children of one labelled metric, each resolved on first use and then looked up in a dict.

    ``children[values]`` gives ``metric.labels(*prefix, *values)``; a storm of requests on one series costs a dict
    lookup each rather than ``labels()``'s validation and lock.
    """

    def __init__(self, metric: Counter | Gauge | Histogram, *prefix: str) -> None:
        super().__init__()
        self._metric, self._prefix = metric, prefix

    def __missing__(self, values: tuple[Any, ...]) -> Any:
        child = self[values] = self._metric.labels(*self._prefix, *values)
        return child


class _FunctionGauge:
    """A gauge child whose ``set_function`` also works in multiprocess mode (see :meth:`Metrics.poll_functions`)."""

    def __init__(self, metrics: Metrics, child: Gauge, key: tuple[str, ...]) -> None:
        self._metrics, self._child, self._key = metrics, child, key

    def set_function(self, function: Callable[[], float]) -> None:
        if self._metrics.multiprocess:
            self._metrics._functions[self._key] = (self._child, function)
        else:
            self._child.set_function(function)


class VersionMetrics:
    """The label children of one model version, resolved once."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self.inference_latency = metrics.inference_latency.labels(model, version)
        self.preprocess_latency = metrics.preprocess_latency.labels(model, version)
        self.queue_latency = metrics.queue_latency.labels(model, version)
        self.request_rows = metrics.request_rows.labels(model, version)
        self.batch_rows = metrics.batch_rows.labels(model, version)
        self.inflight = metrics.inflight.labels(model, version)
        self.confidence = metrics.confidence.labels(model, version)
        self.queue_depth = _FunctionGauge(metrics, metrics.queue_depth.labels(model, version),
                                          ("queue", model, version))
        self._outcomes = LabelChildren(metrics.inference_requests, model, version)
        self._outcomes["success",]  # present from the start, at 0
        self._rejections = LabelChildren(metrics.rejected, model, version)
        # Present from the start, at 0: a dashboard or an absent() alert sees "0 refused", not "no data".
        for reason in ("queue_full", "queue_delay", "deadline"):
            self._rejections[reason,]
        metrics.load_failures.labels(model, version)
        self._classes = LabelChildren(metrics.predicted_class, model, version)
        for outcome in ("correct", "incorrect"):  # present from the start, at 0
            metrics.feedback.labels(model, version, outcome)

    def outcome(self, outcome: str) -> None:
        self._outcomes[outcome,].inc()

    def rejected(self, reason: str) -> None:
        self._rejections[reason,].inc()

    def predicted(self, label: str, confidence: float) -> None:
        if not math.isfinite(confidence):  # one NaN would make the confidence sum NaN for good
            return
        self._classes[label,].inc()
        self.confidence.observe(confidence)

    def batch(self, rows: int, waits: list[float], compute_seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.inference_latency.observe(compute_seconds)
        for wait in waits:
            self.queue_latency.observe(wait)
