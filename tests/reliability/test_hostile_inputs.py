"""Hostile request bodies and names on a real server: every one is refused fast with the status and JSON
error that name the problem, nothing outside the models directory is ever reached, and the server keeps
classifying real digits correctly afterwards."""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import numpy as np
import pytest

LIMIT = 2 * 1024 * 1024  # the main server's CONVSERVE_MAX_BODY_BYTES (conftest)
ROW = 28 * 28
BOUNDARY = "reliability-boundary"
ROUTES = {
    "image upload": ("/models/mnist/predict", "image/png"),
    "v2 infer": ("/v2/models/mnist/infer", "application/json"),
    "tf serving predict": ("/v1/models/mnist:predict", "application/json"),
}


# --- Raw HTTP, for what httpx will not send -----------------------------------------------------

def read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def stream_chunked(port: int, path: str, content_type: str, total: int) -> tuple[int, bytes, int]:
    """POST a chunked body of ``total`` bytes (no Content-Length), stopping as soon as the server answers.
    Returns the status, the body and how many body bytes had been sent by then."""
    piece = b"x" * 65536
    frame = b"%x\r\n" % len(piece) + piece + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        sock.setblocking(False)
        sent, pending = 0, b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if sent < total else [], [], 1)
            if readable:
                status, _, body = read_response(sock)
                return status, body, sent
            if writable:
                if not pending:
                    pending = frame
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    status, _, body = read_response(sock)
                    return status, body, sent
                pending = pending[n:]
                if not pending:
                    sent += len(piece)
        raise AssertionError(f"no answer after {sent} bytes")


def multipart(*parts: tuple[str, bytes], boundary: str = BOUNDARY) -> bytes:
    """A multipart/form-data body from (part headers, data) pairs."""
    body = b"".join(f"--{boundary}\r\n{headers}\r\n\r\n".encode() + data + b"\r\n" for headers, data in parts)
    return body + f"--{boundary}--\r\n".encode()


def file_part(png: bytes, name: str = "file") -> tuple[str, bytes]:
    return f'content-disposition: form-data; name="{name}"; filename="digit.png"\r\ncontent-type: image/png', png


def text_part(name: str, value: bytes) -> tuple[str, bytes]:
    return f'content-disposition: form-data; name="{name}"', value


def v2_body(shape: list[int], data: list | None = None, datatype: str = "FP32", **extra) -> dict:
    count = int(np.prod(shape)) if shape else 1
    return {"inputs": [{"name": "image", "shape": shape, "datatype": datatype,
                        "data": [0.0] * count if data is None else data}], **extra}


