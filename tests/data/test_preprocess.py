"""Preprocessing against independent oracles: nibabel's as_closest_canonical, scipy.ndimage.zoom,
scipy.stats.zscore, np.repeat, and hand-computed geometry."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, stats

from edgeseg.data.io import Volume
from edgeseg.data.preprocess import (
    PreprocessSpec,
    normalize,
    preprocess_case,
    remap_labels,
    reorient_from_canonical,
    reorient_to_canonical,
    resample,
    resample_to_shape,
    undo_spatial,
)
from edgeseg.errors import UserError

# LPS: x and y flipped. PSR: array axes point posterior, superior, right (like spinalcord t2.nii.gz).
LPS = np.array([[-0.8, 0, 0, 10.0], [0, -0.9, 0, -5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])
PSR = np.array([[0, 0, 1.2, -30.0], [-0.7, 0, 0, 40.0], [0, 2.0, 0, -12.0], [0, 0, 0, 1]])
OBLIQUE = nib.affines.from_matvec(
    nib.eulerangles.euler2mat(0.3, -0.2, 0.1) @ np.diag([1.0, -0.5, 3.0]), [1.0, 2.0, 3.0])


def volume(shape, affine, channels=1, seed=0) -> Volume:
    array = np.random.default_rng(seed).normal(size=(channels, *shape)).astype(np.float32)
    spacing = tuple(float(np.linalg.norm(affine[:3, i])) for i in range(len(shape)))
    return Volume(array, np.asarray(affine, float), spacing)


# ---------------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("affine", [LPS, PSR, OBLIQUE, np.eye(4)], ids=["LPS", "PSR", "oblique", "RAS"])
def test_canonical_matches_nibabel_and_round_trips(affine):
    vol = volume((5, 6, 7), affine, channels=2)
    canon, info = reorient_to_canonical(vol)
    for c in range(2):
        oracle = nib.as_closest_canonical(nib.Nifti1Image(vol.array[c], affine))
        np.testing.assert_array_equal(canon.array[c], oracle.get_fdata(dtype=np.float32))
        np.testing.assert_allclose(canon.affine, oracle.affine, atol=1e-9)
    np.testing.assert_allclose(canon.spacing, nib.affines.voxel_sizes(canon.affine), rtol=1e-12)
    back = reorient_from_canonical(canon, info)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_array_equal(back.affine, vol.affine)
    assert back.spacing == vol.spacing


def test_label_reorients_like_nibabel():
    label = np.random.default_rng(0).integers(0, 3, size=(5, 6, 7)).astype(np.uint8)
    canon, info = reorient_to_canonical(Volume(label, PSR, (0.7, 2.0, 1.2)))
    oracle = nib.as_closest_canonical(nib.Nifti1Image(label, PSR))
    np.testing.assert_array_equal(canon.array, np.asanyarray(oracle.dataobj))
    np.testing.assert_array_equal(reorient_from_canonical(canon, info).array, label)


def test_2d_reorientation_flips_by_hand():
    image = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    flipped_x = np.diag([-1.0, 1.0, 1.0, 1.0])
    canon, info = reorient_to_canonical(Volume(image, flipped_x, (1.0, 1.0)))
    np.testing.assert_array_equal(canon.array, image[:, ::-1, :])
    # voxel (0, 0) of the canonical grid is old voxel (2, 0): world x = -2
    np.testing.assert_allclose(canon.affine @ [0, 0, 0, 1], [-2, 0, 0, 1])
    np.testing.assert_array_equal(reorient_from_canonical(canon, info).array, image)
    identity, _ = reorient_to_canonical(Volume(image, np.eye(4), (1.0, 1.0)))
    np.testing.assert_array_equal(identity.array, image)


def test_2d_grid_in_a_sagittal_plane_matches_nibabel():
    # array axis 0 -> world -z (2 mm), axis 1 -> world +y (0.5 mm); x is the missing third axis
    affine = np.array([[0, 0, 1.0, 5.0], [0, 0.5, 0, -3.0], [-2.0, 0, 0, 7.0], [0, 0, 0, 1]])
    image = np.random.default_rng(0).normal(size=(1, 4, 6)).astype(np.float32)
    canon, info = reorient_to_canonical(Volume(image, affine, (2.0, 0.5)))
    oracle = nib.as_closest_canonical(nib.Nifti1Image(image[0][:, :, None], affine))  # 3D with a singleton x
    np.testing.assert_array_equal(canon.array[0], np.squeeze(oracle.get_fdata(dtype=np.float32), axis=0))
    assert canon.spacing == (0.5, 2.0)
    np.testing.assert_allclose(canon.affine[:, [0, 1, 3]], oracle.affine[:, [1, 2, 3]])
    np.testing.assert_array_equal(reorient_from_canonical(canon, info).array, image)


# ----------------------------------------------------------------------------------- resampling


def test_resample_matches_scipy_zoom_grid_mode():
    vol = volume((10, 12, 8), np.diag([2.0, 0.5, 1.5, 1.0]))
    out = resample(vol, (1.0, 1.0, 1.0), order=1)
    assert out.spatial_shape == (20, 6, 12)
    zoom = np.array((20, 6, 12)) / np.array((10, 12, 8))
    oracle = ndimage.zoom(vol.array[0], zoom, order=1, mode="nearest", grid_mode=True)
    np.testing.assert_allclose(out.array[0], oracle, atol=1e-5)
    np.testing.assert_allclose(out.spacing, (1.0, 1.0, 1.0))


def test_resample_keeps_the_field_of_view():
    vol = volume((7, 9, 5), PSR)
    out = resample(vol, (1.0, 1.0, 1.0), order=1)
    n, m = np.array((7, 9, 5)), np.array(out.spatial_shape)
    np.testing.assert_array_equal(m, np.maximum(1, np.round(n * np.array(vol.spacing))))
    for corner_old, corner_new in [(-0.5 * np.ones(3), -0.5 * np.ones(3)), (n - 0.5, m - 0.5)]:
        np.testing.assert_allclose(out.affine @ np.append(corner_new, 1), vol.affine @ np.append(corner_old, 1))


def test_label_upsampling_is_nearest_and_round_trips():
    label = np.random.default_rng(0).integers(0, 4, size=(4, 5, 3)).astype(np.uint8)
    vol = Volume(label, np.diag([2.0, 2.0, 2.0, 1.0]), (2.0, 2.0, 2.0))
    up = resample(vol, (1.0, 1.0, 1.0), order=0)
    oracle = np.repeat(np.repeat(np.repeat(label, 2, 0), 2, 1), 2, 2)
    np.testing.assert_array_equal(up.array, oracle)
    back = resample_to_shape(up, (4, 5, 3), vol.affine, order=0)
    np.testing.assert_array_equal(back.array, label)
    np.testing.assert_array_equal(back.affine, vol.affine)


def test_resample_round_trip_shape_is_exact_for_awkward_sizes():
    for shape, spacing in [((7, 9, 5), (0.8, 1.3, 3.0)), ((31, 1, 17), (0.33, 1.0, 2.71))]:
        affine = np.diag([*spacing, 1.0])
        vol = volume(shape, affine)
        there = resample(vol, (1.1, 0.9, 1.0), order=1)
        back = resample_to_shape(there, shape, affine, order=1)
        assert back.spatial_shape == shape


def test_target_spacing_with_wrong_length():
    with pytest.raises(UserError, match="target_spacing"):
        resample(volume((4, 4, 4), np.eye(4)), (1.0, 1.0), order=1)


# ---------------------------------------------------------------------------------- intensities


def test_zscore_matches_scipy_per_channel():
    image = np.stack([np.random.default_rng(0).normal(50, 10, (6, 7, 8)),
                      np.random.default_rng(1).gamma(2.0, 300.0, (6, 7, 8))]).astype(np.float32)
    out = normalize(image, "zscore")
    assert out.dtype == np.float32
    for c in range(2):
        np.testing.assert_allclose(out[c], stats.zscore(image[c].astype(np.float64), axis=None), atol=1e-5)
        assert abs(out[c].mean()) < 1e-5 and abs(out[c].std() - 1) < 1e-5


def test_percentile_clips_then_zscores():
    x = np.random.default_rng(0).normal(0, 1, (1, 20, 20, 20))
    x[0, 0, 0, :5] = 1e4  # outliers
    out = normalize(x, "percentile", (1.0, 99.0))
    lo, hi = np.percentile(x[0], [1.0, 99.0])
    np.testing.assert_allclose(out[0], stats.zscore(np.clip(x[0], lo, hi), axis=None), atol=1e-5)
    assert out.max() < 4


def test_constant_channel_and_none():
    image = np.full((1, 3, 4), 7.0, np.float64)
    np.testing.assert_array_equal(normalize(image, "zscore"), np.zeros((1, 3, 4), np.float32))
    none = normalize(image, "none")
    assert none.dtype == np.float32 and np.all(none == 7.0)
    with pytest.raises(UserError, match="zscor"):
        normalize(image, "zscor")


# --------------------------------------------------------------------------------------- labels


def test_remap_labels_maps_simultaneously():
    label = np.array([[0, 1, 2], [255, 1, 0]])
    out = remap_labels(label, {255: 1, 1: 2, 2: 1}, num_classes=3)
    np.testing.assert_array_equal(out, [[0, 2, 1], [1, 2, 0]])
    assert out.dtype == np.uint8


def test_remap_labels_names_values_outside_the_classes():
    with pytest.raises(UserError, match=r"label values \[5, 255\] are outside the class list 0..1"):
        remap_labels(np.array([0, 1, 5, 255]), {}, num_classes=2)


# ----------------------------------------------------------------------------------------- spec


def test_spec_json_round_trip_and_validation():
    spec = PreprocessSpec(reorient=False, target_spacing=(1, 1, 2.5), normalization="percentile",
                          clip_percentiles=(1, 99), label_map={255: 1})
    again = PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.label_map == {255: 1} and again.target_spacing == (1.0, 1.0, 2.5)
    assert PreprocessSpec.from_dict({}) == PreprocessSpec()
    with pytest.raises(UserError, match="normalization"):
        PreprocessSpec(normalization="minmax")
    with pytest.raises(UserError, match="clip_percentiles"):
        PreprocessSpec(clip_percentiles=(90, 10))
    with pytest.raises(UserError, match="target_spacing"):
        PreprocessSpec(target_spacing=(1.0, -1.0, 1.0))
    with pytest.raises(UserError, match="unknown preprocessing field"):
        PreprocessSpec.from_dict({"reorient": True, "spacing": 1})


# ---------------------------------------------------------------------------------- whole cases


def test_preprocess_case_matches_a_hand_built_pipeline():
    affine = PSR @ np.diag([2.0, 1.0, 1.0, 1.0])  # spacing (1.4, 2.0, 1.2) in array order
    image = volume((6, 5, 7), affine, seed=3)
    label = Volume(np.random.default_rng(4).integers(0, 2, (6, 5, 7)).astype(np.uint8) * 255, affine, image.spacing)
    spec = PreprocessSpec(target_spacing=(1.0, 1.0, 1.0), label_map={255: 1})
    array, lab, spacing = preprocess_case(image, label, spec)
    # oracle: nibabel canonical -> scipy zscore -> scipy zoom(grid_mode) with the rounded sizes
    canon = nib.as_closest_canonical(nib.Nifti1Image(image.array[0], affine))
    canon_lab = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(label.array, affine)).dataobj)
    zooms = np.array(canon.header.get_zooms()[:3])
    out_shape = np.maximum(1, np.round(np.array(canon.shape) * zooms))
    z = stats.zscore(canon.get_fdata(), axis=None)
    ratio = out_shape / np.array(canon.shape)
    np.testing.assert_allclose(array[0], ndimage.zoom(z, ratio, order=1, mode="nearest", grid_mode=True), atol=1e-4)
    np.testing.assert_array_equal(lab, ndimage.zoom(canon_lab // 255, ratio, order=0, mode="nearest", grid_mode=True))
    np.testing.assert_allclose(spacing, zooms * np.array(canon.shape) / out_shape)


def test_undo_spatial_restores_the_original_grid():
    affine = PSR @ np.diag([2.0, 2.0, 2.0, 1.0])  # integer upsampling by the target spacing below
    image = volume((4, 5, 3), affine)
    label = np.random.default_rng(0).integers(0, 3, (4, 5, 3)).astype(np.uint8)
    # canonical axes (x, y, z) come from array axes (2, 0, 1): spacing (2.4, 1.4, 4.0), shape (3, 4, 5)
    spec = PreprocessSpec(target_spacing=(1.2, 0.7, 2.0))  # half of each canonical spacing
    _, lab, _ = preprocess_case(image, Volume(label, affine, image.spacing), spec)
    assert lab.shape == (6, 8, 10)
    back = undo_spatial(lab, spec, image)
    np.testing.assert_array_equal(back, label)
    probs = np.stack([lab == k for k in range(3)]).astype(np.float32)
    back_probs = undo_spatial(probs, spec, image)
    assert back_probs.shape == (3, 4, 5, 3)
    np.testing.assert_array_equal(back_probs.argmax(0), label)
    with pytest.raises(ValueError):
        undo_spatial(lab[:-1], spec, image)


def test_2d_rgb_case_round_trip():
    image = Volume(np.random.default_rng(0).random((3, 10, 12)).astype(np.float32), np.eye(4), (1.0, 1.0))
    label = np.random.default_rng(1).integers(0, 2, (10, 12)).astype(np.uint8)
    spec = PreprocessSpec(target_spacing=(0.5, 0.5), normalization="percentile")
    array, lab, spacing = preprocess_case(image, Volume(label, np.eye(4), (1.0, 1.0)), spec)
    assert array.shape == (3, 20, 24) and lab.shape == (20, 24) and spacing == (0.5, 0.5)
    np.testing.assert_array_equal(lab, np.repeat(np.repeat(label, 2, 0), 2, 1))
    np.testing.assert_array_equal(undo_spatial(lab, spec, image), label)


def test_undo_spatial_without_resampling_is_exact_inverse():
    image = volume((5, 6, 7), OBLIQUE)
    label = np.random.default_rng(1).integers(0, 2, (5, 6, 7)).astype(np.uint8)
    spec = PreprocessSpec()
    _, lab, _ = preprocess_case(image, Volume(label, OBLIQUE, image.spacing), spec)
    np.testing.assert_array_equal(undo_spatial(lab, spec, image), label)


@pytest.mark.parametrize("method", ["zscore", "percentile"])
def test_float32_chunked_normalize_matches_float64_numpy(method):
    # Oracle: the straightforward float64 numpy computation (what normalize() did before it was made
    # to stay within one float32 copy); int16 CT-like values with an outlier.
    from edgeseg.data import preprocess

    rng = np.random.default_rng(1)
    image = rng.normal(40, 300, size=(2, 33, 21, 17)).astype(np.int16)
    image[0, 0, 0, 0] = 3000
    out = preprocess.normalize(image, method)
    for c in range(2):
        x = image[c].astype(np.float64)
        if method == "percentile":
            x = np.clip(x, *np.percentile(x, (0.5, 99.5)))
        np.testing.assert_allclose(out[c], (x - x.mean()) / x.std(), atol=2e-5)
    mean, std = preprocess._mean_std(image[0].astype(np.float32), chunk=1000)  # many chunks, a ragged last one
    assert mean == pytest.approx(image[0].mean(dtype=np.float64), rel=1e-12)
    assert std == pytest.approx(image[0].std(dtype=np.float64), rel=1e-12)
