"""Scoring an exported ``model.onnx`` on a test set: accuracy, loss, per-class metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

EVAL_BATCH = 500


def onnx_session(model_path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def predict_onnx(session: Any, images: np.ndarray, batch: int = EVAL_BATCH) -> np.ndarray:
    """Probabilities for raw uint8/float images [N, H, W, C], computed in batches."""
    name = session.get_inputs()[0].name
    outputs = [session.run(None, {name: images[i:i + batch].astype(np.float32)})[0]
               for i in range(0, len(images), batch)]
    return np.concatenate(outputs)


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, cross-entropy, confusion matrix and per-class precision/recall."""
    n = len(class_names)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    picked = probabilities[np.arange(len(labels)), labels]
    loss = float(-np.log(np.clip(picked, 1e-7, 1.0)).mean())
    per_class = {}
    for i, name in enumerate(class_names):
        tp = confusion[i, i]
        per_class[name] = {
            "precision": float(tp / confusion[:, i].sum()) if confusion[:, i].sum() else 0.0,
            "recall": float(tp / confusion[i].sum()) if confusion[i].sum() else 0.0,
            "support": int(confusion[i].sum()),
        }
    return {
        "accuracy": float((predicted == labels).mean()),
        "loss": loss,
        "examples": int(len(labels)),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        # What the model answers, whatever the truth: the reference the server's drift figure compares live
        # traffic with (service/state/quality.py).
        "predicted_distribution": (np.bincount(predicted, minlength=n) / max(1, len(predicted))).tolist(),
        "mean_score": float(probabilities.max(axis=1).mean()) if len(probabilities) else 0.0,
    }


def evaluate_onnx(model_path: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    return classification_metrics(predict_onnx(onnx_session(model_path), images), labels, class_names)
