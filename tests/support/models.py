"""Tiny ONNX classifiers built in code, with the interface of the real exports, and model versions on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DIGIT_LABELS = [str(i) for i in range(10)]
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def tiny_classifier(height: int, width: int, channels: int, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """image [N,H,W,C] raw pixels -> /255 -> flatten -> dense -> softmax, like the real exports."""
    rng = np.random.default_rng(seed)
    features = height * width * channels
    weights = rng.normal(0, 0.05, (features, classes)).astype(np.float32)
    bias = rng.normal(0, 0.1, classes).astype(np.float32)
    nodes = [
        helper.make_node("Div", ["image", "scale"], ["scaled"]),
        helper.make_node("Reshape", ["scaled", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", height, width, channels])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        initializer=[
            numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "flat_shape"),
            numpy_helper.from_array(weights, "weights"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_version(root: Path, name: str, version: int, shape: tuple[int, int, int], labels: list[str],
                  digit: bool, seed: int = 0) -> Path:
    """``root/name/version/`` with a tiny classifier's model.onnx (one class per label) and its metadata.json."""
    directory = root / name / str(version)
    directory.mkdir(parents=True)
    onnx.save(tiny_classifier(*shape, classes=len(labels), seed=seed), directory / "model.onnx")
    metadata = {"name": name, "version": version, "labels": labels, "digit": digit,
                "input": {"name": "image", "datatype": "FP32", "shape": [-1, *shape]}}
    (directory / "metadata.json").write_text(json.dumps(metadata))
    return directory


def write_digit_version(root: Path, name: str, version: int, seed: int = 0) -> Path:
    """A tiny 28x28 grayscale digit model version (labels 0-9, digit preprocessing)."""
    return write_version(root, name, version, (28, 28, 1), DIGIT_LABELS, digit=True, seed=seed)


def two_output_classifier(height: int, width: int, channels: int, classes: int = 10, seed: int = 0,
                          probabilities: str = "probabilities") -> onnx.ModelProto:
    """The tiny classifier with a second output: ``ink`` INT64 [N, 1], the count of pixels above 127."""
    model = tiny_classifier(height, width, channels, classes, seed)
    graph = model.graph
    graph.node[-1].output[0] = probabilities
    graph.output[0].name = probabilities
    graph.node.extend([
        helper.make_node("Greater", ["image", "threshold"], ["inked"]),
        helper.make_node("Cast", ["inked"], ["inked_count"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["inked_count", "pixel_axes"], ["ink_flat"], keepdims=0),
        helper.make_node("Unsqueeze", ["ink_flat", "one_axis"], ["ink"]),
    ])
    graph.initializer.extend([
        numpy_helper.from_array(np.array(127.0, dtype=np.float32), "threshold"),
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "pixel_axes"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one_axis"),
    ])
    graph.output.append(helper.make_tensor_value_info("ink", TensorProto.INT64, ["N", 1]))
    return model


def write_model(root: Path, name: str, version: int, model: onnx.ModelProto, metadata: dict | None = None) -> Path:
    """``root/name/version/model.onnx`` from any ONNX model, with an optional metadata.json."""
    directory = root / name / str(version)
    directory.mkdir(parents=True)
    onnx.save(model, directory / "model.onnx")
    if metadata is not None:
        (directory / "metadata.json").write_text(json.dumps(metadata))
    return directory
