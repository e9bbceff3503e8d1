"""Reports of keypoint (heatmap) bundles: accuracy is mean keypoint F1 (table, Pareto front, plots, reuse)."""

import json
from pathlib import Path

import pytest

from edgeseg.errors import UserError
from edgeseg.export.bundle_writer import write_bundle
from edgeseg.report import render
from edgeseg.report.collect import collect
from edgeseg.runtime.bundle import Manifest, ModelForm


def keypoint_bundle(path: Path, payload_bytes: int, nominal: str) -> Path:
    """A Count-ception-like bundle (output_kind "heatmap") whose only file is `payload_bytes` long."""
    manifest = Manifest(
        spatial_dims=2, in_channels=1, class_names=["background", "small", "large"], tile_size=[16, 16],
        min_input_multiple=4, preprocess={}, output_kind="heatmap",
        forms={"cpu": ModelForm(file="model.onnx", backend="onnxruntime", precision="fp32")},
        files={}, bits={"nominal": nominal, "weights_at_rest": "float32", "deployed": {"cpu": ["float32"]}},
    )
    write_bundle(path, {"model.onnx": b"\0" * payload_bytes}, manifest)
    return path


def stat(mean):
    return {"mean": mean, "std": 0.0 if mean is not None else None, "n": 0 if mean is None else 2, "n_inf": 0}


def keypoint_summary(f1_small, f1_large, err_small, err_large, f1_mean):
    """A hand-written keypoint summary (the evaluator's layout for heatmap bundles)."""
    def cls(f1, err):
        return {"precision": stat(f1), "recall": stat(f1), "f1": stat(f1), "error_mm": stat(err),
                "nearest_mm": stat(9.0)}
    return {"small": cls(f1_small, err_small), "large": cls(f1_large, err_large), "mean": cls(f1_mean, 2.0)}


# by bundle folder: fp32 (4000 B) is beaten by the smaller 8/8 (1000 B, higher F1); 4/6 (600 B) is the smallest.
SUMMARIES = {
    "fp32": keypoint_summary(0.5, 0.7, 1.5, 2.25, 0.6),
    "w8a8": keypoint_summary(0.8, 0.6, None, 3.0, 0.7),
    "w4a6": keypoint_summary(0.3, 0.5, 4.0, 5.0, 0.4),
}


class KeypointEvaluator:
    def __init__(self, fail=()):
        self.fail, self.calls = set(fail), []

    def __call__(self, bundle, data, split):
        name = Path(bundle).name
        self.calls.append(name)
        if name in self.fail:
            raise RuntimeError("onnxruntime refused the graph")
        return {"summary": SUMMARIES[name], "cases": [], "seconds_per_case": [0.3, 0.1, 0.2]}


@pytest.fixture
def kp_bundles(tmp_path):
    root = tmp_path / "kp"
    return {"fp32": keypoint_bundle(root / "fp32", 4000, "fp32"), "8/8": keypoint_bundle(root / "w8a8", 1000, "8/8"),
            "4/6": keypoint_bundle(root / "w4a6", 600, "4/6")}


def test_keypoint_rows_front_and_table(kp_bundles, tmp_path):
    rows = collect(list(kp_bundles.items()), data=None, evaluate=KeypointEvaluator(),
                   measure_memory=lambda b, d, s: 123 * 2**20)
    assert [(r["accuracy_metric"], r["accuracy_mean"], r["dice_mean"]) for r in rows] == [
        ("f1", 0.6, None), ("f1", 0.7, None), ("f1", 0.4, None)]
    assert rows[1]["per_class"]["small"]["f1"] == 0.8 and rows[1]["per_class"]["small"]["error_mm"] is None
    out = tmp_path / "report"
    results = render.write_report(out, rows, split="test", data=None)
    # By hand: 8/8 (1000 B, .7) dominates fp32 (4000 B, .6); 4/6 (600 B, .4) is the smallest. By size: 4/6, 8/8.
    assert results["accuracy_metric"] == "f1" and results["pareto_front"] == ["4/6", "8/8"]
    header, cells = render.table(results)
    assert header == ["setting", "Pareto", "bundle kB", "weights at rest", "mean F1", "F1 small", "F1 large",
                      "loc. err. small (mm)", "loc. err. large (mm)", "latency s/vol", "peak RSS MiB"]
    assert cells[0] == ["fp32", "", "4.0", "float32", "0.600", "0.500", "0.700", "1.50", "2.25", "0.200", "123"]
    assert cells[1] == ["8/8", "yes", "1.0", "float32", "0.700", "0.800", "0.600", "-", "3.00", "0.200", "123"]
    md = (out / "report.md").read_text()
    assert "| fp32 |  | 4.0 | float32 | 0.600 | 0.500 | 0.700 | 1.50 | 2.25 | 0.200 | 123 |" in md
    assert "at least as accurate (mean keypoint F1" in md and "HD95" not in md
    for name in ("f1_vs_size.png", "f1_vs_latency.png", "per_class_f1.png"):
        assert (out / name).is_file() and f"]({name})" in md
    assert not (out / "dice_vs_size.png").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["accuracy_metric"] == "f1" and saved["settings"][0]["accuracy_metric"] == "f1"


