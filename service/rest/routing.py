"""The route class of the inference endpoints: FastAPI's routing, a leaner handler.

FastAPI's own handler solves each endpoint's dependencies and validates its parameters on
every request. The inference endpoints take only the raw request and string path parameters,
so their handler calls them directly. They are still ordinary routes of the one router: the
app's middleware and exception handlers apply to them as to every other route, and they
appear in the OpenAPI docs. An endpoint that asks for anything more (a query or body
parameter, a dependency) is refused when the app is built, not at run time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


class InferenceRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        d = self.dependant
        extra = [p.name for p in (*d.query_params, *d.header_params, *d.cookie_params, *d.body_params)]
        extra += [sub.call.__name__ for sub in d.dependencies if sub.call is not None]
        if extra or d.request_param_name not in (None, "request"):
            raise TypeError(f"{path}: an InferenceRoute endpoint takes only `request` and path parameters "
                            f"(found {extra or d.request_param_name}); use a plain APIRoute for anything else")

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        endpoint = self.endpoint
        if self.dependant.request_param_name is None:
            async def handler(request: Request) -> Response:
                return await endpoint(**request.path_params)
        else:
            async def handler(request: Request) -> Response:
                return await endpoint(request, **request.path_params)
        return handler
