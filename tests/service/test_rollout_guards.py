"""The rollout's statistics and decision on synthetic evidence, against independent figures: Newcombe's worked
example, numpy's quantiles, simulated candidates (one that agrees 10% of the time, one identical to stable), and
the canary's split over 10,000 keys."""

from __future__ import annotations

import math

import numpy as np

from service.rollout import (
    LATENCY_BOUNDS,
    Accuracy,
    Active,
    PhaseCounts,
    Rollouts,
    Thresholds,
    difference_interval,
    evaluate,
    key_share,
    latency_bucket,
    quantile,
    quantile_lower_bound,
)

T = Thresholds(min_requests=300, max_seconds=3600, min_agreement=0.9, max_error_increase=0.01,
               max_latency_ratio=2.0, max_accuracy_drop=0.02, min_labels=30)
Z95 = 1.959963984540054


def test_the_difference_interval_is_newcombes_method_10():
    # Newcombe (1998), Statistics in Medicine 17:873-890, Table II example (a): 56/70 - 48/80, 95%: 0.0524 to 0.3339.
    lo, hi = difference_interval(56, 70, 48, 80, Z95)
    assert (round(lo, 4), round(hi, 4)) == (0.0524, 0.3339)
    # Example (h): 10/10 - 0/10: 0.6075 to 1.0000.
    lo, hi = difference_interval(10, 10, 0, 10, Z95)
    assert (round(lo, 4), round(hi, 4)) == (0.6075, 1.0)
    assert difference_interval(1, 0, 1, 1) is None


def test_histogram_quantiles_bracket_numpys():
    rng = np.random.default_rng(3)
    samples = rng.lognormal(np.log(0.004), 0.5, 5000)
    histogram = [0] * len(LATENCY_BOUNDS)
    for s in samples:
        histogram[latency_bucket(float(s))] += 1
    exact = float(np.quantile(samples, 0.99))
    estimate = quantile(histogram, 0.99)
    assert exact <= estimate <= exact * 2 ** 0.25 * 1.0001  # the bucket's upper bound, one bucket at most above
    low = quantile_lower_bound(histogram, 0.99)
    assert low <= exact and low >= float(np.quantile(samples, 0.98)) / 2 ** 0.25


def test_every_latency_lands_in_the_bucket_that_bounds_it():
    for seconds in [1e-5, 1e-4, 1.2e-4, 0.00123, 0.01, 0.5, 3.0, 99.0]:
        i = latency_bucket(seconds)
        assert seconds <= LATENCY_BOUNDS[i] or i == len(LATENCY_BOUNDS) - 1
        assert i == 0 or seconds > LATENCY_BOUNDS[i - 1]


def answer(counts: PhaseCounts, agree: bool, seconds: float = 0.003, error: bool = False,
           stable_seconds: float = 0.003) -> None:
    counts.answered(False, stable_seconds, False)
    counts.answered(True, seconds, error)
    if not error:
        counts.compared += 1
        counts.agreed += agree


def test_a_candidate_agreeing_10_percent_of_the_time_is_rolled_back_within_20_answers():
    rng = np.random.default_rng(0)
    for trial in range(50):
        counts = PhaseCounts()
        while counts.candidate < 300:
            answer(counts, bool(rng.random() < 0.1))
            verdict = evaluate(counts, None, T, 1.0)
            if verdict.action != "wait":
                break
        assert verdict.action == "rollback" and verdict.reason == "agreement", trial
        assert counts.candidate <= 20, (trial, counts.candidate)


def test_an_identical_candidate_is_promoted_at_the_minimum_and_not_before():
    rng = np.random.default_rng(1)
    counts = PhaseCounts()
    for n in range(1, 301):
        latency = float(rng.lognormal(np.log(0.003), 0.3))
        answer(counts, True, latency, stable_seconds=latency)
        verdict = evaluate(counts, None, T, 1.0)
        if n < 300:
            assert verdict.action == "wait", (n, verdict)
    assert verdict.action == "pass" and verdict.reason == "guards_held"
    assert {g.name: g.status for g in verdict.guards} == {"agreement": "holds", "errors": "holds",
                                                          "latency": "holds", "accuracy": "no_data"}


def test_a_candidate_that_fails_a_fifth_of_its_requests_is_rolled_back_on_errors():
    counts = PhaseCounts()
    for n in range(1, 301):
        answer(counts, True, error=n % 5 == 0)
        verdict = evaluate(counts, None, T, 1.0)
        if verdict.action != "wait":
            break
    assert verdict.action == "rollback" and verdict.reason == "errors"
    assert n < 100


