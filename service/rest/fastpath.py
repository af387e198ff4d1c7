"""Direct dispatch for the hottest routes (inference POSTs).

These routes are ordinary FastAPI routes (they appear in the OpenAPI docs and work without
this), but every framework layer between the server and the endpoint costs per-request
Python time: exception middleware, exit stacks, route matching over every route, dependency
solving. Inference endpoints take only the raw ``Request`` and path strings, so this ASGI
middleware matches them up front and calls the very same endpoint functions directly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.routing import APIRoute, APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ServingError, error_response

log = logging.getLogger("service.fastpath")
Endpoint = Callable[..., Awaitable[Response]]


class FastPathMiddleware:
    def __init__(self, app: ASGIApp, fastapi_app: Any, routers: list[APIRouter], endpoints: list[Endpoint]) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self.routes: list[tuple[re.Pattern[str], APIRoute]] = [
            (route.path_regex, route) for router in routers for route in router.routes
            if isinstance(route, APIRoute) and route.endpoint in endpoints and route.methods == {"POST"}
        ]
        if len(self.routes) != len(endpoints):
            raise ValueError("every fast-path endpoint must be a POST route of the given routers")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            for pattern, route in self.routes:
                match = pattern.match(path)
                if match is not None:
                    scope["route"] = route
                    scope["app"] = self.fastapi_app
                    response = await self._call(route, Request(scope, receive), match.groupdict())
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    @staticmethod
    async def _call(route: APIRoute, request: Request, params: dict[str, str]) -> Response:
        try:
            return await route.endpoint(request, **params)
        except ServingError as exc:
            return error_response(exc.status, exc.message, exc.headers)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request.scope.get("request_id")})
            return error_response(500, "internal server error")
