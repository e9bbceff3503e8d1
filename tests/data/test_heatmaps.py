"""Keypoint label volumes <-> Gaussian heatmaps: hand-computed values, scipy as an oracle, round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from edgeseg.data.heatmaps import (
    Keypoint,
    gaussian_heatmaps,
    heatmaps_from_label_volume,
    keypoints_from_heatmaps,
    keypoints_from_label_volume,
    label_volume_from_keypoints,
)
from edgeseg.errors import UserError

# ---- keypoints -> heatmaps: hand-computed values ----------------------------------------------------

def test_single_keypoint_value_at_distance_d_is_exp_minus_d2_over_2_sigma2():
    # spacing (2, 0.5) mm, sigma 3 mm, keypoint at voxel (4, 5)
    heat = gaussian_heatmaps([Keypoint(7, (4.0, 5.0))], labels=[7], shape=(9, 11), spacing=(2.0, 0.5), sigma_mm=3.0)
    assert heat.shape == (1, 9, 11) and heat.dtype == np.float32
    assert heat[0, 4, 5] == 1.0  # the peak
    # (5, 7): offsets 1 and 2 voxels = 2 mm and 1 mm, d^2 = 4 + 1 = 5 mm^2
    assert heat[0, 5, 7] == pytest.approx(math.exp(-5 / 18), rel=1e-6)
    # (4, 1): 4 voxels of 0.5 mm = 2 mm, d^2 = 4
    assert heat[0, 4, 1] == pytest.approx(math.exp(-4 / 18), rel=1e-6)
    # (2, 5): 2 voxels of 2 mm = 4 mm, d^2 = 16
    assert heat[0, 2, 5] == pytest.approx(math.exp(-16 / 18), rel=1e-6)
    assert heat.argmax() == np.ravel_multi_index((0, 4, 5), heat.shape)


def test_3d_anisotropic_value():
    heat = gaussian_heatmaps([Keypoint(1, (3.0, 3.0, 3.0))], [1], (7, 7, 7), spacing=(1.0, 2.0, 3.0), sigma_mm=2.0)
    # offset (1, 1, 1) voxels = (1, 2, 3) mm, d^2 = 14, 2 sigma^2 = 8
    assert heat[0, 4, 4, 4] == pytest.approx(math.exp(-14 / 8), rel=1e-6)
    assert heat[0, 2, 3, 2] == pytest.approx(math.exp(-(1 + 9) / 8), rel=1e-6)


def test_subvoxel_keypoint_splits_between_voxels():
    heat = gaussian_heatmaps([Keypoint(1, (2.5, 3.0))], [1], (6, 6), spacing=(1.0, 1.0), sigma_mm=1.0)
    assert heat[0, 2, 3] == pytest.approx(math.exp(-0.25 / 2), rel=1e-6)
    assert heat[0, 3, 3] == pytest.approx(math.exp(-0.25 / 2), rel=1e-6)


def test_truncation_beyond_truncate_sigma():
    heat = gaussian_heatmaps([Keypoint(1, (5.0, 5.0))], [1], (11, 11), (1.0, 1.0), sigma_mm=1.0, truncate=1.5)
    assert heat[0, 6, 5] == pytest.approx(math.exp(-0.5), rel=1e-6)  # 1 mm: inside
    assert heat[0, 7, 5] == 0.0  # 2 mm > 1.5 sigma
    assert heat[0, 5, 3] == 0.0


def test_same_class_keypoints_take_the_max_and_classes_get_their_own_channels():
    points = [Keypoint(3, (2.0, 2.0)), Keypoint(3, (2.0, 5.0)), Keypoint(5, (6.0, 6.0)), Keypoint(9, (0.0, 0.0))]
    heat = gaussian_heatmaps(points, labels=[3, 5, 4], shape=(8, 8), spacing=(1.0, 1.0), sigma_mm=1.5)
    # (2, 3) is 1 mm from the first and 2 mm from the second keypoint of class 3: the max, not the sum
    assert heat[0, 2, 3] == pytest.approx(math.exp(-1 / 4.5), rel=1e-6)
    assert heat[0, 2, 2] == 1.0 and heat[0, 2, 5] == 1.0
    assert heat[1, 6, 6] == 1.0 and heat[1, 2, 2] == pytest.approx(math.exp(-32 / 4.5), rel=1e-5)
    assert not heat[2].any()  # class 4 has no keypoint (e.g. outside the field of view); class 9 is not asked for


def test_matches_scipy_gaussian_filter_of_a_delta():
    """Oracle: scipy's sampled Gaussian kernel (sigma in voxels = sigma_mm / spacing), scaled to peak 1."""
    shape, spacing, sigma = (21, 17, 15), (1.0, 1.5, 2.5), 3.0
    delta = np.zeros(shape)
    delta[10, 8, 7] = 1.0
    expected = ndimage.gaussian_filter(delta, sigma=[sigma / s for s in spacing], mode="constant", truncate=6.0)
    expected /= expected.max()
    heat = gaussian_heatmaps([Keypoint(1, (10.0, 8.0, 7.0))], [1], shape, spacing, sigma, truncate=6.0)[0]
    near = expected > 1e-3
    assert near.sum() > 500
    np.testing.assert_allclose(heat[near], expected[near], rtol=1e-5)


