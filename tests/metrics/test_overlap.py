"""Overlap metrics: hand-computed cubes, the empty-mask rule, and MONAI 1.6.1 as an oracle on random blobs.

Tolerances: hand-computed values are exact ratios (1e-12); MONAI works in float32, so 1e-6 against it.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeseg.errors import UserError
from edgeseg.metrics import (
    absolute_volume_error_mm3,
    dice,
    iou,
    precision,
    recall,
    specificity,
    volume_similarity,
)

EXACT = 1e-12
MONAI_TOL = 1e-6


def _cube(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def test_two_shifted_cubes_hand_computed():
    # A = 4x4x4 at x in [0,4), B = the same cube moved 2 voxels along x: overlap 2x4x4 = 32 of 64 each.
    shape = (8, 8, 8)  # 512 voxels
    a = _cube(shape, (0, 0, 0), (4, 4, 4))
    b = _cube(shape, (2, 0, 0), (6, 4, 4))
    assert dice(a, b) == pytest.approx(2 * 32 / 128, abs=EXACT)
    assert iou(a, b) == pytest.approx(32 / 96, abs=EXACT)
    assert precision(a, b) == pytest.approx(32 / 64, abs=EXACT)
    assert recall(a, b) == pytest.approx(32 / 64, abs=EXACT)
    # negatives of B: 512 - 64 = 448, of which A covers 32 (false positives) -> TN = 416
    assert specificity(a, b) == pytest.approx(416 / 448, abs=EXACT)
    assert volume_similarity(a, b) == pytest.approx(1.0, abs=EXACT)
    assert absolute_volume_error_mm3(a, b, voxel_volume_mm3=2.5) == pytest.approx(0.0, abs=EXACT)


def test_nested_cubes_volume_metrics_hand_computed():
    # pred = 4x4x4 (64), ref = its half 2x4x4 (32) inside it
    shape = (6, 6, 6)
    pred = _cube(shape, (0, 0, 0), (4, 4, 4))
    ref = _cube(shape, (0, 0, 0), (2, 4, 4))
    assert dice(pred, ref) == pytest.approx(64 / 96, abs=EXACT)
    assert precision(pred, ref) == pytest.approx(0.5, abs=EXACT)
    assert recall(pred, ref) == pytest.approx(1.0, abs=EXACT)
    assert volume_similarity(pred, ref) == pytest.approx(1 - 32 / 96, abs=EXACT)
    # spacing (0.5, 1, 5) -> 2.5 mm^3 per voxel; 32 voxels too many
    assert absolute_volume_error_mm3(pred, ref, voxel_volume_mm3=2.5) == pytest.approx(80.0, abs=EXACT)
    assert absolute_volume_error_mm3(ref, pred, voxel_volume_mm3=2.5) == pytest.approx(80.0, abs=EXACT)


def test_2d_masks_work():
    pred = np.array([[1, 1, 0], [0, 0, 0]], dtype=bool)
    ref = np.array([[1, 0, 0], [1, 0, 0]], dtype=bool)
    assert dice(pred, ref) == pytest.approx(0.5, abs=EXACT)
    assert iou(pred, ref) == pytest.approx(1 / 3, abs=EXACT)
    assert specificity(pred, ref) == pytest.approx(3 / 4, abs=EXACT)


@pytest.mark.parametrize("fn", [dice, iou, precision, recall, volume_similarity])
def test_empty_rule_both_empty_is_one_and_one_empty_is_zero(fn):
    empty = np.zeros((3, 4, 5), dtype=bool)
    some = empty.copy()
    some[1, 2, 3] = True
    assert fn(empty, empty) == 1.0
    assert fn(some, empty) == 0.0
    assert fn(empty, some) == 0.0


def test_empty_rule_specificity_and_volume_error():
    empty = np.zeros((4, 4), dtype=bool)
    full = np.ones((4, 4), dtype=bool)
    assert specificity(empty, empty) == 1.0
    assert specificity(full, empty) == 0.0
    # all-foreground reference: no negatives, so no false positive was possible -> 1.0, not NaN
    assert specificity(empty, full) == 1.0
    assert specificity(full, full) == 1.0
    assert absolute_volume_error_mm3(empty, empty, 3.0) == 0.0
    assert absolute_volume_error_mm3(full, empty, 3.0) == pytest.approx(48.0, abs=EXACT)


def test_shape_mismatch_is_user_error():
    with pytest.raises(UserError, match="shape"):
        dice(np.zeros((3, 4), bool), np.zeros((4, 3), bool))


@pytest.mark.parametrize("shape", [(48, 40), (22, 20, 16)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_monai(blob_pair, shape, seed):
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    pred, ref = blob_pair(shape, seed)
    yp = torch.from_numpy(pred[None, None].astype(np.float32))
    yt = torch.from_numpy(ref[None, None].astype(np.float32))
    want_dice = monai_metrics.compute_dice(yp, yt, include_background=True, ignore_empty=False).item()
    want_iou = monai_metrics.compute_iou(yp, yt, include_background=True, ignore_empty=False).item()
    assert dice(pred, ref) == pytest.approx(want_dice, abs=MONAI_TOL)
    assert iou(pred, ref) == pytest.approx(want_iou, abs=MONAI_TOL)
    confusion = monai_metrics.get_confusion_matrix(yp, yt, include_background=True)
    for name, fn in (("precision", precision), ("recall", recall), ("specificity", specificity)):
        want = monai_metrics.compute_confusion_matrix_metric(name, confusion).item()
        assert fn(pred, ref) == pytest.approx(want, abs=MONAI_TOL), name
