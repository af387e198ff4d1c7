"""TensorFlow Serving REST API: model status, metadata, and ``:predict`` (row and columnar forms).

Rows may also carry encoded images as ``{"b64": "..."}``, as TF Serving clients send binary
values; those go through the same image preprocessing as uploads.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import tracing
from service.dataplane import DataPlane, Prediction
from service.errors import ModelNotFound
from service.json_bodies import TensorSpec, decode_tf
from service.repository import FAILED, READY, VERSION_LABELS, VersionStatus
from service.responses import json_response
from service.rest.body import disconnect_probe, read_body, rollout_key, version_header
from service.rest.routing import InferenceRoute
from service.rest.schemas import ERRORS, TFModelStatus, TFPredictRequest, TFPredictResponse

router = APIRouter(tags=["tensorflow serving rest"], route_class=InferenceRoute)

TF_DTYPES = {"FP32": "DT_FLOAT", "FP64": "DT_DOUBLE", "UINT8": "DT_UINT8", "INT32": "DT_INT32", "INT64": "DT_INT64"}
PREDICT_DOCS: dict[str, Any] = {
    "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/TFPredictRequest"}}}}
}


def _version_status(status: VersionStatus) -> dict[str, Any]:
    """TF Serving's shape: a version that failed to load is END with the reason in error_message."""
    state = {READY: "AVAILABLE", FAILED: "END"}.get(status.state, status.state)
    return {"version": str(status.version), "state": state,
            "status": {"error_code": "UNKNOWN" if status.error else "OK", "error_message": status.error or ""}}


def _label(label: str) -> str:
    if label not in VERSION_LABELS:
        raise ModelNotFound(f"unknown version label {label[:32]!r}; the labels are {', '.join(VERSION_LABELS)}")
    return label


def _status(request: Request, name: str, version: str | None) -> Response:
    dataplane: DataPlane = request.app.state.dataplane
    statuses = dataplane.version_statuses(name, version)
    body: dict[str, Any] = {"model_version_status": [_version_status(s) for s in statuses]}
    if version is None:  # the labels (TF Serving's version_labels): the version serving, and a rollout's candidate
        model = dataplane.model(name)
        labels = {"stable": model.serving.version if model.serving else None,
                  "canary": model.candidate if model.candidate in model.loaded else None}
        body["version_labels"] = {k: str(v) for k, v in labels.items() if v is not None}
    return json_response(body)


def _tensor_info(spec: Any, tensor_name: str) -> dict[str, Any]:
    return {"dtype": TF_DTYPES.get(spec.datatype, "DT_INVALID"),
            "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in spec.shape], "unknown_rank": False},
            "name": tensor_name}


def _metadata(request: Request, name: str, version: str | None) -> Response:
    mv = request.app.state.dataplane.version(name, version)
    signature = {
        "inputs": {s.name: _tensor_info(s, f"serving_default_{s.name}:0") for s in mv.runtime.inputs},
        "outputs": {s.name: _tensor_info(s, "StatefulPartitionedCall:0") for s in mv.runtime.outputs},
        "method_name": "tensorflow/serving/predict",
    }
    return json_response({
        "model_spec": {"name": mv.name, "signature_name": "", "version": str(mv.version)},
        "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
    })


async def _predict(request: Request, name: str, version: str | None) -> Response:
    dataplane: DataPlane = request.app.state.dataplane
    async with dataplane.admitted(name, version, rollout_key(request)) as mv:
        gone = disconnect_probe(request)
        request_id = request.scope.get("request_id")
        body = await read_body(request, dataplane.settings.max_body_bytes)
        with tracing.stage("decode"):  # a large body in the worker's JSON process
            decoded = await dataplane.json_decoder.run(len(body), decode_tf, body,
                                                       TensorSpec.of(mv, dataplane.settings.max_request_rows))
        result: Prediction
        if decoded.images is not None:
            result = await dataplane.infer_images(mv, decoded.images, gone, request_id)
        else:
            assert decoded.tensor is not None
            result = await dataplane.infer(mv, dataplane.check_rows(mv, decoded.tensor), gone, request_id)
    key = "predictions" if decoded.row_format else "outputs"
    return json_response({key: result.probabilities}, headers=version_header(mv.version))


@router.get("/v1/models/{name}", response_model=None, responses={200: {"model": TFModelStatus}, **ERRORS},
            summary="Model status (all versions)")
async def model_status(request: Request, name: str) -> Response:
    return _status(request, name, None)


@router.get("/v1/models/{name}/versions/{version}", response_model=None,
            responses={200: {"model": TFModelStatus}, **ERRORS}, summary="Model version status")
async def model_version_status(request: Request, name: str, version: str) -> Response:
    return _status(request, name, version)


@router.get("/v1/models/{name}/metadata", response_model=None, responses=ERRORS, summary="Signature metadata")
async def model_metadata(request: Request, name: str) -> Response:
    return _metadata(request, name, None)


@router.get("/v1/models/{name}/versions/{version}/metadata", response_model=None, responses=ERRORS,
            summary="Signature metadata of one version")
async def model_version_metadata(request: Request, name: str, version: str) -> Response:
    return _metadata(request, name, version)


@router.post("/v1/models/{name}:predict", response_model=None, openapi_extra=PREDICT_DOCS,
             responses={200: {"model": TFPredictResponse}, **ERRORS}, summary="Predict (newest version)")
async def predict(request: Request, name: str) -> Response:
    return await _predict(request, name, None)


@router.post("/v1/models/{name}/versions/{version}:predict", response_model=None, openapi_extra=PREDICT_DOCS,
             responses={200: {"model": TFPredictResponse}, **ERRORS}, summary="Predict (one version)")
async def predict_version(request: Request, name: str, version: str) -> Response:
    return await _predict(request, name, version)


@router.post("/v1/models/{name}/labels/{label}:predict", response_model=None, openapi_extra=PREDICT_DOCS,
             responses={200: {"model": TFPredictResponse}, **ERRORS},
             summary="Predict with the version a label names (stable, or canary: a rollout's candidate)")
async def predict_label(request: Request, name: str, label: str) -> Response:
    return await _predict(request, name, _label(label))


@router.get("/v1/models/{name}/labels/{label}", response_model=None,
            responses={200: {"model": TFModelStatus}, **ERRORS}, summary="Status of the version a label names")
async def model_label_status(request: Request, name: str, label: str) -> Response:
    mv = request.app.state.dataplane.version(name, _label(label))
    return _status(request, name, str(mv.version))


__all__ = ["router", "TFPredictRequest"]
