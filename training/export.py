"""Export a trained Keras model into the next version directory of the model repository.

The version is staged in a hidden directory next to the published ones, verified (ONNX and
SavedModel outputs must match the in-memory model), scored, documented, and only then
renamed into place, so a half-written or unverified version is never visible to a server.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.data import Dataset
from training.evaluate import classification_metrics, onnx_session, predict_onnx
from training.recipes import Recipe
from training.report import write_report

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
ONNX_OPSET = 17
PARITY_IMAGES = 1000
PARITY_TOLERANCE = 1e-4
TRITON_MAX_BATCH_SIZE = 64


class ExportError(Exception):
    """The exported artifacts do not reproduce the model; nothing was published."""


def _serving_function(model: Any, input_shape: tuple[int, int, int]) -> Any:
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, name=INPUT_NAME)])
    def serve(image: Any) -> dict[str, Any]:
        return {OUTPUT_NAME: model(image, training=False)}

    return serve


def save_savedmodel(model: Any, serve: Any, directory: Path) -> None:
    import tensorflow as tf

    module = tf.Module()
    module.model = model
    module.serve = serve
    tf.saved_model.save(module, str(directory), signatures={"serving_default": serve})


def save_onnx(serve: Any, path: Path) -> None:
    import tf2onnx

    model_proto, _ = tf2onnx.convert.from_function(
        serve, input_signature=serve.input_signature, opset=ONNX_OPSET, output_path=str(path))
    inputs = [i.name for i in model_proto.graph.input]
    outputs = [o.name for o in model_proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise ExportError(f"ONNX graph has inputs {inputs} and outputs {outputs}, "
                          f"expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]")


def check_parity(model: Any, directory: Path, images: np.ndarray) -> dict[str, float]:
    """ONNX and SavedModel must agree with the in-memory Keras model on real images."""
    import tensorflow as tf

    x = images[:PARITY_IMAGES].astype(np.float32)
    expected = np.asarray(model.predict(x, batch_size=250, verbose=0))
    loaded = tf.saved_model.load(str(directory)).signatures["serving_default"]
    got = {
        "onnx": predict_onnx(onnx_session(directory / "model.onnx"), x),
        "saved_model": np.concatenate([loaded(image=tf.constant(x[i:i + 250]))[OUTPUT_NAME].numpy()
                                       for i in range(0, len(x), 250)]),
    }
    report = {}
    for name, values in got.items():
        diff = float(np.abs(values - expected).max())
        same_argmax = bool((values.argmax(1) == expected.argmax(1)).all())
        report[f"{name}_max_abs_diff"] = diff
        if diff > PARITY_TOLERANCE or not same_argmax:
            raise ExportError(f"{name} export disagrees with the Keras model on {len(x)} test images: "
                              f"max abs diff {diff:.2e} (limit {PARITY_TOLERANCE:.0e}), "
                              f"identical argmax: {same_argmax}")
    report["parity_images"] = len(x)
    return report


def file_checksums(directory: Path) -> dict[str, str]:
    """sha256 of every model artifact (ONNX, SavedModel graph and variables)."""
    sums = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and not rel.startswith(("report/", "metadata.json")):
            sums[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def framework_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def triton_config(recipe: Recipe) -> str:
    dims = ", ".join(str(d) for d in recipe.input_shape)
    return f"""name: "{recipe.name}"
backend: "onnxruntime"
max_batch_size: {TRITON_MAX_BATCH_SIZE}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {len(recipe.labels)} ]
    label_filename: "labels.txt"
  }}
]
version_policy: {{ latest: {{ num_versions: 1 }} }}
dynamic_batching {{
  max_queue_delay_microseconds: 500
}}
"""


def next_version(model_root: Path) -> int:
    if not model_root.exists():
        return 1
    versions = [int(p.name) for p in model_root.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def publish(staging: Path, model_root: Path, finish: Callable[[int], None]) -> Path:
    """Rename the staged version into the next free version number (atomic on one filesystem).

    ``finish(version)`` writes the version-numbered files into the staging directory first.
    """
    for _ in range(100):
        version = next_version(model_root)
        finish(version)
        target = model_root / str(version)
        try:
            os.rename(staging, target)
        except OSError:
            if target.exists():
                continue  # another writer took this number
            raise
        return target
    raise ExportError(f"could not find a free version number under {model_root.name}/")


def export_version(model: Any, recipe: Recipe, ds: Dataset, models_dir: Path, *,
                   history: dict[str, list[float]] | None = None,
                   training: dict[str, Any] | None = None) -> Path:
    """Export, verify, score and publish ``model`` as ``models_dir/<recipe.name>/<n+1>/``."""
    model_root = Path(models_dir) / recipe.name
    model_root.mkdir(parents=True, exist_ok=True)
    staging = model_root / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        serve = _serving_function(model, recipe.input_shape)
        save_savedmodel(model, serve, staging)
        save_onnx(serve, staging / "model.onnx")
        parity = check_parity(model, staging, ds.x_test)
        metrics = classification_metrics(predict_onnx(onnx_session(staging / "model.onnx"), ds.x_test),
                                          ds.y_test, list(recipe.labels))
        history = history or {}
        training = {
            "epochs_run": len(history.get("loss", [])),
            "best_val_accuracy": max(history["val_accuracy"]) if history.get("val_accuracy") else None,
            "wall_seconds": 0.0,
            "strategy": "default",
            **(training or {}),
        }
        height, width, channels = recipe.input_shape
        metadata: dict[str, Any] = {
            "name": recipe.name,
            "version": None,
            "labels": list(recipe.labels),
            "digit": recipe.digit,
            "input": {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, height, width, channels],
                      "range": [0, 255], "color": "grayscale" if channels == 1 else "rgb"},
            "output": {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(recipe.labels)]},
            "preprocessing": {
                "resize": [height, width],
                "mode": "L" if channels == 1 else "RGB",
                "mnist_normalisation": recipe.digit,
                "polarity": "light-on-dark" if recipe.digit else "as-is",
            },
            "test_metrics": {k: metrics[k] for k in ("accuracy", "loss", "examples", "per_class")},
            "parity": parity,
            "recipe": recipe.to_dict(),
            "training": training,
            "data": ds.provenance,
            "frameworks": framework_versions(),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        metadata["sha256"] = file_checksums(staging)

        def finish(version: int) -> None:
            metadata["version"] = version
            (staging / "metadata.json").write_text(json.dumps(metadata, indent=2))
            write_report(staging / "report", metadata, metrics, history)

        target = publish(staging, model_root, finish)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (model_root / "labels.txt").write_text("\n".join(recipe.labels) + "\n")
    (model_root / "config.pbtxt").write_text(triton_config(recipe))
    return target
