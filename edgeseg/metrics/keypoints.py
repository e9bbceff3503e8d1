"""Keypoint detection metrics: one-to-one matching by distance, localisation error in mm, precision / recall / F1.

Torch-free (numpy and scipy only). Positions are world coordinates in mm (`edgeseg.data.heatmaps.world_positions`),
so distances are physical whatever the grids of prediction and reference.

Matching, per class: predictions and reference keypoints are paired one to one, only pairs at most
`max_distance_mm` apart being allowed; among the pairings with the most pairs, the one of least total distance
(`scipy.optimize.linear_sum_assignment` on the distances, with disallowed pairs costed above any allowed
pairing). A matched prediction is a true positive, an unmatched one a false positive, an unmatched reference
keypoint a false negative (as in landmark-detection challenges that score detections within a radius).

Per case and class:
- precision = TP / predictions (undefined without predictions), recall = TP / references (undefined without
  references), f1 = 2 TP / (predictions + references) (undefined when both are 0);
- error_mm: the mean distance of the matched pairs (undefined without any), the localisation error;
- nearest_mm: the mean over reference keypoints of the distance to the nearest prediction of the class, at any
  distance (undefined without predictions or references): a localisation error that does not depend on
  `max_distance_mm`, comparable with chance.
Undefined values are None (JSON-safe) and left out of the summaries, which count what they average (`n`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from edgeseg.errors import UserError

KEYPOINT_METRICS = ("precision", "recall", "f1", "error_mm", "nearest_mm")
MEAN_CLASS = "mean"


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of N predictions to M reference keypoints of one class.

    pairs: (T, 2) indices (prediction, reference); distances_mm: (T,) their distances.
    """

    pairs: np.ndarray
    distances_mm: np.ndarray
    n_predicted: int
    n_reference: int

    @property
    def tp(self) -> int:
        return len(self.pairs)

    @property
    def fp(self) -> int:
        return self.n_predicted - self.tp

    @property
    def fn(self) -> int:
        return self.n_reference - self.tp


def _points(points: np.ndarray | Sequence[Sequence[float]], what: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, array.shape[-1] if array.ndim == 2 else 3))
    if array.ndim != 2 or not np.all(np.isfinite(array)):
        raise UserError(f"{what} keypoints must be an (N, d) array of finite coordinates, got shape {array.shape}")
    return array


def match_keypoints(predicted: np.ndarray | Sequence[Sequence[float]],
                    reference: np.ndarray | Sequence[Sequence[float]], max_distance_mm: float) -> Matching:
    """Pair predictions (N, d) with reference keypoints (M, d) one to one within max_distance_mm (module docstring)."""
    if not max_distance_mm > 0:
        raise UserError(f"max_distance_mm must be positive, got {max_distance_mm}")
    pred, ref = _points(predicted, "predicted"), _points(reference, "reference")
    empty = Matching(np.zeros((0, 2), int), np.zeros(0), len(pred), len(ref))
    if not len(pred) or not len(ref):
        return empty
    if pred.shape[1] != ref.shape[1]:
        raise UserError(f"predicted keypoints have {pred.shape[1]} coordinates, reference ones {ref.shape[1]}")
    distances = cdist(pred, ref)
    allowed = distances <= max_distance_mm
    if not allowed.any():
        return empty
    # any disallowed pair costs more than every allowed pairing together: the assignment first maximises the
    # number of allowed pairs, then minimises their total distance
    penalty = 1.0 + float(distances[allowed].sum())
    rows, cols = linear_sum_assignment(np.where(allowed, distances, penalty))
    keep = allowed[rows, cols]
    pairs = np.stack([rows[keep], cols[keep]], axis=1)
    return Matching(pairs, distances[rows[keep], cols[keep]], len(pred), len(ref))


