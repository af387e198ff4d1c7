"""The HTTP protocol uvicorn runs for the service: uvicorn's own httptools protocol, with two changes.

- A request its parser refuses (two ``Content-Length`` headers, ``Content-Length`` with ``Transfer-Encoding``,
  ``Content-Length: +2``, a broken request line) is answered like every other error: a JSON body, an
  ``X-Request-ID``, an access-log line and a count in ``convserve_http_requests_total``. uvicorn answers those
  itself, before any ASGI app sees a request, with a ``text/plain`` 400 and nothing else.
- A request's headers must arrive within ``CONVSERVE_HEADER_TIMEOUT_SECONDS`` of its first byte (of the connection,
  for its first request): otherwise 408 and the connection is closed. uvicorn has no such bound, so connections that
  send nothing or half a header block stayed open for good, one file descriptor each, until ``accept`` failed for
  everyone (slowloris). A body's progress is bounded where it is read (``service.rest.body``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.middleware import new_request_id

Recorder = Callable[[str, int, str, str], None]
_header_timeout = 10.0
_record: Recorder | None = None


def configure(header_timeout_seconds: float, record: Recorder) -> None:
    """This process's header-read bound (0: none), and ``record(request_id, status, reason, client)``, called for
    every request answered here before any app saw it (the app counts and logs it)."""
    global _header_timeout, _record
    _header_timeout, _record = header_timeout_seconds, record


class ServiceHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the service's answer to a request it cannot parse, and a header timeout."""

    _header_timer: asyncio.TimerHandle | None = None
    _in_headers = False

    # The timer costs a few microseconds to arm and cancel, so it is armed only where headers are actually awaited:
    # once per connection (a client may send nothing at all), and after a read that left a request's headers
    # incomplete. A request whose headers arrive in one read, nearly all of them, arms nothing.

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_headers and self._header_timer is None and not self.transport.is_closing():
            self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        if _header_timeout > 0:
            self._header_timer = self.loop.call_later(_header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # a request is being answered: its body's pace is bounded where it is read
        if self.cycle is not None and not self._in_headers:
            return  # idle between requests: uvicorn's keep-alive timeout closes the connection
        self._send_error(408, f"request headers not received within {_header_timeout:g} s",
                         "request header timeout")

    def send_400_response(self, msg: str) -> None:
        self._send_error(400, f"malformed HTTP request: {msg.rstrip('.')}", msg)

    def _send_error(self, status: int, message: str, reason: str) -> None:
        request_id = new_request_id()
        body = json.dumps({"error": message}).encode()
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"x-request-id: " + request_id.encode("ascii") + b"\r\n",
            b"connection: close\r\n",
            b"\r\n",
            body,
        ])
        self.transport.write(b"".join(content))
        self.transport.close()
        client = self.client[0] if self.client else ""
        if _record is not None:
            _record(request_id, status, reason, client)
