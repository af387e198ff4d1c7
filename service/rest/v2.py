"""Open Inference Protocol (KServe v2 / Triton HTTP): health, metadata and inference.

Supports JSON tensors (flat or nested ``data``), the binary tensor data extension
(``Inference-Header-Content-Length``, ``binary_data_size``, ``binary_data``,
``binary_data_output``) and the classification extension (``"score:index:label"``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from service import __version__, tracing
from service.batching import Outputs
from service.dataplane import DataPlane
from service.errors import InvalidInput
from service.limits import check_declared_shape, check_json_items, check_response_bytes, nested_budget, off_loop
from service.parsing import ascii_count, json_count, strict_array
from service.repository import ModelVersion
from service.responses import dumps, json_response
from service.rest.body import disconnect_probe, parse_json, read_body, rollout_key, version_header
from service.rest.routing import InferenceRoute
from service.rest.schemas import ERRORS, ServerMetadata, V2InferRequest, V2InferResponse, V2ModelMetadata
from service.v2_tensors import (
    EXTENSIONS,
    bytes_tensor,
    classification,
    element_count,
    from_buffer,
    output_tensor,
    response_bytes,
    shaped,
    tensor_dtype,
)

router = APIRouter(tags=["open inference protocol (v2)"], route_class=InferenceRoute)

HEADER_LENGTH = "inference-header-content-length"

INFER_DOCS: dict[str, Any] = {
    "requestBody": {
        "description": "A JSON inference request, or (binary tensor extension) the JSON header "
                       "followed by raw tensor bytes, with `Inference-Header-Content-Length`.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


# --- Decoding requests -------------------------------------------------------------------------

def _split_body(header: str | None, body: bytes) -> tuple[Any, memoryview]:
    """The JSON header and the binary section that follows it (binary tensor extension); ``header`` is the
    Inference-Header-Content-Length value."""
    if header is None:
        return parse_json(body), memoryview(b"")
    n = ascii_count(header, HEADER_LENGTH)
    if n > len(body):
        raise InvalidInput(f"{HEADER_LENGTH} must be a byte count no larger than the body")
    view = memoryview(body)
    return parse_json(view[:n]), view[n:]


def _input_tensor(spec: dict[str, Any], binary: memoryview, offset: int,
                  row_shape: tuple[int, ...], max_rows: int) -> tuple[np.ndarray, int]:
    """Decode one request input to an ndarray; returns it and the new offset in the binary section.

    JSON data declared beyond ``max_rows`` rows of ``row_shape`` is refused before it is converted (binary data
    is sized exactly by its shape, at no cost)."""
    name = spec.get("name")
    datatype = spec.get("datatype")
    shape = spec.get("shape")
    count = element_count(name, shape)
    dtype = tensor_dtype(name, datatype)
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"input {name!r}: parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0 or offset + size > len(binary):
            raise InvalidInput(f"input {name!r}: binary_data_size {size!r} does not fit the binary section")
        return from_buffer(name, datatype, shape, binary[offset:offset + size]), offset + size
    data = spec.get("data")
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: needs data (a list) or parameters.binary_data_size")
    check_declared_shape(shape, row_shape, max_rows, f"input {name!r}")  # before a huge list is converted
    check_json_items(data, nested_budget(count, len(shape)), f"input {name!r}")  # the data, not only the shape
    array = strict_array(data, dtype, f"input {name!r}", datatype)
    if array.size != count:
        raise InvalidInput(f"input {name!r}: {array.size} values for shape {shape} (expected {count})")
    return shaped(array, shape, name), offset


def _requested_outputs(payload: dict[str, Any], mv: ModelVersion) -> list[tuple[str, bool, int]]:
    """(name, binary, classification k) for each output to return."""
    parameters = payload.get("parameters") or {}
    binary_default = bool(isinstance(parameters, dict) and parameters.get("binary_data_output", False))
    requested = payload.get("outputs")
    known = {s.name for s in mv.runtime.outputs}
    if not requested:
        return [(name, binary_default, 0) for name in sorted(known)]
    if not isinstance(requested, list):
        raise InvalidInput("outputs must be a list")
    result = []
    seen: set[str] = set()
    for out in requested:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str) or out["name"] not in known:
            raise InvalidInput(f"unknown output {out.get('name') if isinstance(out, dict) else out!r}; "
                               f"this model has {sorted(known)}")
        if out["name"] in seen:  # each copy would be answered in full: a cheap request for a huge response
            raise InvalidInput(f"output {out['name']!r} is requested more than once")
        seen.add(out["name"])
        params = out.get("parameters") or {}
        k = json_count(params.get("classification", 0) if isinstance(params, dict) else 0, "classification")
        binary = params.get("binary_data", binary_default) if isinstance(params, dict) else binary_default
        result.append((out["name"], bool(binary), k))
    return result


# --- Encoding responses ------------------------------------------------------------------------

def _infer_response(mv: ModelVersion, outputs: Outputs, payload: dict[str, Any]) -> Response:
    entries = []
    blobs: list[bytes] = []
    for name, binary, k in _requested_outputs(payload, mv):
        if k:
            values = classification(mv, name, outputs[name], k)
            datatype, raw = "BYTES", bytes_tensor(values) if binary else None
        else:
            datatype, values = output_tensor(outputs[name])
            raw = values.tobytes() if binary else None
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if raw is not None:
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = values.ravel().tolist() if datatype == "BYTES" else values.ravel()
        entries.append(entry)
    response: dict[str, Any] = {"model_name": mv.name, "model_version": str(mv.version), "outputs": entries}
    if isinstance(payload.get("id"), str):
        response["id"] = payload["id"]
    header = dumps(response)
    if not blobs:
        return Response(header, media_type="application/json", headers=version_header(mv.version))
    return Response(b"".join([header, *blobs]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header)), **version_header(mv.version)})


def _decode_request(header: str | None, body: bytes, mv: ModelVersion, max_rows: int) -> tuple[Any, np.ndarray]:
    """The JSON payload and the input tensor of a request body (on a worker thread when the body is large)."""
    payload, binary = _split_body(header, body)
    if not isinstance(payload, dict):
        raise InvalidInput("inference request must be a JSON object")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput(f"inference request needs exactly one input, {mv.input.name!r}")
    if inputs[0].get("name") != mv.input.name:
        raise InvalidInput(f"unknown input {inputs[0].get('name')!r}; this model takes {mv.input.name!r}")
    _requested_outputs(payload, mv)  # reject bad output requests before converting data or running the model
    tensor, _ = _input_tensor(inputs[0], binary, 0, tuple(mv.input.shape[1:]), max_rows)
    return payload, tensor


async def _infer(request: Request, name: str, version: str | None) -> Response:
    dataplane: DataPlane = request.app.state.dataplane
    settings = dataplane.settings
    async with dataplane.admitted(name, version, rollout_key(request)) as mv:
        body = await read_body(request, settings.max_body_bytes)
        with tracing.stage("decode"):
            payload, tensor = await off_loop(len(body), _decode_request, request.headers.get(HEADER_LENGTH), body,
                                             mv, settings.max_request_rows)
            rows = dataplane.check_rows(mv, tensor)
        check_response_bytes(response_bytes(mv, len(rows), _requested_outputs(payload, mv)),
                             settings.max_response_bytes)
        result = await dataplane.infer(mv, rows, disconnect_probe(request), request.scope.get("request_id"))
        return _infer_response(result.model, result.outputs, payload)


# --- Routes ------------------------------------------------------------------------------------

@router.get("/v2", response_model=None, responses={200: {"model": ServerMetadata}}, summary="Server metadata")
async def server_metadata() -> Response:
    return json_response({"name": "convserve", "version": __version__, "extensions": EXTENSIONS})


@router.get("/v2/health/live", response_model=None, summary="Liveness: the process answers")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready", response_model=None, summary="Readiness: every model has a ready version",
            responses={503: {"description": "not ready"}})
async def ready(request: Request) -> Response:
    state = request.app.state
    is_ready = state.ready and state.dataplane.ready() and state.cluster.ready()  # every worker
    return json_response({"ready": bool(is_ready)}, status=200 if is_ready else 503)


@router.get("/v2/models/{name}", response_model=None, responses={200: {"model": V2ModelMetadata}, **ERRORS},
            summary="Model metadata (newest ready version)")
async def model_metadata(request: Request, name: str) -> Response:
    return json_response(request.app.state.dataplane.metadata(name))


@router.get("/v2/models/{name}/versions/{version}", response_model=None,
            responses={200: {"model": V2ModelMetadata}, **ERRORS}, summary="Model version metadata")
async def model_version_metadata(request: Request, name: str, version: str) -> Response:
    return json_response(request.app.state.dataplane.metadata(name, version))


async def _model_ready(request: Request, name: str, version: str | None) -> Response:
    """Ready or not; for a named version that is not, its state and (when it failed) the reason."""
    is_ready, status = request.app.state.dataplane.model_ready(name, version)
    # Ready here is not enough with several workers: every one must serve it.
    is_ready = is_ready and request.app.state.cluster.model_ready(name, version)
    body: dict[str, Any] = {"name": name, "ready": is_ready}
    if status is not None:
        body["version"] = str(status.version)
        if not is_ready:
            body["state"] = status.state
            if status.error:
                body["reason"] = status.error
    return json_response(body, status=200 if is_ready else 503)


@router.get("/v2/models/{name}/ready", response_model=None, summary="Is the model ready",
            responses={404: ERRORS[404], 503: {"description": "not ready"}})
async def model_ready(request: Request, name: str) -> Response:
    return await _model_ready(request, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", response_model=None, summary="Is the version ready",
            responses={404: ERRORS[404], 503: {"description": "not ready"}})
async def model_version_ready(request: Request, name: str, version: str) -> Response:
    return await _model_ready(request, name, version)


@router.post("/v2/models/{name}/infer", response_model=None, openapi_extra=INFER_DOCS,
             responses={200: {"model": V2InferResponse}, **ERRORS}, summary="Inference (newest version)")
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", response_model=None, openapi_extra=INFER_DOCS,
             responses={200: {"model": V2InferResponse}, **ERRORS}, summary="Inference (one version)")
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


__all__ = ["router", "V2InferRequest"]
