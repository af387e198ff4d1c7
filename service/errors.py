"""Domain errors that know their HTTP status, and the one handler that renders them as JSON."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response

from service.responses import json_response

log = logging.getLogger("service.errors")


class ServingError(Exception):
    """Base of every error a client may see; ``status`` is the HTTP status it maps to."""

    status = 500
    headers: dict[str, str] | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServingError):
    status = 400


class Unauthorized(ServingError):
    status = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ServingError):
    status = 403


class ModelNotFound(ServingError):
    status = 404


class PayloadTooLarge(ServingError):
    status = 413


class UnsupportedMediaType(ServingError):
    status = 415


class NotExplainable(ServingError):
    """The model cannot be explained (no convolution or pooling layers, no ONNX graph)."""

    status = 422


class NonFiniteOutput(ServingError):
    """The model's answer for a well-formed input holds NaN or Inf (inputs far outside its range)."""

    status = 422


class UnknownPrediction(ServingError):
    """Feedback names a prediction id the prediction log does not have."""

    status = 404


class Conflict(ServingError):
    """Feedback gives a prediction a different label from the one it already has."""

    status = 409


class UnprocessableInput(ServingError):
    """Well-formed JSON whose values are not acceptable (a label out of range or of the wrong type)."""

    status = 422


class StateUnavailable(ServingError):
    """The state store is off, or cannot be reached just now."""

    status = 503
    headers = {"Retry-After": "1"}


class ModelNotReady(ServingError):
    status = 503


class Overloaded(ServingError):
    status = 503

    def __init__(self, message: str, retry_after: int = 1, reason: str = "queue_full") -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}
        self.reason = reason
        """Why it was refused, as counted in convserve_rejected_requests_total: queue_full or queue_delay."""


class DeadlineExceeded(ServingError):
    status = 504


class RequestTimeout(ServingError):
    """The client sent its request too slowly (a stalled body): the connection is closed after the answer, since
    the rest of the body may still come."""

    status = 408
    headers = {"Connection": "close"}


class ClientDisconnected(ServingError):
    """The client went away before its request ran; it is dropped, not executed."""

    status = 499


class DecoderStopped(ServingError):
    """The worker's JSON process (:mod:`service.json_bodies`) stopped, killed or out of memory, while it decoded
    the request's body."""

    status = 503
    headers = {"Retry-After": "1"}


class InferenceFailed(ServingError):
    status = 500


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status=status, headers=headers)


async def serving_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServingError)
    return error_response(exc.status, exc.message, exc.headers)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 and friends, in our JSON shape."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) or "error"
    return error_response(status, str(detail), getattr(exc, "headers", None))


async def validation_error_handler(request: Request, exc: Exception) -> Response:
    errors = getattr(exc, "errors", lambda: [])()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = first.get("msg", "invalid request")
    return error_response(400, f"{where}: {message}" if where else message)


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    """Last resort: log the traceback, tell the client only that it was our fault."""
    log.exception("unhandled error", extra={"request_id": request.scope.get("request_id")})
    return error_response(500, "internal server error")
