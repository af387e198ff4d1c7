"""Pure-ASGI middleware: request ids, one JSON access-log line per request, HTTP metrics, drain cut-offs.

Written against raw ASGI (not BaseHTTPMiddleware) because it wraps every request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import tracing
from service.metrics import LabelChildren, Metrics
from service.responses import dumps

access_log = logging.getLogger("service.access")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# Probes and scrapes are not traffic.
UNCOUNTED_ROUTES = frozenset({"/metrics", "/v2/health/live", "/v2/health/ready"})
# Metric labels come from closed sets, never from the client: a made-up method (any token is a valid HTTP
# method) would otherwise add a series per request. Routes are templates (``/models/{name}/predict``).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})


def new_request_id() -> str:
    """A generated request id: 16 hex digits, the microsecond clock (13) then 12 random bits (3).

    Time-ordered, so the prediction log's index on ids grows at its end instead of at random places: a
    random id touched a different index page per prediction written (measured: 17 us a row at 200,000 rows
    in SQLite, 10 with these ids)."""
    return f"{time.time_ns() // 1000:013x}{random.getrandbits(12):03x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields passed with ``extra=`` are included."""

    RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "color_message"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,  # which worker, when there are several
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self.RESERVED})
        if tracing.tracer is not None and (ids := tracing.ids()) is not None:
            entry["trace_id"], entry["span_id"] = ids
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the ``service`` loggers at ``level``; the access log is not filtered by it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("service")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # Whether request lines are written is CONVSERVE_ACCESS_LOG's decision alone: with CONVSERVE_LOG_LEVEL=warning
    # and the access log on, they still appear (they are info records).
    access_log.setLevel(logging.INFO)
    # What no line of ours shows is not gathered for every record (the logging HOWTO's "Optimization"): the
    # caller's file and line (a stack walk), the thread and the multiprocessing process name. The pid stays.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False


class RequestContextMiddleware:
    """Request ids, the access log, the HTTP metrics, and the JSON 503 of a request cut off by the drain.

    On SIGTERM the server cancels what is still running after ``CONVSERVE_DRAIN_SECONDS``; such a request
    gets a JSON 503 here, like every other error, instead of the server's plain-text 500. One middleware,
    not two: every layer wraps every request's ``send``.
    """

    DRAINED = dumps({"error": "the server is shutting down and this request did not finish within its drain "
                              "time; retry it"})

    def __init__(self, app: ASGIApp, metrics: Metrics, log_requests: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests
        # Label children by (method, route, status): closed sets (see KNOWN_METHODS), resolved once each.
        self._counters = LabelChildren(metrics.http_requests)
        self._latencies = LabelChildren(metrics.http_latency)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = ""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                candidate = value.decode("latin-1")
                if REQUEST_ID_RE.match(candidate):
                    request_id = candidate
                break
        request_id = request_id or new_request_id()
        scope["request_id"] = request_id
        status = 0  # no answer started yet
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        span, token = None, None
        if tracing.tracer is not None and scope["path"] not in UNCOUNTED_ROUTES:
            span, token = self._server_span(scope, request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            if status:
                raise  # half an answer cannot be taken back: the connection is closed
            await send_with_id({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(self.DRAINED)).encode()),
                (b"retry-after", b"1"), (b"connection", b"close")]})
            await send_with_id({"type": "http.response.body", "body": self.DRAINED})
        finally:
            template = self._record(scope, status or 500, time.perf_counter() - started, request_id, span)
            if span is not None:
                method = scope["method"]
                span.update_name(f"{method} {template}" if template != "unmatched" else method)
                span.set_attributes({"http.route": template, "http.response.status_code": status or 500})
                if (status or 500) >= 400:
                    span.set_attribute("error.type", str(status or 500))
                tracing.finish(span, token, f"HTTP {status or 500}" if (status or 500) >= 500 else None)

    @staticmethod
    def _server_span(scope: Scope, request_id: str) -> tuple[Any, object]:
        """The request's server span (HTTP semantic conventions), the caller's child by its ``traceparent``."""
        carrier = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]
                   if key in (b"traceparent", b"tracestate")}
        client = scope.get("client") or ("", 0)
        server = scope.get("server") or ("", 0)
        method = scope["method"]
        return tracing.server_span(method if method in KNOWN_METHODS else "HTTP", carrier, {
            "http.request.method": method if method in KNOWN_METHODS else "_OTHER", "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"), "network.protocol.version": scope.get("http_version", ""),
            "client.address": client[0], "server.port": server[1], "convserve.request_id": request_id})

    def _record(self, scope: Scope, status: int, elapsed: float, request_id: str, span: Any = None) -> str:
        """Count, time and log an answer (``span``: its server span, when tracing); its route template."""
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"]
        if template not in UNCOUNTED_ROUTES:
            label = method if method in KNOWN_METHODS else "other"
            self._counters[label, template, status].inc()
            self._latencies[label, template].observe(elapsed)
            if span is not None and self.metrics.exemplars is not None:
                self.metrics.exemplars.observe("convserve_http_request_duration_seconds", (label, template), elapsed,
                                               span)
        if self.log_requests:
            log_access(request_id, method[:16], scope["path"], template, status, elapsed,
                       (scope.get("client") or ("", 0))[0])
        return template


def log_access(request_id: str, method: str, path: str, route: str, status: int, elapsed: float, client: str,
               **extra: str) -> None:
    """One access-log line: every answer, the app's and the HTTP protocol's own."""
    access_log.info("request", extra={"request_id": request_id, "method": method, "path": path, "route": route,
                                      "status": status, "duration_ms": round(elapsed * 1000, 3), "client": client,
                                      **extra})


def malformed_recorder(metrics: Metrics, log_requests: bool) -> Callable[[str, int, str, str], None]:
    """What a request answered by the HTTP protocol before any app saw it (``service.http_protocol``: a malformed
    request, 400, or headers too slow, 408) leaves behind: a count and an access-log line, like any other answer."""
    counters = {status: metrics.http_requests.labels("other", "unmatched", str(status)) for status in (400, 408)}

    def record(request_id: str, status: int, reason: str, client: str) -> None:
        counters[status].inc()
        if log_requests:
            log_access(request_id, "", "", "unmatched", status, 0.0, client, error=reason)

    return record