def v2_binary(rows: np.ndarray, datatype: str = "FP32") -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "image", "shape": list(rows.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": rows.nbytes}}]}).encode()
    return header + rows.tobytes(), {"inference-header-content-length": str(len(header)),
                                     "content-type": "application/octet-stream"}


# --- Body size ---------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
def test_body_over_the_limit_with_content_length_is_413_before_any_body_byte_is_sent(
        route, server, assert_error, assert_still_serving):
    path, content_type = ROUTES[route]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {64 * 1024 * 1024}\r\n\r\n".encode())
        status, headers, body = read_response(sock)
    response = httpx.Response(status, headers=headers, content=body)
    assert_error(response, 413, f"request body of {64 * 1024 * 1024} bytes exceeds the limit of {LIMIT} bytes")
    assert_still_serving(server)


@pytest.mark.parametrize("route", ["image upload", "v2 infer"])
def test_upload_over_the_body_limit_without_content_length_is_413_before_it_is_all_sent(
        route, server, assert_error, assert_still_serving):
    path, content_type = ROUTES[route]
    total = 64 * 1024 * 1024
    status, body, sent = stream_chunked(server.port, path, content_type, total)
    response = httpx.Response(status, headers={"content-type": "application/json"}, content=body)
    assert_error(response, 413, f"request body exceeds the limit of {LIMIT} bytes")
    # Refused while most of the body was still to come: it was never buffered whole (socket buffers on
    # loopback hold a few MB beyond the limit).
    assert sent < total // 4, f"{sent} of {total} bytes were sent before the 413"
    assert_still_serving(server)


# --- Multipart ---------------------------------------------------------------------------------

def post_multipart(http: httpx.Client, body: bytes, boundary: str = BOUNDARY) -> httpx.Response:
    return http.post("/models/mnist/predict", content=body,
                     headers={"content-type": f"multipart/form-data; boundary={boundary}"})


def test_multipart_with_a_text_part_over_the_body_limit_is_413(http, server, digits, assert_error,
                                                                assert_still_serving):
    body = multipart(text_part("note", b"x" * (LIMIT + 1)), file_part(digits[0][0]))
    assert_error(post_multipart(http, body), 413, "exceeds the limit of 2097152 bytes")
    assert_still_serving(server)


def test_multipart_with_a_huge_top_k_field_is_400(http, server, digits, assert_error, assert_still_serving):
    body = multipart(text_part("top_k", b"9" * 1_000_000), file_part(digits[0][0]))
    response = post_multipart(http, body)
    assert_error(response, 400, "top_k must be a positive integer")
    assert_still_serving(server)


def test_multipart_with_more_parts_than_allowed_is_400(http, server, digits, assert_error, assert_still_serving):
    body = multipart(*[text_part(f"field{i}", b"1") for i in range(100)], file_part(digits[0][0]))
    assert_error(post_multipart(http, body), 400, "too many parts in the multipart body (at most 80)")
    assert_still_serving(server)


def test_multipart_with_ten_thousand_empty_parts_is_400(http, server, assert_error, assert_still_serving):
    body = f"--{BOUNDARY}\r\n\r\n\r\n".encode() * 10_000 + f"--{BOUNDARY}--\r\n".encode()
    response = post_multipart(http, body)
    assert_error(response, 400, "too many parts in the multipart body")
    assert_still_serving(server)


def test_multipart_with_more_files_than_allowed_is_400(http, server, digits, assert_error, assert_still_serving):
    body = multipart(*[file_part(digits[i % 40][0], "files") for i in range(70)])
    assert_error(post_multipart(http, body), 400, "70 images exceed the limit of 64 per request")
    assert_still_serving(server)


@pytest.mark.parametrize("content_type", [
    "multipart/form-data",
    "multipart/form-data; boundary=",
    "multipart/form-data; boundary=" + "b" * 201,
    "multipart/form-data; boundary=\u00e9t\u00e9",
], ids=["missing", "empty", "longer than 200", "not ascii"])
def test_multipart_with_a_bad_boundary_parameter_is_400(content_type, http, server, digits, assert_error,
                                                        assert_still_serving):
    response = http.post("/models/mnist/predict", content=multipart(file_part(digits[0][0])),
                         headers={"content-type": content_type.encode()})
    assert_error(response, 400, "multipart body without a valid boundary parameter in its Content-Type")
    assert_still_serving(server)


def test_multipart_body_of_boundary_near_misses_is_400(http, server, assert_error, assert_still_serving):
    boundary = "a" * 200  # the longest accepted, and the body is nothing but almost-delimiters
    body = (f"--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\n".encode()
            + (b"\r\n--" + boundary[:-1].encode()) * 9_000)
    response = post_multipart(http, body, boundary)
    assert_error(response, 400, "malformed multipart body: missing closing boundary")
    assert_still_serving(server)


def test_multipart_part_headers_without_an_end_are_400(http, server, assert_error, assert_still_serving):
    body = f"--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"file\"\r\n".encode() + b"h" * 1_500_000
    assert_error(post_multipart(http, body), 400, "malformed multipart body: part headers missing or too long")
    assert_still_serving(server)


# --- Media types -------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/x-www-form-urlencoded",
                                          "video/mp4", ""])
def test_image_endpoint_refuses_unsupported_media_types_with_415(content_type, http, server, digits, assert_error,
                                                                 assert_still_serving):
    response = http.post("/models/mnist/predict", content=digits[0][0], headers={"content-type": content_type})
    assert_error(response, 415, "unsupported content type", "send multipart/form-data, image/*, or application/json")
    assert_still_serving(server)


# --- JSON --------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
def test_malformed_json_is_400(route, http, server, assert_error, assert_still_serving):
    path, _ = ROUTES[route]
    response = http.post(path, content=b'{"inputs": [', headers={"content-type": "application/json"})
    assert_error(response, 400, "request body is not valid JSON")
    assert_still_serving(server)


