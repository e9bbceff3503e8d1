"""Surface distances: hand-computed shifts with anisotropic spacing, the empty rule, and MONAI 1.6.1
(`get_mask_edges`, `compute_hausdorff_distance(percentile=95)`, `compute_average_surface_distance(
symmetric=True)`) as an oracle on seeded random blobs in 2D and 3D.

Tolerances: hand-computed distances 1e-9 mm; against MONAI (float32 distances) 1e-4 mm.
MONAI returns NaN when both masks are empty where we return 0.0, so that case is checked by hand only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeseg.errors import UserError
from edgeseg.metrics import assd, hd95, surface, surface_distances

EXACT = 1e-9
MONAI_TOL = 1e-4
# MONAI 1.6 warns about an argument that its own get_mask_edges passes internally
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")


def _box(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def test_square_shifted_one_pixel_hand_computed():
    # ref: 4x4 square rows 2..5; pred: the same moved one row down (rows 3..6); row spacing 2 mm, column 1 mm.
    # Each boundary has 12 pixels. pred -> ref: top row of pred (row 3): corners on ref's side edges (0),
    # middle two 1 mm sideways from ref's side edges; rows 4,5 edges lie on ref's side edges (0);
    # bottom row (row 6) is 2 mm below ref's bottom row. ref -> pred mirrors this.
    ref = _box((10, 10), (2, 2), (6, 6))
    pred = _box((10, 10), (3, 2), (7, 6))
    d_pr, d_rp = surface_distances(pred, ref, spacing=(2.0, 1.0))
    expected = [0.0] * 6 + [1.0] * 2 + [2.0] * 4
    np.testing.assert_allclose(np.sort(d_pr), expected, atol=EXACT)
    np.testing.assert_allclose(np.sort(d_rp), expected, atol=EXACT)
    assert hd95(pred, ref, spacing=(2.0, 1.0)) == pytest.approx(2.0, abs=EXACT)
    assert assd(pred, ref, spacing=(2.0, 1.0)) == pytest.approx(2 * (2 * 1 + 4 * 2) / 24, abs=EXACT)
    # the same shift measured along a 1 mm axis
    assert hd95(pred, ref, spacing=(1.0, 1.0)) == pytest.approx(1.0, abs=EXACT)


@pytest.mark.parametrize(("axis", "want"), [(2, 2.0), (0, 1.0)])
def test_cube_shifted_one_voxel_spacing_1_1_2(axis, want):
    # 4x4x4 cube moved one voxel along `axis`; spacing (1, 1, 2): HD95 is the voxel size along the shift,
    # since a whole face (16 of 56 surface voxels, > 5%) moves by exactly one voxel.
    ref = _box((10, 10, 10), (3, 3, 3), (7, 7, 7))
    lo, hi = [3, 3, 3], [7, 7, 7]
    lo[axis] += 1
    hi[axis] += 1
    pred = _box((10, 10, 10), lo, hi)
    assert hd95(pred, ref, spacing=(1.0, 1.0, 2.0)) == pytest.approx(want, abs=EXACT)
    assert hd95(ref, pred, spacing=(1.0, 1.0, 2.0)) == pytest.approx(want, abs=EXACT)


def test_hd95_is_max_of_directed_percentiles_not_pooled():
    # ref: one voxel; pred: that voxel and one 2 voxels further along the 2 mm axis.
    # pred -> ref = [0, 4], ref -> pred = [0]. Directed 95th percentiles (linear): 0 + 0.95 * 4 = 3.8 and 0,
    # so HD95 = 3.8 (the pooled [0, 0, 4] would give 3.6). ASSD pools: (0 + 4 + 0) / 3.
    ref = np.zeros((5, 5, 7), dtype=bool)
    ref[2, 2, 2] = True
    pred = ref.copy()
    pred[2, 2, 4] = True
    assert hd95(pred, ref, spacing=(1.0, 1.0, 2.0)) == pytest.approx(3.8, abs=EXACT)
    assert assd(pred, ref, spacing=(1.0, 1.0, 2.0)) == pytest.approx(4 / 3, abs=EXACT)


def test_identical_masks_are_zero():
    mask = _box((8, 9, 10), (1, 2, 3), (5, 7, 6))
    assert hd95(mask, mask, spacing=(0.7, 1.1, 3.0)) == 0.0
    assert assd(mask, mask, spacing=(0.7, 1.1, 3.0)) == 0.0


def test_empty_rule():
    empty = np.zeros((6, 6, 6), dtype=bool)
    some = _box((6, 6, 6), (1, 1, 1), (3, 3, 3))
    assert hd95(empty, empty, spacing=(1, 1, 2)) == 0.0
    assert assd(empty, empty, spacing=(1, 1, 2)) == 0.0
    for pred, ref in ((some, empty), (empty, some)):
        assert hd95(pred, ref, spacing=(1, 1, 2)) == math.inf
        assert assd(pred, ref, spacing=(1, 1, 2)) == math.inf


def test_surface_connectivity_hand_computed():
    # a plus sign: with face connectivity its centre is interior (4 surface pixels of 5);
    # with full connectivity the missing diagonals make the centre surface too.
    plus = np.zeros((5, 5), dtype=bool)
    plus[2, 1:4] = True
    plus[1:4, 2] = True
    assert surface(plus).sum() == 4
    assert not surface(plus)[2, 2]
    assert surface(plus, connectivity=2).sum() == 5
    # a block touching the array border keeps its border voxels as surface
    block = np.ones((4, 4, 4), dtype=bool)
    assert surface(block).sum() == 64 - 8


def test_cropping_does_not_change_distances(blob_pair):
    # padding both masks with background must not change anything (the code crops to the union box)
    pred, ref = blob_pair((24, 20, 12), seed=5)
    padded = [np.pad(m, ((3, 1), (0, 4), (2, 2))) for m in (pred, ref)]
    spacing = (0.8, 1.2, 2.5)
    assert hd95(*padded, spacing=spacing) == pytest.approx(hd95(pred, ref, spacing=spacing), abs=EXACT)
    assert assd(*padded, spacing=spacing) == pytest.approx(assd(pred, ref, spacing=spacing), abs=EXACT)


def test_bad_spacing_is_user_error():
    mask = np.ones((3, 3), dtype=bool)
    with pytest.raises(UserError, match="spacing"):
        hd95(mask, mask, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(UserError, match="spacing"):
        assd(mask, mask, spacing=(1.0, 0.0))


@pytest.mark.parametrize(
    ("shape", "seed"), [((44, 40), 0), ((44, 40), 1), ((20, 18, 14), 0), ((20, 18, 14), 1)]
)
def test_surface_matches_monai_edges(blob_pair, shape, seed):
    monai_utils = pytest.importorskip("monai.metrics.utils")
    pred, ref = blob_pair(shape, seed, fill=0.45)  # big blobs: some touch the array border
    edges_pred, edges_ref = monai_utils.get_mask_edges(pred, ref, crop=False)
    np.testing.assert_array_equal(surface(pred), edges_pred)
    np.testing.assert_array_equal(surface(ref), edges_ref)


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [
        ((48, 40), (1.0, 1.0)),
        ((48, 40), (0.6, 1.7)),
        ((22, 20, 16), (1.0, 1.0, 1.0)),
        ((22, 20, 16), (0.8, 1.1, 2.5)),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_and_assd_against_monai(blob_pair, shape, spacing, seed):
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    pred, ref = blob_pair(shape, seed)
    yp = torch.from_numpy(pred[None, None].astype(np.float32))
    yt = torch.from_numpy(ref[None, None].astype(np.float32))
    want_hd95 = monai_metrics.compute_hausdorff_distance(
        yp, yt, include_background=True, percentile=95, spacing=list(spacing)
    ).item()
    want_assd = monai_metrics.compute_average_surface_distance(
        yp, yt, include_background=True, symmetric=True, spacing=list(spacing)
    ).item()
    assert want_hd95 > 0 and want_assd > 0  # a non-trivial case
    assert hd95(pred, ref, spacing=spacing) == pytest.approx(want_hd95, abs=MONAI_TOL)
    assert assd(pred, ref, spacing=spacing) == pytest.approx(want_assd, abs=MONAI_TOL)


def test_one_empty_matches_monai_inf():
    # MONAI gives inf for the plain Hausdorff distance and the ASSD when one mask is empty (its percentile
    # HD gives NaN there: torch.quantile interpolates inf - inf); we give inf for HD95 and ASSD alike.
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    ref = _box((8, 8), (2, 2), (5, 6))
    empty = np.zeros_like(ref)
    for pred, target in ((empty, ref), (ref, empty)):
        yp = torch.from_numpy(pred[None, None].astype(np.float32))
        yt = torch.from_numpy(target[None, None].astype(np.float32))
        with pytest.warns(UserWarning, match="all 0"):
            want_hd = monai_metrics.compute_hausdorff_distance(yp, yt, include_background=True).item()
        with pytest.warns(UserWarning, match="all 0"):
            want_assd = monai_metrics.compute_average_surface_distance(
                yp, yt, include_background=True, symmetric=True
            )
        assert want_hd == hd95(pred, target) == math.inf
        assert want_assd.item() == assd(pred, target) == math.inf
