"""Input checks shared by the metric modules: two same-shape masks, a per-axis voxel spacing."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from edgeseg.errors import UserError


def mask_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as boolean arrays of one shape (any dimensionality); a shape mismatch is a user error."""
    pred_b, ref_b = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred_b.shape != ref_b.shape:
        raise UserError(f"prediction shape {pred_b.shape} does not match reference shape {ref_b.shape}")
    return pred_b, ref_b


def voxel_spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Spacing per array axis in mm: None -> 1.0 each, a number -> that for every axis, else one per axis."""
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, (int, float, np.number)):
        values = [float(spacing)] * ndim
    else:
        values = [float(s) for s in spacing]
    if len(values) != ndim:
        raise UserError(f"spacing {tuple(values)} has {len(values)} values but the masks have {ndim} axes")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise UserError(f"spacing {tuple(values)} must be positive and finite")
    return tuple(values)