# ---- heatmaps -> keypoints --------------------------------------------------------------------------

def test_decoding_threshold_plateau_and_radius_in_mm():
    heat = np.zeros((1, 12, 12), dtype=np.float32)
    heat[0, 2, 2] = 0.9
    heat[0, 2, 5] = 0.8  # 3 voxels x 2 mm = 6 mm from (2, 2) along axis 1
    heat[0, 9, 9] = heat[0, 9, 10] = 0.7  # a flat top: one keypoint, the first in index order
    heat[0, 11, 0] = 0.4  # below the threshold
    spacing = (1.0, 2.0)
    found = keypoints_from_heatmaps(heat, spacing, radius_mm=5.0, threshold=0.5, labels=[4])
    assert [(k.label, k.position, round(k.score, 6)) for k in found] == [
        (4, (2.0, 2.0), 0.9), (4, (2.0, 5.0), 0.8), (4, (9.0, 9.0), 0.7)]
    # a 7 mm radius suppresses (2, 5) (6 mm from the better (2, 2)), not (9, 9) (sqrt(49 + 64) mm from (2, 5))
    found = keypoints_from_heatmaps(heat, spacing, radius_mm=7.0, threshold=0.5)
    assert [k.position for k in found] == [(2.0, 2.0), (9.0, 9.0)]
    assert [k.position for k in keypoints_from_heatmaps(heat, spacing, radius_mm=5.0, max_per_class=1)] == [(2.0, 2.0)]
    assert keypoints_from_heatmaps(heat, spacing, radius_mm=5.0, threshold=0.95) == []


# ---- round trips ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "spacing", "points"), [
    ((40, 30), (1.0, 0.5), {(5, 6): 3, (15, 20): 4, (30, 10): 5, (33, 25): 3}),
    ((24, 20, 12), (0.8, 0.8, 3.0), {(4, 5, 2): 1, (12, 15, 6): 2, (20, 4, 10): 7}),
])
def test_label_volume_heatmap_keypoint_round_trip(shape, spacing, points):
    volume = np.zeros(shape, dtype=np.int16)
    for index, label in points.items():
        volume[index] = label
    heat, channels = heatmaps_from_label_volume(volume, spacing, sigma_mm=2.0)
    assert channels == tuple(sorted(set(points.values())))
    assert heat.shape == (len(channels), *shape)
    for index, label in points.items():
        assert heat[(channels.index(label), *index)] == 1.0
    found = keypoints_from_heatmaps(heat, spacing, radius_mm=4.0, labels=channels)
    assert {tuple(int(p) for p in k.position): k.label for k in found} == points
    np.testing.assert_array_equal(label_volume_from_keypoints(found, shape), volume)


def test_coordinate_list_round_trip_and_fixed_channels():
    points = [Keypoint(2, (3.0, 4.0)), Keypoint(1, (10.0, 12.0))]
    heat = gaussian_heatmaps(points, labels=[1, 2, 3], shape=(16, 16), spacing=(1.0, 1.0), sigma_mm=1.5)
    found = keypoints_from_heatmaps(heat, (1.0, 1.0), radius_mm=3.0, labels=[1, 2, 3])
    assert sorted(found, key=lambda k: k.label) == [Keypoint(1, (10.0, 12.0), 1.0), Keypoint(2, (3.0, 4.0), 1.0)]
    assert keypoints_from_label_volume(label_volume_from_keypoints(points, (16, 16)), labels=[2]) == [points[0]]


# ---- errors and torch-freedom -----------------------------------------------------------------------

def test_user_errors():
    with pytest.raises(UserError, match="spacing"):
        gaussian_heatmaps([], [1], (4, 4), spacing=(1.0,), sigma_mm=1.0)
    with pytest.raises(UserError, match="sigma_mm"):
        gaussian_heatmaps([], [1], (4, 4), spacing=(1.0, 1.0), sigma_mm=0.0)
    with pytest.raises(UserError, match="integer labels"):
        keypoints_from_label_volume(np.full((3, 3), 0.5))
    with pytest.raises(UserError, match="distinct positive"):
        gaussian_heatmaps([], [1, 1], (4, 4), spacing=(1.0, 1.0), sigma_mm=1.0)
    with pytest.raises(UserError, match="2 labels for 1 heatmap channels"):
        keypoints_from_heatmaps(np.zeros((1, 4, 4)), (1.0, 1.0), radius_mm=1.0, labels=[1, 2])