@pytest.mark.parametrize("route", ROUTES)
def test_json_nested_a_hundred_thousand_levels_deep_is_400(route, http, server, assert_error,
                                                           assert_still_serving):
    """Refused from a count of its brackets before any parse: more lists than a request to the model can hold."""
    path, _ = ROUTES[route]
    response = http.post(path, content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
    assert_error(response, 400, "the JSON body holds more lists and objects than a request to this model can")
    assert_still_serving(server)


@pytest.mark.parametrize("route", ["v2 infer", "tf serving predict"])
def test_json_nested_past_the_parsers_depth_limit_is_400(route, http, server, assert_error, assert_still_serving):
    """Few enough lists for a tensor request (a thousand), nested deeper than the parser goes (1024 levels)."""
    path, _ = ROUTES[route]
    response = http.post(path, content=b"[" * 1100 + b"]" * 1100, headers={"content-type": "application/json"})
    assert_error(response, 400, "request body is not valid JSON", "depth limit exceeded")
    assert_still_serving(server)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_literals_in_a_v2_json_tensor_are_400(literal, http, server, assert_error,
                                                               assert_still_serving):
    data = b"[" + literal + b",0" * (ROW - 1) + b"]"
    body = b'{"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": ' + data + b"}]}"
    assert_error(http.post("/v2/models/mnist/infer", content=body), 400, "request body is not valid JSON")
    assert_still_serving(server)


def test_nan_literal_in_tf_serving_instances_is_400(http, server, assert_error, assert_still_serving):
    body = b'{"instances": [[NaN' + b",0" * (ROW - 1) + b"]]}"
    assert_error(http.post("/v1/models/mnist:predict", content=body), 400, "request body is not valid JSON")
    assert_still_serving(server)


def test_a_number_that_overflows_a_double_is_400(http, server, assert_error, assert_still_serving):
    body = b'{"instances": [[1e999' + b",0" * (ROW - 1) + b"]]}"
    assert_error(http.post("/v1/models/mnist:predict", content=body), 400, "number is infinity")
    assert_still_serving(server)


def test_values_that_overflow_float32_are_400(http, server, assert_error, assert_still_serving):
    response = http.post("/v2/models/mnist/infer", json=v2_body([1, 28, 28, 1], [1e39] * ROW))
    assert_error(response, 400, "input contains NaN or Inf values")
    assert_still_serving(server)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nan_or_infinity_in_a_binary_tensor_is_400(bad, http, server, assert_error, assert_still_serving):
    rows = np.zeros((2, 28, 28, 1), np.float32)
    rows[1, 14, 14, 0] = bad
    content, headers = v2_binary(rows)
    assert_error(http.post("/v2/models/mnist/infer", content=content, headers=headers), 400,
                 "input contains NaN or Inf values")
    assert_still_serving(server)


def test_fp16_values_that_overflow_are_400(http, server, assert_error, assert_still_serving):
    content, headers = v2_binary(np.full((1, 28, 28, 1), np.inf, np.float16), "FP16")
    assert_error(http.post("/v2/models/mnist/infer", content=content, headers=headers), 400,
                 "input contains NaN or Inf values")
    assert_still_serving(server)


# --- Tensors: rank, shape, dtype, rows ---------------------------------------------------------

@pytest.mark.parametrize("shape", [[28, 28], [1, 1, 28, 28, 1], [1, 32, 32, 1], [1, 28, 28, 3], [784]],
                         ids=["rank 2", "rank 5", "32x32", "3 channels", "flat"])
def test_v2_tensor_of_the_wrong_shape_is_400(shape, http, server, assert_error, assert_still_serving):
    response = http.post("/v2/models/mnist/infer", json=v2_body(shape))
    assert_error(response, 400, f"input image must have shape [N, 28, 28, 1], got {shape}")
    assert_still_serving(server)


def test_tf_serving_instances_of_the_wrong_rank_are_400(http, server, assert_error, assert_still_serving):
    response = http.post("/v1/models/mnist:predict", json={"instances": [[1.0, 2.0]]})
    assert_error(response, 400, "input image must have shape [N, 28, 28, 1], got [1, 2]")
    assert_still_serving(server)


def test_ragged_tf_serving_instances_are_400(http, server, assert_error, assert_still_serving):
    response = http.post("/v1/models/mnist:predict", json={"instances": [[1.0, 2.0], [1.0]]})
    assert_error(response, 400, "instances: not a regular numeric array")
    assert_still_serving(server)


@pytest.mark.parametrize("datatype", ["BYTES", "FP8", "float32", "", None])
def test_v2_tensor_with_an_unsupported_datatype_is_400(datatype, http, server, assert_error, assert_still_serving):
    response = http.post("/v2/models/mnist/infer", json=v2_body([1, 28, 28, 1], datatype=datatype))
    assert_error(response, 400, f"unsupported datatype {datatype!r}", "supported: BOOL, UINT8")
    assert_still_serving(server)


def test_v2_data_that_is_not_numbers_is_400(http, server, assert_error, assert_still_serving):
    response = http.post("/v2/models/mnist/infer", json=v2_body([1, 28, 28, 1], [{"x": 1}] * ROW))
    assert_error(response, 400, "input 'image': data is not a regular array of FP32 values")
    assert_still_serving(server)


def test_v2_shape_that_does_not_match_the_data_length_is_400(http, server, assert_error, assert_still_serving):
    response = http.post("/v2/models/mnist/infer", json=v2_body([1, 28, 28, 1], [0.0] * 700))
    assert_error(response, 400, "input 'image': 700 values for shape [1, 28, 28, 1] (expected 784)")
    assert_still_serving(server)


def test_v2_binary_size_that_does_not_match_the_shape_is_400(http, server, assert_error, assert_still_serving):
    content, headers = v2_binary(np.zeros((2, 28, 28, 1), np.float32))
    header = content[:int(headers["inference-header-content-length"])].replace(b'"shape": [2,', b'"shape": [3,')
    headers["inference-header-content-length"] = str(len(header))
    response = http.post("/v2/models/mnist/infer", content=header + content[len(header):], headers=headers)
    assert_error(response, 400, "6272 bytes of binary data for shape [3, 28, 28, 1] of FP32 (expected 9408)")
    assert_still_serving(server)


@pytest.mark.parametrize("shape", [[2 ** 62, 2 ** 62], [2 ** 63, 2], [0, 2 ** 62]],
                         ids=["product wraps int64 to 0", "product is 2^64", "empty but unrepresentable"])
def test_v2_shape_whose_size_overflows_is_400(shape, http, server, assert_error, assert_still_serving):
    response = http.post("/v2/models/mnist/infer", json=v2_body(shape, data=[]))
    assert_error(response, 400, "input 'image': ")
    assert_still_serving(server)


def test_v2_binary_shape_whose_size_overflows_is_400(http, server, assert_error, assert_still_serving):
    header = json.dumps({"inputs": [{"name": "image", "shape": [2 ** 62, 2 ** 62], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 0}}]}).encode()
    response = http.post("/v2/models/mnist/infer", content=header,
                         headers={"inference-header-content-length": str(len(header))})
    assert_error(response, 400, "0 bytes of binary data for shape")
    assert_still_serving(server)