def class_metrics(predicted: np.ndarray | Sequence[Sequence[float]], reference: np.ndarray | Sequence[Sequence[float]],
                  max_distance_mm: float) -> dict[str, Any]:
    """KEYPOINT_METRICS (None where undefined) and the counts tp, fp, fn for one class of one case."""
    pred, ref = _points(predicted, "predicted"), _points(reference, "reference")
    m = match_keypoints(pred, ref, max_distance_mm)
    nearest = float(cdist(ref, pred).min(axis=1).mean()) if len(pred) and len(ref) else None
    return {
        "precision": m.tp / m.n_predicted if m.n_predicted else None,
        "recall": m.tp / m.n_reference if m.n_reference else None,
        "f1": 2 * m.tp / (m.n_predicted + m.n_reference) if m.n_predicted + m.n_reference else None,
        "error_mm": float(m.distances_mm.mean()) if m.tp else None,
        "nearest_mm": nearest,
        "tp": m.tp, "fp": m.fp, "fn": m.fn,
        "distances_mm": [float(d) for d in m.distances_mm],
    }


def case_keypoint_metrics(predicted: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                          max_distance_mm: float) -> dict[str, dict[str, Any]]:
    """{class name: class_metrics} for one case, from world positions (N, d) per class name (every class of
    `reference`; a class missing from `predicted` has no predictions)."""
    unknown = sorted(set(predicted) - set(reference))
    if unknown:
        raise UserError(f"predicted keypoints of classes {unknown} that the reference does not list")
    return {name: class_metrics(predicted.get(name, np.zeros((0, 3))), points, max_distance_mm)
            for name, points in reference.items()}


def _stats(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """mean / std (population) over the defined values, n their count (the summary format of `edgeseg.metrics`)."""
    defined = np.asarray([v for v in values if v is not None], dtype=np.float64)
    n = int(defined.size)
    return {"mean": float(defined.mean()) if n else None, "std": float(defined.std()) if n else None,
            "n": n, "n_inf": 0}


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def summarize_keypoints(per_case: Sequence[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Summaries of `case_keypoint_metrics` results over cases.

    "summary": {class or "mean": {metric: {mean, std, n, n_inf}}} over cases, as `edgeseg.metrics.aggregate`
    formats segmentation metrics (the "mean" pseudo-class first averages each case's defined class values);
    "detection": per class and "all" classes pooled, the summed tp / fp / fn, precision, recall and f1 of the
    sums, and error_mm, the mean distance over every matched pair (each keypoint counts once);
    "score": the mean over classes of the pooled f1 (classes with neither predictions nor references left out;
    0 when none is left), the model-selection criterion of keypoint runs.
    """
    classes: list[str] = []
    for case in per_case:
        classes.extend(c for c in case if c not in classes)
    if MEAN_CLASS in classes:
        raise UserError(f"a class may not be named '{MEAN_CLASS}': that name is the summary's class average")
    summary: dict[str, Any] = {}
    for cls in classes:
        summary[cls] = {m: _stats([case[cls][m] for case in per_case if cls in case]) for m in KEYPOINT_METRICS}
    means: dict[str, list[float]] = {m: [] for m in KEYPOINT_METRICS}
    for case in per_case:
        for m in KEYPOINT_METRICS:
            values = [v[m] for v in case.values() if v[m] is not None]
            if values:
                means[m].append(float(np.mean(values)))
    summary[MEAN_CLASS] = {m: _stats(v) for m, v in means.items()}
    detection: dict[str, Any] = {}
    for cls in [*classes, "all"]:
        records = [case[c] for case in per_case for c in case if cls in ("all", c)]
        tp, fp, fn = (sum(r[k] for r in records) for k in ("tp", "fp", "fn"))
        distances = [d for r in records for d in r["distances_mm"]]
        detection[cls] = {"tp": tp, "fp": fp, "fn": fn, "precision": _ratio(tp, tp + fp),
                          "recall": _ratio(tp, tp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
                          "error_mm": float(np.mean(distances)) if distances else None}
    f1s = [detection[c]["f1"] for c in classes if detection[c]["f1"] is not None]
    return {"summary": summary, "detection": detection, "score": float(np.mean(f1s)) if f1s else 0.0}


__all__ = ["KEYPOINT_METRICS", "Matching", "case_keypoint_metrics", "class_metrics", "match_keypoints",
           "summarize_keypoints"]
