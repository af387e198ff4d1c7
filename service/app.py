"""``create_app(settings)``: wires the repository, data plane, routes, errors, middleware and metrics.

Nothing heavy happens at import time; models load in the lifespan.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import PlainTextResponse, Response

from service import __version__, grpc_api, http_protocol, tracing
from service.cluster import Cluster, WorkerCluster
from service.dataplane import DataPlane
from service.errors import (
    ServingError,
    http_exception_handler,
    serving_error_handler,
    unhandled_error_handler,
    validation_error_handler,
)
from service.metrics import Metrics
from service.middleware import RequestContextMiddleware, configure_logging, malformed_recorder
from service.repository import ModelRepository
from service.rest import docs, explain, feedback, images, rollout, tfserving, v2, web
from service.rest import repository as repository_api
from service.rest.admission import AdmissionGate
from service.settings import Settings
from service.state import State

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("service.app")


async def _poll(repository: ModelRepository, seconds: float) -> None:
    """Pick up new, changed and removed versions without a restart."""
    if seconds <= 0:
        return
    while True:
        await asyncio.sleep(seconds)
        try:
            await repository.refresh()
        except Exception:  # a bad scan must not stop the next one
            log.exception("repository scan failed")


GAUGE_DRIFT_PREDICTIONS = 10_000
"""The drift gauge's window: a model's newest predictions (GET .../quality covers every one)."""


async def _refresh_quality(dataplane: DataPlane, seconds: float) -> None:
    """Keep the live-quality gauges (accuracy, labelled count, drift) in line with the store."""
    state = dataplane.state
    if state is None or seconds <= 0:
        return
    while True:
        await asyncio.sleep(seconds)
        for model in dataplane.models():
            try:
                # Drift over the newest predictions only: a bounded read every tick, whatever the log's size.
                counts = await state.counts(model.name, None, GAUGE_DRIFT_PREDICTIONS)
            except Exception:  # the store is down: the gauges keep their last values
                log.warning("live quality refresh failed", extra={"model": model.name})
                break
            state.publish(model.name, state.quality(counts, lambda v, m=model: dataplane.version_labels(m, v),
                                                    lambda v, m=model: dataplane.version_metadata(m, v)))


async def _flush_exemplars(metrics: Metrics) -> None:
    """Write this worker's exemplars where a scrape answered by another worker finds them (tracing on)."""
    if metrics.exemplars is None or not metrics.multiprocess:
        return
    while True:
        await asyncio.sleep(EXEMPLAR_FLUSH_SECONDS)
        try:
            metrics.exemplars.flush()
        except OSError:
            log.warning("writing the exemplars failed")


EXEMPLAR_FLUSH_SECONDS = 1.0


def create_app(settings: Settings | None = None, metrics: Metrics | None = None,
               cluster_dir: Path | None = None, freeze_startup: bool = False,
               span_exporter: SpanExporter | None = None) -> FastAPI:
    """The app of one process; ``cluster_dir`` (set by the supervisor) makes it one of several workers;
    ``freeze_startup`` (the server's own processes) exempts what startup made from garbage collection;
    ``span_exporter`` (tests, tracing on) takes the spans instead of OTLP."""
    settings = settings or Settings()
    metrics = metrics or Metrics()
    configure_logging(settings.log_level)
    tracing.setup(settings, span_exporter)  # this process's tracer (each worker exports its own spans)
    if settings.tracing:
        metrics.trace_exemplars()
    repository = ModelRepository(settings, metrics)
    state = State(settings, metrics) if settings.state_url else None
    dataplane = DataPlane(repository, metrics, settings, state)
    cluster = (Cluster(repository) if cluster_dir is None
               else WorkerCluster(cluster_dir, repository, metrics, settings.worker_sync_seconds))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = time.perf_counter()
        if state is not None:
            await state.open()  # a store that cannot be used stops the start, with the reason
        await cluster.join()
        await dataplane.rollouts.load()  # the stable and candidate versions the store names load first
        await repository.refresh()
        app.state.ready = True
        if freeze_startup:
            # What startup made (modules, the app, the loaded models) lives as long as the server process: moved
            # out of the collector's sight, a full collection no longer walks it. It was a pause of the event
            # loop of tens of milliseconds several times a minute under load (p99 at c=32: 75-93 ms, 28-35 ms
            # frozen; docs/benchmarks.md). Not for an app embedded in another process (tests): frozen cycles
            # are never collected, and such a process builds many apps.
            gc.collect()
            gc.freeze()
        log.info("models loaded", extra={
            "seconds": round(time.perf_counter() - started, 3),
            "models": {m.name: [s.to_dict() for s in m.statuses()] for m in repository.models()},
        })
        cluster.start(lambda: app.state.ready and repository.ready())
        poller = asyncio.create_task(_poll(repository, settings.repository_poll_seconds))
        gauges = asyncio.create_task(_refresh_quality(dataplane, settings.quality_refresh_seconds))
        rollouts = asyncio.create_task(dataplane.rollouts.run())
        exemplars = asyncio.create_task(_flush_exemplars(metrics))
        grpc_server = await grpc_api.start_server(
            dataplane, metrics, settings, ready=lambda: app.state.ready and dataplane.ready() and cluster.ready(),
            cluster=cluster)
        try:
            yield
        finally:
            app.state.ready = False
            if grpc_server is not None:  # stop taking calls; those in flight get the drain time to finish
                await grpc_server.stop(settings.drain_seconds)
            await cluster.leave()
            poller.cancel()
            gauges.cancel()
            rollouts.cancel()
            exemplars.cancel()
            await repository.close()
            dataplane.close()
            if state is not None:
                await state.close()  # writes what the prediction log still holds
            if settings.tracing:
                await asyncio.to_thread(tracing.shutdown)  # exports the spans still buffered

    app = FastAPI(
        title="convserve",
        version=__version__,
        description="Image classification models over REST: image uploads, the Open Inference Protocol "
                    "(KServe v2) and the TensorFlow Serving REST API. The Open Inference Protocol is also served "
                    "over gRPC (Triton's inference.GRPCInferenceService) on the gRPC port.",
        lifespan=lifespan,
        # No redirects: a trailing-slash redirect would echo the Host header in Location before any auth check,
        # and API clients should see the route's own 404. /docs is served from the package (service/rest/docs.py).
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.dataplane = dataplane
    app.state.cluster = cluster
    app.state.ready = False

    app.include_router(images.router)
    app.include_router(explain.router)
    app.include_router(v2.router)
    app.include_router(tfserving.router)
    app.include_router(feedback.router)
    app.include_router(rollout.router)
    app.include_router(repository_api.router)
    app.include_router(web.router)
    app.include_router(docs.router)

    @app.get("/metrics", include_in_schema=True, tags=["observability"], summary="Prometheus metrics",
             response_class=PlainTextResponse)  # documents the text exposition format, not JSON
    async def prometheus_metrics(request: Request) -> Response:
        body, content_type = metrics.exposition(request.headers.get("accept", ""))
        return Response(body, headers={"content-type": content_type})

    app.add_exception_handler(ServingError, serving_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)
    app.add_middleware(AdmissionGate, dataplane=dataplane,
                       routes=[route for router in (images.router, explain.router, v2.router, tfserving.router)
                               for route in router.routes])
    app.add_middleware(RequestContextMiddleware, metrics=metrics, log_requests=settings.access_log)
    http_protocol.configure(settings.header_timeout_seconds, malformed_recorder(metrics, settings.access_log))
    return app
