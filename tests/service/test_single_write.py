"""One ``write`` per small response: the head goes with the first body chunk (service.http_protocol.SingleWriteSend).

uvicorn's own request-response cycle runs here against a transport that records what it is asked to write, so the
bytes on the wire are uvicorn's, and only their grouping is ours. Then a real server answers a pipelined GET, HEAD
and POST on one connection, byte for byte parseable.
"""

import asyncio
import logging
import socket

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from service.http_protocol import SingleWriteSend
from tests.support.server import REPO_ROOT, ServiceProcess


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", bytes(data)))

    def close(self) -> None:
        self.calls.append(("close", b""))

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def cycle(method: str = "GET", keep_alive: bool = True) -> tuple[RequestResponseCycle, Recorder]:
    transport = Recorder()
    scope = {"type": "http", "method": method, "path": "/", "http_version": "1.1", "headers": [],
             "query_string": b"", "client": ("127.0.0.1", 1)}
    c = RequestResponseCycle(scope=scope, transport=transport, flow=FlowControl(transport),  # type: ignore[arg-type]
                             logger=logging.getLogger("t"), access_logger=logging.getLogger("t"), access_log=False,
                             default_headers=[(b"server", b"t")], message_event=asyncio.Event(),
                             expect_100_continue=False, keep_alive=keep_alive, on_response=lambda: None)
    c.send = SingleWriteSend(c)  # type: ignore[method-assign]
    return c, transport


async def respond(c: RequestResponseCycle, body: bytes, chunks: list[bytes] | None = None) -> None:
    headers = [(b"content-type", b"application/json")]
    if chunks is None:
        headers.append((b"content-length", str(len(body)).encode()))
    await c.send({"type": "http.response.start", "status": 200, "headers": headers})
    for part in chunks or []:
        await c.send({"type": "http.response.body", "body": part, "more_body": True})
    await c.send({"type": "http.response.body", "body": b"" if chunks else body, "more_body": False})


def test_a_response_is_one_write_with_the_head_first():
    c, transport = cycle()
    asyncio.run(respond(c, b'{"ok":true}'))
    assert [kind for kind, _ in transport.calls] == ["write"]
    data = transport.calls[0][1]
    assert data.startswith(b"HTTP/1.1 200 OK\r\nserver: t\r\n") and data.endswith(b"\r\n\r\n{\"ok\":true}")
    assert b"content-length: 11\r\n" in data
    assert c.response_complete


def test_a_head_request_writes_its_head_though_no_body_chunk_does():
    c, transport = cycle("HEAD")
    asyncio.run(respond(c, b'{"ok":true}'))
    assert len(transport.calls) == 1 and transport.calls[0][1].endswith(b"content-length: 11\r\n\r\n")


def test_connection_close_writes_everything_before_closing():
    c, transport = cycle(keep_alive=False)
    asyncio.run(respond(c, b"{}"))
    assert [kind for kind, _ in transport.calls] == ["write", "close"]
    assert b"connection: close\r\n" in transport.calls[0][1] and transport.calls[0][1].endswith(b"{}")


def test_a_streamed_body_sends_the_head_with_its_first_chunk_then_each_chunk():
    c, transport = cycle()
    asyncio.run(respond(c, b"", chunks=[b"ab", b"cd"]))
    writes = [data for kind, data in transport.calls if kind == "write"]
    assert len(writes) == 3
    assert b"transfer-encoding: chunked\r\n" in writes[0] and writes[0].endswith(b"\r\n\r\n2\r\nab\r\n")
    assert writes[1:] == [b"2\r\ncd\r\n", b"0\r\n\r\n"]


def test_a_disconnected_client_gets_nothing_written():
    c, transport = cycle()
    c.disconnected = True
    asyncio.run(respond(c, b"{}"))
    assert transport.calls == []


def test_a_real_server_answers_pipelined_requests_each_whole(tmp_path):
    image = (REPO_ROOT / "tests" / "data" / "mnist" / "0000.png").read_bytes()
    service = ServiceProcess(REPO_ROOT / "models", log=tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", service.port), timeout=10) as s:
            s.sendall(b"HEAD /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n"
                      b"POST /models/mnist/predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
                      + f"Content-Length: {len(image)}\r\n\r\n".encode() + image
                      + b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    finally:
        service.stop()
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        is_head_request = not answers  # the first answer is the HEAD request's: no body follows its head
        body, data = (b"", rest) if is_head_request else (rest[:length], rest[length:])
        answers.append((head.split(b"\r\n")[0], body))
    assert [status for status, _ in answers] == [b"HTTP/1.1 405 Method Not Allowed", b"HTTP/1.1 200 OK",
                                                 b"HTTP/1.1 200 OK"]
    assert b'"class_id":7' in answers[1][1] and answers[2][1] == b'{"live":true}'
