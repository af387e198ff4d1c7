"""OpenTelemetry traces of requests (optional: ``pip install 'convserve[tracing]'``, ``CONVSERVE_TRACING=true``).

Off, nothing here imports the OpenTelemetry SDK and every hook on the request path is one ``tracer is None`` test. On,
each worker process exports its own spans over OTLP, configured by the standard ``OTEL_*`` variables: the
endpoint and headers (``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``...), the protocol
(``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``: ``http/protobuf``, the default, or ``grpc``), the exporter
(``OTEL_TRACES_EXPORTER``: ``otlp``, ``console`` or ``none``), the sampler (``OTEL_TRACES_SAMPLER[_ARG]``; the
SDK's default is ``parentbased_always_on``), ``OTEL_SERVICE_NAME`` (default ``convserve``) and
``OTEL_RESOURCE_ATTRIBUTES``; propagation is W3C ``traceparent``/``tracestate`` (``OTEL_PROPAGATORS``).

A request's trace (docs/tracing.md shows one)::

    POST /models/{name}/predict       server span: HTTP (or RPC) semantic conventions, the caller's child
      admission                       the version chosen (and the rollout arm), or the refusal
      read body
      preprocess                      image decoding, wherever it runs: in the batch or the decode pool
      queue                           enqueued -> its batch started; links to the batch's span
      inference                       the batch: model, version, requests, rows, outcome; links to every
                                      request in it (it is the child of the first of them)
      explain                         an explanation's own work

Only what is recorded costs anything: a stage of a request that is not sampled makes no span at all.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract as _extract
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from prometheus_client.utils import floatToGoString

from service import __version__
from service.errors import ServingError

if TYPE_CHECKING:  # the SDK: only imported when tracing is on (the API above comes with FastAPI anyway)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanContext, Tracer

    from service.settings import Settings

tracer: Tracer | None = None
"""This process's tracer while tracing is on, else None: the one test every hook makes."""
_provider: TracerProvider | None = None
_NULL = contextlib.nullcontext()

EXTRA_MISSING = ("CONVSERVE_TRACING=true needs the OpenTelemetry SDK and OTLP exporters, which are not installed: "
                 "pip install 'convserve[tracing]'")
PROTOCOLS = ("http/protobuf", "grpc")


def problem(settings: Settings) -> str | None:
    """Why tracing as configured cannot start (checked once, before any worker starts), or None."""
    if not settings.tracing:
        return None
    try:
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return EXTRA_MISSING
    protocol = _protocol()
    if protocol not in PROTOCOLS:
        return f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use http/protobuf or grpc"
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter not in ("otlp", "console", "none"):
        return f"OTEL_TRACES_EXPORTER={exporter!r} is not supported: use otlp, console or none"
    return None


def _protocol() -> str:
    return (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf").strip().lower()


def setup(settings: Settings, exporter: SpanExporter | None = None) -> None:
    """Start (or stop) tracing for this process as ``settings`` say; ``exporter`` replaces the OTLP one and is
    called synchronously (tests)."""
    global tracer, _provider
    shutdown()
    if not settings.tracing:
        return
    reason = problem(settings)
    if reason is not None:
        raise RuntimeError(reason)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({"service.version": __version__, "process.pid": os.getpid()})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "convserve"}))
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER, as the SDK reads it
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        if kind == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif kind == "otlp":
            if _protocol() == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider = provider
    tracer = provider.get_tracer("convserve", __version__)


def shutdown() -> None:
    """Export what is still buffered and stop (at the end of the app's lifespan)."""
    global tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    tracer, _provider = None, None


# Context -------------------------------------------------------------------------------------------------------


def server_span(name: str, carrier: Mapping[str, str], attributes: dict[str, Any]) -> tuple[Span, object]:
    """Start a request's server span as the caller's child and make it current; ``finish`` ends it."""
    assert tracer is not None
    span = tracer.start_span(name, context=_extract(carrier) if carrier else None, kind=SpanKind.SERVER,
                             attributes=attributes)
    token = otel_context.attach(trace.set_span_in_context(span))
    return span, token


def finish(span: Span, token: object, error: str | None = None) -> None:
    """End a server span (status ERROR with ``error``) and restore the context before it."""
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()
    otel_context.detach(token)  # type: ignore[arg-type]


def current_span() -> Span | None:
    """The span of the running request while tracing is on and it is recorded, else None."""
    if tracer is None:
        return None
    span = trace.get_current_span()
    return span if span.is_recording() else None


def ids(span: Span | None = None) -> tuple[str, str] | None:
    """The trace and span ids in hex of ``span`` (by default the current one) when it is sampled, or None: an
    unsampled trace is exported nowhere, so no log line or exemplar points to it."""
    if tracer is None:
        return None
    context = (span or trace.get_current_span()).get_span_context()
    if not context.trace_flags.sampled:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def annotate(**attributes: Any) -> None:
    """Attributes on the current request's span (its model, version, rollout arm), when it is recorded."""
    span = current_span()
    if span is not None:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})


