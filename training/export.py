"""Export a trained Keras model into the next version directory of the model repository.

The version is staged in a hidden directory next to the published ones, verified (ONNX and
SavedModel outputs must match the in-memory model), scored, judged by the promotion gate
(``training.promotion``), documented, and only then renamed into place, so a half-written,
unverified or worse version is never visible to a server.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.data import Dataset
from training.evaluate import classification_metrics, onnx_session, predict_onnx
from training.promotion import REFUSED, Check, Gate, PromotionRefused, add_check, judge
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


def _tensor_blocks(recipe: Recipe) -> str:
    dims = ", ".join(str(d) for d in recipe.input_shape)
    return f"""input [
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
"""


def triton_config(name: str, recipe: Recipe, existing: str | None = None) -> str:
    """The model's config.pbtxt: only what an export must say, or ``existing`` with new tensor specs.

    A new config names the backend, the batch limit and the tensors, and nothing else: no
    version policy and no batching numbers, so the service's own settings apply. An existing
    config keeps every other field (a ``specific`` version policy, batching settings, comments);
    only its ``name``, ``input`` and ``output`` are rewritten.
    """
    if existing is None:
        return f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {TRITON_MAX_BATCH_SIZE}\n' + \
            _tensor_blocks(recipe)
    pieces, position, named, placed = [], 0, False, False
    for field, start, end in _top_level_fields(existing):
        if field not in ("name", "input", "output"):
            continue
        pieces.append(existing[position:start])
        position = end
        if field == "name":
            pieces.append(f'name: "{name}"')
            named = True
        elif not placed:  # the new input and output go where the first of the old ones was
            pieces.append(_tensor_blocks(recipe).rstrip("\n"))
            placed = True
        elif existing[end:end + 1] == "\n":
            position += 1  # a removed block takes its line break with it
    pieces.append(existing[position:])
    text = "".join(pieces).rstrip("\n") + "\n"
    if not placed:
        text += _tensor_blocks(recipe)
    return text if named else f'name: "{name}"\n' + text


_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPEN, _CLOSE = "{[<", "}]>"


def _skip_string(text: str, i: int) -> int:
    quote, i = text[i], i + 1
    while i < len(text) and text[i] != quote:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _skip_value(text: str, i: int) -> int:
    """The end of the value starting at ``i``: a nested message or list, a string, or a scalar."""
    if i < len(text) and text[i] in _OPEN:
        depth = 0
        while i < len(text):
            char = text[i]
            if char in "\"'":
                i = _skip_string(text, i)
                continue
            if char == "#":
                i = text.find("\n", i) if "\n" in text[i:] else len(text)
                continue
            depth += (char in _OPEN) - (char in _CLOSE)
            i += 1
            if depth == 0:
                return i
        raise ValueError("config.pbtxt has an unclosed bracket")
    if i < len(text) and text[i] in "\"'":
        return _skip_string(text, i)
    match = re.compile(r"[^\s,;#}\]>]+").match(text, i)
    if not match:
        raise ValueError(f"config.pbtxt has no value at offset {i}")
    return match.end()


def _top_level_fields(text: str) -> list[tuple[str, int, int]]:
    """``(field, start, end)`` for each top-level field of a protobuf text-format message."""
    fields, i = [], 0
    while i < len(text):
        if text[i].isspace() or text[i] in ",;":
            i += 1
            continue
        if text[i] == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        match = _FIELD_NAME.match(text, i)
        if not match:
            raise ValueError(f"config.pbtxt: unexpected {text[i]!r} at offset {i}")
        start, i = i, match.end()
        while i < len(text) and text[i] in " \t\r\n:":
            i += 1
        i = _skip_value(text, i)
        fields.append((match.group(), start, i))
    return fields


def new_triton_config(model_root: Path, name: str, recipe: Recipe) -> str:
    """The config.pbtxt text this export will write (raises before anything is published).

    The result must parse as Triton's ``ModelConfig`` message, as the service and Triton read it.
    """
    from google.protobuf import text_format

    from service.protos.model_config_pb2 import ModelConfig

    path = model_root / "config.pbtxt"
    try:
        text = triton_config(name, recipe, path.read_text() if path.is_file() else None)
        text_format.Parse(text, ModelConfig())
    except (ValueError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise ExportError(f"{path} cannot be updated, fix or remove it: {exc}") from None
    return text


def write_atomically(path: Path, text: str) -> None:
    """Write a file next to its final name and rename it, so the service never reads half of it."""
    temporary = path.parent / f".{path.name}-{uuid.uuid4().hex[:8]}"
    temporary.write_text(text)
    os.replace(temporary, path)


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


def _keep_refused(staging: Path, keep_dir: Path | None) -> Path | None:
    """Move a refused candidate's export out of the model repository, into the run directory."""
    if keep_dir is None:
        shutil.rmtree(staging, ignore_errors=True)
        return None
    kept = keep_dir / "candidate"
    shutil.rmtree(kept, ignore_errors=True)  # the run's previous refused candidate
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(kept))
    return kept


def export_version(model: Any, recipe: Recipe, ds: Dataset, models_dir: Path, *,
                   history: dict[str, list[float]] | None = None,
                   training: dict[str, Any] | None = None, name: str | None = None,
                   gate: Gate | None = None, check: Callable[[Path], Check] | None = None) -> Path:
    """Export, verify, score, judge and publish ``model`` as ``models_dir/<name>/<n+1>/``.

    ``name`` is the model's name in the repository (default: the recipe's). The ``gate``
    (default: ``Gate()``) compares the candidate with the newest published version; a refused
    candidate raises :class:`PromotionRefused` after its export is moved to ``gate.keep_dir``. ``check``, called
    with the staged version directory, is a second test the candidate must pass (see :class:`Check`).
    """
    name = name or recipe.name
    gate = gate or Gate()
    model_root = Path(models_dir) / name
    model_root.mkdir(parents=True, exist_ok=True)
    config = new_triton_config(model_root, name, recipe)
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
            "workers": 1,
            "global_batch_size": recipe.batch_size,
            **(training or {}),
        }
        height, width, channels = recipe.input_shape
        metadata: dict[str, Any] = {
            "name": name,
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
            # The served version's live drift is measured against this (docs/feedback.md).
            "reference": {"source": "the exported model.onnx on the test set",
                          "predicted_distribution": metrics["predicted_distribution"],
                          "mean_score": metrics["mean_score"]},
            "parity": parity,
            "recipe": recipe.to_dict(),
            "training": training,
            "data": ds.provenance,
            "frameworks": framework_versions(),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        metadata["sha256"] = file_checksums(staging)
        metadata["promotion"] = judge(model_root, metrics["accuracy"], metadata, ds, gate)
        if check is not None:
            extra = check(staging)
            metadata[extra.key] = extra.record
            add_check(metadata["promotion"], extra, gate)

        def finish(version: int | None) -> None:
            metadata["version"] = version
            (staging / "metadata.json").write_text(json.dumps(metadata, indent=2))
            write_report(staging / "report", metadata, metrics, history)

        if metadata["promotion"]["decision"] == REFUSED:
            finish(None)
            kept = _keep_refused(staging, gate.keep_dir)
            where = f"its export is kept in {kept}" if kept else "its export was discarded"
            raise PromotionRefused(f"{name} was not published: {metadata['promotion']['reason']}; {where} "
                                   "(--force publishes it anyway)", kept)
        target = publish(staging, model_root, finish)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_atomically(model_root / "labels.txt", "\n".join(recipe.labels) + "\n")
    write_atomically(model_root / "config.pbtxt", config)
    return target
