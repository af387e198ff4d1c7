"""Explanations: ``POST /models/{name}[/versions/{v}]/explain``, one image in the bodies ``/predict`` takes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import Response

from service import tracing
from service.dataplane import DataPlane
from service.errors import InvalidInput
from service.explain import explain
from service.parsing import ascii_count
from service.responses import json_response
from service.rest.body import disconnect_probe
from service.rest.images import ERRORS, PREDICT_BODY, images_and_top_k
from service.rest.routing import InferenceRoute
from service.rest.schemas import ErrorResponse, ImagePrediction

router = APIRouter(tags=["explanations"], route_class=InferenceRoute)


class ModelInput(BaseModel):
    shape: list[int] = Field(description="[H, W, C]")
    data: list[list[list[float]]] = Field(description="The raw pixel values the model was given, as "
                                                      "POST /v2/models/{name}/infer takes them")
    png: str = Field(description="The same input as a base64 PNG, for display")


class Saliency(BaseModel):
    method: str = Field(description="occlusion: how much the class's probability falls when a patch is covered")
    class_id: int = Field(description="The class explained: the top class, or ?target=k")
    label: str
    patch: int = Field(description="Side of the covering patch, in input pixels")
    stride: int = Field(description="Step between patch positions")
    baseline: list[float] = Field(description="What a covered patch is set to, per channel")
    shape: list[int] = Field(description="[H, W], the input's size")
    data: list[list[float]] = Field(description="Per pixel: the mean fall in probability when it is covered")


class FeatureMap(BaseModel):
    layer: str = Field(description="The node's name in the ONNX graph")
    op: str = Field(description="Conv, MaxPool, ...")
    tensor: str = Field(description="The tensor shown (a convolution's after its activation)")
    shape: list[int] = Field(description="[h, w, channels]")
    png: str = Field(description="Base64 PNG: a numbered grid of the channels, each scaled to its own range")


class ExplainResponse(BaseModel):
    model: str
    version: int
    predictions: list[ImagePrediction] = Field(description="Exactly what /predict answers for the image")
    input: ModelInput
    saliency: Saliency
    feature_maps: list[FeatureMap] = Field(description="Every convolution and pooling layer, in graph order")


EXPLAIN_ERRORS = {**ERRORS, 422: {"model": ErrorResponse, "description": "The model has no layers to explain"}}


def _target(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        return ascii_count(value, "target")
    except InvalidInput:  # not ASCII digits ("３", "1e3", "-1"): the class-id message says what to send
        raise InvalidInput("target must be a class id (an integer)") from None


async def _explain(request: Request, name: str, version: str | None) -> Response:
    dataplane: DataPlane = request.app.state.dataplane
    settings = dataplane.settings
    async with dataplane.admitted(name, version) as mv:  # 404, 503 before reading a large body
        images, k = await images_and_top_k(request, settings)
        if len(images) != 1:
            raise InvalidInput(f"explain takes exactly one image, got {len(images)}")
        target = _target(request.query_params.get("target"))
        with tracing.stage("explain", {"convserve.explain.target": target} if target is not None else None):
            explanation = await explain(dataplane, mv, images[0], k, target, disconnect_probe(request))
    return json_response(explanation)


@router.post("/models/{name}/explain", response_model=None, responses={200: {"model": ExplainResponse},
             **EXPLAIN_ERRORS}, openapi_extra=PREDICT_BODY,
             summary="Explain a prediction of the newest version: its input, saliency and feature maps")
async def explain_latest(request: Request, name: str) -> Response:
    return await _explain(request, name, None)


@router.post("/models/{name}/versions/{version}/explain", response_model=None,
             responses={200: {"model": ExplainResponse}, **EXPLAIN_ERRORS}, openapi_extra=PREDICT_BODY,
             summary="Explain a prediction of one version: its input, saliency and feature maps")
async def explain_version(request: Request, name: str, version: str) -> Response:
    return await _explain(request, name, version)
