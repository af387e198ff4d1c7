"""Checks of answers against what the model itself computes."""

from __future__ import annotations

import numpy as np


def assert_classification(entries: list[list[str]], probabilities: np.ndarray, k: int) -> None:
    """Triton's classification strings: for each row, "score:index:label" of its k most probable classes, in order
    (the digit labels are the indexes)."""
    assert len(entries) == len(probabilities)
    for row, expected in zip(entries, probabilities):
        order = np.argsort(-expected, kind="stable")[:k]
        parsed = [entry.split(":") for entry in row]
        assert [(int(index), label) for _, index, label in parsed] == [(int(i), str(i)) for i in order]
        np.testing.assert_allclose([float(score) for score, _, _ in parsed], expected[order], atol=1e-5)
