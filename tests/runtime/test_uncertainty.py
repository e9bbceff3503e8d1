"""Uncertainty measures on hand-computed cases."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from edgeseg.runtime.uncertainty import (
    case_summary,
    entropy_map,
    remove_uncertain_structures,
    structure_uncertainty,
)


def test_entropy_hand_computed():
    probs = np.array([[1.0, 0.5, 0.25], [0.0, 0.5, 0.75]], np.float32)
    ent = entropy_map(probs)
    assert ent.dtype == np.float32 and ent.shape == (3,)
    assert ent[0] == pytest.approx(0.0, abs=1e-6)
    assert ent[1] == pytest.approx(math.log(2), rel=1e-6)
    assert ent[2] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-6)
    np.testing.assert_allclose(entropy_map(probs, normalise=True), ent / math.log(2), rtol=1e-6)
    uniform3 = np.full((3, 2, 2), 1 / 3, np.float32)
    np.testing.assert_allclose(entropy_map(uniform3), math.log(3), rtol=1e-6)
    np.testing.assert_allclose(entropy_map(uniform3, normalise=True), 1.0, rtol=1e-6)


def _box(shape, lo, hi, value=1):
    seg = np.zeros(shape, np.uint8)
    seg[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return seg


def _only(records):
    assert len(records) == 1
    return records[0]


def test_cube_figures_hand_computed():
    shape = (12, 12, 12)
    # sample 1: 2x2x2 cube; sample 2: the same cube grown by one slab (2x2x3); sample 3 = sample 1
    s1 = _box(shape, (2, 2, 2), (4, 4, 4))
    s2 = _box(shape, (2, 2, 2), (4, 4, 5))
    unc = np.zeros(shape, np.float32)
    unc[2:4, 2:4, 2:4] = 0.5
    unc[2:4, 2:4, 2] = 0.25  # half the cube at 0.25, half at 0.5; the grown slab (outside) at 0.9
    unc[2:4, 2:4, 4] = 0.9
    r = _only(structure_uncertainty(s1, np.stack([s1, s2, s1]), unc, spacing=(1.0, 1.0, 2.0)))
    assert (r["class_index"], r["structure"]) == (1, 1)
    assert r["volume_mm3"] == pytest.approx(8 * 2.0)
    assert r["iou_across_samples"] == pytest.approx(8 / 12)  # intersection 8 voxels, union 12
    volumes = np.array([8, 12, 8]) * 2.0
    assert r["volume_cv"] == pytest.approx(volumes.std() / volumes.mean())  # population std: 0.2020...
    assert r["volume_cv"] == pytest.approx(math.sqrt(32 / 9) * 2 / (56 / 3), rel=1e-9)
    assert r["mean_uncertainty"] == pytest.approx(0.375)
    assert r["samples_with_structure"] == 3
    assert r["centroid_voxel"] == pytest.approx([2.5, 2.5, 2.5])


def test_a_leaking_sample_counts_in_full():
    """Whole sample components are compared, not just a neighbourhood of the structure."""
    shape = (6, 6, 12)
    cube = _box(shape, (1, 1, 1), (3, 3, 3))
    leak = _box(shape, (1, 1, 1), (3, 3, 9))  # the cube plus 6 more slabs of 4: 32 voxels
    r = _only(structure_uncertainty(cube, np.stack([cube, leak]), np.zeros(shape), spacing=(1, 1, 1)))
    assert r["iou_across_samples"] == pytest.approx(8 / 32)
    assert r["volume_cv"] == pytest.approx(12 / 20)  # volumes 8 and 32: std 12, mean 20


def test_a_sample_that_splits_the_structure_keeps_both_parts():
    bar = _box((3, 8), (1, 1), (2, 7))  # 6 pixels
    split = bar.copy()
    split[1, 4] = 0  # two components of 3 and 2 pixels
    r = _only(structure_uncertainty(bar, np.stack([bar, split]), np.zeros(bar.shape), spacing=(1, 1)))
    assert r["iou_across_samples"] == pytest.approx(5 / 6)  # ivadomed would keep only the 3-pixel part: 3/6


def test_unrelated_sample_components_are_ignored_and_bridges_count_for_both():
    shape = (5, 12)
    a = _box(shape, (1, 1), (3, 3))  # 4 px
    b = _box(shape, (1, 8), (3, 10))  # 4 px
    mean = a | b
    elsewhere = mean.copy()
    elsewhere[4, 5] = 1  # a false positive touching neither structure
    bridge = _box(shape, (1, 1), (3, 10))  # a and b joined: 18 px
    records = structure_uncertainty(mean, np.stack([mean, elsewhere, bridge]), np.zeros(shape), spacing=(1, 1))
    assert [r["structure"] for r in records] == [1, 2]
    for r in records:
        assert r["iou_across_samples"] == pytest.approx(4 / 18)
        assert r["volume_cv"] == pytest.approx(np.std([4, 4, 18]) / np.mean([4, 4, 18]))


def test_missing_structures_have_iou_zero_and_only_they_are_removed():
    shape = (10, 14)
    a = _box(shape, (1, 1), (3, 3))  # class 1, structure 1
    c = _box(shape, (1, 10), (3, 12))  # class 1, structure 2
    b = _box(shape, (6, 6), (8, 8), value=2)  # class 2
    mean_seg = a | b | c
    samples = np.stack([mean_seg, a | b, a | c, mean_seg])
    records = structure_uncertainty(mean_seg, samples, np.zeros(shape, np.float32), spacing=(1, 1),
                                    class_names=["background", "one", "two"])
    by_key = {(r["class"], r["structure"]): r for r in records}
    assert set(by_key) == {("one", 1), ("one", 2), ("two", 1)}
    assert by_key[("one", 1)]["iou_across_samples"] == 1.0 and by_key[("one", 1)]["volume_cv"] == 0.0
    assert by_key[("one", 2)]["iou_across_samples"] == 0.0 and by_key[("one", 2)]["samples_with_structure"] == 3
    assert by_key[("two", 1)]["iou_across_samples"] == 0.0
    assert by_key[("two", 1)]["volume_cv"] == pytest.approx(np.std([4, 4, 0, 4]) / 3)
    cleaned = remove_uncertain_structures(mean_seg, records, iou_threshold=0.5)
    np.testing.assert_array_equal(cleaned, a)
    assert cleaned.dtype == mean_seg.dtype
    np.testing.assert_array_equal(remove_uncertain_structures(mean_seg, records, iou_threshold=0.0), mean_seg)


def test_a_structure_no_sample_has():
    mean = _box((4, 4), (1, 1), (3, 3), value=2)
    r = _only(structure_uncertainty(mean, np.zeros((3, 4, 4), np.uint8), np.ones((4, 4)), spacing=(1, 1)))
    assert (r["iou_across_samples"], r["volume_cv"], r["samples_with_structure"]) == (0.0, 0.0, 0)


def test_case_summary_is_json_ready():
    shape = (8, 8)
    mean = _box(shape, (1, 1), (4, 4))
    records = structure_uncertainty(mean, np.stack([mean, mean]), np.full(shape, 0.1, np.float32), spacing=(0.5, 0.5))
    summary = case_summary(records, 2, {"tta_flips": 2, "mc_passes": 1}, removed=0)
    again = json.loads(json.dumps(summary))
    assert again["num_samples"] == 2 and again["num_structures"] == 1 and again["min_iou_across_samples"] == 1.0
    assert again["structures"][0]["volume_mm3"] == pytest.approx(9 * 0.25)
    assert again["structures"][0]["mean_uncertainty"] == pytest.approx(0.1)
    assert case_summary([], 2, {})["min_iou_across_samples"] is None


def test_runtime_modules_import_without_torch():
    code = ("import sys, edgeseg.runtime.tiling, edgeseg.runtime.tta, edgeseg.runtime.uncertainty; "
            "print(sorted({'torch', 'brevitas', 'monai'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
