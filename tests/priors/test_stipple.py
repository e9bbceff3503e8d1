"""STIPPLE prior building, storage and painting (edgeseg.priors.stipple) against hand-computed values."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgeseg.errors import UserError
from edgeseg.priors.stipple import build_prior, load_prior, organ_centre, prior_maps, save_prior


def _two_volumes() -> list[np.ndarray]:
    """Volume A: organ 1 at (1,1,0),(1,1,1),(2,1,1),(1,1,2) (extents 2,1,3); volume B: (3,3,1),(3,3,2)."""
    a = np.zeros((5, 5, 4), dtype=np.uint8)
    for v in [(1, 1, 0), (1, 1, 1), (2, 1, 1), (1, 1, 2)]:
        a[v] = 1
    b = np.zeros((5, 5, 4), dtype=np.uint8)
    b[3, 3, 1] = b[3, 3, 2] = 1
    return [a, b]


def test_prior_of_two_tiny_volumes_by_hand():
    # box = max extents (2, 1, 3); B = 2 bins: slices {0, 1} and {2}.
    # A: centre (1, 1, 1) -> box x 1..2, z 0..2. B: centre (3, 3, 1) -> box x 3..4 (x=4 empty), z 0..2.
    # bin 0, x=0: A z0 1, A z1 1, B z0 0, B z1 1 -> 3/4; x=1: A z1 only -> 1/4
    # bin 1, x=0: A 1, B 1 -> 1; x=1: 0
    prior = build_prior(_two_volumes(), ["background", "organ"], num_bins=2)
    (organ,) = prior.organs
    assert organ.box == (2, 1, 3)
    np.testing.assert_allclose(organ.bins, [[[0.75], [0.25]], [[1.0], [0.0]]])
    np.testing.assert_allclose(organ.volume()[:, 0, :], [[0.75, 0.75, 1.0], [0.25, 0.25, 0.0]])


def test_axial_axis_moves_to_last():
    vols = [np.moveaxis(v, 2, 0) for v in _two_volumes()]
    prior = build_prior(vols, ["background", "organ"], num_bins=2, axial_axis=0)
    np.testing.assert_allclose(prior.organs[0].bins, [[[0.75], [0.25]], [[1.0], [0.0]]])


def test_centre_is_the_bounding_box_centre_rounded_down():
    mask = np.zeros((6, 6, 6), bool)
    mask[1:5, 2, 3:6] = True  # x 1..4, z 3..5
    assert organ_centre(mask) == (2, 2, 4)
    assert organ_centre(np.zeros((2, 2, 2), bool)) is None


def test_absent_class_and_bad_bin_count_are_user_errors():
    with pytest.raises(UserError, match="'liver' is in no training"):
        build_prior(_two_volumes(), ["background", "organ", "liver"], num_bins=2)
    with pytest.raises(UserError, match="1 < B < 3"):
        build_prior(_two_volumes(), ["background", "organ"], num_bins=3)


def test_prior_maps_paint_box_and_background_by_hand():
    prior = build_prior(_two_volumes(), ["background", "organ"], num_bins=2)
    maps = prior_maps(prior, {1: (0, 2, 3)}, (3, 4, 4), eps=1e-3)
    # box (2, 1, 3) centred at (0, 2, 3): start (0, 2, 2); z 2, 3 are the box's slices 0, 1 (z 4 is outside)
    expected = np.zeros((3, 4, 4))
    expected[0, 2, 2:4] = 0.75
    expected[1, 2, 2:4] = 0.25
    np.testing.assert_allclose(maps[1], np.maximum(expected, 1e-3), rtol=1e-6)
    np.testing.assert_allclose(maps[0], np.maximum(1 - expected, 1e-3), rtol=1e-6)


def test_save_load_round_trip(tmp_path):
    prior = build_prior(_two_volumes(), ["background", "organ"], num_bins=2)
    save_prior(prior, tmp_path / "prior")
    loaded = load_prior(tmp_path / "prior")
    assert loaded.class_names == prior.class_names and loaded.num_bins == 2
    assert loaded.organs[0].box == (2, 1, 3)
    np.testing.assert_array_equal(loaded.organs[0].bins, prior.organs[0].bins)
    (tmp_path / "prior" / "prior.json").write_text("{}")
    with pytest.raises(UserError, match="not a STIPPLE prior"):
        load_prior(tmp_path / "prior")


def test_import_is_torch_free():
    code = ("import sys, edgeseg.priors.stipple, edgeseg.priors.placement, edgeseg.priors.activation; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
