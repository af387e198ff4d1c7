"""JSON request bodies (base64 image uploads, KServe v2 tensors, TF Serving rows) decoded into what a request
needs: its encoded images or its input array, and the few fields beside them.

orjson builds a Python object for every value and every list while it holds the interpreter's lock, so a worker
thread does not keep the event loop answering: a 1024-row TF Serving body (28x28x1 rows as nested lists, 6 MB)
parses in about 0.55 s, and for all that time every other client of the worker waits, health probes included.
Bodies from :data:`PROCESS_BYTES` on are therefore decoded in a process of the worker's own
(:class:`JsonDecoder`): started on the first such body, one per worker (so a worker decodes one large body at a
time), stopped after :data:`IDLE_SECONDS` unused. It sends back only what the request needs, an array or the
encoded images and a few small fields, never the parsed lists: nothing of the parse is rebuilt on the worker's
side. Smaller bodies are decoded where the request runs, since the hand-off would cost more than the work.

This module imports numpy, orjson and the service's light modules only: the decoding process loads it and
nothing else of the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import orjson

from service.errors import DecoderStopped, InvalidInput
from service.limits import check_declared_shape, check_images, check_json_items, check_rows, nested_budget
from service.parsing import ascii_count, json_count, positive_int, strict_array
from service.v2_tensors import element_count, from_buffer, shaped, tensor_dtype

if TYPE_CHECKING:
    from service.repository import ModelVersion

T = TypeVar("T")

PROCESS_BYTES = 256 * 1024
"""Bodies from this size on are decoded in the worker's JSON process. Below it a parse costs at most about 25 ms
of the event loop (nested one-value lists, the slowest JSON to build), and under 1 ms for base64 images or
flat lists."""
IDLE_SECONDS = 300.0
"""The JSON process stops after this long without a large body (it holds about 45 MB); the next one starts it
again, which costs that request about 0.3 s."""
V2_HEADER_LENGTH = "inference-header-content-length"
FP32 = np.dtype(np.float32)


STRUCTURE_SLACK = 64
"""JSON lists and objects a request may hold beside its tensor's or its images' own (shape, outputs, parameters)."""


def check_structure(body: bytes, containers: int, end: int | None = None) -> None:
    """Refuse a body with more JSON lists and objects than a request can hold, from a count of its brackets and
    braces before it is parsed (at memory speed: about 10 ms for 20 MB). A parse builds every one of them: 20 MB of
    ``[0],`` is 5 M lists, 2.5 s and 720 MB to parse, where a tensor of 1024 rows never needs a million."""
    if body.count(b"[", 0, end) + body.count(b"{", 0, end) > containers + STRUCTURE_SLACK:
        raise InvalidInput(f"the JSON body holds more lists and objects than a request to this model can (at most "
                           f"about {containers}: for a tensor, a list per row and per dimension of a row)")


def row_lists(row_shape: tuple[int, ...] | list[int]) -> int:
    """The lists of one row written as nested JSON lists: 1 + d1 + d1*d2 + ... (the innermost holds values)."""
    total, level = 0, 1
    for d in row_shape:
        total += level
        level *= max(int(d), 1)
    return total


def parse_json(data: bytes | memoryview) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON ({exc.msg} at position {exc.pos})") from None


# --- Image uploads -----------------------------------------------------------------------------

def decode_images(body: bytes, max_images: int) -> tuple[list[bytes], int | None]:
    """``{"images": ["<base64>", ...], "top_k": k}``: the encoded images and top_k."""
    check_structure(body, 2)
    payload = parse_json(body)
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise InvalidInput('JSON body must be {"images": ["<base64>", ...], "top_k": k}')
    check_images(len(payload["images"]), max_images)  # before millions of strings are decoded
    images = []
    for i, item in enumerate(payload["images"]):
        if not isinstance(item, str):
            raise InvalidInput(f"images[{i}] must be a base64 string")
        if item.startswith("data:") and "," in item:
            item = item.split(",", 1)[1]  # a data: URL from a browser
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"images[{i}] is not valid base64") from None
    top_k = payload.get("top_k")
    return images, None if top_k is None else positive_int(top_k, "top_k", text_allowed=False)


# --- Tensors -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """What decoding a tensor request needs of the model version (which does not cross to another process)."""

    input_name: str
    row_shape: tuple[int, ...]
    outputs: frozenset[str]
    max_rows: int

    @classmethod
    def of(cls, mv: ModelVersion, max_rows: int) -> TensorSpec:
        return cls(mv.input.name, tuple(mv.input.shape[1:]), frozenset(s.name for s in mv.runtime.outputs),
                   max_rows)


@dataclass(frozen=True)
class V2Request:
    tensor: np.ndarray
    outputs: list[tuple[str, bool, int]]
    """(name, binary, classification k) of each output to return."""
    id: str | None


def requested_outputs(payload: dict[str, Any], known: frozenset[str]) -> list[tuple[str, bool, int]]:
    """(name, binary, classification k) for each output a v2 request asks for (all of them by default)."""
    parameters = payload.get("parameters") or {}
    binary_default = bool(isinstance(parameters, dict) and parameters.get("binary_data_output", False))
    requested = payload.get("outputs")
    if not requested:
        return [(name, binary_default, 0) for name in sorted(known)]
    if not isinstance(requested, list):
        raise InvalidInput("outputs must be a list")
    result = []
    seen: set[str] = set()
    for out in requested:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str) or out["name"] not in known:
            raise InvalidInput(f"unknown output {out.get('name') if isinstance(out, dict) else out!r}; "
                               f"this model has {sorted(known)}")
        if out["name"] in seen:  # each copy would be answered in full: a cheap request for a huge response
            raise InvalidInput(f"output {out['name']!r} is requested more than once")
        seen.add(out["name"])
        params = out.get("parameters") or {}
        k = json_count(params.get("classification", 0) if isinstance(params, dict) else 0, "classification")
        binary = params.get("binary_data", binary_default) if isinstance(params, dict) else binary_default
        result.append((out["name"], bool(binary), k))
    return result


def v2_json_end(header: str | None, body: bytes) -> int:
    """Where a v2 body's JSON ends: at its end, or (binary tensor extension) after the ``header`` bytes that
    Inference-Header-Content-Length gives, before the raw tensor data."""
    if header is None:
        return len(body)
    n = ascii_count(header, V2_HEADER_LENGTH)
    if n > len(body):
        raise InvalidInput(f"{V2_HEADER_LENGTH} must be a byte count no larger than the body")
    return n


def decode_v2(json_end: int, body: bytes, spec: TensorSpec) -> V2Request:
    """A v2 inference request: its JSON (``body`` up to ``json_end``, :func:`v2_json_end`) and the raw tensor data
    after it, if any (binary tensor extension)."""
    check_structure(body, 1 + spec.max_rows * row_lists(spec.row_shape), json_end)  # the data, nested to its rows
    view = memoryview(body)
    payload, binary = parse_json(view[:json_end]), view[json_end:]
    if not isinstance(payload, dict):
        raise InvalidInput("inference request must be a JSON object")
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidInput(f"inference request needs exactly one input, {spec.input_name!r}")
    if inputs[0].get("name") != spec.input_name:
        raise InvalidInput(f"unknown input {inputs[0].get('name')!r}; this model takes {spec.input_name!r}")
    outputs = requested_outputs(payload, spec.outputs)  # bad output requests are refused before any conversion
    tensor = _v2_input(inputs[0], binary, spec.row_shape, spec.max_rows)
    request_id = payload.get("id")
    return V2Request(tensor, outputs, request_id if isinstance(request_id, str) else None)


def _v2_input(spec: dict[str, Any], binary: memoryview, row_shape: tuple[int, ...], max_rows: int) -> np.ndarray:
    """One v2 input as an ndarray. JSON data declared beyond ``max_rows`` rows of ``row_shape`` is refused before it
    is converted (binary data is sized exactly by its shape, at no cost)."""
    name = spec.get("name")
    datatype = spec.get("datatype")
    shape = spec.get("shape")
    count = element_count(name, shape)
    dtype = tensor_dtype(name, datatype)
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"input {name!r}: parameters must be an object")
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0 or size > len(binary):
            raise InvalidInput(f"input {name!r}: binary_data_size {size!r} does not fit the binary section")
        return from_buffer(name, datatype, shape, binary[:size])
    data = spec.get("data")
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: needs data (a list) or parameters.binary_data_size")
    check_declared_shape(shape, row_shape, max_rows, f"input {name!r}")  # before a huge list is converted
    check_json_items(data, nested_budget(count, len(shape)), f"input {name!r}")  # the data, not only the shape
    array = strict_array(data, dtype, f"input {name!r}", datatype)
    if array.size != count:
        raise InvalidInput(f"input {name!r}: {array.size} values for shape {shape} (expected {count})")
    return shaped(array, shape, name)


@dataclass(frozen=True)
class TFRequest:
    row_format: bool
    """``instances`` (rows), else ``inputs`` (columnar): the answer names its key after it."""
    images: list[bytes] | None
    """Encoded images (``{"b64": ...}`` values), else None and the rows are in ``tensor``."""
    tensor: np.ndarray | None


def decode_tf(body: bytes, spec: TensorSpec) -> TFRequest:
    """A TF Serving ``:predict`` body, in the row (``instances``) or the columnar (``inputs``) form."""
    check_structure(body, 1 + spec.max_rows * row_lists(spec.row_shape))  # rows of nested lists (or of objects)
    payload = parse_json(body)
    if not isinstance(payload, dict) or ("instances" in payload) == ("inputs" in payload):
        raise InvalidInput('request must be a JSON object with either "instances" or "inputs"')
    row_format = "instances" in payload
    values = payload["instances" if row_format else "inputs"]
    if row_format:
        if not isinstance(values, list) or not values:
            raise InvalidInput("instances must be a non-empty list")
        if all(isinstance(v, dict) and not _is_b64(v) for v in values):
            if any(set(v) != {spec.input_name} for v in values):
                raise InvalidInput(f"each instance must have exactly the input {spec.input_name!r}")
            values = [v[spec.input_name] for v in values]
    elif isinstance(values, dict) and not _is_b64(values):
        if set(values) != {spec.input_name}:
            raise InvalidInput(f"inputs must name exactly the input {spec.input_name!r}")
        values = values[spec.input_name]
    if isinstance(values, list) and values and all(_is_b64(v) for v in values):
        return TFRequest(row_format, [_b64(v, f"instance {i}") for i, v in enumerate(values)], None)
    if _is_b64(values):
        return TFRequest(row_format, [_b64(values, "inputs")], None)
    # Before converting a huge list: the rows, and what the lists hold (an instance is one row).
    row_shape = [max(int(d), 1) for d in spec.row_shape]
    row_values = math.prod(row_shape)
    if row_format:
        check_rows(len(values), spec.max_rows)
        for i, instance in enumerate(values):
            check_json_items(instance, nested_budget(row_values, len(row_shape)), f"instance {i}")
    else:
        check_json_items(values, nested_budget(spec.max_rows * row_values, len(row_shape) + 1), "inputs")
    where = "instances" if row_format else "inputs"
    try:
        tensor = strict_array(values, FP32, where, "FP32")  # numbers only: "1e3", booleans and nulls are refused
    except InvalidInput:
        raise InvalidInput(f"{where}: not a regular numeric array") from None
    return TFRequest(row_format, None, tensor)


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _b64(value: dict[str, Any], where: str) -> bytes:
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidInput(f"{where}: b64 is not valid base64") from None


# --- Where they are decoded ----------------------------------------------------------------------

class JsonDecoder:
    """Runs a decode function of this module on a body: here when the body is small, else in the worker's JSON
    process, which the event loop does not wait for."""

    def __init__(self, idle_seconds: float = IDLE_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self._executor: ProcessPoolExecutor | None = None
        self._busy = 0
        self._idle: asyncio.TimerHandle | None = None

    async def run(self, size: int, work: Callable[..., T], *args: Any) -> T:
        if size < PROCESS_BYTES:
            return work(*args)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        executor = self._executor or self._start()
        self._busy += 1
        try:
            try:
                future = executor.submit(work, *args)
            except BrokenProcessPool:  # it stopped while idle (killed by hand, or by the kernel): start another
                executor = self._start()
                future = executor.submit(work, *args)
            return await asyncio.wrap_future(future)
        except BrokenProcessPool:  # it stopped while it decoded this body
            if self._executor is executor:
                self._executor = None
            executor.shutdown(wait=False)
            raise DecoderStopped("the process decoding this request's JSON body stopped before it finished; "
                                 "try again") from None
        finally:
            self._busy -= 1
            if not self._busy and self._executor is not None:
                self._idle = asyncio.get_running_loop().call_later(self.idle_seconds, self.close)

    def _start(self) -> ProcessPoolExecutor:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        self._executor = ProcessPoolExecutor(1, multiprocessing.get_context("spawn"), initializer=_ignore_sigint)
        return self._executor

    def close(self) -> None:
        """Stop the JSON process (a body still decoding there is answered 503); the next large body starts one."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _ignore_sigint() -> None:
    """A terminal's Ctrl-C reaches the whole process group: the server stops the JSON process itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