def test_a_slow_candidate_is_rolled_back_but_one_slow_answer_is_not_enough():
    counts = PhaseCounts()
    for n in range(300):
        answer(counts, True, 0.05 if n == 10 else 0.003)
    assert evaluate(counts, None, T, 1.0).action == "pass"  # one 50 ms answer in 300: p99 unmoved
    counts = PhaseCounts()
    for _ in range(300):
        answer(counts, True, 0.02, stable_seconds=0.004)
    verdict = evaluate(counts, None, T, 1.0)
    assert verdict.action == "rollback" and verdict.reason == "latency"


def test_accuracy_counts_only_with_enough_labels_and_fails_on_its_bound():
    counts = PhaseCounts()
    for _ in range(300):
        answer(counts, True)
    few = Accuracy(stable=(9, 10), candidate=(2, 10))
    assert {g.name: g.status for g in evaluate(counts, few, T, 1.0).guards}["accuracy"] == "no_data"
    worse = Accuracy(stable=(190, 200), candidate=(120, 200))
    verdict = evaluate(counts, worse, T, 1.0)
    assert verdict.action == "rollback" and verdict.reason == "accuracy"
    close = Accuracy(stable=(180, 200), candidate=(175, 200))  # 2.5 points lower: not clearly worse, not within
    verdict = evaluate(counts, close, T, 1.0)
    assert verdict.action == "wait" and {g.name: g.status for g in verdict.guards}["accuracy"] == "pending"
    assert evaluate(counts, close, T, 3600.0).reason == "deadline"
    better = Accuracy(stable=(180, 200), candidate=(185, 200))
    assert evaluate(counts, better, T, 1.0).action == "pass"


def test_too_little_traffic_by_the_deadline_is_a_rollback():
    counts = PhaseCounts()
    for _ in range(20):
        answer(counts, True)
    assert evaluate(counts, None, T, 3599.0).action == "wait"
    verdict = evaluate(counts, None, T, 3600.0)
    assert verdict.action == "rollback" and verdict.reason == "deadline" and "20 of 300" in verdict.detail


def test_counts_add_up_across_processes_and_survive_json():
    a, b = PhaseCounts(), PhaseCounts()
    answer(a, True, 0.001)
    answer(b, False, 0.2)
    b.skipped = 3
    total = PhaseCounts.from_json(a.to_json())
    total.add(PhaseCounts.from_json(b.to_json()))
    assert (total.candidate, total.compared, total.agreed, total.skipped) == (2, 2, 1, 3)
    assert sum(total.candidate_latency) == 2 and sum(total.stable_latency) == 2


class _Settings:
    rollout_shadow_fraction = 0.0


def canary_router(traffic: float) -> Rollouts:
    router = Rollouts.__new__(Rollouts)
    router.settings = _Settings()
    router.active = {"digits": Active("digits", 1, 2, "canary", traffic, "p", 0.0)}
    return router


def test_the_canary_share_over_10000_keys_is_within_3_points_and_a_key_keeps_its_arm():
    router = canary_router(0.2)
    arms = [router.route("digits", f"user-{i}") for i in range(10_000)]
    share = sum(a == "2" for a in arms) / len(arms)
    assert abs(share - 0.2) <= 0.03
    assert [router.route("digits", f"user-{i}") for i in range(10_000)] == arms  # every key, the same arm again
    assert set(arms) == {"2", None}
    # The same key on the other model may land elsewhere; a larger share keeps every key the smaller one took.
    wider = canary_router(0.5)
    assert all(wider.route("digits", f"user-{i}") == "2" for i, a in enumerate(arms) if a == "2")
    assert 0 <= key_share("digits", "k") < 1 and key_share("digits", "k") != key_share("letters", "k")


def test_unkeyed_requests_split_at_random_and_shadow_never_routes():
    router = canary_router(0.3)
    picks = [router.route("digits", None) for _ in range(10_000)]
    assert abs(sum(p == "2" for p in picks) / len(picks) - 0.3) <= 0.03
    router.active["digits"].mode = "shadow"
    assert router.route("digits", "user-1") is None
    assert router.route("other", "user-1") is None
    assert math.isclose(sum(p is None for p in picks) / len(picks), 0.7, abs_tol=0.03)
