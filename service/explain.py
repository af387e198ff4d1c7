"""Explanations of one prediction: the input the model was given, where it looked, and its feature maps.

- **saliency**: occlusion sensitivity. Square patches of the input are set to the background, every
  patch position one row of a single batch that runs through the version's own runtime and batching
  queue; a pixel's value is how much the target class's probability falls, on average, when it is
  covered. Forward passes only, so any exported model works, whatever runtime serves it.
- **feature maps**: the outputs of every convolution and pooling node in graph order, from a second
  ONNX Runtime session on the version's ``model.onnx`` whose graph outputs include those tensors.
  Built on first use, cached per version, released with it.

The graph is read and extended with protobuf (which onnxruntime already installs) rather than the
``onnx`` package: that would add about 55 MB to a serving install (onnx 31 MB + ml_dtypes 24 MB
installed, 14 MB of wheels) for reading five fields and appending one.
"""

from __future__ import annotations

import base64
import io
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from google.protobuf import empty_pb2
from google.protobuf.unknown_fields import UnknownFieldSet
from PIL import Image, ImageDraw, ImageFont

from service import tracing
from service.dataplane import DataPlane, error_outcome, top_k
from service.errors import (
    InvalidInput,
    NotExplainable,
    ServingError,
)
from service.preprocessing import images_to_rows, open_images
from service.repository import ModelVersion

CONV_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalMaxPool", "GlobalAveragePool", "GlobalLpPool"})
# A convolution's feature map is what its layer outputs: after the activation that follows it, if one does.
ACTIVATION_OPS = frozenset({"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "Tanh",
                            "Softplus", "Softsign", "Clip", "HardSwish", "Mish", "Gelu"})
OCCLUSION_STEPS = 7  # patches about a seventh of the image wide, moved half a patch at a time: ~13x13 rows
TILE_PIXELS = 32  # small feature maps are enlarged (whole pixels) to about this size in the grids
SALIENCY_DECIMALS = 6

# --- Reading an ONNX graph with protobuf ------------------------------------------------------
# Field numbers from onnx.proto (stable by protobuf's rules): ModelProto.graph = 7; GraphProto.node = 1,
# .output = 12; NodeProto.input = 1, .output = 2, .name = 3, .op_type = 4, .domain = 7; ValueInfoProto.name = 1.

_LENGTH_DELIMITED = 2


def _fields(message: bytes) -> list[tuple[int, bytes]]:
    """The length-delimited fields of a serialized message, in order (repeated fields repeat)."""
    parsed = empty_pb2.Empty()
    parsed.ParseFromString(message)  # every field is unknown to Empty, so all are kept as they are
    return [(f.field_number, f.data) for f in UnknownFieldSet(parsed) if f.wire_type == _LENGTH_DELIMITED]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(payload)) + payload


@dataclass(frozen=True)
class GraphNode:
    name: str
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def graph_nodes(model: bytes) -> list[GraphNode]:
    """The main graph's nodes of a serialized ONNX model, in graph (topological) order."""
    nodes = []
    for number, graph in _fields(model):
        if number != 7:
            continue
        for kind, data in _fields(graph):
            if kind != 1:
                continue
            values: dict[int, list[str]] = {}
            for field, value in _fields(data):
                if field in (1, 2, 3, 4, 7):
                    values.setdefault(field, []).append(value.decode("utf-8", "replace"))
            nodes.append(GraphNode(name=(values.get(3) or [""])[0], op_type=(values.get(4) or [""])[0],
                                   domain=(values.get(7) or [""])[0], inputs=tuple(values.get(1, ())),
                                   outputs=tuple(values.get(2, ()))))
    return nodes


def with_graph_outputs(model: bytes, tensors: Iterable[str]) -> bytes:
    """The model with more graph outputs. A parser merges a message field that appears twice and
    concatenates its repeated fields, so appending a graph holding only the new outputs adds them."""
    outputs = b"".join(_field(12, _field(1, name.encode())) for name in tensors)
    return model + _field(7, outputs)


