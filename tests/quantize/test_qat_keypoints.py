"""`edgeseg quantize` on a keypoint run (train.scheme keypoints, Count-ception): QAT trains with the scheme's loss on
heatmap targets, validates and selects by keypoint detection and compares float and quantized models by it; the
quantized run exports to a heatmap bundle that `edgeseg segment` decodes.

Oracles: detections recomputed by hand from the saved QAT checkpoint (sigmoid of the raw output, argmax per class
channel, distance to the label PNG's keypoint pixel, F1 counted by hand); the bundle's heatmaps against the brevitas
model's sigmoid output, and its keypoints JSON against the argmax of the heatmaps it wrote.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from edgeseg.cli.app import app
from edgeseg.config import load_experiment
from edgeseg.data.preprocess import PreprocessSpec
from edgeseg.losses.wing import AdaptiveWingLoss
from edgeseg.quantize import qat
from edgeseg.quantize.qat import load_quant_model, quantize_run
from edgeseg.train.experiment import load_cases
from edgeseg.train.keypoints import KeypointValidation
from edgeseg.train.setup import load_data_splits

QUIET = Console(quiet=True)
MATCH_MM = 6.0
THRESHOLD = 0.001  # every class decoded: one detection per class and image (max_per_class 1)
FLOAT_RUN = ["data.synthetic_cases=12", "data.synthetic_shape=[20, 20]", "data.patch_size=[20, 20]",
             "data.class_names=[background, small, large]", "model.base_width=1", "train.epochs=1",
             "train.steps_per_epoch=3", "train.batch_size=2", "train.num_threads=1",
             f"train.keypoints.threshold={THRESHOLD}", "train.keypoints.max_per_class=1",
             f"train.keypoints.match_mm={MATCH_MM}"]
CLASSES = {1: "small", 2: "large"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny float keypoint run and its 8/8 quantization (one short QAT epoch), with the loop's parts recorded."""
    from edgeseg.train.experiment import train_experiment

    tmp = tmp_path_factory.mktemp("keypoints")
    train_experiment(load_experiment(Path("configs/countception_phantoms.yaml"), FLOAT_RUN), tmp / "run",
                     console=QUIET)
    seen = []

    def spy(parts, *args, **kwargs):
        seen.append(parts)
        return fit(parts, *args, **kwargs)

    fit = qat.fit
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(qat, "fit", spy)
        metrics = quantize_run(tmp / "run", "8/8", tmp / "q", epochs=1,
                               overrides=["quant.steps_per_epoch=2", "quant.calibration_batches=2"], console=QUIET)
    return tmp, metrics, seen[0]


def _heatmaps(model, image: np.ndarray) -> np.ndarray:
    """sigmoid of the raw model output, channels 1.. (K-1, *S)."""
    with torch.no_grad():
        out = model(torch.from_numpy(image[None]))
    return torch.sigmoid(getattr(out, "value", out)).numpy()[0, 1:]


def _oracle(model, cases, labels: Path) -> dict:
    """Detection counted by hand: one detection per class (the argmax, if >= THRESHOLD), one keypoint per class."""
    counts = {k: {"tp": 0, "pred": 0, "ref": 0} for k in CLASSES}
    distances = []
    for case in cases:
        truth = np.asarray(Image.open(labels / case.name))
        assert case.image.shape[1:] == truth.shape  # grid kept: voxel = PNG pixel = world mm (unit spacing)
        heat = _heatmaps(model, case.image)
        for k in CLASSES:
            (point,) = np.argwhere(truth == k)
            counts[k]["ref"] += 1
            if heat[k - 1].max() >= THRESHOLD:
                counts[k]["pred"] += 1
                d = math.dist(np.unravel_index(heat[k - 1].argmax(), truth.shape), point)
                if d <= MATCH_MM:
                    counts[k]["tp"] += 1
                    distances.append(d)
    f1 = {CLASSES[k]: 2 * c["tp"] / (c["pred"] + c["ref"]) for k, c in counts.items()}
    tp, pred, ref = (sum(c[key] for c in counts.values()) for key in ("tp", "pred", "ref"))
    return {"keypoint_f1": sum(f1.values()) / len(f1), "keypoint_f1_per_class": f1,
            "keypoint_precision": tp / pred if pred else None, "keypoint_recall": tp / ref,
            "keypoint_error_mm": float(np.mean(distances)) if distances else None}


def _approx(fields: dict, expected: dict) -> None:
    for key, value in expected.items():
        if isinstance(value, dict):
            assert fields[key] == pytest.approx(value, abs=1e-9), key
        elif value is None:
            assert fields[key] is None, key
        else:
            assert fields[key] == pytest.approx(value, abs=1e-9), key


