"""TensorFlow Serving REST API: model status, metadata, and ``:predict`` (row and columnar forms).

Rows may also carry encoded images as ``{"b64": "..."}``, as TF Serving clients send binary
values; those go through the same image preprocessing as uploads.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from service import tracing
from service.dataplane import DataPlane, Prediction
from service.errors import InvalidInput, ModelNotFound
from service.limits import check_json_items, check_rows, nested_budget, off_loop
from service.parsing import strict_array
from service.repository import FAILED, READY, VERSION_LABELS, VersionStatus
from service.responses import json_response
from service.rest.body import disconnect_probe, parse_json, read_body, rollout_key, version_header
from service.rest.routing import InferenceRoute
from service.rest.schemas import ERRORS, TFModelStatus, TFPredictRequest, TFPredictResponse

router = APIRouter(tags=["tensorflow serving rest"], route_class=InferenceRoute)

FP32 = np.dtype(np.float32)

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


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _b64(value: dict[str, Any], where: str) -> bytes:
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidInput(f"{where}: b64 is not valid base64") from None


def _tensor(values: Any, where: str) -> np.ndarray:
    """Numbers only: strings (``"1e3"``), booleans and nulls are refused, not coerced."""
    try:
        return strict_array(values, FP32, where, "FP32")
    except InvalidInput:
        raise InvalidInput(f"{where}: not a regular numeric array") from None


async def _predict(request: Request, name: str, version: str | None) -> Response:
    dataplane: DataPlane = request.app.state.dataplane
    async with dataplane.admitted(name, version, rollout_key(request)) as mv:
        gone = disconnect_probe(request)
        request_id = request.scope.get("request_id")
        body = await read_body(request, dataplane.settings.max_body_bytes)
        with tracing.stage("parse json"):
            payload = await off_loop(len(body), parse_json, body)
        if not isinstance(payload, dict) or ("instances" in payload) == ("inputs" in payload):
            raise InvalidInput('request must be a JSON object with either "instances" or "inputs"')
        input_name = mv.input.name
        row_format = "instances" in payload
        values = payload["instances" if row_format else "inputs"]
        if row_format:
            if not isinstance(values, list) or not values:
                raise InvalidInput("instances must be a non-empty list")
            if all(isinstance(v, dict) and not _is_b64(v) for v in values):
                if any(set(v) != {input_name} for v in values):
                    raise InvalidInput(f"each instance must have exactly the input {input_name!r}")
                values = [v[input_name] for v in values]
        elif isinstance(values, dict) and not _is_b64(values):
            if set(values) != {input_name}:
                raise InvalidInput(f"inputs must name exactly the input {input_name!r}")
            values = values[input_name]

        result: Prediction
        if isinstance(values, list) and values and all(_is_b64(v) for v in values):
            images = [_b64(v, f"instance {i}") for i, v in enumerate(values)]
            result = await dataplane.infer_images(mv, images, gone, request_id)
        elif _is_b64(values):
            result = await dataplane.infer_images(mv, [_b64(values, "inputs")], gone, request_id)
        else:
            # Before converting a huge list: the rows, and what the lists hold (an instance is one row).
            row_shape = [max(int(d), 1) for d in mv.input.shape[1:]]
            row_budget = nested_budget(math.prod(row_shape), len(row_shape))
            if row_format:
                check_rows(len(values), dataplane.settings.max_request_rows)
                for i, instance in enumerate(values):
                    check_json_items(instance, row_budget, f"instance {i}")
            else:
                check_json_items(values, nested_budget(dataplane.settings.max_request_rows * math.prod(row_shape),
                                                       len(row_shape) + 1), "inputs")
            with tracing.stage("decode"):
                tensor = await off_loop(len(body), _tensor, values, "instances" if row_format else "inputs")
                rows = dataplane.check_rows(mv, tensor)
            result = await dataplane.infer(mv, rows, gone, request_id)
    key = "predictions" if row_format else "outputs"
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
