"""Keypoint detection metrics: matching, localisation error, precision / recall / F1 and their summaries.

Oracles: point sets whose distances, matchings and rates are computed by hand, and a brute-force matcher
(every partial one-to-one assignment enumerated) on random point sets.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from edgeseg.errors import UserError
from edgeseg.metrics.keypoints import (
    case_keypoint_metrics,
    class_metrics,
    match_keypoints,
    summarize_keypoints,
)


def test_hand_made_sets_give_hand_computed_errors_and_rates():
    predicted = [(0.0, 0.0, 0.0), (10.0, 0.0, 0.0), (0.0, 3.0, 0.0)]
    reference = [(0.0, 1.0, 0.0), (10.0, 4.0, 0.0)]
    # distances: p0-r0 1, p2-r0 2, p1-r1 4 (> 3.5: not allowed), the rest far
    m = class_metrics(predicted, reference, max_distance_mm=3.5)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["f1"] == pytest.approx(2 * 1 / (3 + 2))
    assert m["error_mm"] == pytest.approx(1.0)  # p0 takes r0 (1 mm beats p2's 2 mm)
    assert m["nearest_mm"] == pytest.approx((1.0 + 4.0) / 2)  # r0 -> p0 at 1, r1 -> p1 at 4 (any distance)
    # with a 5 mm radius p1-r1 counts too
    m5 = class_metrics(predicted, reference, max_distance_mm=5.0)
    assert (m5["tp"], m5["fp"], m5["fn"]) == (2, 1, 0)
    assert m5["error_mm"] == pytest.approx((1.0 + 4.0) / 2)


def test_matching_maximises_the_pairs_before_the_distance():
    # greedy nearest-first would pair B-X (0.5) and leave A alone (A-Y is 3 > 1.6): one pair
    a, b, x, y = (0.0, 0.0), (1.5, 0.0), (1.0, 0.0), (3.0, 0.0)
    m = match_keypoints([a, b], [x, y], max_distance_mm=1.6)
    assert sorted(map(tuple, m.pairs.tolist())) == [(0, 0), (1, 1)]  # A-X (1.0), B-Y (1.5)
    assert m.distances_mm.sum() == pytest.approx(2.5)
    # among pairings with equally many pairs, the least total distance
    m = match_keypoints([(0.0, 0.0), (4.0, 0.0)], [(1.0, 0.0), (3.0, 0.0)], max_distance_mm=10.0)
    assert sorted(map(tuple, m.pairs.tolist())) == [(0, 0), (1, 1)] and m.distances_mm.sum() == pytest.approx(2.0)


def test_empty_sides_leave_undefined_values_undefined():
    none = class_metrics(np.zeros((0, 3)), [(1.0, 2.0, 3.0)], 2.0)
    assert none["precision"] is None and none["recall"] == 0.0 and none["f1"] == 0.0
    assert none["error_mm"] is None and none["nearest_mm"] is None and (none["tp"], none["fn"]) == (0, 1)
    spurious = class_metrics([(1.0, 2.0, 3.0)], np.zeros((0, 3)), 2.0)
    assert spurious["precision"] == 0.0 and spurious["recall"] is None and spurious["f1"] == 0.0
    nothing = class_metrics(np.zeros((0, 3)), np.zeros((0, 3)), 2.0)
    assert nothing["f1"] is None and nothing["precision"] is None and nothing["recall"] is None


def _brute_force(pred: np.ndarray, ref: np.ndarray, radius: float) -> tuple[int, float]:
    """Most pairs within `radius`, then least total distance, over every partial one-to-one assignment."""
    best = (0, 0.0)
    for k in range(1, min(len(pred), len(ref)) + 1):
        for rows in itertools.combinations(range(len(pred)), k):
            for cols in itertools.permutations(range(len(ref)), k):
                d = [math.dist(pred[r], ref[c]) for r, c in zip(rows, cols)]
                if max(d) <= radius and (k > best[0] or (k == best[0] and sum(d) < best[1])):
                    best = (k, sum(d))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_matching_agrees_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    pred = rng.uniform(0, 6, (int(rng.integers(1, 5)), 2))
    ref = rng.uniform(0, 6, (int(rng.integers(1, 5)), 2))
    m = match_keypoints(pred, ref, max_distance_mm=2.5)
    count, total = _brute_force(pred, ref, 2.5)
    assert m.tp == count
    assert m.distances_mm.sum() == pytest.approx(total, abs=1e-9)
    assert len(set(m.pairs[:, 0])) == m.tp == len(set(m.pairs[:, 1]))  # one to one


def test_summary_over_cases_by_hand():
    case1 = case_keypoint_metrics(
        {"a": np.array([[0.0, 0.0, 0.0]]), "b": np.array([[5.0, 5.0, 0.0], [9.0, 9.0, 0.0]])},
        {"a": np.array([[0.0, 2.0, 0.0]]), "b": np.array([[5.0, 6.0, 0.0]])}, max_distance_mm=3.0)
    case2 = case_keypoint_metrics(
        {"b": np.array([[1.0, 1.0, 0.0]])},  # class a: nothing predicted
        {"a": np.array([[7.0, 7.0, 0.0]]), "b": np.array([[1.0, 4.0, 0.0]])}, max_distance_mm=3.0)
    # case 1: a tp at 2 mm; b tp at 1 mm + one fp. case 2: a fn; b tp at 3 mm (the radius is inclusive)
    out = summarize_keypoints([case1, case2])
    det = out["detection"]
    assert (det["a"]["tp"], det["a"]["fp"], det["a"]["fn"]) == (1, 0, 1)
    assert (det["b"]["tp"], det["b"]["fp"], det["b"]["fn"]) == (2, 1, 0)
    assert det["a"]["f1"] == pytest.approx(2 / 3) and det["b"]["f1"] == pytest.approx(4 / 5)
    assert det["all"]["precision"] == pytest.approx(3 / 4) and det["all"]["recall"] == pytest.approx(3 / 4)
    assert det["all"]["error_mm"] == pytest.approx((2.0 + 1.0 + 3.0) / 3)
    assert out["score"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    s = out["summary"]
    assert s["a"]["error_mm"] == {"mean": 2.0, "std": 0.0, "n": 1, "n_inf": 0}  # case 2 has no a error
    assert s["a"]["recall"]["mean"] == pytest.approx(0.5) and s["a"]["recall"]["std"] == pytest.approx(0.5)
    assert s["b"]["precision"]["mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["a"]["precision"]["n"] == 1  # undefined in case 2 (no predictions): left out, counted
    # "mean": each case's defined class values averaged first: errors (2 + 1) / 2 and 3 -> mean 2.25
    assert s["mean"]["error_mm"]["mean"] == pytest.approx((1.5 + 3.0) / 2)


def test_user_errors():
    with pytest.raises(UserError, match="positive"):
        match_keypoints([(0.0, 0.0)], [(0.0, 0.0)], 0.0)
    with pytest.raises(UserError, match="coordinates"):
        match_keypoints([(0.0, 0.0)], [(0.0, 0.0, 0.0)], 1.0)
    with pytest.raises(UserError, match="classes"):
        case_keypoint_metrics({"c": np.zeros((1, 3))}, {"a": np.zeros((1, 3))}, 1.0)