def test_v2_inference_header_length_beyond_the_body_is_400(http, server, assert_error, assert_still_serving):
    response = http.post("/v2/models/mnist/infer", content=b"{}",
                         headers={"inference-header-content-length": "99999999999999999999"})
    assert_error(response, 400, "inference-header-content-length must be a byte count no larger than the body")
    assert_still_serving(server)


def test_v2_requested_output_that_is_not_a_name_is_400(http, server, assert_error, assert_still_serving):
    response = http.post("/v2/models/mnist/infer", json=v2_body([1, 28, 28, 1], outputs=[{"name": ["x"]}]))
    assert_error(response, 400, "unknown output ['x']; this model has ['probabilities']")
    assert_still_serving(server)


@pytest.mark.parametrize("route", ["v2 infer", "tf serving predict"])
def test_more_rows_than_allowed_are_400(route, http, server, assert_error, assert_still_serving):
    rows = 65  # CONVSERVE_MAX_REQUEST_ROWS is 64 on this server
    if route == "v2 infer":
        content, headers = v2_binary(np.zeros((rows, 28, 28, 1), np.float32))
        response = http.post("/v2/models/mnist/infer", content=content, headers=headers)
    else:
        response = http.post("/v1/models/mnist:predict", json={"instances": np.zeros((rows, 28, 28)).tolist()})
    assert_error(response, 400, "65 rows exceed the limit of 64 per request")
    assert_still_serving(server)