def test_keypoint_plots_are_labelled_f1(kp_bundles, monkeypatch):
    rows = collect(list(kp_bundles.items()), data=None, evaluate=KeypointEvaluator(), measure_memory=None)
    results = render.build_results(rows, split="test", data=None)
    seen = []
    original = render.figure_png

    def spy(fig, draw):
        def wrapped():
            draw()
            ax = fig.axes[0]
            points = [tuple(p) for p in ax.collections[0].get_offsets()] if ax.collections else None
            bars = [round(b.get_height(), 6) for b in ax.patches]
            seen.append((ax.get_ylabel(), ax.get_title(), points, bars))
        return original(fig, wrapped)

    monkeypatch.setattr(render, "figure_png", spy)
    render.plot_accuracy_vs_size(results)
    render.plot_accuracy_vs_latency(results)
    render.plot_per_class_accuracy(results)
    assert [s[:2] for s in seen] == [("mean F1", "F1 vs model size"), ("mean F1", "F1 vs latency"),
                                     ("mean F1", "Per-class F1")]
    assert seen[0][2] == [(4.0, 0.6), (1.0, 0.7), (0.6, 0.4)]  # (kB, mean F1) per setting
    assert seen[2][3] == [0.5, 0.7, 0.8, 0.6, 0.3, 0.5]  # per-class F1 bars, setting by setting (small, large)


def test_failed_keypoint_setting_keeps_the_table_shape(kp_bundles):
    rows = collect(list(kp_bundles.items()), data=None, evaluate=KeypointEvaluator(fail={"w8a8"}),
                   measure_memory=None)
    results = render.build_results(rows, split="test", data=None)
    assert results["pareto_front"] == ["4/6", "fp32"]  # without 8/8, fp32 is not dominated
    header, cells = render.table(results)
    assert all(len(c) == len(header) for c in cells) and cells[1][:3] == ["8/8", "", "failed"]


def test_old_cached_keypoint_rows_are_reused_with_f1(kp_bundles, tmp_path):
    cache = tmp_path / "cache"
    collect(list(kp_bundles.items()), data=None, cache_dir=cache, evaluate=KeypointEvaluator(), measure_memory=None)
    for f in cache.glob("*.json"):  # the rows as the report wrote them before it knew keypoint bundles
        row = json.loads(f.read_text())
        for key in ("accuracy_metric", "accuracy_mean", "output_kind"):
            del row[key]
        row["per_class"] = {c: {} for c in ("small", "large", "mean")}
        f.write_text(json.dumps(row))
    again = KeypointEvaluator()
    rows = collect(list(kp_bundles.items()), data=None, cache_dir=cache, evaluate=again, measure_memory=None)
    assert again.calls == [] and all(r["reused"] for r in rows)
    assert [(r["accuracy_metric"], r["accuracy_mean"]) for r in rows] == [("f1", 0.6), ("f1", 0.7), ("f1", 0.4)]
    assert rows[0]["per_class"]["large"]["error_mm"] == 2.25


def test_mixed_segmentation_and_keypoint_bundles_are_a_user_error(kp_bundles, bundles, fake_evaluator):
    seg = fake_evaluator({"fp32": (0.9, 0.8)})
    with pytest.raises(UserError, match="mix segmentation"):
        collect([("seg", bundles["fp32"]), ("kp", kp_bundles["fp32"])], data=None, evaluate=seg,
                measure_memory=None)
    assert seg.calls == []  # refused before any evaluation
    seg_rows = collect([("seg", bundles["fp32"])], data=None, evaluate=seg, measure_memory=None)
    kp_rows = collect([("kp", kp_bundles["fp32"])], data=None, evaluate=KeypointEvaluator(), measure_memory=None)
    with pytest.raises(UserError, match="dice: seg; f1: kp"):
        render.build_results(seg_rows + kp_rows, split="test", data=None)