# --- Feature maps ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    name: str
    """The node's name in the graph (its output's name if the node has none)."""
    op_type: str
    tensor: str
    """The tensor shown: the node's output, or for a convolution the output of the activation after it."""


def feature_layers(nodes: list[GraphNode]) -> list[Layer]:
    """Every standard convolution and pooling node, in graph order."""
    consumers: dict[str, list[GraphNode]] = {}
    for node in nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    layers = []
    for node in nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in CONV_OPS | POOL_OPS or not node.outputs:
            continue
        tensor = node.outputs[0]
        after = consumers.get(tensor, [])
        if node.op_type in CONV_OPS and len(after) == 1 and after[0].op_type in ACTIVATION_OPS and after[0].outputs:
            tensor = after[0].outputs[0]
        layers.append(Layer(node.name or node.outputs[0], node.op_type, tensor))
    return layers


class FeatureMaps:
    """An ONNX Runtime session on a model whose outputs are its conv and pool activations (NCHW, per ONNX)."""

    def __init__(self, model_path: Path, threads: int) -> None:
        model = model_path.read_bytes()
        self.layers = feature_layers(graph_nodes(model))
        self._session: ort.InferenceSession | None = None
        if not self.layers:
            return
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Loaded from bytes: external weights, if any, are found beside the original file.
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(model_path.parent))
        session = ort.InferenceSession(with_graph_outputs(model, [layer.tensor for layer in self.layers]),
                                       options, providers=["CPUExecutionProvider"])
        ranks = {o.name: len(o.shape) if isinstance(o.shape, list) else 4 for o in session.get_outputs()}
        self.layers = [layer for layer in self.layers if ranks.get(layer.tensor) == 4]  # 2-D images only
        self._session = session if self.layers else None
        self._input = session.get_inputs()[0].name

    def run(self, row: np.ndarray) -> list[np.ndarray]:
        """Each layer's activations for one input row, as [h, w, channels]."""
        assert self._session is not None
        outputs = self._session.run([layer.tensor for layer in self.layers], {self._input: row[None]})
        return [np.asarray(out[0], dtype=np.float32).transpose(1, 2, 0) for out in outputs]

    def close(self) -> None:
        self._session = None


_SESSIONS: dict[int, FeatureMaps] = {}


def feature_maps_of(mv: ModelVersion, threads: int) -> FeatureMaps:
    """The version's feature-map session, built on first use and released when the version is unloaded.
    Called only where the version's batches run (its inference thread or the event loop, one at a time), so a
    session is never built twice."""
    key = id(mv)
    maps = _SESSIONS.get(key)
    if maps is None:
        path = mv.path / "model.onnx"
        if not path.is_file():
            raise NotExplainable(f"model {mv.name} version {mv.version} has no model.onnx to take feature maps from")
        maps = _SESSIONS[key] = FeatureMaps(path, threads)
        mv.on_close(lambda: _release(key))
    if not maps.layers:
        raise NotExplainable(f"model {mv.name} version {mv.version} has no convolution or pooling layers, "
                             "so it has no feature maps to explain")
    return maps


def _release(key: int) -> None:
    maps = _SESSIONS.pop(key, None)
    if maps is not None:
        maps.close()


def cached_feature_sessions() -> int:
    """How many versions hold a feature-map session now."""
    return len(_SESSIONS)


# --- Occlusion sensitivity ---------------------------------------------------------------------

@dataclass(frozen=True)
class Occlusion:
    patch: int
    stride: int
    tops: tuple[int, ...]
    lefts: tuple[int, ...]

    @property
    def rows(self) -> int:
        return len(self.tops) * len(self.lefts)

    def boxes(self) -> Iterable[tuple[slice, slice]]:
        for top in self.tops:
            for left in self.lefts:
                yield slice(top, top + self.patch), slice(left, left + self.patch)