def test_qat_trains_with_the_keypoint_loss_and_selects_by_keypoint_detection(runs):
    tmp, metrics, parts = runs
    assert isinstance(parts.score, KeypointValidation) and isinstance(parts.loss_fn, AdaptiveWingLoss)
    assert parts.output_activation == "heatmap"
    batch = parts.sampler.next_batch(2)
    assert batch.labels.shape == (2, 3, 20, 20) and batch.labels.dtype == np.float32  # Gaussian heatmap targets
    assert batch.labels[:, 1:].max() > 0.5
    log = [json.loads(line) for line in (tmp / "q" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and "val_keypoint_f1" in log[0] and not any("dice" in k for k in log[0])
    # recorded scores are keypoint scores, not Dice
    assert "dice" not in json.dumps(metrics["qat"]) + json.dumps(metrics["splits"])
    assert "val_dice_after_calibration" not in metrics and "val_score_after_calibration" in metrics
    assert set(metrics["qat"]["best_val"]) >= {"val_keypoint_f1", "val_keypoint_precision", "val_keypoint_recall",
                                               "val_keypoint_error_mm"}
    for split in ("val", "test"):
        row = metrics["splits"][split]
        assert row["score"] == "keypoint_score" and row["score_delta"] == row["score_quant"] - row["score_float"]
        assert 0.0 <= row["quant"]["keypoint_f1"] <= 1.0 and 0.0 <= row["float"]["keypoint_f1"] <= 1.0
    on_disk = json.loads((tmp / "q" / "metrics.json").read_text())
    assert on_disk["splits"]["test"]["quant"] == metrics["splits"]["test"]["quant"]


def test_recorded_keypoint_scores_match_detections_recounted_from_the_checkpoint(runs):
    tmp, metrics, _ = runs
    model, _, info = load_quant_model(tmp / "q")
    data = tmp / "run" / "synthetic_data"
    splits = load_data_splits(data, "auto", None, 0)
    spec = PreprocessSpec.from_dict(info.preprocess)
    for split, refs in (("val", splits.val), ("test", splits.test)):
        cases = load_cases(refs, spec, 3, QUIET, split)
        expected = _oracle(model, cases, data / "labels")
        row = metrics["splits"][split]
        _approx(row["quant"], expected)
        error = expected["keypoint_error_mm"]
        tie_break = 0.0 if error is None else 1e-6 * error / MATCH_MM  # KeypointValidation's documented score
        assert row["score_quant"] == pytest.approx(expected["keypoint_f1"] - tie_break, abs=1e-12)
        if split == "val":  # one QAT epoch: the saved checkpoint is the one validated and selected
            assert metrics["qat"]["best_epoch"] == 1
            _approx({k.removeprefix("val_"): v for k, v in metrics["qat"]["best_val"].items()}, expected)
            assert metrics["qat"]["best_val_score"] == pytest.approx(row["score_quant"], abs=1e-12)


def test_quantized_keypoint_run_exports_and_segments(runs):
    tmp, _, _ = runs
    runner = CliRunner()
    bundle, out = tmp / "bundle", tmp / "segmented"
    result = runner.invoke(app, ["export", str(tmp / "q"), "--out", str(bundle)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["output_kind"] == "heatmap" and manifest["bits"]["nominal"] == "8/8"
    assert "cpu_int8" in manifest["forms"] and manifest["parity"]["qcdq_per_layer"]["passed"]
    assert manifest["keypoints"]["threshold"] == THRESHOLD and manifest["keypoints"]["match_mm"] == MATCH_MM
    data = tmp / "run" / "synthetic_data"
    name = json.loads((data / "splits.json").read_text())["test"][0]
    result = runner.invoke(app, ["segment", str(bundle), str(data / "images" / name), "--out", str(out)])
    assert result.exit_code == 0, result.output
    stem = name.removesuffix(".png")
    heat = np.asarray(nib.load(out / f"{stem}_heatmaps.nii.gz").dataobj, dtype=np.float64)
    assert heat.shape == (20, 20, 1, 2)
    heat = np.moveaxis(heat[:, :, 0], -1, 0)
    # the int8 graph against brevitas (sigmoid space): within the export's reported end-to-end differences
    model, _, info = load_quant_model(tmp / "q")
    (case,) = load_cases([r for r in load_data_splits(data, "auto", None, 0).test if r.name == name],
                         PreprocessSpec.from_dict(info.preprocess), 3, QUIET, "test")
    assert np.abs(heat - _heatmaps(model, case.image)).max() < 0.01
    record = json.loads((out / f"{stem}_keypoints.json").read_text())
    assert record["heatmap_classes"] == ["small", "large"]
    points = {p["class"]: p["voxel"] for p in record["keypoints"]}
    expected = {CLASSES[k]: [float(v) for v in np.unravel_index(heat[k - 1].argmax(), (20, 20))]
                for k in CLASSES if heat[k - 1].max() >= THRESHOLD}
    assert points == expected
