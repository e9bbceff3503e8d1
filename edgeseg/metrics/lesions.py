"""Lesion-wise detection: count connected components of the reference that the prediction hits.

A lesion is a connected component (`scipy.ndimage.label`). A reference lesion is detected (true positive)
if any of its voxels is predicted; a predicted lesion is a false positive if none of its voxels is in the
reference. One predicted blob covering two reference lesions detects both.

Empty rule (as `overlap.recall` / `overlap.precision`, so that no rate is NaN): detection_rate with no
reference lesion is 1.0 if nothing was predicted either, else 0.0; false_detection_rate with no predicted
lesion is 0.0 (no false detection among none).

Shape: pred, ref (*S) bool, the same S.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from edgeseg.metrics._inputs import mask_pair, voxel_spacing


def _lesions(mask: np.ndarray, structure: np.ndarray, min_voxels: float) -> tuple[np.ndarray, int]:
    """Label the components of `mask`, dropping those with fewer than `min_voxels` voxels.

    Shape: mask (*S) bool -> labels (*S) int (0 = none), count.
    """
    labels, n = ndimage.label(mask, structure=structure)
    if min_voxels > 1 and n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_voxels
        keep[0] = False
        new_ids = np.where(keep, np.cumsum(keep), 0)
        labels, n = new_ids[labels], int(keep.sum())
    return labels, n


def lesion_detection(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: float | Sequence[float] | None = None,
    connectivity: int | None = None,
    min_volume_mm3: float = 0.0,
) -> dict[str, float | int]:
    """Lesion counts and rates of a prediction against a reference.

    connectivity: 1 (face neighbours) up to ndim; None = ndim (full: 26 in 3D, 8 in 2D, as in the BraTS
    lesion-wise evaluation). min_volume_mm3: components of either mask smaller than this (voxel volume from
    `spacing`, 1 mm^3 when None) are ignored, in both the counts and the overlap test.
    Returns true_positive_lesions, false_positive_lesions, ref_lesions, pred_lesions (ints),
    detection_rate = TP / ref_lesions and false_detection_rate = FP / pred_lesions (floats).
    """
    pred, ref = mask_pair(pred, ref)
    structure = ndimage.generate_binary_structure(
        pred.ndim, pred.ndim if connectivity is None else connectivity
    )
    min_voxels = float(min_volume_mm3) / math.prod(voxel_spacing(spacing, pred.ndim))
    ref_labels, n_ref = _lesions(ref, structure, min_voxels)
    pred_labels, n_pred = _lesions(pred, structure, min_voxels)
    hit_ref = np.unique(ref_labels[pred_labels > 0])
    hit_pred = np.unique(pred_labels[ref_labels > 0])
    true_pos = int(np.count_nonzero(hit_ref))
    false_pos = n_pred - int(np.count_nonzero(hit_pred))
    if n_ref:
        detection_rate = true_pos / n_ref
    else:
        detection_rate = 1.0 if n_pred == 0 else 0.0
    return {
        "true_positive_lesions": true_pos,
        "false_positive_lesions": false_pos,
        "ref_lesions": n_ref,
        "pred_lesions": n_pred,
        "detection_rate": float(detection_rate),
        "false_detection_rate": false_pos / n_pred if n_pred else 0.0,
    }
