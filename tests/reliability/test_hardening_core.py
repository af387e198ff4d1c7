"""Hardening of the service core (issue 21, items 4 and 9), on real server processes: a version cannot be torn
down under a request admitted to it, and model names and versions are matched in full (no trailing newline)."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import socket

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.waiting import wait_for

TOKEN = "core-hardening-token"
HEADER_LENGTH = "Inference-Header-Content-Length"


def bearer() -> dict[str, str]:
    return {"authorization": f"Bearer {TOKEN}"}


# --- 9. Names and versions match in full -------------------------------------------------------------

# Each is some version or name followed or preceded by something a `$`-anchored `match` lets through, or that
# only looks like a digit.
BAD_VERSIONS = ["1%0A", "1%0A%0A", "%0A1", "1%0D%0A", "1%20", "%201", "+1", "%EF%BC%91", "%D9%A1", "1.", "1_"]
BAD_NAMES = ["mnist%0A", "mnist%0A%0A", "%0Amnist", "mnist%20", "mnist%0D%0A"]


class TestVersionsMatchInFull:
    """A version is ASCII digits and nothing else: ``1\\n`` is no version 1, on every route that takes one."""

    @pytest.mark.parametrize("version", BAD_VERSIONS)
    @pytest.mark.parametrize("route", ["image predict", "v2 infer", "tf predict"])
    def test_inference_on_a_near_miss_version_is_404(self, version, route, http, server, digits, assert_error,
                                                      assert_still_serving):
        png = digits[0][0]
        if route == "image predict":
            response = http.post(f"/models/mnist/versions/{version}/predict", content=png,
                                 headers={"content-type": "image/png"})
        elif route == "v2 infer":
            row = np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.float32)[None, ..., None]
            response = http.post(f"/v2/models/mnist/versions/{version}/infer", json={"inputs": [
                {"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": row.ravel().tolist()}]})
        else:
            response = http.post(f"/v1/models/mnist/versions/{version}:predict",
                                 json={"instances": [{"b64": base64.b64encode(png).decode()}]})
        assert_error(response, 404, "model 'mnist' has no version")
        assert_still_serving(server)

    @pytest.mark.parametrize("version", BAD_VERSIONS)
    @pytest.mark.parametrize("path", ["/v1/models/mnist/versions/{v}", "/v1/models/mnist/versions/{v}/metadata",
                                      "/v2/models/mnist/versions/{v}", "/v2/models/mnist/versions/{v}/ready"])
    def test_status_and_metadata_of_a_near_miss_version_are_404(self, version, path, http, server, assert_error,
                                                                 assert_still_serving):
        response = http.get(path.format(v=version))
        assert_error(response, 404, "model 'mnist' has no version")
        assert_still_serving(server)


class TestNamesMatchInFull:
    """A model name with a trailing newline or space is another, unknown name on every route."""

    @pytest.mark.parametrize("name", BAD_NAMES)
    @pytest.mark.parametrize("method,path", [
        ("POST", "/models/{n}/predict"), ("POST", "/models/{n}/versions/1/predict"), ("POST", "/v2/models/{n}/infer"),
        ("GET", "/v2/models/{n}"), ("GET", "/v2/models/{n}/ready"), ("GET", "/v1/models/{n}"),
        ("GET", "/v1/models/{n}/metadata"), ("POST", "/v1/models/{n}:predict")])
    def test_a_near_miss_name_is_404(self, name, method, path, http, server, digits, assert_error,
                                     assert_still_serving):
        response = http.request(method, path.format(n=name), content=digits[0][0],
                                headers={"content-type": "image/png"})
        assert_error(response, 404, "not found")
        assert_still_serving(server)

    @pytest.mark.parametrize("name", BAD_NAMES)
    @pytest.mark.parametrize("action", ["load", "unload"])
    def test_the_repository_api_refuses_a_near_miss_name(self, name, action, admin, assert_error,
                                                         assert_still_serving):
        response = httpx.post(f"{admin.url}/v2/repository/models/{name}/{action}", headers=bearer(), timeout=30)
        assert response.status_code in (400, 404), response.text
        assert_error(response, response.status_code, "mnist")
        ready = httpx.get(f"{admin.url}/v2/models/mnist/ready", timeout=10)
        assert ready.status_code == 200  # the real mnist was neither unloaded nor reloaded under another name
        assert_still_serving(admin)


@pytest.fixture()
def admin(request, start_server, mnist_repo):
    return start_server(mnist_repo, stop_with=request, CONVSERVE_ADMIN_TOKEN=TOKEN)


# --- 4. A version is not torn down under an admitted request --------------------------------------------------

def request_bytes(protocol: str, png: bytes, port: int) -> bytes:
    """A complete HTTP/1.1 request for one digit, unversioned (it is admitted to the newest version)."""
    row = np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.float32)[None, ..., None]
    headers = {"Host": f"127.0.0.1:{port}", "Connection": "close"}
    if protocol == "image":
        path, body = "/models/mnist/predict", png
        headers["Content-Type"] = "image/png"
    elif protocol == "v2":
        raw = row.astype("<f4").tobytes()
        head = json.dumps({"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(raw)}}]}).encode()
        path, body = "/v2/models/mnist/infer", head + raw
        headers.update({"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))})
    else:
        path, body = "/v1/models/mnist:predict", json.dumps({"instances": row.tolist()}).encode()
        headers["Content-Type"] = "application/json"
    headers["Content-Length"] = str(len(body))
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + body


def tcp_queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """The send and receive queues (bytes) of this machine's TCP socket from ``local_port`` to ``remote_port``,
    from /proc/net/tcp: unacknowledged bytes sent, and bytes received that its process has not read."""
    wanted = (f"{local_port:04X}", f"{remote_port:04X}")
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if (fields[1].rsplit(":", 1)[1], fields[2].rsplit(":", 1)[1]) == wanted:
                    tx, rx = fields[4].split(":")
                    return int(tx, 16), int(rx, 16)
    return None


def server_has_read(sock: socket.socket, server_port: int) -> bool:
    """Every byte sent on ``sock`` has reached the server's end of the connection and the server has read it."""
    client_port = sock.getsockname()[1]
    return tcp_queues(client_port, server_port) == (0, 0) and tcp_queues(server_port, client_port) == (0, 0)


