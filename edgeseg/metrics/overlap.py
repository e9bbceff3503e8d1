"""Voxel-overlap metrics of a predicted and a reference binary mask.

Every function takes two boolean arrays of one shape (2D or 3D, any dimensionality) and returns a Python
float. So that no metric is ever NaN (NaNs silently vanish from averages), the 0/0 cases follow one rule:

- both masks empty: perfect agreement on absence -> dice = iou = precision = recall = volume_similarity = 1.0
  (and abs volume error 0.0);
- exactly one mask empty -> dice = iou = precision = recall = volume_similarity = 0.0. Precision of an empty
  prediction and recall against an empty reference are 0/0 there; they take 0.0 because the case is a
  complete miss (a structure missed entirely, or one predicted where there is none);
- specificity against an all-foreground reference (no negatives, 0/0) is 1.0: no false positive was possible.

Shape: pred, ref (*S) bool, the same S.
"""

from __future__ import annotations

import numpy as np

from edgeseg.metrics._inputs import mask_pair


def _counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) voxel counts as Python ints (no overflow, exact ratios)."""
    pred, ref = mask_pair(pred, ref)
    tp = int(np.count_nonzero(pred & ref))
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    fp, fn = n_pred - tp, n_ref - tp
    return tp, fp, fn, pred.size - tp - fp - fn


def _ratio(num: int, den: int, both_empty: bool) -> float:
    """num / den, with 0/0 -> 1.0 when both masks are empty and 0.0 otherwise (the module's empty rule)."""
    if den == 0:
        return 1.0 if both_empty else 0.0
    return num / den


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice = 2 |P & R| / (|P| + |R|); 1.0 when both are empty."""
    tp, fp, fn, _ = _counts(pred, ref)
    return _ratio(2 * tp, 2 * tp + fp + fn, both_empty=tp + fp + fn == 0)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union (Jaccard) = |P & R| / |P | R|; 1.0 when both are empty."""
    tp, fp, fn, _ = _counts(pred, ref)
    return _ratio(tp, tp + fp + fn, both_empty=tp + fp + fn == 0)


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """Precision (positive predictive value) = |P & R| / |P|; empty P: 1.0 if R is empty too, else 0.0."""
    tp, fp, fn, _ = _counts(pred, ref)
    return _ratio(tp, tp + fp, both_empty=tp + fp + fn == 0)


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
    """Recall (sensitivity) = |P & R| / |R|; empty R: 1.0 if P is empty too, else 0.0."""
    tp, fp, fn, _ = _counts(pred, ref)
    return _ratio(tp, tp + fn, both_empty=tp + fp + fn == 0)


def specificity(pred: np.ndarray, ref: np.ndarray) -> float:
    """Specificity = |~P & ~R| / |~R|; 1.0 when R covers the whole array (no false positive possible)."""
    _, fp, _, tn = _counts(pred, ref)
    return _ratio(tn, tn + fp, both_empty=True)


def volume_similarity(pred: np.ndarray, ref: np.ndarray) -> float:
    """Volume similarity = 1 - | |P| - |R| | / (|P| + |R|), in [0, 1]; 1.0 when both are empty.

    It compares sizes only (a mask shifted away entirely still scores 1.0); read it next to Dice.
    """
    tp, fp, fn, _ = _counts(pred, ref)
    n_pred, n_ref = tp + fp, tp + fn
    if n_pred + n_ref == 0:
        return 1.0
    return 1.0 - abs(n_pred - n_ref) / (n_pred + n_ref)


def absolute_volume_error_mm3(pred: np.ndarray, ref: np.ndarray, voxel_volume_mm3: float) -> float:
    """| |P| - |R| | * voxel volume, in mm^3 (0.0 when both are empty)."""
    _, fp, fn, _ = _counts(pred, ref)
    return abs(fp - fn) * float(voxel_volume_mm3)
