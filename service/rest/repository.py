"""Model repository extension (Triton's): index, load and unload. Off unless an admin token is set.

Nothing here takes a path, URL or file from the request: ``load`` only (re)reads the named
model's directory under ``models_dir``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.dataplane import DataPlane
from service.errors import InvalidInput
from service.json_bodies import parse_json
from service.repository import valid_name
from service.responses import json_response
from service.rest.body import read_body
from service.rest.schemas import ERRORS

router = APIRouter(tags=["model repository (admin)"])

AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing bearer token"},
    403: {"description": "Wrong token, or the repository API is off (no CONVSERVE_ADMIN_TOKEN)"},
}


def authorize(request: Request) -> DataPlane:
    dataplane: DataPlane = request.app.state.dataplane
    dataplane.authorize_admin(request.headers.get("authorization", ""))
    return dataplane


async def _no_request_parameters(request: Request) -> None:
    """Triton lets load carry a config or files; we only ever read the model repository."""
    body = await read_body(request, 64 * 1024)
    if body.strip() and parse_json(body) not in ({}, {"parameters": {}}):
        raise InvalidInput("load and unload take no parameters: models are only read from the model repository")


def _checked_name(name: str) -> str:
    if not valid_name(name):
        raise InvalidInput(f"invalid model name {name!r}: use letters, digits, '_', '-' and '.'")
    return name


@router.post("/v2/repository/index", response_model=None, responses={**AUTH_ERRORS},
             summary="Rescan the repository; list its models and the state of their versions")
async def repository_index(request: Request) -> Response:
    dataplane = authorize(request)
    payload = parse_json(await read_body(request, 64 * 1024) or b"{}")
    await request.app.state.cluster.apply("index")  # in every worker; also picks up what changed on disk
    entries = await dataplane.repository.index()
    if isinstance(payload, dict) and payload.get("ready"):
        entries = [e for e in entries if e["state"] == "READY"]
    return json_response(entries)


@router.post("/v2/repository/models/{name}/load", response_model=None, responses={**AUTH_ERRORS, **ERRORS},
             summary="(Re)load a model from its directory in the repository")
async def repository_load(request: Request, name: str) -> Response:
    authorize(request)
    await _no_request_parameters(request)
    await request.app.state.cluster.apply("load", _checked_name(name))  # in every worker
    return json_response({})


@router.post("/v2/repository/models/{name}/unload", response_model=None, responses={**AUTH_ERRORS, **ERRORS},
             summary="Unload every version of a model (in-flight requests finish first)")
async def repository_unload(request: Request, name: str) -> Response:
    authorize(request)
    await _no_request_parameters(request)
    await request.app.state.cluster.apply("unload", _checked_name(name))  # in every worker
    return json_response({})
