"""The report's example slice: the right case and slice, the runtime's labels, a real PNG, never fatal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeseg.report.example import EXAMPLE_PNG, busiest_slice, example_writer, plot_example, segment_example


@pytest.fixture(scope="module")
def detector_bundle(intensity_detector_bundle) -> Path:
    return intensity_detector_bundle


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    from edgeseg.data.phantoms import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "ph", n_cases=6, shape=(20, 18, 16), seed=3)


def test_busiest_slice_by_hand():
    labels = np.zeros((2, 3, 4), np.uint8)
    labels[:, :, 2] = 1  # 6 voxels in slice 2 of axis 2
    labels[0, 0, 3] = 2  # 1 voxel in slice 3
    assert busiest_slice(labels, 2) == 2
    assert busiest_slice(labels, 0) == 0  # 7 voxels in row 0 vs 6 in row 1
    assert busiest_slice(np.zeros((2, 3, 5), np.uint8), 2) == 2  # empty: the middle slice


def test_example_is_the_runtime_segmentation_of_the_first_test_case(detector_bundle, phantoms):
    from edgeseg.data.io import read_image
    from edgeseg.runtime.backends import open_backend
    from edgeseg.runtime.bundle import load_bundle
    from edgeseg.runtime.pipeline import segment_volume

    example = segment_example("w4a6", detector_bundle, phantoms, "test")
    first = json.loads((phantoms / "splits.json").read_text())["test"][0]
    assert example.case in first
    # Oracle: a plain (no TTA) segmentation of the same file; the model is flip-equivariant so TTA
    # must not change the labels, and the slice is the one with the most foreground (numpy by hand).
    bundle = load_bundle(detector_bundle)
    engine = open_backend(bundle, "onnxruntime")
    plain = segment_volume(read_image([next((phantoms / "images").glob(f"{example.case}*"))]), bundle.manifest,
                           engine).labels
    engine.close()
    counts = [(plain[:, :, k] > 0).sum() for k in range(plain.shape[2])]
    assert example.axis == 2 and example.index == int(np.argmax(counts))
    np.testing.assert_array_equal(example.labels, plain[:, :, example.index])
    assert example.samples == 8 and example.uncertainty.shape == example.labels.shape
    assert np.all(example.uncertainty >= 0) and np.all(example.uncertainty <= np.log(3) + 1e-5)
    png = plot_example(example)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_with_example_and_with_a_failing_example(detector_bundle, phantoms, tmp_path):
    from edgeseg.report.render import write_report

    row = {"name": "w4a6", "status": "ok", "bundle": str(detector_bundle), "bundle_bytes": 1000,
           "dice_mean": 0.5, "per_class": {"bright": {"dice": 0.5}}, "latency_s_median": 0.1,
           "peak_rss_bytes": None, "weights_at_rest": "float32"}
    results = write_report(tmp_path / "ok", [row], split="test", data=str(phantoms),
                           example=example_writer(phantoms, "test"))
    assert results["example"]["setting"] == "w4a6" and (tmp_path / "ok" / EXAMPLE_PNG).is_file()
    assert f"]({EXAMPLE_PNG})" in (tmp_path / "ok" / "report.md").read_text()
    assert ("the runtime's mask and its voxel-wise entropy over 8 flip-TTA / MC-dropout samples"
            in (tmp_path / "ok" / "report.md").read_text())
    broken = write_report(tmp_path / "bad", [row], split="test", data=str(tmp_path),
                          example=example_writer(tmp_path / "missing", "test"))
    assert "error" in broken["example"] and not (tmp_path / "bad" / EXAMPLE_PNG).exists()
    assert "Example slice not drawn" in (tmp_path / "bad" / "report.md").read_text()
    assert json.loads((tmp_path / "bad" / "results.json").read_text())["example"]["error"]


def test_example_is_the_smallest_front_setting_that_keeps_accuracy():
    from edgeseg.report.example import example_setting

    def row(name, kb, accuracy, pareto=True):
        return {"name": name, "status": "ok", "pareto": pareto, "bundle_bytes": kb * 1000, "accuracy_mean": accuracy}

    # a keypoint report: the 4/6 bundle is smallest (so on the front) but finds nothing
    keypoints = {"settings": [row("fp32", 443, 1.0, pareto=False), row("8/8", 136, 1.0), row("4/6", 115, 0.0)]}
    assert example_setting(keypoints)["name"] == "8/8"
    # the hippocampus report: 4/8 is 0.004 below fp32, within the slack, and smallest
    dice = {"settings": [row("fp32", 5318, 0.886), row("4/8", 718, 0.882), row("2/4", 400, 0.71),
                         row("8/8", 1400, 0.881, pareto=False)]}
    assert example_setting(dice)["name"] == "4/8"
    assert example_setting({"settings": [row("fp32", 5, 0.9, pareto=False)]}) is None
