"""Tiny ONNX classifiers built in code, with the interface of the real exports, and model versions on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DIGIT_LABELS = [str(i) for i in range(10)]
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _dense_head(features: int, classes: int, rng: np.random.Generator, source: str) -> tuple[list, list]:
    """``source`` -> flatten -> dense -> softmax "probabilities": the nodes and their weights."""
    nodes = [
        helper.make_node("Reshape", [source, "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    weights = [
        numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(rng.normal(0, 0.05, (features, classes)).astype(np.float32), "weights"),
        numpy_helper.from_array(rng.normal(0, 0.1, classes).astype(np.float32), "bias"),
    ]
    return nodes, weights


def _image_model(name: str, nodes: list, weights: list, shape: tuple[int, int, int], classes: int) -> onnx.ModelProto:
    """A model from "image" [N,H,W,C] (raw pixels, divided by "scale" = 255 first) to "probabilities" [N,classes]."""
    graph = helper.make_graph(
        [helper.make_node("Div", ["image", "scale"], ["scaled"]), *nodes], name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"), *weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tiny_classifier(height: int, width: int, channels: int, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """image [N,H,W,C] raw pixels -> /255 -> flatten -> dense -> softmax, like the real exports."""
    nodes, weights = _dense_head(height * width * channels, classes, np.random.default_rng(seed), "scaled")
    return _image_model("tiny", nodes, weights, (height, width, channels), classes)


def tiny_cnn(height: int, width: int, channels: int, classes: int = 10, seed: int = 0,
             filters: int = 4) -> onnx.ModelProto:
    """image [N,H,W,C] -> /255 -> NCHW -> Conv 3x3 same (``conv1``) -> Relu -> MaxPool 2 (``pool1``) -> dense
    -> softmax: the smallest convolutional network, laid out the way tf2onnx exports one."""
    rng = np.random.default_rng(seed)
    head, head_weights = _dense_head(filters * (height // 2) * (width // 2), classes, rng, "pool1_out")
    nodes = [
        helper.make_node("Transpose", ["scaled"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "kernel", "kernel_bias"], ["conv1_out"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1_out"], ["conv1_relu"], name="conv1_relu"),
        helper.make_node("MaxPool", ["conv1_relu"], ["pool1_out"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        *head,
    ]
    weights = [numpy_helper.from_array(rng.normal(0, 0.5, (filters, channels, 3, 3)).astype(np.float32), "kernel"),
               numpy_helper.from_array(rng.normal(0, 0.1, filters).astype(np.float32), "kernel_bias"), *head_weights]
    return _image_model("tiny_cnn", nodes, weights, (height, width, channels), classes)


def write_version(root: Path, name: str, version: int, shape: tuple[int, int, int], labels: list[str],
                  digit: bool, seed: int = 0, conv: bool = False) -> Path:
    """``root/name/version/`` with a tiny classifier's model.onnx (one class per label) and its metadata.json;
    ``conv``: a tiny convolutional network instead of a dense one."""
    directory = root / name / str(version)
    directory.mkdir(parents=True)
    build = tiny_cnn if conv else tiny_classifier
    onnx.save(build(*shape, classes=len(labels), seed=seed), directory / "model.onnx")
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
