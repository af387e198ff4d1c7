"""Feedback and live quality: ``POST /v2/models/{name}/feedback`` and ``GET /v2/models/{name}/quality``.

Feedback attaches true labels to logged predictions, named by the answer's request id (``X-Request-Id``;
gRPC: the response ``id``) and the image's index in the request::

    {"id": "<request id>", "index": 0, "label": 7}          one label ("index" defaults to 0)
    {"feedback": [{"id": ..., "index": ..., "label": ...}]}  up to CONVSERVE_MAX_FEEDBACK_ITEMS, all or none

``label`` is a class id or a label name. Answers ``{"accepted": n, "new": k}`` (the same label again is
accepted and not stored twice). Errors: malformed JSON 400; unknown model or prediction 404; a different
label for a labelled prediction 409; too many items 413; a label or id of the wrong type or out of range 422.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.dataplane import DataPlane
from service.errors import PayloadTooLarge, StateUnavailable, UnprocessableInput
from service.json_bodies import parse_json
from service.middleware import REQUEST_ID_RE
from service.repository import ModelVersion
from service.responses import json_response
from service.rest.body import read_body
from service.rest.schemas import ERRORS
from service.state import State
from service.state.store import Label

router = APIRouter(tags=["feedback"])

FEEDBACK_ITEM_BYTES = 256  # a generous item: {"id": "<64 characters>", "index": 1023, "label": "<a label>"}

FEEDBACK_DOCS: dict[str, Any] = {
    "requestBody": {
        "description": 'One label, `{"id": "<request id>", "index": 0, "label": 7}`, or several, '
                       '`{"feedback": [...]}`; `label` is a class id or a label name.',
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}


def _state(request: Request) -> tuple[DataPlane, State]:
    dataplane: DataPlane = request.app.state.dataplane
    if dataplane.state is None:
        raise StateUnavailable("the state store is off (CONVSERVE_STATE_URL is empty): there is no prediction log "
                               "to attach feedback to")
    return dataplane, dataplane.state


def _label(value: Any, labels: list[str], where: str) -> int:
    if type(value) is int:
        if 0 <= value < len(labels):
            return value
        raise UnprocessableInput(f"{where}: label {value} is out of range; this model has classes 0.."
                                 f"{len(labels) - 1}")
    if isinstance(value, str):
        if value in labels:
            return labels.index(value)
        raise UnprocessableInput(f"{where}: unknown label {value[:64]!r}; this model's labels are "
                                 f"{', '.join(labels)[:512]}")
    raise UnprocessableInput(f"{where}: label must be a class id (an integer) or a label name (a string)")


def _item(item: Any, labels: list[str], where: str) -> Label:
    if not isinstance(item, dict):
        raise UnprocessableInput(f"{where} must be an object {{\"id\": ..., \"index\": ..., \"label\": ...}}")
    unknown = set(item) - {"id", "index", "label"}
    if unknown:
        raise UnprocessableInput(f"{where}: unknown field {sorted(unknown)[0][:64]!r}; use id, index and label")
    request_id = item.get("id")
    if not isinstance(request_id, str) or not REQUEST_ID_RE.match(request_id):
        raise UnprocessableInput(f"{where}: id must be the prediction's request id (the answer's X-Request-Id)")
    index = item.get("index", 0)
    if type(index) is not int or index < 0:
        raise UnprocessableInput(f"{where}: index must be the image's position in its request, an integer >= 0")
    if "label" not in item:
        raise UnprocessableInput(f"{where}: label is missing")
    return Label(request_id, index, _label(item["label"], labels, where))


def _labels_of(dataplane: DataPlane, name: str) -> list[str]:
    model = dataplane.model(name)  # 404 for an unknown model
    serving: ModelVersion | None = model.serving
    if serving is None:
        dataplane.version(name)  # raises the 503 with its reason
    assert serving is not None
    return serving.labels


@router.post("/v2/models/{name}/feedback", response_model=None, openapi_extra=FEEDBACK_DOCS,
             responses={409: {"description": "The prediction already has a different label"},
                        422: {"description": "A label, id or index of the wrong type or out of range"}, **ERRORS},
             summary="Give the true labels of logged predictions")
async def post_feedback(request: Request, name: str) -> Response:
    dataplane, state = _state(request)
    labels = _labels_of(dataplane, name)
    limit = dataplane.settings.max_feedback_items
    payload = parse_json(await read_body(request, max(64 * 1024, limit * FEEDBACK_ITEM_BYTES)))
    if isinstance(payload, dict) and "feedback" in payload:
        items = payload["feedback"]
        if set(payload) != {"feedback"} or not isinstance(items, list) or not items:
            raise UnprocessableInput('a feedback batch is {"feedback": [{"id": ..., "index": ..., "label": ...}]}, '
                                     "a non-empty list and nothing else")
        if len(items) > limit:
            raise PayloadTooLarge(f"{len(items)} feedback items exceed the limit of {limit} per request")
        parsed = [_item(item, labels, f"feedback[{i}]") for i, item in enumerate(items)]
    else:
        parsed = [_item(payload, labels, "feedback")]
    result = await state.add_feedback(name, parsed)
    return json_response({"accepted": result.new + result.repeated, "new": result.new})


def _since(value: str | None) -> float | None:
    """``?since=``: unix seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
        if math.isfinite(seconds):
            return seconds
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UnprocessableInput(f"since={value[:64]!r} is neither unix seconds nor an ISO 8601 time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


@router.get("/v2/models/{name}/quality", response_model=None, responses={**ERRORS},
            summary="Live accuracy, confusion matrix and drift per version, from logged predictions and feedback")
async def get_quality(request: Request, name: str) -> Response:
    dataplane, state = _state(request)
    since = _since(request.query_params.get("since"))
    model = dataplane.model(name)  # 404 for an unknown model
    counts = await state.counts(name, since)
    versions = state.quality(counts, lambda v: dataplane.version_labels(model, v),
                             lambda v: dataplane.version_metadata(model, v))
    return json_response({"model": name, "since": since, "versions": versions})