def test_v2_empty_batch_is_400(http, server, assert_error, assert_still_serving):
    response = http.post("/v2/models/mnist/infer", json=v2_body([0, 28, 28, 1]))
    assert_error(response, 400, "the request has no rows")
    assert_still_serving(server)


def test_tf_serving_empty_instances_are_400(http, server, assert_error, assert_still_serving):
    assert_error(http.post("/v1/models/mnist:predict", json={"instances": []}), 400,
                 "instances must be a non-empty list")
    assert_still_serving(server)


def test_image_upload_with_no_images_is_400(http, server, assert_error, assert_still_serving):
    assert_error(http.post("/models/mnist/predict", json={"images": []}), 400, "no images in the request")
    assert_still_serving(server)


# --- Model names and versions ------------------------------------------------------------------

def test_unknown_model_is_404(http, server, digits, assert_error, assert_still_serving):
    response = http.post("/models/nope/predict", content=digits[0][0], headers={"content-type": "image/png"})
    assert_error(response, 404, "model 'nope' not found")
    assert_still_serving(server)


@pytest.mark.parametrize("version", ["7", "0", "-1", "01", "1.0", "%2e%2e", "latest"])
def test_unknown_or_malformed_version_is_404(version, http, server, digits, assert_error, assert_still_serving):
    response = http.post(f"/models/mnist/versions/{version}/predict", content=digits[0][0],
                         headers={"content-type": "image/png"})
    assert_error(response, 404, "model 'mnist' has no version")
    assert_still_serving(server)


# Each request names, one way or another, the tiny model ``outside`` that sits beside the models directory
# (written by the fixture below); resolving any of them on the filesystem would serve it.
TRAVERSALS = [
    ("POST", "/models/..%2Foutside/predict"),
    ("POST", "/models/%2e%2e%2foutside/predict"),
    ("POST", "/models/..%5Coutside/predict"),
    ("POST", "/models/mnist/..%2F..%2Foutside/predict"),
    ("POST", "/models/%2Fetc%2Fpasswd/predict"),
    ("POST", "/v2/models/..%2Foutside/infer"),
    ("POST", "/v2/models/..%2Foutside/versions/1/infer"),
    ("GET", "/v2/models/..%2Foutside"),
    ("GET", "/v2/models/%2e%2e/ready"),
    ("GET", "/v1/models/..%2Foutside"),
    ("GET", "/v1/models/..%2Foutside/metadata"),
    ("POST", "/v1/models/..%2Foutside:predict"),
    ("GET", "/static/..%2F..%2Fpyproject.toml"),
    ("GET", "/static/%2e%2e%2f%2e%2e%2fapp.py"),
]


@pytest.fixture(scope="module")
def outside_model(models_root, write_tiny):
    """A servable model directly outside the models directory: what a traversal would reach."""
    if not (models_root.parent / "outside").exists():
        write_tiny(models_root.parent, "outside", 1)
    return models_root.parent / "outside"


def traversal(http, method: str, path: str, png: bytes, assert_error) -> None:
    """``method path`` is answered 404, with nothing of what it names on the filesystem."""
    kwargs = {"content": png, "headers": {"content-type": "image/png"}} if method == "POST" else {}
    response = http.request(method, path, **kwargs)
    message = assert_error(response, 404)
    assert message == "Not Found" or "not found" in message or "no static file" in message, message
    assert "root:" not in response.text and "[build-system]" not in response.text


@pytest.mark.parametrize(("method", "path"), TRAVERSALS, ids=[p for _, p in TRAVERSALS])
def test_names_that_are_paths_are_404_and_reach_nothing_outside_the_models_directory(
        method, path, outside_model, http, server, digits, assert_error, assert_still_serving):
    traversal(http, method, path, digits[0][0], assert_error)
    assert_still_serving(server)


def test_a_name_that_is_a_path_is_404_in_each_batching_mode(outside_model, http_in_each_mode, server_in_each_mode,
                                                            digits, assert_error, assert_still_serving):
    method, path = TRAVERSALS[0]
    traversal(http_in_each_mode, method, path, digits[0][0], assert_error)
    assert_still_serving(server_in_each_mode)


def test_the_model_beside_the_models_directory_is_never_listed(outside_model, http, server, assert_still_serving):
    assert [m["name"] for m in http.get("/models").json()["models"]] == ["mnist", "tiny"]
    assert_still_serving(server)