def read_all(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def predicted_class(protocol: str, body: bytes) -> tuple[int, str | None]:
    """The class a response names, and the version it says answered (v2 only)."""
    answer = json.loads(body)
    if protocol == "image":
        return answer["predictions"][0]["class_id"], None
    if protocol == "v2":
        return int(np.argmax(answer["outputs"][0]["data"])), answer["model_version"]
    return int(np.argmax(answer["predictions"][0])), None


class TestNoTeardownUnderAdmittedRequests:
    """A request admitted to a version while its body is still arriving is answered by that version (200), even
    when the version is unloaded through the repository API, or replaced by a newer version on disk, before
    the body is complete (was: 500 with an AssertionError on v2 and TF Serving, 503 on the image route).

    One worker, so that the half-sent requests and the repository call meet the same process. A request is
    admitted as soon as its headers are read (before its body), and the in-flight gauge counts it only once its
    body is in: the tests wait until the server has read every byte sent (the kernel's queues of the connection,
    both ends empty), which on the worker's one event loop puts the request's admission before any later call."""

    WAITED = 0.3
    """How long the repository call must still be waiting once version 1 is no longer ready: without the wait
    for admitted requests, tearing the version down takes a few milliseconds."""

    @pytest.fixture()
    def running(self, request, start_server, mnist_repo):
        return start_server(mnist_repo, stop_with=request, CONVSERVE_ADMIN_TOKEN=TOKEN, CONVSERVE_WORKERS="1")

    def half_sent(self, running, protocol: str, png: bytes) -> tuple[socket.socket, bytes]:
        """Headers and half the body sent and read by the server (the request is admitted to the newest
        version); returns the socket and the rest of the body."""
        request = request_bytes(protocol, png, running.port)
        split = request.index(b"\r\n\r\n") + 4 + (len(request) - request.index(b"\r\n\r\n") - 4) // 2
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=60)
        sock.sendall(request[:split])
        assert wait_for(lambda: server_has_read(sock, running.port), timeout=10), "the server never read the headers"
        return sock, request[split:]

    def still_waiting(self, running, admin: concurrent.futures.Future) -> None:
        """The repository call has begun taking version 1 down (it is no longer ready) and is still waiting."""
        assert wait_for(lambda: admin.done() or httpx.get(f"{running.url}/v2/models/mnist/versions/1/ready",
                                                          timeout=10).status_code != 200, timeout=30)
        with pytest.raises(TimeoutError):
            admin.result(timeout=self.WAITED)  # it waits for the admitted request, whose body is not all in

    def finish(self, sock: socket.socket, rest: bytes) -> tuple[int, bytes]:
        sock.sendall(rest)
        with sock:
            return read_all(sock)

    def answered_across(self, running, protocol: str, digit: tuple[bytes, int], action: str) -> None:
        """Half-send a request for ``digit``, call the repository API's ``action`` on mnist meanwhile, finish the
        body once the call is seen waiting: the request is answered with the digit's label (by version 1), and
        the action succeeds."""
        png, label = digit
        sock, rest = self.half_sent(running, protocol, png)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            admin = pool.submit(httpx.post, f"{running.url}/v2/repository/models/mnist/{action}", headers=bearer(),
                                timeout=60)
            self.still_waiting(running, admin)
            status, body = self.finish(sock, rest)
            assert status == 200, body
            assert predicted_class(protocol, body) in ((label, None), (label, "1"))
            assert admin.result().status_code == 200, admin.result().text

    @pytest.mark.parametrize("protocol", ["image", "v2", "tf"])
    def test_unloading_the_model_waits_for_the_admitted_request(self, protocol, running, digits,
                                                                 assert_still_serving):
        self.answered_across(running, protocol, digits[5], "unload")
        assert httpx.get(f"{running.url}/v2/models/mnist/ready", timeout=10).status_code in (404, 503)
        assert httpx.post(f"{running.url}/v2/repository/models/mnist/load", headers=bearer(),
                          timeout=60).status_code == 200
        assert_still_serving(running)

    @pytest.mark.parametrize("protocol", ["image", "v2", "tf"])
    def test_a_newer_version_replacing_it_waits_for_the_admitted_request(self, protocol, running, mnist_repo,
                                                                          mnist_version_files, digits,
                                                                          assert_still_serving):
        newer = mnist_repo / "mnist" / "2"  # on disk, but only the load below (no poller) picks it up
        newer.mkdir()
        for name, data in mnist_version_files.items():
            (newer / name).write_bytes(data)
        # the config's policy is latest:1, so loading version 2 unloads version 1
        self.answered_across(running, protocol, digits[7], "load")
        assert httpx.get(f"{running.url}/v2/models/mnist/versions/1/ready", timeout=10).status_code in (404, 503)
        assert httpx.get(f"{running.url}/v2/models/mnist/versions/2/ready", timeout=10).status_code == 200
        assert_still_serving(running)

    @pytest.mark.parametrize("protocol", ["image", "v2", "tf"])
    def test_many_admitted_requests_all_complete_across_an_unload(self, protocol, running, digits,
                                                                  assert_still_serving):
        started = [self.half_sent(running, protocol, digits[i][0]) for i in range(6)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            unload = pool.submit(httpx.post, f"{running.url}/v2/repository/models/mnist/unload", headers=bearer(),
                                 timeout=60)
            self.still_waiting(running, unload)
            results = [self.finish(sock, rest) for sock, rest in started]
            assert [status for status, _ in results] == [200] * 6, [body[:200] for _, body in results]
            assert unload.result().status_code == 200
        assert httpx.post(f"{running.url}/v2/repository/models/mnist/load", headers=bearer(),
                          timeout=60).status_code == 200
        assert_still_serving(running)
