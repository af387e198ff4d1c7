"""Open Inference Protocol tensors, shared by its REST (``service.rest.v2``) and gRPC (``service.grpc_api``) forms.

The datatype table, the checks that turn a (datatype, shape, bytes) triple into an ndarray without
trusting the shape, Triton's BYTES serialisation and the classification extension.
"""

from __future__ import annotations

import math
import struct
from typing import TYPE_CHECKING, Any

import numpy as np

from service.errors import InvalidInput
from service.limits import CLASSIFICATION_BYTES, JSON_FP32_BYTES, JSON_VALUE_BYTES

if TYPE_CHECKING:  # the JSON decoding process loads this module, and none of the server's
    from service.repository import ModelVersion

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(dtype) for name, dtype in (
        ("BOOL", "bool"), ("UINT8", "uint8"), ("UINT16", "uint16"), ("UINT32", "uint32"), ("UINT64", "uint64"),
        ("INT8", "int8"), ("INT16", "int16"), ("INT32", "int32"), ("INT64", "int64"),
        ("FP16", "<f2"), ("FP32", "<f4"), ("FP64", "<f8"),
    )
}
V2_DATATYPE = {dtype: name for name, dtype in DATATYPES.items()}


def tensor_dtype(name: Any, datatype: Any) -> np.dtype[Any]:
    """The numpy dtype of a numeric datatype; 400 for anything else."""
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInput(f"input {name!r}: unsupported datatype {datatype!r} (supported: {', '.join(DATATYPES)})")
    return dtype


def element_count(name: Any, shape: Any) -> int:
    """The number of elements of a shape, exactly: an int64 product of a hostile shape could wrap around."""
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be a list of non-negative integers")
    return math.prod(shape)


def from_buffer(name: Any, datatype: str, shape: list[int], data: bytes | memoryview,
                what: str = "binary data") -> np.ndarray:
    """A raw little-endian tensor (binary extension, gRPC ``raw_input_contents``) whose size must match its shape."""
    dtype = tensor_dtype(name, datatype)
    count = element_count(name, shape)
    if len(data) != count * dtype.itemsize:
        raise InvalidInput(f"input {name!r}: {len(data)} bytes of {what} for shape {list(shape)} "
                           f"of {datatype} (expected {count * dtype.itemsize})")
    return shaped(np.frombuffer(data, dtype=dtype), shape, name)


def shaped(array: np.ndarray, shape: list[int], name: Any) -> np.ndarray:
    try:
        return array.reshape(shape)
    except ValueError:  # an empty tensor whose other dimensions numpy cannot represent
        raise InvalidInput(f"input {name!r}: shape {list(shape)} is too large") from None


def output_tensor(values: np.ndarray) -> tuple[str, np.ndarray]:
    """An output's datatype and its values as that datatype's little-endian array."""
    dtype = values.dtype.newbyteorder("<") if values.dtype.byteorder == ">" else values.dtype
    datatype = V2_DATATYPE[np.dtype(dtype)]
    return datatype, values.astype(DATATYPES[datatype], copy=False)


def classification(mv: ModelVersion, name: str, scores: np.ndarray, k: int) -> np.ndarray:
    """Triton's classification extension: the k best ``"score:index[:label]"`` per row of an output."""
    from service.dataplane import ranked_classes  # here: see the imports

    if scores.ndim != 2:
        raise InvalidInput(f"classification needs an output of shape [N, classes]; {name} has {list(scores.shape)}")
    with_labels = name == mv.output.name  # the labels belong to the class-probabilities output
    rows = [[f"{p[c]:f}:{c}:{mv.label(c)}" if with_labels else f"{p[c]:f}:{c}" for c in classes]
            for p, classes in zip(scores.tolist(), ranked_classes(scores, k))]
    return np.array(rows, dtype=object).reshape(len(rows), len(rows[0]) if rows else 0)


def response_bytes(mv: ModelVersion, rows: int, requested: list[tuple[str, bool, int]]) -> int:
    """An upper bound of an inference answer's size, known before the model runs: ``requested`` holds
    (output name, binary, classification k); gRPC answers are binary."""
    specs = {s.name: s for s in mv.runtime.outputs}
    label = max((len(label) for label in mv.labels), default=8) * 6  # JSON escapes at worst
    total = 0
    for name, binary, k in requested:
        spec = specs[name]
        values = rows * math.prod(d for d in spec.shape[1:] if d > 0)
        dtype = DATATYPES.get(spec.datatype, np.dtype("<f8"))
        per_value = dtype.itemsize if binary else JSON_FP32_BYTES if spec.datatype == "FP32" else JSON_VALUE_BYTES
        total += rows * k * (CLASSIFICATION_BYTES + label) if k else values * per_value
    return total


def bytes_tensor(values: np.ndarray) -> bytes:
    """Triton's BYTES serialisation: a 4-byte little-endian length before each element."""
    parts = []
    for value in values.ravel():
        raw = value.encode() if isinstance(value, str) else bytes(value)
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def split_bytes_tensor(name: Any, data: bytes | memoryview, count: int) -> list[bytes]:
    """The ``count`` elements of a serialised BYTES tensor; 400 when the lengths do not add up."""
    view = memoryview(data)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidInput(f"input {name!r}: BYTES data ends inside an element length")
        (size,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + size > len(view):
            raise InvalidInput(f"input {name!r}: a BYTES element of {size} bytes runs past the end of the data")
        elements.append(bytes(view[offset:offset + size]))
        offset += size
        if len(elements) > count:
            break
    if len(elements) != count:
        raise InvalidInput(f"input {name!r}: {len(elements)} BYTES elements for a shape of {count}")
    return elements
