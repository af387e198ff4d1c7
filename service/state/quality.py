"""Live quality of a served version from its logged predictions and feedback: accuracy with a Wilson interval,
the confusion matrix, and drift of what it predicts against what it predicted on its own test set.

Drift is the population stability index (PSI) of the predicted-class distribution against the version's
reference distribution, ``sum((p - q) * ln(p / q))`` over classes, each share floored at ``PSI_FLOOR`` so an
empty class does not make it infinite. The usual reading: below 0.1 no real shift, 0.1 to 0.25 a moderate
shift worth a look, above 0.25 a significant shift (the traffic, or the model's answers to it, changed).
The reference is the version's metadata ``reference.predicted_distribution`` (what the exported model
predicted on the test set) when the export recorded it, else the test set's class distribution
(``test_metrics.per_class`` support), which an accurate model's predictions follow closely.
"""

from __future__ import annotations

import math
from typing import Any

from service.state.store import VersionCounts

Z95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95% interval."""
PSI_FLOOR = 1e-4
PSI_MODERATE, PSI_SIGNIFICANT = 0.1, 0.25


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (None without observations)."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def psi(observed: list[float], expected: list[float], floor: float = PSI_FLOOR) -> float:
    """Population stability index of two distributions over the same classes (shares, each summing to 1)."""
    total = 0.0
    for p, q in zip(observed, expected):
        p, q = max(p, floor), max(q, floor)
        total += (p - q) * math.log(p / q)
    return total


def drift_level(value: float) -> str:
    if value < PSI_MODERATE:
        return "none"
    return "moderate" if value < PSI_SIGNIFICANT else "significant"


def reference_of(metadata: dict[str, Any], classes: int) -> tuple[list[float] | None, float | None, str | None]:
    """A version's reference predicted-class distribution, mean top-1 score, and where they come from."""
    reference = metadata.get("reference") or {}
    shares = reference.get("predicted_distribution")
    if isinstance(shares, list) and len(shares) == classes:
        return [float(s) for s in shares], reference.get("mean_score"), "test set predictions"
    per_class = (metadata.get("test_metrics") or {}).get("per_class") or {}
    labels = metadata.get("labels") or []
    support = [per_class.get(str(label), {}).get("support") for label in labels]
    if len(support) == classes and all(isinstance(s, int | float) for s in support) and sum(support) > 0:
        total = float(sum(support))
        return [s / total for s in support], reference.get("mean_score"), "test set classes"
    return None, None, None


def version_quality(counts: VersionCounts, labels: list[str], metadata: dict[str, Any]) -> dict[str, Any]:
    """The quality answer of one version (``GET /v2/models/{name}/quality``)."""
    k = len(labels)
    n = counts.predictions
    confusion = [[0] * k for _ in range(k)]
    labelled = correct = 0
    for (true, predicted), count in counts.confusion.items():
        labelled += count
        if true == predicted:
            correct += count
        if 0 <= true < k and 0 <= predicted < k:
            confusion[true][predicted] += count
    distribution = [counts.predicted.get(c, 0) / n if n else 0.0 for c in range(k)]
    mean_score = counts.score_sum / n if n else None
    interval = wilson_interval(correct, labelled)
    reference, reference_score, source = reference_of(metadata, k)
    drift: dict[str, Any] = {"method": "psi", "reference": source}
    if reference is not None and n:
        value = psi(distribution, reference)
        drift.update(psi=value, level=drift_level(value))
    else:
        drift.update(psi=None, level=None)
    if reference_score is not None and mean_score is not None:
        drift.update(mean_score_reference=reference_score, mean_score_shift=mean_score - reference_score)
    return {
        "version": counts.version,
        "predictions": n,
        "labelled": labelled,
        "correct": correct,
        "accuracy": correct / labelled if labelled else None,
        "accuracy_ci95": list(interval) if interval else None,
        "confusion": confusion,
        "labels": labels,
        "predicted_distribution": distribution,
        "mean_score": mean_score,
        "drift": drift,
    }
