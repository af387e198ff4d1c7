"""Open Inference Protocol over gRPC: Triton's ``inference.GRPCInferenceService``, as ``tritonclient.grpc`` speaks it.

A grpcio asyncio server in the same process and event loop as the REST app (started and stopped in its
lifespan, so every worker process runs one), going through the same :class:`~service.dataplane.DataPlane`:
a gRPC and a REST request may share a batch. It binds with ``SO_REUSEPORT`` so workers share the port;
:func:`claim_port` keeps another instance off it.

Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer, ModelConfig and
the repository RPCs (admin token in ``authorization: Bearer ...`` metadata, off without a token). The
others (streaming, statistics, shared memory, trace and log settings) answer UNIMPLEMENTED.

Tensors arrive as typed ``contents`` or ``raw_input_contents``; outputs leave as ``raw_output_contents``
(what tritonclient reads). A BYTES input holds encoded images, decoded like the image endpoints do.
Errors carry Triton's status codes (:data:`STATUS_CODES`); a client deadline is the request's queue
deadline, so a request still queued when its client gave up is never run.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from service import __version__, tracing
from service.batching import client_deadline
from service.cluster import Cluster
from service.dataplane import DataPlane, Prediction
from service.errors import InvalidInput, ServingError
from service.limits import check_images, check_response_bytes
from service.metrics import Metrics
from service.middleware import REQUEST_ID_RE, access_log, new_request_id
from service.protos import grpc_service_pb2 as pb
from service.protos import grpc_service_pb2_grpc as pb_grpc
from service.protos import model_config_pb2 as mc
from service.repository import ModelVersion, valid_name
from service.settings import Settings
from service.v2_tensors import (
    DATATYPES,
    EXTENSIONS,
    bytes_tensor,
    classification,
    element_count,
    from_buffer,
    output_tensor,
    response_bytes,
    shaped,
    split_bytes_tensor,
)

log = logging.getLogger("service.grpc")
Code = grpc.StatusCode

# A ServingError's HTTP status as the gRPC status Triton answers with. An image too big to decode (413) is the
# request's own fault and retrying will not help, so INVALID_ARGUMENT; a message over the size limit is refused
# by grpcio itself with RESOURCE_EXHAUSTED.
STATUS_CODES = {400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED,
                404: Code.NOT_FOUND, 413: Code.INVALID_ARGUMENT, 415: Code.INVALID_ARGUMENT, 499: Code.CANCELLED,
                503: Code.UNAVAILABLE, 504: Code.DEADLINE_EXCEEDED}
UNCOUNTED = frozenset({"ServerLive", "ServerReady", "ModelReady"})  # probes are not traffic
SERVICE = "inference.GRPCInferenceService"
SERVER_ERRORS = frozenset({Code.UNKNOWN, Code.DEADLINE_EXCEEDED, Code.UNIMPLEMENTED, Code.INTERNAL, Code.UNAVAILABLE,
                           Code.DATA_LOSS})
"""The codes that mark a server span as failed (OpenTelemetry's RPC conventions); the others are the client's."""
# The typed field of InferTensorContents for each datatype (FP16 has none: it travels raw only).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}
FIELD_DTYPES = {"bool_contents": np.bool_, "int_contents": np.int64, "int64_contents": np.int64,
                "uint_contents": np.uint64, "uint64_contents": np.uint64, "fp32_contents": np.float32,
                "fp64_contents": np.float64}

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]


MAX_DETAILS = 1024
"""Longest error message sent as grpc-message: it travels in a header, and a client-supplied name quoted in
it must not push the headers past the client's metadata limit (8 KiB by default), which would turn a clear
INVALID_ARGUMENT into RESOURCE_EXHAUSTED."""


def _details(message: str) -> str:
    return message if len(message) <= MAX_DETAILS else message[:MAX_DETAILS - 20] + "... (truncated)"


def _rpc(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    """Map ServingErrors to status codes, hide internal errors, and count, time and log the call."""
    method = handler.__name__

    @functools.wraps(handler)
    async def wrapped(self: InferenceServicer, request: Request, context: grpc.aio.ServicerContext) -> Response:
        started = time.perf_counter()
        code = Code.OK
        span, token = None, None
        if tracing.tracer is not None and method not in UNCOUNTED:
            span, token = _server_span(method, context)
        try:
            return await handler(self, request, context)
        except ServingError as exc:
            code = STATUS_CODES.get(exc.status, Code.INTERNAL)
            retry = (exc.headers or {}).get("Retry-After")
            await context.abort(code, _details(exc.message),
                                trailing_metadata=(("retry-after", retry),) if retry else ())
            raise  # abort raises; for the type checker
        except Exception:
            code = Code.INTERNAL
            log.exception("unhandled error in a gRPC call", extra={"method": method})
            await context.abort(code, "internal server error")
            raise
        except BaseException:  # cancelled: the client went away, or its deadline passed
            remaining = context.time_remaining()
            code = Code.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else Code.CANCELLED
            raise
        finally:
            self.record(method, code, time.perf_counter() - started, context)
            if span is not None:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                tracing.finish(span, token, code.name if code in SERVER_ERRORS else None)

    return wrapped


def _server_span(method: str, context: grpc.aio.ServicerContext) -> tuple[Any, object]:
    """A call's server span (RPC semantic conventions), the caller's child by its ``traceparent`` metadata."""
    carrier = {key: value for key, value in context.invocation_metadata() or ()
               if key in ("traceparent", "tracestate") and isinstance(value, str)}
    return tracing.server_span(f"{SERVICE}/{method}", carrier, {
        "rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method, "client.address": context.peer()})


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane, metrics: Metrics, ready: Callable[[], bool],
                 cluster: Cluster | None = None) -> None:
        self.dataplane = dataplane
        self.cluster = cluster or Cluster(dataplane.repository)  # the worker processes' one model state
        self.metrics = metrics
        self.is_ready = ready
        self.log_requests = dataplane.settings.access_log

    def record(self, method: str, code: grpc.StatusCode, elapsed: float, context: grpc.aio.ServicerContext) -> None:
        if method in UNCOUNTED:
            return
        self.metrics.grpc_requests.labels(method, code.name).inc()
        self.metrics.grpc_latency.labels(method).observe(elapsed)
        if self.metrics.exemplars is not None:
            self.metrics.exemplars.observe("convserve_grpc_request_duration_seconds", (method,), elapsed)
        if self.log_requests:
            supplied = dict(context.invocation_metadata() or ()).get("x-request-id", "")
            access_log.info("request", extra={
                "request_id": supplied if REQUEST_ID_RE.match(supplied) else new_request_id(),
                "method": "GRPC", "route": method, "status": code.name, "duration_ms": round(elapsed * 1000, 3),
                "client": context.peer()})

    # Health and metadata -----------------------------------------------------------------------

    @_rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.is_ready())

    @_rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            ready, _ = self.dataplane.model_ready(request.name, request.version or None)
            ready = ready and self.cluster.model_ready(request.name, request.version or None)  # every worker
        except ServingError as exc:
            if exc.status != 404:
                raise
            ready = False  # as Triton: an unknown model is simply not ready
        return pb.ModelReadyResponse(ready=ready)

    @_rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="convserve", version=__version__, extensions=EXTENSIONS)

    @_rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        meta = self.dataplane.metadata(request.name, request.version or None)
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]])

    @_rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        mv = self.dataplane.version(request.name, request.version or None)
        return pb.ModelConfigResponse(config=model_config(mv, self.dataplane.model(request.name).config))

    # Inference ---------------------------------------------------------------------------------

    @_rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        dataplane = self.dataplane
        remaining = context.time_remaining()
        token = client_deadline.set(None if remaining is None else time.monotonic() + remaining)
        # The prediction id: the request's own id when it has a usable one, else a new one (the response's id).
        request_id = request.id if REQUEST_ID_RE.match(request.id) else new_request_id()
        try:
            key = _rollout_key(context)
            async with dataplane.admitted(request.model_name, request.model_version or None, key) as mv:
                if len(request.inputs) != 1:
                    raise InvalidInput(f"inference request needs exactly one input, {mv.input.name!r}")
                spec = request.inputs[0]
                if spec.name != mv.input.name:
                    raise InvalidInput(f"unknown input {spec.name!r}; this model takes {mv.input.name!r}")
                if len(request.raw_input_contents) > 1:
                    raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for one input")
                raw = request.raw_input_contents[0] if request.raw_input_contents else None
                if raw is not None and spec.HasField("contents"):
                    raise InvalidInput(f"input {spec.name!r}: send contents or raw_input_contents, not both")
                requested = _requested_outputs(request, mv)
                settings = dataplane.settings
                if spec.datatype == "BYTES":  # encoded images (see service.decoding for where they are decoded)
                    images = _bytes_input(spec, raw, settings.max_images_per_request)
                    check_response_bytes(response_bytes(mv, len(images), [(n, True, k) for n, k in requested]),
                                         settings.max_response_bytes)
                    result = await dataplane.infer_images(mv, images, request_id=request_id)
                else:
                    with tracing.stage("decode"):
                        rows = dataplane.check_rows(mv, _numeric_input(spec, raw))
                    check_response_bytes(response_bytes(mv, len(rows), [(n, True, k) for n, k in requested]),
                                         settings.max_response_bytes)
                    result = await dataplane.infer(mv, rows, request_id=request_id)
                return _infer_response(result, requested, request_id)
        finally:
            client_deadline.reset(token)

    # Model repository (admin) ------------------------------------------------------------------

    def _authorize(self, context: Any) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.dataplane.authorize_admin(metadata.get("authorization", ""))

    @_rpc
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        self._authorize(context)
        repository = self.dataplane.repository
        await self.cluster.apply("index")  # in every worker; also picks up what changed on disk
        entries = [e for e in await repository.index() if not request.ready or e["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])

    @_rpc
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Any) -> pb.RepositoryModelLoadResponse:
        self._authorize(context)
        await self.cluster.apply("load", _repository_target(request))  # in every worker
        return pb.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Any) -> pb.RepositoryModelUnloadResponse:
        self._authorize(context)
        await self.cluster.apply("unload", _repository_target(request))  # in every worker
        return pb.RepositoryModelUnloadResponse()


def _repository_target(request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest) -> str:
    # Triton lets load carry a config or files; we only ever read the model repository. unload_dependents (which
    # tritonclient always sends) concerns ensembles, which have no dependents here.
    if set(request.parameters) - {"unload_dependents"}:
        raise InvalidInput("load and unload take no parameters: models are only read from the model repository")
    if not valid_name(request.model_name):
        raise InvalidInput(f"invalid model name {request.model_name!r}: use letters, digits, '_', '-' and '.'")
    return request.model_name


# --- Tensors ---------------------------------------------------------------------------------------

def _numeric_input(spec: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    shape = list(spec.shape)
    if raw is not None:
        return from_buffer(spec.name, spec.datatype, shape, raw, what="raw_input_contents")
    count = element_count(spec.name, shape)
    dtype = DATATYPES.get(spec.datatype)
    field = CONTENTS.get(spec.datatype)
    if dtype is None or field is None:
        supported = ", ".join(d for d in DATATYPES if d in CONTENTS)
        raise InvalidInput(f"input {spec.name!r}: datatype {spec.datatype!r} cannot be sent as typed contents "
                           f"(supported: {supported}; any of {', '.join(DATATYPES)} as raw_input_contents)")
    values = getattr(spec.contents, field)
    if len(values) != count:
        raise InvalidInput(f"input {spec.name!r}: {len(values)} values for shape {shape} (expected {count})")
    array = np.array(values, dtype=FIELD_DTYPES[field])  # each typed field's own (wider) type
    if dtype.kind in "iu" and array.size:
        limits = np.iinfo(dtype)
        if array.min() < limits.min or array.max() > limits.max:
            raise InvalidInput(f"input {spec.name!r}: a value does not fit {spec.datatype}")
    array = array.astype(dtype, copy=False)
    return shaped(array, shape, spec.name)


def _bytes_input(spec: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, max_images: int) -> list[bytes]:
    """The encoded images of a BYTES input, one per element; the image count is checked against the shape and
    ``max_images`` before any element is split or copied (4.9 M empty elements once took 2.6 s to refuse)."""
    count = element_count(spec.name, list(spec.shape))
    check_images(count, max_images)
    if raw is not None:
        return split_bytes_tensor(spec.name, raw, count)  # stops after count + 1 elements
    sent = len(spec.contents.bytes_contents)  # the repeated field's length: no copy
    if sent != count:
        raise InvalidInput(f"input {spec.name!r}: {sent} BYTES elements for a shape of {count}")
    return list(spec.contents.bytes_contents)


def _requested_outputs(request: pb.ModelInferRequest, mv: ModelVersion) -> list[tuple[str, int]]:
    """(name, classification k) for each output to return; every output when none is named."""
    known = {s.name for s in mv.runtime.outputs}
    if not request.outputs:
        return [(name, 0) for name in sorted(known)]
    result = []
    seen: set[str] = set()
    for out in request.outputs:
        if out.name not in known:
            raise InvalidInput(f"unknown output {out.name!r}; this model has {sorted(known)}")
        if out.name in seen:  # each copy would be answered in full: a cheap request for a huge response
            raise InvalidInput(f"output {out.name!r} is requested more than once")
        seen.add(out.name)
        k = 0
        if "classification" in out.parameters:
            param = out.parameters["classification"]
            choice = param.WhichOneof("parameter_choice")
            k = getattr(param, choice) if choice in ("int64_param", "uint64_param") else -1
            if k < 0:
                raise InvalidInput("classification must be a non-negative integer")
        result.append((out.name, k))
    return result


def _rollout_key(context: Any) -> str | None:
    """The ``x-rollout-key`` metadata: the same key always lands on the same arm of a canary."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-rollout-key" and isinstance(value, str):
            return value[:256]
    return None


def _infer_response(result: Prediction, requested: list[tuple[str, int]], request_id: str) -> pb.ModelInferResponse:
    mv = result.model
    response = pb.ModelInferResponse(model_name=mv.name, model_version=str(mv.version), id=request_id)
    for name, k in requested:
        if k:
            values = classification(mv, name, result.outputs[name], k)
            datatype, raw = "BYTES", bytes_tensor(values)
        else:
            datatype, values = output_tensor(result.outputs[name])
            raw = values.tobytes()
        response.outputs.add(name=name, datatype=datatype, shape=values.shape)
        response.raw_output_contents.append(raw)
    return response


# --- ModelConfig -------------------------------------------------------------------------------------

def model_config(mv: ModelVersion, parsed: mc.ModelConfig | None) -> mc.ModelConfig:
    """The model's config.pbtxt, completed as Triton completes it: name, platform, batch size, inputs, outputs.

    What the file sets is kept; what it leaves out comes from the runtime (so a model without a file gets a
    whole config). Every model here has a batch dimension, so ``max_batch_size`` is the batcher's limit.
    """
    config = mc.ModelConfig()
    if parsed is not None:
        config.CopyFrom(parsed)
    config.name = config.name or mv.name
    config.platform = config.platform or mv.runtime.platform
    config.max_batch_size = config.max_batch_size or mv.batcher.config.max_batch_size
    if not config.input:
        for spec in mv.runtime.inputs:
            config.input.add(name=spec.name, data_type=_config_type(spec.datatype), dims=spec.shape[1:])
    if not config.output:
        for spec in mv.runtime.outputs:
            config.output.add(name=spec.name, data_type=_config_type(spec.datatype), dims=spec.shape[1:])
    return config


def _config_type(datatype: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


# --- Server ----------------------------------------------------------------------------------------

def claim_port(settings: Settings) -> list[socket.socket]:
    """Claim ``settings.grpc_port`` for this instance, once, before any of its gRPC servers starts; an OSError
    naming the address when another process holds it.

    ``SO_REUSEPORT``, which lets the workers share the port, would as well let a second instance on it start
    without error and take a share of its connections. A bind without it is refused wherever a socket is bound:
    so a plain bind checks the port, then a socket bound with ``SO_REUSEPORT`` (never listening, so it takes no
    connection) holds it until it is closed: this instance's servers bind beside it, another's check fails.
    """
    if not settings.grpc_port:
        return []
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    claimed: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(settings.host, settings.grpc_port,
                                                                  type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as check:
                check.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a past run's TIME_WAIT is no owner
                check.bind(address)
            hold = socket.socket(family, kind, proto)
            claimed.append(hold)
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            hold.bind(address)
    except OSError as exc:
        for hold in claimed:
            hold.close()
        in_use = " (another process holds it)" if exc.errno == errno.EADDRINUSE else ""
        raise OSError(exc.errno, f"cannot bind {host}:{settings.grpc_port}: {exc.strerror}{in_use}") from None
    return claimed


async def start_server(dataplane: DataPlane, metrics: Metrics, settings: Settings,
                       ready: Callable[[], bool], cluster: Cluster | None = None) -> grpc.aio.Server | None:
    """Start serving on ``settings.grpc_port`` (None when it is 0), on the running event loop."""
    if not settings.grpc_port:
        return None
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", settings.max_body_bytes),  # the REST body limit
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 1),  # several worker processes share the port, as they share the HTTP one
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(dataplane, metrics, ready, cluster), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    server.add_insecure_port(f"{host}:{settings.grpc_port}")
    await server.start()
    log.info("gRPC listening", extra={"address": f"{host}:{settings.grpc_port}"})
    return server
