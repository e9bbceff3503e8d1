import math

import numpy as np
import pytest

from edgeseg.runtime.uncertainty import entropy_map, remove_uncertain_structures, structure_uncertainty


def test_entropy_hand_computed():
    probs = np.array([[1.0, 0.5, 0.25], [0.0, 0.5, 0.75]], np.float32)
    ent = entropy_map(probs)
    assert ent[0] == pytest.approx(0.0, abs=1e-6)
    assert ent[1] == pytest.approx(math.log(2), rel=1e-6)
    assert ent[2] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-6)


def _cube(shape, lo, hi, value=1):
    seg = np.zeros(shape, np.uint8)
    seg[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return seg


def test_structure_figures_hand_computed():
    shape = (12, 12, 12)
    # sample 1: 2x2x2 cube; sample 2: the same cube plus one slab (2x2x3); sample 3: identical to 1
    s1 = _cube(shape, (2, 2, 2), (4, 4, 4))
    s2 = _cube(shape, (2, 2, 2), (4, 4, 5))
    mean_seg = s1.copy()
    unc = np.zeros(shape, np.float32)
    unc[2:4, 2:4, 2:4] = 0.5
    records = structure_uncertainty(mean_seg, np.stack([s1, s2, s1]), unc, spacing=(1.0, 1.0, 2.0))
    assert len(records) == 1
    r = records[0]
    assert r["volume_mm3"] == pytest.approx(8 * 2.0)
    # union 12 voxels, intersection 8: IoU 2/3
    assert r["iou_across_samples"] == pytest.approx(8 / 12)
    volumes = np.array([8, 12, 8]) * 2.0
    assert r["volume_cv"] == pytest.approx(volumes.std() / volumes.mean())
    assert r["mean_uncertainty"] == pytest.approx(0.5)


def test_a_missing_structure_has_iou_zero_and_is_removed():
    shape = (10, 10)
    a = _cube(shape, (1, 1), (3, 3))
    b = _cube(shape, (6, 6), (8, 8), value=2)
    mean_seg = a + b
    samples = np.stack([mean_seg, a, mean_seg])  # class-2 structure missing from one sample
    records = structure_uncertainty(mean_seg, samples, np.zeros(shape, np.float32), spacing=(1, 1))
    by_class = {r["class_index"]: r for r in records}
    assert by_class[1]["iou_across_samples"] == 1.0
    assert by_class[2]["iou_across_samples"] == 0.0
    cleaned = remove_uncertain_structures(mean_seg, records, iou_threshold=0.5)
    np.testing.assert_array_equal(cleaned, a)


def test_runtime_modules_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, edgeseg.runtime.tiling, edgeseg.runtime.tta, edgeseg.runtime.uncertainty; "
            "print(sorted({'torch', 'brevitas'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
