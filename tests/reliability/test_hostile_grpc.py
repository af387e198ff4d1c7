"""Hostile gRPC inference requests: each is answered with Triton's status code and a message naming the problem
(nothing internal), and the server keeps serving, over gRPC and HTTP."""

from __future__ import annotations

import struct
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.support.server import free_port

MAX_BODY_BYTES = 2 * 1024 * 1024  # as the suite's main server
ROW = 28 * 28 * 4  # bytes of one FP32 mnist row
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def grpc_server(request, start_server, models_root):
    port = free_port()
    running = start_server(models_root, stop_with=request, CONVSERVE_GRPC_PORT=str(port),
                           CONVSERVE_MAX_BODY_BYTES=str(MAX_BODY_BYTES), CONVSERVE_MAX_REQUEST_ROWS="64")
    running.grpc_url = f"127.0.0.1:{port}"
    return running


@pytest.fixture(scope="module")
def stub(grpc_server):
    with grpc.insecure_channel(grpc_server.grpc_url, options=[("grpc.max_send_message_length", -1)]) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def request(shape=(1, 28, 28, 1), datatype="FP32", raw: bytes | list[bytes] | None = None, name="image",
            model="mnist", **contents) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model)
    tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    if raw is None and not contents:
        raw = np.zeros(shape, np.float32).tobytes()
    if raw is not None:
        message.raw_input_contents.extend(raw if isinstance(raw, list) else [raw])
    return message


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@pytest.fixture()
def refusal_check(no_internals, assert_still_serving, digits):
    """``refusal_check(stub, server)``: the :func:`assert_refused` check against that stub and server."""

    def bind(stub, running) -> Callable[..., None]:
        def check(message: pb.ModelInferRequest, code: grpc.StatusCode, *fragments: str) -> None:
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(message, timeout=60)
            assert info.value.code() == code, (info.value.code(), info.value.details())
            for fragment in fragments:
                assert fragment in info.value.details(), info.value.details()
            no_internals(info.value.details())
            png, label = digits[0]
            good = pb.ModelInferRequest(model_name="mnist")
            good.inputs.add(name="image", datatype="BYTES", shape=[1])
            good.raw_input_contents.append(bytes_tensor(png))
            scores = np.frombuffer(stub.ModelInfer(good, timeout=60).raw_output_contents[0], np.float32)
            assert scores.argmax() == label
            assert_still_serving(running)

        return check

    return bind


@pytest.fixture()
def assert_refused(refusal_check, stub, grpc_server):
    """``assert_refused(message, code, *fragments)``: ModelInfer answers that code with a message holding every
    fragment and nothing internal; then the server still classifies a real digit, over gRPC and HTTP."""
    return refusal_check(stub, grpc_server)


@pytest.mark.parametrize("size", [0, ROW - 4, ROW + 4, 3 * ROW])
def test_raw_contents_of_the_wrong_size(assert_refused, size):
    assert_refused(request(raw=b"\0" * size), INVALID, f"{size} bytes of raw_input_contents", "expected 3136")


def test_raw_contents_of_the_wrong_size_in_each_batching_mode(refusal_check, server_in_each_mode):
    with grpc.insecure_channel(server_in_each_mode.grpc_url) as channel:
        assert_refused = refusal_check(service_pb2_grpc.GRPCInferenceServiceStub(channel), server_in_each_mode)
        assert_refused(request(raw=b"\0" * (ROW + 4)), INVALID, f"{ROW + 4} bytes of raw_input_contents",
                       "expected 3136")


@pytest.mark.parametrize("shape", [(-1, 28, 28, 1), (1, -28, 28, 1), (-(2**63), 1)])
def test_negative_shapes(assert_refused, shape):
    assert_refused(request(shape=shape, raw=b"\0" * ROW), INVALID, "non-negative")


@pytest.mark.parametrize("shape", [(2**62, 2**62, 28, 1), (2**63 - 1, 28, 28, 1), (0, 2**62, 2**62, 2**62)])
def test_huge_shapes(assert_refused, shape):
    assert_refused(request(shape=shape, raw=b"\0" * ROW), INVALID, "raw_input_contents")


def test_huge_shape_of_typed_contents(assert_refused):
    assert_refused(request(shape=(2**40, 28, 28, 1), fp32_contents=[0.0] * 784), INVALID, "784 values")


def test_a_message_over_the_size_limit_is_resource_exhausted(stub, grpc_server, assert_still_serving):
    rows = MAX_BODY_BYTES // ROW + 1
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request(shape=(rows, 28, 28, 1)), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
    assert_still_serving(grpc_server)


@pytest.mark.parametrize("datatype", ["FP8", "", "BF16", "fp32", "STRING", "FP32\0"])
def test_unknown_datatypes(assert_refused, datatype):
    assert_refused(request(datatype=datatype, raw=b"\0" * ROW), INVALID, "datatype")


def test_fp16_as_typed_contents_names_the_raw_alternative(assert_refused):
    assert_refused(request(datatype="FP16", fp32_contents=[0.0] * 784), INVALID, "raw_input_contents")


def test_both_raw_and_typed_contents(assert_refused):
    assert_refused(request(raw=b"\0" * ROW, fp32_contents=[0.0] * 784), INVALID, "not both")


