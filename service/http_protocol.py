"""The HTTP protocol uvicorn runs for the service: its own, except that a request its parser refuses (two
``Content-Length`` headers, ``Content-Length`` with ``Transfer-Encoding``, ``Content-Length: +2``, a broken request
line) is answered like every other error: a JSON body, an ``X-Request-ID``, an access-log line and a count in
``convserve_http_requests_total``. uvicorn answers those itself, before any ASGI app sees a request, with a
``text/plain`` 400 and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.middleware import new_request_id

Recorder = Callable[[str, str, str], None]
_recorders: list[Recorder] = []


def on_malformed(record: Recorder) -> None:
    """Have ``record(request_id, reason, client)`` called for every request the parser refuses (the app counts and
    logs it): one per process, the last registered wins."""
    _recorders[:] = [record]


class ServiceHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the service's answer to a request it cannot parse."""

    def send_400_response(self, msg: str) -> None:
        request_id = new_request_id()
        body = json.dumps({"error": f"malformed HTTP request: {msg.rstrip('.')}"}).encode()
        content = [STATUS_LINE[400]]
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
        for record in _recorders:
            record(request_id, msg, client)
