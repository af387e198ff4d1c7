"""Image endpoints: ``POST /models/{name}[/versions/{v}]/predict`` and ``GET /models``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import tracing
from service.dataplane import DataPlane, top_k
from service.errors import UnsupportedMediaType
from service.json_bodies import decode_images
from service.parsing import positive_int
from service.responses import json_response
from service.rest.body import disconnect_probe, media_type, read_body, rollout_key, version_header
from service.rest.multipart import parse_multipart
from service.rest.routing import InferenceRoute
from service.rest.schemas import ERRORS, ModelsResponse, PredictResponse
from service.settings import Settings

router = APIRouter(tags=["images"], route_class=InferenceRoute)

MAX_FORM_FIELDS = 16  # non-file parts (top_k) allowed beside the images

PREDICT_BODY = {
    "requestBody": {
        "description": "Multipart image files (any field name; `file` or `files` by convention), "
                       "a raw image body with an `image/*` content type, or JSON with base64 images.",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "top_k": {"type": "integer"}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/Base64Images"}},
        },
    }
}


def _top_k_value(value: Any, default: int, *, text: bool) -> int:
    """top_k from a query or form field (``text``: ASCII digits) or from JSON (an integer, not true or 2.9)."""
    if value is None or (text and value == ""):
        return default
    return positive_int(value, "top_k", text_allowed=text)


async def _images_from_request(request: Request, limit: int, max_images: int) -> tuple[list[bytes], Any, bool]:
    """The encoded images of a request, its top_k field and whether that field is text, whatever the body format."""
    kind = media_type(request)
    if kind == "multipart/form-data":
        body = await read_body(request, limit)
        parts = parse_multipart(body, request.headers["content-type"], max_parts=max_images + MAX_FORM_FIELDS)
        images = [p.data for p in parts if p.is_file and (p.data or p.filename)]
        fields = {p.name: p.data for p in parts if not p.is_file}
        k_field = fields.get("top_k")
        return images, k_field.decode("utf-8", "replace") if k_field is not None else None, True
    if kind.startswith("image/") or kind == "application/octet-stream":
        return [await read_body(request, limit)], None, True
    if kind == "application/json":
        body = await read_body(request, limit)
        with tracing.stage("parse json"):  # a large body in the worker's JSON process
            images, k = await request.app.state.dataplane.json_decoder.run(len(body), decode_images, body, max_images)
        return images, k, False
    raise UnsupportedMediaType(
        f"unsupported content type {kind or '(none)'!r}: send multipart/form-data, image/*, or application/json")


async def images_and_top_k(request: Request, settings: Settings) -> tuple[list[bytes], int]:
    """The encoded images of an image-endpoint request and its top_k (the query's, else the body's)."""
    images, k, text = await _images_from_request(request, settings.max_body_bytes, settings.max_images_per_request)
    if "top_k" in request.query_params:
        k, text = request.query_params["top_k"], True
    return images, _top_k_value(k, settings.default_top_k, text=text)


async def _predict(request: Request, name: str, version: str | None) -> Response:
    dataplane: DataPlane = request.app.state.dataplane
    settings = dataplane.settings
    async with dataplane.admitted(name, version, rollout_key(request)) as mv:  # 404, 503 before reading a body
        images, k = await images_and_top_k(request, settings)
        result = await dataplane.infer_images(mv, images, disconnect_probe(request), request.scope.get("request_id"))
    return json_response({"model": mv.name, "version": mv.version,
                          "predictions": top_k(mv, result.probabilities, k)}, headers=version_header(mv.version))


@router.post("/models/{name}/predict", response_model=None, responses={200: {"model": PredictResponse}, **ERRORS},
             openapi_extra=PREDICT_BODY, summary="Classify images with the newest version of a model")
async def predict(request: Request, name: str) -> Response:
    return await _predict(request, name, None)


@router.post("/models/{name}/versions/{version}/predict", response_model=None,
             responses={200: {"model": PredictResponse}, **ERRORS}, openapi_extra=PREDICT_BODY,
             summary="Classify images with one version of a model")
async def predict_version(request: Request, name: str, version: str) -> Response:
    return await _predict(request, name, version)


@router.get("/models", response_model=None, responses={200: {"model": ModelsResponse}},
            summary="Models, their versions and state, and what they take")
async def list_models(request: Request) -> Response:
    dataplane: DataPlane = request.app.state.dataplane
    models = []
    for model in dataplane.models():
        newest = model.serving
        entry: dict[str, Any] = {
            "name": model.name,
            "default_version": newest.version if newest else None,
            "versions": [status.to_dict() for status in model.statuses()],
        }
        if model.error:
            entry["error"] = model.error
        if newest is not None:
            entry.update(platform=newest.runtime.platform, input=newest.input.to_dict(),
                         output=newest.output.to_dict(), labels=newest.labels, digit=newest.image_spec.digit)
        models.append(entry)
    return json_response({"models": models})
