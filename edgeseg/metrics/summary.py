"""Per-case metrics of integer label maps, and their summary over cases.

`case_metrics` scores each class of a label map as a binary mask with `overlap` and `surface`;
`aggregate` turns a list of those into mean / std / n / n_inf per class and metric, plus a "mean"
pseudo-class (the per-case average over classes).

Infinite values (HD95 / ASSD when exactly one of prediction and reference is empty) are counted in
`n_inf` and left out of mean and std, which are over the `n` finite values; a reader must see `n_inf`
next to the mean. mean and std are None when no value is finite (JSON-safe, unlike NaN). std is the
population standard deviation (ddof=0), defined for n = 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from edgeseg.errors import UserError
from edgeseg.metrics._inputs import voxel_spacing
from edgeseg.metrics.overlap import (
    absolute_volume_error_mm3,
    dice,
    iou,
    precision,
    recall,
    specificity,
    volume_similarity,
)
from edgeseg.metrics.surface import assd_from_distances, hd95_from_distances, surface_distances

METRICS = (
    "dice",
    "iou",
    "precision",
    "recall",
    "specificity",
    "volume_similarity",
    "abs_volume_error_mm3",
    "hd95",
    "assd",
)
MEAN_CLASS = "mean"


def _check_labels(labels: np.ndarray, n_classes: int, what: str) -> None:
    """Every label must index `class_names` (a stray label is usually a wrong class list or file)."""
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        bad = sorted(set(np.unique(labels).tolist()) - set(range(n_classes)))
        raise UserError(f"{what} label map holds label(s) {bad} but only {n_classes} class names are given")


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """All of METRICS for one binary mask pair. Shape: pred, ref (*S) bool; spacing one value per axis."""
    pred_to_ref, ref_to_pred = surface_distances(pred, ref, spacing)
    return {
        "dice": dice(pred, ref),
        "iou": iou(pred, ref),
        "precision": precision(pred, ref),
        "recall": recall(pred, ref),
        "specificity": specificity(pred, ref),
        "volume_similarity": volume_similarity(pred, ref),
        "abs_volume_error_mm3": absolute_volume_error_mm3(pred, ref, math.prod(spacing)),
        "hd95": hd95_from_distances(pred_to_ref, ref_to_pred),
        "assd": assd_from_distances(pred_to_ref, ref_to_pred),
    }


def case_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing: float | Sequence[float] | None,
    class_names: Sequence[str],
    include_background: bool = False,
) -> dict[str, dict[str, float]]:
    """{class name: {metric: value}} for one case; label i is class_names[i], 0 is the background.

    The background (class 0) is scored only with include_background=True. Values follow the empty rules
    of `overlap` and `surface` (HD95 / ASSD may be inf).
    Shape: pred_labels, ref_labels (*S) integer, the same S; spacing in mm, one value per axis of S.
    """
    pred_labels, ref_labels = np.asarray(pred_labels), np.asarray(ref_labels)
    if pred_labels.shape != ref_labels.shape:
        raise UserError(
            f"prediction shape {pred_labels.shape} does not match reference shape {ref_labels.shape}"
        )
    sampling = voxel_spacing(spacing, ref_labels.ndim)
    _check_labels(ref_labels, len(class_names), "reference")
    _check_labels(pred_labels, len(class_names), "predicted")
    first = 0 if include_background else 1
    return {
        class_names[i]: binary_metrics(pred_labels == i, ref_labels == i, sampling)
        for i in range(first, len(class_names))
    }


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    """mean / std over the finite values, n = their count, n_inf = count of +-inf (NaN is a bug here)."""
    arr = np.asarray(values, dtype=np.float64)
    if np.isnan(arr).any():
        raise ValueError("metric values must not be NaN (the metric functions never return NaN)")
    finite = arr[np.isfinite(arr)]
    n = int(finite.size)
    return {
        "mean": float(finite.mean()) if n else None,
        "std": float(finite.std()) if n else None,
        "n": n,
        "n_inf": int(arr.size - n),
    }


def aggregate(
    per_case: Sequence[dict[str, dict[str, float]]],
    mean_over: Sequence[str] | None = None,
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """{class name or "mean": {metric: {"mean", "std", "n", "n_inf"}}} over cases (`case_metrics` outputs).

    The "mean" pseudo-class first averages each metric over the classes `mean_over` within each case (None:
    every class in the per-case dicts, i.e. the foreground classes when `case_metrics` ran with its default
    include_background=False), then summarises those per-case values like a class. A case where one class
    has an infinite HD95 therefore has an infinite mean HD95, counted in n_inf.
    """
    classes: list[str] = []
    for case in per_case:
        classes.extend(c for c in case if c not in classes)
    averaged = list(classes if mean_over is None else mean_over)
    if MEAN_CLASS in classes:
        raise UserError(f"a class may not be named '{MEAN_CLASS}': that name is the summary's class average")
    summary: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for cls in classes:
        metrics = [m for m in METRICS if any(m in case.get(cls, {}) for case in per_case)]
        summary[cls] = {
            m: _stats([case[cls][m] for case in per_case if m in case.get(cls, {})]) for m in metrics
        }
    means: dict[str, list[float]] = {m: [] for m in METRICS}
    for case in per_case:
        for m in METRICS:
            values = [case[c][m] for c in averaged if m in case.get(c, {})]
            if values:
                means[m].append(float(np.mean(values)))
    summary[MEAN_CLASS] = {m: _stats(v) for m, v in means.items() if v}
    return summary
