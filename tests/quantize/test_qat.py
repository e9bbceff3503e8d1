"""`edgeseg quantize` end to end on synthetic phantoms: Dice stays close to the float model,
the quantized run directory reloads to the same predictions, and user mistakes are clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from edgeseg.cli.quantize_cmd import quantize
from edgeseg.config import load_experiment
from edgeseg.data.preprocess import PreprocessSpec
from edgeseg.errors import UserError
from edgeseg.quantize.qat import load_quant_model, quantize_run
from edgeseg.train.evaluation import evaluate_predictions, mean_foreground_dice
from edgeseg.train.experiment import load_cases
from edgeseg.train.inference import predict_labels
from edgeseg.train.rundir import RunDir
from edgeseg.train.setup import load_data_splits

QUIET = Console(quiet=True)
# volumes (24^3) fit into one inference tile, so evaluation needs no sliding window
FLOAT_RUN = [
    "data.root=synthetic",
    "data.class_names=[background, sphere, blob]",
    "data.synthetic_cases=10",
    "data.synthetic_shape=[24, 24, 24]",
    "data.patch_size=[16, 16, 16]",
    "data.inference_tile=[24, 24, 24]",
    "model.depth=2",
    "model.base_width=8",
    "train.batch_size=2",
    "train.num_threads=2",
    "train.epochs=6",
    "train.steps_per_epoch=12",
    "train.lr=0.01",
    "train.deterministic=true",
]
QUICK_QAT = ["quant.steps_per_epoch=8", "quant.calibration_batches=4", "quant.lr=0.002"]
MARGIN = 0.05  # a 4/6 model after 2 short QAT epochs keeps mean foreground Dice within 5 points of float


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    from edgeseg.train.experiment import train_experiment

    out = tmp_path_factory.mktemp("float") / "run"
    result = train_experiment(load_experiment(None, FLOAT_RUN), out, console=QUIET)
    assert result.best_dice is not None and result.best_dice > 0.5  # a float model worth quantizing
    return out


@pytest.fixture(scope="module")
def quant_run(float_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "q46"
    metrics = quantize_run(float_run, "4/6", out, epochs=2, overrides=QUICK_QAT, console=QUIET)
    return out, metrics


def test_short_qat_keeps_dice_within_margin(quant_run, float_run, tmp_path):
    out, metrics = quant_run
    assert metrics["bits"] == "4/6"
    # control: the same fine-tuning schedule in fp32, to separate quantization from extra training
    control = quantize_run(float_run, "fp32", tmp_path / "fp32", epochs=2, overrides=QUICK_QAT, console=QUIET)
    assert control["bits"] == "fp32" and control["float_islands"] == [] and "calibration_batches" not in control
    for split in ("val", "test"):
        row = metrics["splits"][split]
        assert row["dice_float"] > 0.5, row
        assert row["dice_quant"] >= row["dice_float"] - MARGIN, (split, row["dice_float"], row["dice_quant"])
        assert row["dice_quant"] >= control["splits"][split]["dice_quant"] - MARGIN, (split, row, control["splits"])
    assert metrics["qat"]["epochs"] == 2
    assert metrics["calibration_batches"] == 4
    assert metrics["quant_weight_bits"] < metrics["float_weight_bits"] / 4  # mostly 4-bit weights
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["splits"]["test"]["dice_quant"] == pytest.approx(metrics["splits"]["test"]["dice_quant"])


def test_qat_that_only_hurts_keeps_the_calibrated_weights(float_run, tmp_path):
    """Fine-tuning at an absurd learning rate wrecks the model; the calibrated model (validated before QAT) is
    kept, so the run is never worse on val than calibration alone (a 4-bit Count-ception once collapsed to a
    constant heatmap in QAT after validating keypoint F1 1.0 when calibrated, and the collapsed one was kept)."""
    out = tmp_path / "wrecked"
    metrics = quantize_run(float_run, "4/6", out, epochs=1, lr=50.0, overrides=QUICK_QAT, console=QUIET)
    calibrated = metrics["val_dice_after_calibration"]
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert calibrated > 0.5 and logged[-1]["val_dice"] < calibrated - 0.1  # QAT did make it worse
    assert metrics["qat"]["kept_calibrated"] is True and metrics["qat"]["best_epoch"] == 0
    assert metrics["qat"]["best_val_dice"] == calibrated
    # the saved best checkpoint is the calibrated model: scored again on val, it gives the calibrated Dice
    assert metrics["splits"]["val"]["dice_quant"] == pytest.approx(calibrated, abs=1e-9)


def test_quant_run_directory_records_bits_parent_and_config(float_run, quant_run):
    out, _ = quant_run
    run = RunDir(out)
    info, cfg = run.read_info(), run.read_config()
    assert info.bits == "4/6" and info.parent_run == str(float_run.resolve())
    assert cfg.quant.bits == "4/6" and cfg.quant.epochs == 2 and cfg.quant.steps_per_epoch == 8
    assert info.extra["layer_plan"]["enc0.conv1"] == "w8" and info.extra["layer_plan"]["enc1.conv1"] == "w4"
    assert run.best.is_file() and run.last.is_file()
    assert len(run.log.read_text().splitlines()) == 2


def test_loaded_quant_model_reproduces_the_reported_dice(quant_run):
    """load_quant_model (what export uses) -> independent scoring on the test split -> metrics.json's Dice."""
    out, metrics = quant_run
    model, cfg, info = load_quant_model(out)
    assert not model.training
    splits = load_data_splits(Path(info.data_root), cfg.data.layout, cfg.data.splits, cfg.train.seed)
    spec = PreprocessSpec.from_dict(info.preprocess)
    cases = load_cases(splits.test, spec, len(info.class_names), QUIET, "test")
    result = evaluate_predictions(
        cases, lambda c: predict_labels(model, c.image, tuple(info.tile_size), torch.device("cpu"), 3),
        spec, info.class_names)
    assert mean_foreground_dice(result["summary"]) == pytest.approx(metrics["splits"]["test"]["dice_quant"], abs=1e-9)


