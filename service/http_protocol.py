"""The HTTP protocol uvicorn runs for the service: uvicorn's own httptools protocol, with three changes.

- A request its parser refuses (two ``Content-Length`` headers, ``Content-Length`` with ``Transfer-Encoding``,
  ``Content-Length: +2``, a broken request line) is answered like every other error: a JSON body, an
  ``X-Request-ID``, an access-log line and a count in ``convserve_http_requests_total``. uvicorn answers those
  itself, before any ASGI app sees a request, with a ``text/plain`` 400 and nothing else.
- A request's headers must arrive within ``CONVSERVE_HEADER_TIMEOUT_SECONDS`` of its first byte (of the connection,
  for its first request): otherwise 408 and the connection is closed. uvicorn has no such bound, so connections that
  send nothing or half a header block stayed open for good, one file descriptor each, until ``accept`` failed for
  everyone (slowloris). A body's progress is bounded where it is read (``service.rest.body``).
- A response's status line and headers are written with its first body chunk, in one ``write`` (SingleWriteSend).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from service.middleware import new_request_id

Recorder = Callable[[str, int, str, str], None]
_header_timeout = 10.0
_record: Recorder | None = None


def configure(header_timeout_seconds: float, record: Recorder) -> None:
    """This process's header-read bound (0: none), and ``record(request_id, status, reason, client)``, called for
    every request answered here before any app saw it (the app counts and logs it)."""
    global _header_timeout, _record
    _header_timeout, _record = header_timeout_seconds, record


class _Held:
    """Stands in for the transport while uvicorn writes a response's status line and headers: keeps them."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class _HeadFirst:
    """Stands in for the transport while uvicorn writes a response's first body chunk: the head goes with it."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: asyncio.Transport, head: bytes) -> None:
        self.transport, self.head = transport, head

    def write(self, data: bytes) -> None:
        head, self.head = self.head, b""
        self.transport.write(head + data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def flush(self) -> None:
        """Write the head if no body chunk took it (a HEAD request's answer has none)."""
        if self.head:
            head, self.head = self.head, b""
            self.transport.write(head)


class SingleWriteSend:
    """A request-response cycle's ASGI ``send`` that writes the response's head with its first body chunk.

    uvicorn writes the status line and headers when the app sends ``http.response.start`` and the body when it sends
    ``http.response.body``: two ``write`` calls, two syscalls, and two wake-ups of the client for one small answer.
    Keeping the head until the first body chunk makes it one (strace: 5 response writes for 5 uploads, against 10).
    What that saves in req/s is within this project's machine noise so far (docs/benchmarks.md). Everything else
    is uvicorn's own ``send``, given a stand-in transport for the two messages.
    """

    __slots__ = ("cycle", "head")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self.cycle, self.head = cycle, b""

    async def __call__(self, message: ASGISendEvent) -> None:
        cycle, transport = self.cycle, self.cycle.transport
        if message["type"] == "http.response.start" and not cycle.response_started:
            stand_in: _Held | _HeadFirst = _Held()
        elif self.head:
            stand_in, self.head = _HeadFirst(transport, self.head), b""
        else:
            await RequestResponseCycle.send(cycle, message)
            return
        cycle.transport = stand_in  # type: ignore[assignment]
        try:
            await RequestResponseCycle.send(cycle, message)
        finally:
            cycle.transport = transport
            if isinstance(stand_in, _HeadFirst) and not cycle.disconnected:
                stand_in.flush()
        if isinstance(stand_in, _Held):
            self.head = stand_in.data


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
        cycle = self.cycle
        super().on_headers_complete()
        if self.cycle is not cycle and self.cycle is not None:
            # The new cycle's ASGI task has not run yet; it looks ``send`` up when it does.
            self.cycle.send = SingleWriteSend(self.cycle)  # type: ignore[method-assign]

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
