"""`edgeseg evaluate BUNDLE` on a keypoint (heatmap) bundle: the keypoint metrics `edgeseg evaluate RUN` gives.

A tiny Count-ception run on keypoint phantoms is trained, exported and scored both ways on its test split.
Oracles: the run's own evaluation (PyTorch on `load_cases`' preprocessing; the bundle goes through ONNX Runtime
and the runtime's own reading, preprocessing and tiling), and every count and distance recomputed here from the
bundle's decoded keypoints and the phantoms' label files (PNG: voxel = world mm) with scipy's assignment.
Tolerances: decoded positions and TP/FP/FN counts exact, heatmap scores 1e-4, distances and ratios 1e-6 (ONNX
Runtime and PyTorch heatmaps differ by ~1e-7, far below the ~1e-5 gaps between neighbouring heatmap values
here, so no peak moves; the untrained run gives a mix of true and false positives and misses).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy.optimize import linear_sum_assignment

pytest.importorskip("torch")

MATCH_MM = 6.0
SETS = ["data.synthetic_cases=6", "data.synthetic_shape=[20, 20]", "data.patch_size=[20, 20]",
        "data.class_names=[background, small, large]", "model.base_width=1", "train.epochs=1",
        "train.steps_per_epoch=3", "train.batch_size=2", "train.num_threads=1", "train.val_every=1",
        "train.keypoints.threshold=0.001", "train.keypoints.max_per_class=2", "train.keypoints.radius_mm=3",
        f"train.keypoints.match_mm={MATCH_MM}"]


@pytest.fixture(scope="module")
def keypoint_run(tmp_path_factory):
    """(run dir, bundle dir, data dir) of a tiny keypoint run exported to a float ONNX bundle."""
    from typer.testing import CliRunner

    from edgeseg.cli.app import app
    from edgeseg.export.run_export import export_run

    base = tmp_path_factory.mktemp("keypoint_eval")
    run = base / "run"
    args = ["train", "configs/countception_phantoms.yaml", "--out", str(run)]
    for s in SETS:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    bundle = base / "bundle"
    export_run(run, bundle)
    return run, bundle, run / "synthetic_data"


def _counts(metrics: dict) -> dict:
    return {case: {c: (m["tp"], m["fp"], m["fn"]) for c, m in classes.items()} for case, classes in metrics.items()}


def test_bundle_scores_as_the_run_does(keypoint_run):
    from edgeseg.runtime.evaluate_bundle import evaluate_bundle
    from edgeseg.train.experiment import evaluate_run

    run, bundle, data = keypoint_run
    by_run = evaluate_run(run, data=data, split="train", device="cpu")  # the largest split: 4 cases
    by_bundle = evaluate_bundle(bundle, data, "train", backend="onnxruntime")
    assert set(by_bundle["cases"]) == set(by_run["cases"]) and len(by_run["cases"]) == 4
    assert by_bundle["settings"]["match_mm"] == MATCH_MM and by_bundle["settings"]["max_per_class"] == 2
    # the same keypoints decoded (ONNX Runtime vs PyTorch heatmaps: scores to float tolerance, positions exact)
    for case, records in by_run["keypoints"].items():
        got = by_bundle["keypoints"][case]
        assert [(r["label"], r["voxel"]) for r in got] == [(r["label"], r["voxel"]) for r in records]
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in records], abs=1e-4)
    # the same counts exactly, the same distances within 1e-6 mm
    assert _counts(by_bundle["cases"]) == _counts(by_run["cases"])
    for case, classes in by_run["cases"].items():
        for cls, m in classes.items():
            for key in ("precision", "recall", "f1", "error_mm", "nearest_mm"):
                assert by_bundle["cases"][case][cls][key] == pytest.approx(m[key], abs=1e-6)
    for cls, d in by_run["detection"].items():
        for key, value in d.items():
            assert by_bundle["detection"][cls][key] == pytest.approx(value, abs=1e-6), (cls, key)
    assert by_bundle["score"] == pytest.approx(by_run["score"], abs=1e-9)
    assert set(by_bundle["summary"]) == set(by_run["summary"]) == {"small", "large", "mean"}

    # independent recount from the decoded keypoints and the label files
    names = {1: "small", 2: "large"}
    tp_total = 0
    for case, records in by_bundle["keypoints"].items():
        truth = np.asarray(Image.open(data / "labels" / case))
        for label, name in names.items():
            pred = np.array([r["world_mm"][:2] for r in records if r["label"] == label]).reshape(-1, 2)
            ref = np.argwhere(truth == label).astype(float)
            d = np.sqrt(((pred[:, None] - ref[None]) ** 2).sum(-1))
            rows, cols = linear_sum_assignment(np.where(d <= MATCH_MM, d, 1e9)) if d.size else ([], [])
            matched = [d[i, j] for i, j in zip(rows, cols) if d[i, j] <= MATCH_MM]
            m = by_bundle["cases"][case][name]
            assert (m["tp"], m["fp"], m["fn"]) == (len(matched), len(pred) - len(matched), len(ref) - len(matched))
            if matched:
                assert m["error_mm"] == pytest.approx(float(np.mean(matched)), abs=1e-9)
            if d.size:
                assert m["nearest_mm"] == pytest.approx(float(d.min(axis=0).mean()), abs=1e-9)
            tp_total += len(matched)
    assert by_bundle["detection"]["all"]["tp"] == tp_total


def test_cli_evaluates_a_keypoint_bundle(keypoint_run, tmp_path):
    from typer.testing import CliRunner

    from edgeseg.cli.app import app
    from edgeseg.errors import UserError

    _, bundle, data = keypoint_run
    out = tmp_path / "bundle.json"
    result = CliRunner().invoke(app, ["evaluate", str(bundle), "--data", str(data), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "f1" in result.output and "error_mm" in result.output  # the keypoint table
    written = json.loads(out.read_text())
    assert set(written["summary"]) == {"small", "large", "mean"}
    assert set(written["summary"]["mean"]) == {"precision", "recall", "f1", "error_mm", "nearest_mm"}
    assert math.isfinite(written["score"]) and "all" in written["detection"]
    result = CliRunner().invoke(app, ["evaluate", str(bundle), "--data", str(data), "--include-background"])
    assert result.exit_code != 0 and isinstance(result.exception, UserError)
    assert "channel 0 is unused" in str(result.exception)


def test_report_example_draws_the_keypoints_evaluate_decodes(keypoint_run):
    """The report's example of a keypoint bundle shows the keypoints `evaluate BUNDLE --tta` decodes for that case
    (once it drew the argmax of the heatmaps as a mask), and the strongest heatmap instead of an entropy map."""
    from edgeseg.report.example import plot_example, segment_example
    from edgeseg.runtime.evaluate_bundle import evaluate_bundle

    _, bundle, data = keypoint_run
    example = segment_example("fp32", bundle, data, "test")
    expected = evaluate_bundle(bundle, data, "test", tta=True, backend="onnxruntime")["keypoints"][example.case]
    assert expected and example.points == [(r["label"], *r["voxel"]) for r in expected]
    assert example.axis is None and example.samples == 4 and example.uncertainty is None
    assert example.heatmap is not None and example.heatmap.shape == example.image.shape == (20, 20)
    assert not example.labels.any() and example.caption().startswith("the runtime's keypoints and its strongest heatmap")
    assert plot_example(example)[:8] == b"\x89PNG\r\n\x1a\n"
