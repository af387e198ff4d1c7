"""Open Inference Protocol (KServe v2 / Triton HTTP): health, metadata and inference.

Supports JSON tensors (flat or nested ``data``), the binary tensor data extension
(``Inference-Header-Content-Length``, ``binary_data_size``, ``binary_data``,
``binary_data_output``) and the classification extension (``"score:index:label"``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import __version__, tracing
from service.batching import Outputs
from service.dataplane import DataPlane
from service.json_bodies import V2_HEADER_LENGTH, TensorSpec, V2Request, decode_v2, v2_json_end
from service.limits import check_response_bytes
from service.repository import ModelVersion
from service.responses import dumps, json_response
from service.rest.body import disconnect_probe, read_body, rollout_key, version_header
from service.rest.routing import InferenceRoute
from service.rest.schemas import ERRORS, ServerMetadata, V2InferRequest, V2InferResponse, V2ModelMetadata
from service.v2_tensors import EXTENSIONS, bytes_tensor, classification, output_tensor, response_bytes

router = APIRouter(tags=["open inference protocol (v2)"], route_class=InferenceRoute)

INFER_DOCS: dict[str, Any] = {
    "requestBody": {
        "description": "A JSON inference request, or (binary tensor extension) the JSON header "
                       "followed by raw tensor bytes, with `Inference-Header-Content-Length`.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2InferRequest"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


# --- Encoding responses ------------------------------------------------------------------------

def _infer_response(mv: ModelVersion, outputs: Outputs, request: V2Request) -> Response:
    entries = []
    blobs: list[bytes] = []
    for name, binary, k in request.outputs:
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
    if request.id is not None:
        response["id"] = request.id
    header = dumps(response)
    if not blobs:
        return Response(header, media_type="application/json", headers=version_header(mv.version))
    return Response(b"".join([header, *blobs]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header)), **version_header(mv.version)})


async def _infer(request: Request, name: str, version: str | None) -> Response:
    dataplane: DataPlane = request.app.state.dataplane
    settings = dataplane.settings
    async with dataplane.admitted(name, version, rollout_key(request)) as mv:
        body = await read_body(request, settings.max_body_bytes)
        with tracing.stage("decode"):  # a large JSON part in the worker's JSON process
            json_end = v2_json_end(request.headers.get(V2_HEADER_LENGTH), body)
            decoded = await dataplane.json_decoder.run(json_end, decode_v2, json_end, body,
                                                       TensorSpec.of(mv, settings.max_request_rows))
            rows = dataplane.check_rows(mv, decoded.tensor)
        check_response_bytes(response_bytes(mv, len(rows), decoded.outputs), settings.max_response_bytes)
        result = await dataplane.infer(mv, rows, disconnect_probe(request), request.scope.get("request_id"))
        return _infer_response(result.model, result.outputs, decoded)


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
