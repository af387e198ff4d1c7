"""The admission gate: an overloaded model's refusal, answered before the framework handles the request.

Under overload most requests are refused, and each refusal should cost next to nothing, or the refusals
themselves take the CPU the admitted requests need. A refusal that went through the whole app (the
framework's middleware, routing, the endpoint, the exception handler) cost about 60-95 µs of CPU; here,
it is a path match and a prepared answer. The gate matches the request against the inference routes' own
path patterns (no second route table), asks the data plane whether the model takes the request
(:meth:`DataPlane.check_admission`, the check the route would make first), and on a refusal answers it
exactly as the route would: 503, ``Retry-After`` and the JSON error. Everything else (an admitted request,
an unknown model, a model not ready) goes on to the app unchanged, which answers it as before.

It sits inside the request middleware, so a refusal still gets its request id, access-log line and HTTP
metrics, under its route's template.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service import tracing
from service.dataplane import DataPlane
from service.errors import Overloaded, error_response
from service.rest.routing import InferenceRoute


class AdmissionGate:
    def __init__(self, app: ASGIApp, dataplane: DataPlane, routes: Iterable[BaseRoute]) -> None:
        self.app = app
        self.dataplane = dataplane
        self.routes = [route for route in routes if isinstance(route, InferenceRoute) and "POST" in route.methods]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            for route in self.routes:
                match = route.path_regex.match(path)
                if match is None:
                    continue
                params = match.groupdict()
                try:
                    self.dataplane.check_admission(params["name"], params.get("version"))
                except Overloaded as exc:
                    if tracing.tracer is not None:
                        tracing.refused("admission", exc, {"convserve.model": params["name"]})
                    scope["route"] = route
                    await error_response(exc.status, exc.message, exc.headers)(scope, receive, send)
                    return
                except Exception:  # not found, not ready, a bad version: the route answers those as always
                    pass
                break
        await self.app(scope, receive, send)
