"""Reading request bodies under the size limit, before any parsing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from starlette.requests import ClientDisconnect, Request

from service import tracing
from service.errors import ClientDisconnected, PayloadTooLarge, RequestTimeout
from service.parsing import ascii_count


async def read_body(request: Request, limit: int, idle_timeout: float | None = None) -> bytes:
    """The whole body, refusing with 413 as soon as it is known to exceed ``limit`` bytes, and with 408 when no part
    of it arrives for ``idle_timeout`` seconds (default: the app's ``body_timeout_seconds``; 0: no bound)."""
    if tracing.tracer is None:
        return await _read_body(request, limit, idle_timeout)
    with tracing.stage("read body") as span:
        body = await _read_body(request, limit, idle_timeout)
        if span is not None:
            span.set_attribute("http.request.body.size", len(body))
        return body


async def _read_body(request: Request, limit: int, idle_timeout: float | None) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if ascii_count(declared, "Content-Length") > limit:
            raise PayloadTooLarge(f"request body of {declared[:24]} bytes exceeds the limit of {limit} bytes")
    if idle_timeout is None:
        settings = getattr(request.app.state, "settings", None)
        idle_timeout = getattr(settings, "body_timeout_seconds", 0.0)
    cycle = getattr(request.receive, "__self__", None)  # uvicorn's request cycle: the body it has received so far
    if cycle is not None and getattr(cycle, "more_body", True) is False:
        idle_timeout = 0  # all of it is here already (nearly every request): nothing to wait for, no timer to arm
    chunks: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    try:
        # One timer for the whole read, pushed back by every piece that arrives (a task or a timer per piece would
        # cost more than reading a small body), and none at all when the body is already here.
        async with (asyncio.timeout_at(loop.time() + idle_timeout) if idle_timeout
                    else contextlib.nullcontext()) as timer:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
                if timer is not None:
                    timer.reschedule(loop.time() + idle_timeout)
    except TimeoutError:
        raise RequestTimeout(f"no part of the request body arrived for {idle_timeout:g} s") from None
    except ClientDisconnect:  # gone mid-upload: a client's doing (499), not a server error with a traceback
        raise ClientDisconnected("client disconnected while sending the request body") from None
    body = b"".join(chunks)
    request._body = body  # later parsers (multipart) read the cached body
    return body


def disconnect_probe(request: Request) -> Callable[[], bool] | None:
    """A cheap "has the client gone?" check, where the server exposes it (uvicorn's request cycle
    keeps a ``disconnected`` flag). Queued work of a gone client is dropped instead of run."""
    cycle = getattr(request.receive, "__self__", None)
    if cycle is not None and isinstance(getattr(cycle, "disconnected", None), bool):
        return lambda: cycle.disconnected
    return None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


ROLLOUT_KEY = b"x-rollout-key"


def rollout_key(request: Request) -> str | None:
    """The client's ``X-Rollout-Key``: the same key always lands on the same arm of a canary."""
    for name, value in request.scope["headers"]:
        if name == ROLLOUT_KEY:
            return value[:256].decode("latin-1")
    return None


def version_header(version: int) -> dict[str, str]:
    """``X-Model-Version``: the version that answered, on every prediction."""
    return {"X-Model-Version": str(version)}