def occlusion_for(height: int, width: int) -> Occlusion:
    """Patches about a seventh of the image, half-overlapping, the last one flush with each edge."""
    patch = max(1, math.ceil(min(height, width) / OCCLUSION_STEPS))
    stride = max(1, patch // 2)

    def starts(size: int) -> tuple[int, ...]:
        positions = list(range(0, size - patch + 1, stride))
        if positions[-1] != size - patch:
            positions.append(size - patch)
        return tuple(positions)

    return Occlusion(patch, stride, starts(height), starts(width))


def background(row: np.ndarray, digit: bool) -> np.ndarray:
    """What a covered patch is set to, per channel: black for MNIST-style digits (their background),
    the image's mean colour otherwise (neutral: it adds no edge or colour of its own)."""
    return np.zeros(row.shape[-1], np.float32) if digit else row.mean(axis=(0, 1)).astype(np.float32)


def occluded_rows(row: np.ndarray, occlusion: Occlusion, baseline: np.ndarray) -> np.ndarray:
    """[1 + patches, H, W, C]: the row itself, then one copy per patch position with that patch covered."""
    rows = np.repeat(row[None], 1 + occlusion.rows, axis=0)
    for index, box in enumerate(occlusion.boxes(), start=1):
        rows[(index, *box)] = baseline
    return rows


def saliency_map(probabilities: np.ndarray, target: int, occlusion: Occlusion, height: int,
                 width: int) -> np.ndarray:
    """[H, W]: per pixel, the mean fall of the target's probability over the patches covering it."""
    drops = probabilities[0, target] - probabilities[1:, target]
    total = np.zeros((height, width), np.float64)
    count = np.zeros((height, width), np.float64)
    for drop, box in zip(drops.tolist(), occlusion.boxes()):
        total[box] += drop
        count[box] += 1
    return (total / np.maximum(count, 1)).astype(np.float32)


# --- Pictures ----------------------------------------------------------------------------------

def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_png(row: np.ndarray) -> str:
    """The model's input [H, W, C] as a base64 PNG at its own size (grayscale or RGB)."""
    pixels = np.clip(np.rint(row), 0, 255).astype(np.uint8)
    if pixels.shape[-1] == 3:
        return _png(Image.fromarray(pixels, "RGB"))
    return _png(Image.fromarray(pixels[..., 0], "L"))


@cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def feature_grid_png(maps: np.ndarray, title: str) -> str:
    """A base64 PNG of a layer's channels [h, w, c] side by side, each numbered and scaled to its own
    range (a channel that is flat everywhere is black), under a title line."""
    height, width, channels = maps.shape
    scale = max(1, TILE_PIXELS // max(height, width))
    tile_h, tile_w = height * scale, width * scale
    font = _font()
    label_h, gap, header_h = 11, 3, 16
    cols = math.ceil(math.sqrt(channels))
    rows = math.ceil(channels / cols)
    cell_w = max(tile_w, math.ceil(font.getlength(str(channels - 1))))
    canvas_w = max(gap + cols * (cell_w + gap), gap * 2 + math.ceil(font.getlength(title)))
    canvas = np.full((header_h + rows * (label_h + tile_h + gap) + gap, canvas_w), 24, np.uint8)
    low = maps.min(axis=(0, 1))
    span = maps.max(axis=(0, 1)) - low
    scaled = np.where(span > 0, (maps - low) / np.where(span > 0, span, 1) * 255, 0)
    tiles = np.rint(scaled).astype(np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)
    for channel in range(channels):
        top = header_h + (channel // cols) * (label_h + tile_h + gap) + label_h
        left = gap + (channel % cols) * (cell_w + gap)
        canvas[top:top + tile_h, left:left + tile_w] = tiles[..., channel]
    image = Image.fromarray(canvas, "L")
    draw = ImageDraw.Draw(image)
    draw.text((gap, 2), title, fill=255, font=font)
    for channel in range(channels):
        top = header_h + (channel // cols) * (label_h + tile_h + gap)
        draw.text((gap + (channel % cols) * (cell_w + gap), top), str(channel), fill=170, font=font)
    return _png(image)


# --- The explanation of one image --------------------------------------------------------------

async def explain(dataplane: DataPlane, mv: ModelVersion, image: bytes, k: int, target: int | None,
                  gone: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Explain one encoded image: its prediction, model input, occlusion saliency and feature maps.

    The whole job (decoding, the feature-map pass, the occlusion batch) runs where the version's batches
    run (its inference thread, or the worker's event loop) as one queued request of ``1 + patches`` rows:
    its cost counts in the queue.
    """
    spec, version_metrics = mv.image_spec, mv.metrics
    classes = len(mv.labels)
    if target is not None and not 0 <= target < classes:
        raise InvalidInput(f"target must be a class id from 0 to {classes - 1}, got {target}")
    occlusion = occlusion_for(spec.height, spec.width)
    threads = dataplane.settings.inference_threads
    made: dict[str, Any] = {}
    # As for predictions: the headers first, then a large image is decoded in the decode pool under the request's
    # deadline, never where the batches run (the worker's event loop, with the defaults).
    opened = open_images([image], dataplane.image_limits)
    decoded = None
    if not dataplane.decoder.inline(opened):
        decoded = (await dataplane.decoder.decode(opened, spec, version_metrics.preprocess_latency.observe, gone,
                                                  tracing.current_span()))[0]

    def prepare() -> np.ndarray:  # where the version's batches run
        maps = feature_maps_of(mv, threads)  # first: a model without conv layers is refused before decoding
        row = decoded
        if row is None:
            started = time.perf_counter()
            row = images_to_rows(opened, spec)[0]
            version_metrics.preprocess_latency.observe(time.perf_counter() - started)
        made["row"], made["baseline"] = row, background(row, spec.digit)
        made["feature_maps"] = []
        for layer, activations in zip(maps.layers, maps.run(row)):
            h, w, c = activations.shape
            made["feature_maps"].append({
                "layer": layer.name, "op": layer.op_type, "tensor": layer.tensor, "shape": [h, w, c],
                "png": feature_grid_png(activations, f"{layer.name}  {h}x{w}x{c}")})
        made["input_png"] = input_png(row)
        return occluded_rows(row, occlusion, made["baseline"])

    labels = (mv.name, str(mv.version))
    started = time.perf_counter()
    version_metrics.inflight.inc()
    try:
        outputs = await mv.predict_prepared(1 + occlusion.rows, prepare, gone)
    except ServingError as exc:
        outcome, reason = error_outcome(exc)
        if reason is not None:
            version_metrics.rejected(reason)
        dataplane.metrics.explanations.labels(*labels, outcome).inc()
        raise
    finally:
        version_metrics.inflight.dec()
    probabilities = outputs[mv.output.name]
    chosen = int(np.argmax(probabilities[0])) if target is None else target
    saliency = saliency_map(probabilities, chosen, occlusion, spec.height, spec.width)
    row = made["row"]
    dataplane.metrics.explanations.labels(*labels, "success").inc()
    dataplane.metrics.explain_latency.labels(*labels).observe(time.perf_counter() - started)
    return {
        "model": mv.name,
        "version": mv.version,
        "predictions": top_k(mv, probabilities[:1], k),
        "input": {"shape": list(row.shape), "data": row.tolist(), "png": made["input_png"]},
        "saliency": {
            "method": "occlusion", "class_id": chosen, "label": mv.label(chosen),
            "patch": occlusion.patch, "stride": occlusion.stride, "baseline": made["baseline"].tolist(),
            "shape": [spec.height, spec.width], "data": np.round(saliency, SALIENCY_DECIMALS).tolist(),
        },
        "feature_maps": made["feature_maps"],
    }