def test_cli_runs_and_rejects_bad_input(float_run, quant_run, tmp_path):
    app = typer.Typer()
    app.command()(quantize)
    runner = CliRunner()
    result = runner.invoke(app, [str(float_run), "--bits", "4/9", "--out", str(tmp_path / "x")])
    assert isinstance(result.exception, UserError) and "2..8" in str(result.exception)
    result = runner.invoke(app, [str(float_run), "--bits", "4/6", "--out", str(tmp_path / "x"),
                                 "--set", "model.depth=3"])
    assert isinstance(result.exception, UserError) and "quant.*" in str(result.exception)
    result = runner.invoke(app, [str(quant_run[0]), "--out", str(tmp_path / "y")])
    assert isinstance(result.exception, UserError) and "already a quantized run" in str(result.exception)
    result = runner.invoke(app, [str(float_run), "--out", str(quant_run[0])])
    assert isinstance(result.exception, UserError) and "already holds a run" in str(result.exception)
    # calibration only (--epochs 0), 8/8 with float first/last convs (the 2019 paper's setting)
    result = runner.invoke(app, [str(float_run), "--bits", "8/8", "--out", str(tmp_path / "z"), "--epochs", "0",
                                 "--set", "quant.calibration_batches=4", "--set", "quant.first_last_bits=32"])
    assert result.exit_code == 0, result.output
    info = RunDir(tmp_path / "z").read_info()
    assert info.extra["layer_plan"]["enc0.conv1"] == "float" and info.extra["layer_plan"]["head"] == "float"
    assert set(info.extra["float_islands"]) == {"encoders.0.conv1", "head"}
    metrics = json.loads((tmp_path / "z" / "metrics.json").read_text())
    assert "qat" not in metrics and metrics["calibration_batches"] == 4
    for row in metrics["splits"].values():
        assert abs(row["dice_quant"] - row["dice_float"]) < MARGIN, row
    model, _, _ = load_quant_model(tmp_path / "z")
    assert not model.training


def test_quant_outputs_are_deterministic_after_reload(quant_run):
    out, _ = quant_run
    a, _, _ = load_quant_model(out)
    b, _, _ = load_quant_model(out)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, 24, 24, 24)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_calibration_only_checkpoint_reloads(tmp_path):
    """quantize --epochs 0: the twin saved right after calibration must load again (regression)."""
    import torch

    from edgeseg.quantize.bits import parse_bits
    from edgeseg.quantize.calibrate import calibrate
    from edgeseg.quantize.layers import QuantLayers
    from edgeseg.nets import create_model
    from edgeseg.train.checkpoint import load_weights, save_weights

    def build():
        torch.manual_seed(0)
        layers = QuantLayers(2, parse_bits("4/6"), first_last=parse_bits("8/8"), overrides={}, norm="none",
                             power_of_two=False, learned_weight_scales=True, signed_concat=False)
        return create_model("unet", spatial_dims=2, in_channels=1, out_channels=2, depth=1, base_width=4,
                            norm="none", layers=layers)

    model = build()
    calibrate(model, [torch.randn(2, 1, 16, 16) for _ in range(2)])
    save_weights(tmp_path / "w.safetensors", model)
    again = build()
    load_weights(tmp_path / "w.safetensors", again)
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(model.eval()(x), again.eval()(x))


def test_qat_trains_only_on_the_labelled_training_cases(tmp_path, monkeypatch):
    """data.labelled_train_cases (few-label runs) holds for QAT too: only the first N training cases' labels."""
    import edgeseg.quantize.qat as qat
    from edgeseg.train.experiment import train_experiment

    float_run = tmp_path / "few"
    few = ["data.labelled_train_cases=2", "train.epochs=1", "train.steps_per_epoch=1"]
    train_experiment(load_experiment(None, FLOAT_RUN + few), float_run, console=QUIET)

    seen: dict[str, list[str]] = {}

    class Stop(Exception):
        pass

    def recording(refs, spec, num_classes, console, what):
        seen[what] = [r.name for r in refs]
        if what == "train cases":
            raise Stop
        return []

    monkeypatch.setattr(qat, "load_cases", recording)
    with pytest.raises(Stop):
        quantize_run(float_run, "4/6", tmp_path / "q", epochs=1, overrides=QUICK_QAT, console=QUIET)
    train = json.loads((Path(float_run) / "synthetic_data" / "splits.json").read_text())["train"]
    assert seen["train cases"] == train[:2] and len(train) > 2
