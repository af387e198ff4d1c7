"""Live quality statistics against hand-computed values: the Wilson interval, the PSI and the answer's shape."""

from __future__ import annotations

import math

import pytest

from service.state.quality import drift_level, psi, reference_of, version_quality, wilson_interval
from service.state.store import VersionCounts


@pytest.mark.parametrize(("successes", "n", "low", "high"), [
    (8, 10, 0.4902, 0.9433),  # the textbook example (Newcombe 1998, Brown, Cai and DasGupta 2001)
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),
])
def test_wilson_interval_matches_the_published_values(successes, n, low, high):
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=1e-4)
    assert hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_needs_observations():
    assert wilson_interval(0, 0) is None


def test_psi_by_hand():
    # (0.5 - 0.25) ln(0.5 / 0.25) + (0.5 - 0.75) ln(0.5 / 0.75)
    expected = 0.25 * math.log(2) + 0.25 * math.log(1.5)
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(expected)
    assert psi([0.1] * 10, [0.1] * 10) == 0.0


def test_psi_of_an_empty_class_is_finite():
    value = psi([1.0, 0.0], [0.5, 0.5])
    assert math.isfinite(value)
    assert value == pytest.approx(0.5 * math.log(2) + (1e-4 - 0.5) * math.log(1e-4 / 0.5))


@pytest.mark.parametrize(("value", "level"), [(0.0, "none"), (0.099, "none"), (0.1, "moderate"),
                                              (0.24, "moderate"), (0.25, "significant"), (3.0, "significant")])
def test_drift_levels(value, level):
    assert drift_level(value) == level


METADATA = {"labels": ["a", "b"], "test_metrics": {"per_class": {"a": {"support": 30}, "b": {"support": 10}}}}


def test_the_reference_falls_back_to_the_test_set_classes():
    assert reference_of(METADATA, 2) == ([0.75, 0.25], None, "test set classes")
    exported = {**METADATA, "reference": {"predicted_distribution": [0.6, 0.4], "mean_score": 0.97}}
    assert reference_of(exported, 2) == ([0.6, 0.4], 0.97, "test set predictions")
    assert reference_of({}, 2) == (None, None, None)


def test_version_quality_from_counts():
    counts = VersionCounts("3", predicted={0: 6, 1: 4}, score_sum=8.0, confusion={(0, 0): 3, (1, 0): 1, (1, 1): 2})
    q = version_quality(counts, ["a", "b"], METADATA)
    assert (q["version"], q["predictions"], q["labelled"], q["correct"]) == ("3", 10, 6, 5)
    assert q["accuracy"] == pytest.approx(5 / 6)
    lo, hi = q["accuracy_ci95"]
    assert lo < 5 / 6 < hi
    assert q["confusion"] == [[3, 0], [1, 2]]  # rows: the true class
    assert q["predicted_distribution"] == [0.6, 0.4]
    assert q["mean_score"] == pytest.approx(0.8)
    assert q["drift"]["psi"] == pytest.approx((0.6 - 0.75) * math.log(0.6 / 0.75) + (0.4 - 0.25) * math.log(1.6))
    assert q["drift"]["level"] == "moderate"


def test_a_version_without_labels_has_no_accuracy():
    q = version_quality(VersionCounts("1", {0: 2}, 1.8, {}), ["a", "b"], {})
    assert q["accuracy"] is None and q["accuracy_ci95"] is None and q["labelled"] == 0
    assert q["drift"]["psi"] is None
