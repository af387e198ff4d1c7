"""Rollouts: ``GET /v2/models/{name}/rollout``, and the admin calls that start, promote and abort one.

The admin calls take the repository API's bearer token (``CONVSERVE_ADMIN_TOKEN``)::

    POST /v2/repository/models/{name}/rollout          {"candidate": "2", "mode": "canary", "traffic": 0.2}
    POST /v2/repository/models/{name}/rollout/promote  {} (the candidate) or {"version": "1"} (any on disk)
    POST /v2/repository/models/{name}/rollout/abort    {}

Each answers the rollout as ``GET`` shows it. The change is written to the state store, applied by the answering
worker at once and by every other worker and replica on its next sync (``CONVSERVE_ROLLOUT_SYNC_SECONDS``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.dataplane import DataPlane
from service.errors import UnprocessableInput
from service.json_bodies import parse_json
from service.responses import json_response
from service.rest.body import read_body
from service.rest.repository import AUTH_ERRORS, authorize
from service.rest.schemas import ERRORS

router = APIRouter(tags=["rollout"])

ROLLOUT_ERRORS: dict[int | str, dict[str, Any]] = {
    409: {"description": "Rollouts are off for the model, or nothing to promote or abort"},
    422: {"description": "A field of the wrong type or out of range"},
}


async def _body(request: Request, allowed: set[str]) -> dict[str, Any]:
    raw = await read_body(request, 16 * 1024)
    payload = parse_json(raw) if raw.strip() else {}
    if not isinstance(payload, dict):
        raise UnprocessableInput("the body must be a JSON object")
    unknown = sorted(set(payload) - allowed)
    if unknown:
        raise UnprocessableInput(f"unknown field(s) {', '.join(map(repr, unknown))}; this call takes "
                                 f"{', '.join(sorted(allowed)) or 'none'}")
    return payload


def _version(value: Any, field: str) -> str:
    if type(value) is int and value > 0:
        return str(value)
    if isinstance(value, str) and value.isdigit() and len(value) <= 9:
        return value
    raise UnprocessableInput(f"{field} must be a version number, got {str(value)[:32]!r}")


@router.get("/v2/models/{name}/rollout", response_model=None, responses=ERRORS,
            summary="The model's rollout: stable, candidate, mode, live guard figures and past decisions")
async def get_rollout(request: Request, name: str) -> Response:
    dataplane: DataPlane = request.app.state.dataplane
    return json_response(await dataplane.rollouts.describe(name))


@router.post("/v2/repository/models/{name}/rollout", response_model=None,
             responses={**AUTH_ERRORS, **ERRORS, **ROLLOUT_ERRORS}, summary="Start a rollout of a version")
async def start_rollout(request: Request, name: str) -> Response:
    dataplane = authorize(request)
    payload = await _body(request, {"candidate", "mode", "traffic"})
    if "candidate" not in payload:
        raise UnprocessableInput('the body needs "candidate": the version to roll out')
    traffic = payload.get("traffic")
    if traffic is not None and (type(traffic) not in (int, float) or isinstance(traffic, bool)):
        raise UnprocessableInput(f"traffic must be a number from 0 to 1, got {str(traffic)[:32]!r}")
    mode = payload.get("mode")
    if mode is not None and not isinstance(mode, str):
        raise UnprocessableInput("mode must be shadow or canary")
    return json_response(await dataplane.rollouts.start_by_hand(
        name, _version(payload["candidate"], "candidate"), mode, None if traffic is None else float(traffic)))


@router.post("/v2/repository/models/{name}/rollout/promote", response_model=None,
             responses={**AUTH_ERRORS, **ERRORS, **ROLLOUT_ERRORS},
             summary="Make the candidate (or a named version) stable now")
async def promote_rollout(request: Request, name: str) -> Response:
    dataplane = authorize(request)
    payload = await _body(request, {"version"})
    version = _version(payload["version"], "version") if "version" in payload else None
    return json_response(await dataplane.rollouts.promote_by_hand(name, version))


@router.post("/v2/repository/models/{name}/rollout/abort", response_model=None,
             responses={**AUTH_ERRORS, **ERRORS, **ROLLOUT_ERRORS},
             summary="Stop the running rollout; the candidate is not served again unless promoted by hand")
async def abort_rollout(request: Request, name: str) -> Response:
    dataplane = authorize(request)
    await _body(request, set())
    return json_response(await dataplane.rollouts.abort_by_hand(name))
