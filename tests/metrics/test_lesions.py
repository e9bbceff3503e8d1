"""Lesion-wise detection against hand-counted layouts (connectivity, size filter, empty rule)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeseg.errors import UserError
from edgeseg.metrics import lesion_detection


def _layout():
    # ref: four 2x2 lesions A, B, D (top row) and C (bottom right).
    ref = np.zeros((12, 12), dtype=bool)
    ref[1:3, 1:3] = True  # A
    ref[1:3, 5:7] = True  # B
    ref[1:3, 9:11] = True  # D
    ref[8:10, 8:10] = True  # C, missed
    # pred: one pixel in A; one bar across B and D (one predicted lesion detecting two); one false blob.
    pred = np.zeros_like(ref)
    pred[2, 2] = True
    pred[2, 5:11] = True
    pred[6:8, 1:3] = True
    return pred, ref


def test_hand_counted_layout():
    pred, ref = _layout()
    got = lesion_detection(pred, ref)
    assert got == {
        "true_positive_lesions": 3,
        "false_positive_lesions": 1,
        "ref_lesions": 4,
        "pred_lesions": 3,
        "detection_rate": pytest.approx(3 / 4),
        "false_detection_rate": pytest.approx(1 / 3),
    }
    assert isinstance(got["ref_lesions"], int) and isinstance(got["detection_rate"], float)


def test_3d_layout():
    ref = np.zeros((6, 6, 6), dtype=bool)
    ref[0:2, 0:2, 0:2] = True
    ref[4:6, 4:6, 4:6] = True
    pred = np.zeros_like(ref)
    pred[1, 1, 1] = True
    got = lesion_detection(pred, ref)
    assert (got["true_positive_lesions"], got["false_positive_lesions"]) == (1, 0)
    assert (got["ref_lesions"], got["pred_lesions"]) == (2, 1)
    assert got["detection_rate"] == pytest.approx(0.5)
    assert got["false_detection_rate"] == 0.0


def test_connectivity_decides_whether_diagonal_voxels_are_one_lesion():
    ref = np.zeros((4, 4, 4), dtype=bool)
    ref[1, 1, 1] = ref[2, 2, 2] = True  # touching at a corner only
    pred = np.zeros_like(ref)
    pred[1, 1, 1] = True
    full = lesion_detection(pred, ref)  # default: full connectivity (26)
    assert full["ref_lesions"] == 1 and full["detection_rate"] == 1.0
    faces = lesion_detection(pred, ref, connectivity=1)
    assert faces["ref_lesions"] == 2 and faces["detection_rate"] == pytest.approx(0.5)
    edges = lesion_detection(pred, ref, connectivity=2)  # 18-neighbourhood: corners still apart
    assert edges["ref_lesions"] == 2


def test_min_volume_uses_spacing():
    ref = np.zeros((8, 8), dtype=bool)
    ref[0, 0] = True  # 1 pixel = 4 mm^2 at spacing (2, 2)
    ref[4:6, 4:6] = True  # 4 pixels = 16 mm^2
    pred = np.zeros_like(ref)
    pred[0, 0] = True  # detects the small one only
    pred[7, 0] = True  # a 1-pixel false positive
    assert lesion_detection(pred, ref)["ref_lesions"] == 2
    got = lesion_detection(pred, ref, spacing=(2.0, 2.0), min_volume_mm3=8.0)
    # small lesions of both masks are dropped: one ref lesion left, undetected; no predicted lesion left
    assert got["ref_lesions"] == 1 and got["pred_lesions"] == 0
    assert got["true_positive_lesions"] == 0 and got["false_positive_lesions"] == 0
    assert got["detection_rate"] == 0.0 and got["false_detection_rate"] == 0.0
    # at 1 mm spacing (default) the same threshold drops the 4-pixel lesion too
    assert lesion_detection(pred, ref, min_volume_mm3=8.0)["ref_lesions"] == 0


def test_empty_rule():
    empty = np.zeros((5, 5), dtype=bool)
    some = empty.copy()
    some[2, 2] = True
    both = lesion_detection(empty, empty)
    assert both["detection_rate"] == 1.0 and both["false_detection_rate"] == 0.0
    only_pred = lesion_detection(some, empty)
    assert only_pred["detection_rate"] == 0.0 and only_pred["false_detection_rate"] == 1.0
    only_ref = lesion_detection(empty, some)
    assert only_ref["detection_rate"] == 0.0 and only_ref["false_detection_rate"] == 0.0


def test_shape_mismatch_is_user_error():
    with pytest.raises(UserError):
        lesion_detection(np.zeros((3, 3), bool), np.zeros((3, 4), bool))