def test_more_raw_contents_than_inputs(assert_refused):
    assert_refused(request(raw=[b"\0" * ROW, b"\0" * ROW]), INVALID, "raw_input_contents for one input")


def test_typed_contents_of_the_wrong_count(assert_refused):
    assert_refused(request(fp32_contents=[0.0] * 783), INVALID, "783 values")


def test_typed_values_that_do_not_fit_their_datatype(assert_refused):
    assert_refused(request(datatype="INT8", int_contents=[1000] * 784), INVALID, "does not fit INT8")


def test_nan_in_a_raw_tensor(assert_refused):
    x = np.zeros((1, 28, 28, 1), np.float32)
    x[0, 3, 3, 0] = np.nan
    assert_refused(request(raw=x.tobytes()), INVALID, "NaN")


def test_more_rows_than_allowed_and_no_rows(assert_refused):
    assert_refused(request(shape=(65, 28, 28, 1)), INVALID, "65 rows exceed the limit of 64")
    assert_refused(request(shape=(0, 28, 28, 1), raw=b""), INVALID, "no rows")


@pytest.mark.parametrize("raw", [b"\x05\0\0", struct.pack("<I", 2**32 - 1) + b"abc", bytes_tensor(b"x") + b"\x01"])
def test_bytes_tensors_whose_lengths_do_not_add_up(assert_refused, raw):
    assert_refused(request(datatype="BYTES", shape=(1,), raw=raw), INVALID, "BYTES")


def test_bytes_elements_that_are_not_images(assert_refused):
    assert_refused(request(datatype="BYTES", shape=(2,), raw=bytes_tensor(b"GIF89a", b"\0" * 100)), INVALID)


def test_more_bytes_elements_than_the_shape(assert_refused):
    elements = [b"x"] * 10_000
    assert_refused(request(datatype="BYTES", shape=(1,), raw=bytes_tensor(*elements)), INVALID, "BYTES elements")


def test_unknown_model_input_and_output(assert_refused):
    assert_refused(request(model="../mnist"), NOT_FOUND)
    assert_refused(request(model="nope"), NOT_FOUND, "nope")
    assert_refused(request(name="x" * 10_000), INVALID, "unknown input")
    message = request()
    message.outputs.add(name="probabilities").parameters["classification"].int64_param = -3
    assert_refused(message, INVALID, "classification")


def test_a_message_that_is_not_protobuf_leaves_the_server_serving(grpc_server, assert_still_serving):
    with grpc.insecure_channel(grpc_server.grpc_url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff\xff garbage", timeout=60)
    assert info.value.code() != grpc.StatusCode.OK  # grpcio itself refuses what it cannot parse
    assert_still_serving(grpc_server)


class TestBytesCountedBeforeSplit:
    """Issue 33, class 2: a BYTES tensor's element count is checked against the image limit before its length
    prefixes are split (or its ``bytes_contents`` copied). 4.9 M empty elements in one 19.6 MB message used to
    stall the worker 2.6 s before INVALID_ARGUMENT. The bound is relative: the refusal takes about as long as
    refusing a message of the same size at its first check (an unknown input name), the same server and run."""

    ELEMENTS = 4_900_000

    @pytest.fixture(scope="class")
    def big_stub(self, request, start_server, models_root):
        port = free_port()
        start_server(models_root, stop_with=request, CONVSERVE_GRPC_PORT=str(port),
                     CONVSERVE_MAX_BODY_BYTES=str(24 * 1024 * 1024))
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]) as channel:
            yield service_pb2_grpc.GRPCInferenceServiceStub(channel)

    @staticmethod
    def refusal_seconds(stub, message: pb.ModelInferRequest) -> tuple[grpc.RpcError, float]:
        """The refusal and the quicker of two sends (a pause of either process, a collection or the scheduler on a
        shared machine, once cost a single send a second)."""
        import time

        times = []
        for _ in range(2):
            started = time.perf_counter()
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(message, timeout=60)
            times.append(time.perf_counter() - started)
        return info.value, min(times)

    @pytest.mark.parametrize("form", ["raw_input_contents", "bytes_contents"])
    def test_millions_of_empty_elements_are_refused_at_once(self, form, big_stub, no_internals, digits):
        n = self.ELEMENTS
        if form == "raw_input_contents":
            def make(name: str) -> pb.ModelInferRequest:
                return request(shape=[n], datatype="BYTES", raw=b"\0\0\0\0" * n, name=name)
        else:
            def make(name: str) -> pb.ModelInferRequest:
                return request(shape=[n], datatype="BYTES", name=name, bytes_contents=[b""] * n)
        baseline, baseline_s = self.refusal_seconds(big_stub, make("nope"))
        assert baseline.code() == INVALID and "unknown input" in baseline.details()
        refused, seconds = self.refusal_seconds(big_stub, make("image"))
        assert refused.code() == INVALID, refused.details()
        assert f"{n} images exceed the limit of 64 per request" in refused.details()
        no_internals(refused.details())
        assert seconds < 3 * baseline_s + 0.25, (seconds, baseline_s)
        answer = big_stub.ModelInfer(request(shape=[1], datatype="BYTES", bytes_contents=[digits[0][0]]), timeout=60)
        assert int(np.frombuffer(answer.raw_output_contents[0], np.float32).argmax()) == digits[0][1]