@contextlib.contextmanager
def _stage(name: str, parent: Span | None, attributes: dict[str, Any] | None) -> Iterator[Span]:
    assert tracer is not None
    context = trace.set_span_in_context(parent) if parent is not None else None
    span = tracer.start_span(name, context=context, attributes=attributes)
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    except ServingError as exc:  # the client's or the load's doing: a status and a type, no stack trace
        span.set_status(Status(StatusCode.ERROR, exc.message[:256]))
        span.set_attribute("error.type", type(exc).__name__)
        raise
    except Exception as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        span.set_attribute("error.type", type(exc).__name__)
        raise
    finally:
        otel_context.detach(token)
        span.end()


def stage(name: str, attributes: dict[str, Any] | None = None,
          parent: Span | None = None) -> contextlib.AbstractContextManager[Any]:
    """``with stage("read body"):`` a span of one step of the current request (of ``parent``'s, given one, for
    work that runs outside the request's task), when that request is recorded; otherwise nothing at all."""
    if tracer is None:
        return _NULL
    if parent is None:
        parent = current_span()
        if parent is None:
            return _NULL
        return _stage(name, None, attributes)
    if not parent.is_recording():
        return _NULL
    return _stage(name, parent, attributes)


def refused(name: str, exc: ServingError, attributes: dict[str, Any]) -> None:
    """A stage that refused the request at once (the admission gate's 503): a span with its status."""
    with contextlib.suppress(ServingError), stage(name, attributes):
        raise exc


# Batches -------------------------------------------------------------------------------------------------------


def batch_span(model: str, version: str, parents: list[Span], rows: int, start_ns: int) -> Span:
    """The span of one executed batch: the child of its first recorded request, linked to each of them."""
    assert tracer is not None
    return tracer.start_span("inference", context=trace.set_span_in_context(parents[0]),
                             links=[Link(p.get_span_context()) for p in parents], start_time=start_ns,
                             attributes={"convserve.model": model,
                                         "convserve.model.version": int(version) if version.isdigit() else version,
                                         "convserve.batch.requests": len(parents), "convserve.batch.rows": rows})


def queue_span(parent: Span, enqueued_ns: int, started_ns: int, batch: SpanContext | None) -> None:
    """A request's wait for its batch, after the fact; it links to the batch that ran it."""
    assert tracer is not None
    span = tracer.start_span("queue", context=trace.set_span_in_context(parent), start_time=enqueued_ns,
                             links=[Link(batch)] if batch is not None else None)
    span.end(end_time=started_ns)


def end_batch(span: Span, outcome: str, failed: int) -> None:
    span.set_attribute("convserve.batch.outcome", outcome)
    if failed:
        span.set_attribute("convserve.batch.failed_requests", failed)
    if outcome == "error":
        span.set_status(Status(StatusCode.ERROR, "the batch's inference failed"))
    span.end()


# Exemplars ------------------------------------------------------------------------------------------------------


class Exemplars:
    """The newest traced observation per histogram bucket, attached to the OpenMetrics exposition as exemplars.

    prometheus_client keeps no exemplars in multiprocess mode (the workers' values live in mmap files), so each
    worker keeps its own here and writes them to ``exemplars_<pid>.json`` beside its metric files every second
    (:meth:`flush`); a scrape, answered by any worker, takes the newest per bucket over all of them.
    """

    def __init__(self, histograms: dict[str, tuple[tuple[str, ...], tuple[float, ...]]], directory: str | None) -> None:
        """``histograms``: each metric's label names and bucket bounds; ``directory``: the metric files'."""
        self.label_names = {name: names for name, (names, _) in histograms.items()}
        self._buckets = {name: (*bounds, float("inf")) for name, (_, bounds) in histograms.items()}
        self._directory = Path(directory) if directory else None
        self._latest: dict[tuple[str, tuple[str, ...], str], tuple[str, str, float, float]] = {}
        self._changed = False
        self._lock = threading.Lock()

    def observe(self, metric: str, labels: tuple[str, ...], value: float, span: Span | None = None) -> None:
        """Note ``value``, just observed into ``metric{labels}``, under ``span``'s trace id (by default the current
        span's) when it is sampled."""
        found = ids(span)
        if found is None:
            return
        bounds = self._buckets[metric]
        index = bisect.bisect_left(bounds, value)
        le = floatToGoString(bounds[min(index, len(bounds) - 1)])  # as the bucket's own "le" label is written
        with self._lock:
            self._latest[metric, labels, le] = (*found, value, time.time())
            self._changed = True

    def flush(self) -> None:
        """Write this worker's exemplars where the other workers' scrapes read them (multiprocess mode)."""
        if self._directory is None or not self._changed:
            return
        with self._lock:
            entries = [[m, list(labels), le, *rest] for (m, labels, le), rest in self._latest.items()]
            self._changed = False
        path = self._directory / f"exemplars_{os.getpid()}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(entries))
        temporary.replace(path)

    def all(self) -> dict[tuple[str, tuple[str, ...], str], tuple[str, str, float, float]]:
        """The newest exemplar per (metric, labels, bucket) of this process, and of every worker's file."""
        with self._lock:
            merged = dict(self._latest)
        if self._directory is not None:
            for path in self._directory.glob("exemplars_*.json"):
                try:
                    entries = json.loads(path.read_text())
                except (OSError, ValueError):  # being replaced, or a dead worker's: skipped this time
                    continue
                for metric, labels, le, trace_id, span_id, value, at in entries:
                    key = (metric, tuple(labels), le)
                    if key not in merged or merged[key][3] < at:
                        merged[key] = (trace_id, span_id, value, at)
        return merged
