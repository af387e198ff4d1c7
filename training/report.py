"""The evaluation report of a version: report.md, metrics.json and two matplotlib figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from training.promotion import describe


def plot_confusion(confusion: list[list[int]], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(confusion)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=6,
                color="white" if value > threshold else "black")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_learning_curves(history: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", left), ("accuracy", right)):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = history.get(prefix + key)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, label=prefix + key or key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_report(directory: Path, metadata: dict[str, Any], metrics: dict[str, Any],
                 history: dict[str, list[float]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    labels = metadata["labels"]
    (directory / "metrics.json").write_text(json.dumps({**metrics, "history": history}, indent=2))
    plot_confusion(metrics["confusion_matrix"], labels, directory / "confusion_matrix.png")
    plot_learning_curves(history, directory / "learning_curves.png")

    recipe = metadata["recipe"]
    training = metadata["training"]
    rows = "\n".join(
        f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['support']} |"
        for name, m in metrics["per_class"].items()
    )
    recipe_rows = "\n".join(f"| {k} | {v} |" for k, v in recipe.items() if k != "labels")
    if recipe.get("validation_size", 0) > 0:
        kept = ("The kept weights are those of the epoch with the best accuracy on the validation split\n"
                "carved from the training set.")
    else:
        kept = ("The recipe trains on the whole training set (no validation split), so the kept weights\n"
                "are those of the last epoch of its fixed schedule; no epoch was chosen by a score.")
    title = (f"{metadata['name']} version {metadata['version']}" if metadata["version"] is not None
             else f"{metadata['name']} candidate (not published)")
    promotion = metadata.get("promotion")
    workers = training.get("workers", 1)
    batch = training.get("global_batch_size")
    cluster = f"{workers} (global batch {batch} = {batch // workers} per worker x {workers})" if batch else workers
    text = f"""# {title}

Scored from the exported `model.onnx` on the untouched test set ({metrics['examples']} images).

| metric | value |
|---|---|
| test accuracy | {metrics['accuracy']:.4f} |
| test loss (cross-entropy) | {metrics['loss']:.4f} |
| epochs run | {training['epochs_run']} |
| training wall time | {training['wall_seconds']:.0f} s |
| best validation accuracy | {_fraction(training.get('best_val_accuracy'))} |
| distribution strategy | {training['strategy']} |
| workers | {cluster} |
| promotion gate | {describe(promotion) if promotion else 'n/a'} |
| data | {json.dumps(metadata['data'])} |

## Per class

| class | precision | recall | support |
|---|---|---|---|
{rows}

![confusion matrix](confusion_matrix.png)

![learning curves](learning_curves.png)

## Recipe

| field | value |
|---|---|
{recipe_rows}

Augmentation runs in the tf.data input pipeline only; the exported graph takes raw 0..255
pixels and rescales them itself. {kept}
"""
    (directory / "report.md").write_text(text)
