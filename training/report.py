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


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _feedback_section(metadata: dict[str, Any]) -> str:
    """A refreshed version's two test sets (the recipe's and the held-out feedback) and the feedback it used."""
    feedback = metadata.get("feedback")
    if not feedback:
        return ""
    promotion, held = metadata.get("promotion") or {}, feedback["held_out"]
    base = feedback["base_version"]
    split = feedback["split"]
    classes = ", ".join(f"{label} {n}" for label, n in split["train_per_class"].items())
    rows = "\n".join(f"| {name} | {images} | {_percent(old)} | {_percent(new)} |" for name, images, old, new in (
        ("the recipe's test set", promotion.get("test_images", "n/a"), promotion.get("incumbent_accuracy"),
         promotion.get("candidate_accuracy")),
        ("held-out production feedback", held["examples"], held["stable_accuracy"], held["candidate_accuracy"])))
    gain = "n/a" if held["gain_pp"] is None else f"{held['gain_pp']:+.2f}"
    return f"""## Refreshed from production feedback

Fine-tuned from version {base} ({feedback['base']}) on the recipe's training set mixed with
{feedback['mix']['feedback_examples']} labelled production inputs (each repeated {feedback['mix']['repeats']} times,
{feedback['mix']['feedback_share']:.0%} of an epoch), {feedback['schedule']['epochs']} epochs from a peak rate of
{feedback['schedule']['peak_learning_rate']:g}. Both test sets, from the exported `model.onnx` files:

| test set | images | version {base} | this candidate |
|---|---|---|---|
{rows}

Held-out gain {gain} pp (at least {held['min_gain_pp']:g} pp needed).
Feedback: {feedback['labelled']} labelled predictions ({feedback['skipped']} skipped) made from
{feedback['first_prediction_at']} to {feedback['last_prediction_at']} in {feedback['state_store']}, answered by
{", ".join(f"v{v} {n}" for v, n in feedback['answered_by'].items())}; split seeded {split['seed']}, stratified by true
label, {split['held_out_fraction']:.0%} held out (the ids are in `feedback_split.json`). Training part per class:
{classes}.

"""


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

{_feedback_section(metadata)}## Per class

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
