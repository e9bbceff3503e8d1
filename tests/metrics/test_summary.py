"""case_metrics on label maps (MONAI 1.6.1 as the oracle, plus hand-computed values), aggregate's
mean / std / n / n_inf against hand arithmetic, and the torch-free import of edgeseg.metrics.

Tolerances: 1e-6 for Dice / IoU against MONAI (float32), 1e-4 mm for distances, 1e-12 for hand values.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from edgeseg.errors import UserError
from edgeseg.metrics import METRICS, aggregate, case_metrics

NAMES = ["background", "liver", "tumour"]
# MONAI 1.6 warns about an argument that its own get_mask_edges passes internally
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")


def _label_pair(blob_pair, shape, seed):
    """(pred, ref) integer label maps with classes 0, 1, 2 built from two independent blob pairs."""
    p1, r1 = blob_pair(shape, seed)
    p2, r2 = blob_pair(shape, seed + 100, fill=0.2)
    pred = np.where(p1, 1, np.where(p2, 2, 0)).astype(np.uint8)
    ref = np.where(r1, 1, np.where(r2, 2, 0)).astype(np.int64)
    return pred, ref


@pytest.mark.parametrize(("shape", "spacing"), [((40, 36), (0.7, 1.3)), ((20, 18, 14), (0.9, 1.0, 2.5))])
def test_case_metrics_against_monai(blob_pair, shape, spacing):
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    pred, ref = _label_pair(blob_pair, shape, seed=3)
    got = case_metrics(pred, ref, spacing, NAMES)
    assert list(got) == ["liver", "tumour"]
    assert all(list(m) == list(METRICS) for m in got.values())

    def one_hot(labels):
        return (
            torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), 3)
            .movedim(-1, 0)[None]
            .float()
        )

    yp, yt = one_hot(pred), one_hot(ref)
    dice = monai_metrics.compute_dice(yp, yt, include_background=False, ignore_empty=False)[0]
    iou = monai_metrics.compute_iou(yp, yt, include_background=False, ignore_empty=False)[0]
    hd = monai_metrics.compute_hausdorff_distance(yp, yt, percentile=95, spacing=list(spacing))[0]
    asd = monai_metrics.compute_average_surface_distance(yp, yt, symmetric=True, spacing=list(spacing))[0]
    for c, name in enumerate(["liver", "tumour"]):
        assert got[name]["dice"] == pytest.approx(dice[c].item(), abs=1e-6)
        assert got[name]["iou"] == pytest.approx(iou[c].item(), abs=1e-6)
        assert got[name]["hd95"] == pytest.approx(hd[c].item(), abs=1e-4)
        assert got[name]["assd"] == pytest.approx(asd[c].item(), abs=1e-4)
    with_bg = case_metrics(pred, ref, spacing, NAMES, include_background=True)
    assert list(with_bg) == NAMES
    bg_dice = monai_metrics.compute_dice(yp, yt, include_background=True, ignore_empty=False)[0, 0].item()
    assert with_bg["background"]["dice"] == pytest.approx(bg_dice, abs=1e-6)


def test_case_metrics_hand_computed_and_missing_class():
    ref = np.zeros((4, 6), dtype=np.int16)
    ref[0:2, 0:2] = 1  # 4 voxels of class 1
    ref[3, 5] = 2  # 1 voxel of class 2, which the prediction misses
    pred = np.zeros_like(ref)
    pred[0:2, 0:3] = 1  # 6 voxels: 4 right, 2 too many
    got = case_metrics(pred, ref, (0.5, 2.0), NAMES)  # 1 mm^2 per voxel
    liver, tumour = got["liver"], got["tumour"]
    assert liver["dice"] == pytest.approx(8 / 10, abs=1e-12)
    assert liver["iou"] == pytest.approx(4 / 6, abs=1e-12)
    assert liver["precision"] == pytest.approx(4 / 6, abs=1e-12)
    assert liver["recall"] == 1.0
    assert liver["specificity"] == pytest.approx(18 / 20, abs=1e-12)
    assert liver["volume_similarity"] == pytest.approx(1 - 2 / 10, abs=1e-12)
    assert liver["abs_volume_error_mm3"] == pytest.approx(2.0, abs=1e-12)
    # every pixel of both 2-row blocks is surface; pred's extra column 2 lies one column (2 mm) from ref's
    # column 1, all else coincides: pred -> ref [0, 0, 0, 0, 2, 2], ref -> pred [0, 0, 0, 0]
    assert liver["hd95"] == pytest.approx(2.0, abs=1e-12)
    assert liver["assd"] == pytest.approx(4 / 10, abs=1e-12)
    assert tumour["dice"] == 0.0 and tumour["recall"] == 0.0
    assert tumour["hd95"] == math.inf and tumour["assd"] == math.inf
    assert tumour["abs_volume_error_mm3"] == pytest.approx(1.0, abs=1e-12)


def test_case_metrics_user_errors():
    ref = np.zeros((4, 4), dtype=np.int64)
    with pytest.raises(UserError, match="shape"):
        case_metrics(np.zeros((4, 5), np.int64), ref, (1.0, 1.0), NAMES)
    with pytest.raises(UserError, match=r"label\(s\) \[3\]"):
        case_metrics(ref, np.full((4, 4), 3), (1.0, 1.0), NAMES)
    with pytest.raises(UserError, match="spacing"):
        case_metrics(ref, ref, (1.0, 1.0, 1.0), NAMES)


def _case(a_dice, a_hd, b_dice, b_hd):
    return {"a": {"dice": a_dice, "hd95": a_hd}, "b": {"dice": b_dice, "hd95": b_hd}}


def test_aggregate_hand_computed_with_inf():
    per_case = [_case(0.8, 2.0, 0.0, math.inf), _case(0.6, 4.0, 0.5, 3.0), _case(1.0, 0.0, 1.0, 1.0)]
    summary = aggregate(per_case)
    assert list(summary) == ["a", "b", "mean"]
    a_dice = summary["a"]["dice"]
    assert a_dice["mean"] == pytest.approx(0.8, abs=1e-12)
    assert a_dice["std"] == pytest.approx(math.sqrt((0.0 + 0.04 + 0.04) / 3), abs=1e-12)
    assert (a_dice["n"], a_dice["n_inf"]) == (3, 0)
    b_hd = summary["b"]["hd95"]  # inf counted, not averaged
    assert b_hd["mean"] == pytest.approx(2.0, abs=1e-12)
    assert b_hd["std"] == pytest.approx(1.0, abs=1e-12)
    assert (b_hd["n"], b_hd["n_inf"]) == (2, 1)
    # "mean": per-case average over a and b, then over cases
    mean_dice = summary["mean"]["dice"]
    assert mean_dice["mean"] == pytest.approx((0.4 + 0.55 + 1.0) / 3, abs=1e-12)
    assert (mean_dice["n"], mean_dice["n_inf"]) == (3, 0)
    mean_hd = summary["mean"]["hd95"]  # case 1 has an infinite class -> infinite mean
    assert mean_hd["mean"] == pytest.approx((3.5 + 0.5) / 2, abs=1e-12)
    assert (mean_hd["n"], mean_hd["n_inf"]) == (2, 1)
    json.dumps(summary, allow_nan=False)  # no NaN / inf leaks into the summary


def test_aggregate_all_inf_and_mean_over():
    per_case = [_case(0.5, math.inf, 0.9, 1.0), _case(0.7, math.inf, 0.7, 3.0)]
    summary = aggregate(per_case, mean_over=["b"])
    assert summary["a"]["hd95"] == {"mean": None, "std": None, "n": 0, "n_inf": 2}
    assert summary["mean"]["dice"]["mean"] == pytest.approx(0.8, abs=1e-12)
    assert summary["mean"]["hd95"]["mean"] == pytest.approx(2.0, abs=1e-12)
    json.dumps(summary, allow_nan=False)


def test_aggregate_of_case_metrics_keeps_every_metric(blob_pair):
    pred, ref = _label_pair(blob_pair, (24, 20), seed=7)
    summary = aggregate([case_metrics(pred, ref, (1.0, 1.0), NAMES)] * 2)
    assert list(summary) == ["liver", "tumour", "mean"]
    assert all(list(m) == list(METRICS) for m in summary.values())
    assert summary["liver"]["dice"]["n"] == 2 and summary["liver"]["dice"]["std"] == 0.0


def test_aggregate_rejects_nan_and_reserved_name():
    with pytest.raises(ValueError, match="NaN"):
        aggregate([{"a": {"dice": math.nan}}])
    with pytest.raises(UserError, match="mean"):
        aggregate([{"mean": {"dice": 1.0}}])


def test_import_is_torch_free():
    code = "import sys, edgeseg.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
