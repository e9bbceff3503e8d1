"""The demo end to end, at reduced sizes (the full demo is the README's first command)."""

import json

import pytest
from rich.console import Console

from edgeseg.cli import demo
from edgeseg.errors import UserError
from edgeseg.runtime.bundle import load_bundle


@pytest.fixture
def small_demo(monkeypatch):
    monkeypatch.setattr(demo, "DEMO_SETTINGS", demo.DEMO_SETTINGS + [
        "data.synthetic_cases=8", "data.synthetic_shape=[24, 24, 24]", "data.patch_size=[16, 16, 16]",
        "data.inference_tile=[24, 24, 24]", "train.epochs=2", "train.steps_per_epoch=4", "train.val_every=1",
    ])
    monkeypatch.setattr(demo, "DEMO_QAT_EPOCHS", 1)


def test_demo_writes_every_stage(tmp_path, small_demo):
    out = tmp_path / "demo"
    demo.run_demo(out, data=None, overwrite=False, console=Console(quiet=True))
    metrics = json.loads((out / "float_test_metrics.json").read_text())
    assert set(metrics["summary"]) == {"sphere", "blob", "mean"}
    qmetrics = json.loads((out / "quant_4w6a_run" / "metrics.json").read_text())
    assert qmetrics["bits"] == "4/6"
    assert "test" in qmetrics["splits"]
    float_bundle = load_bundle(out / "bundle_fp32")
    quant_bundle = load_bundle(out / "bundle_4w6a")
    assert quant_bundle.manifest.class_names == float_bundle.manifest.class_names == ["background", "sphere", "blob"]
    masks = sorted((out / "segmentations").glob("*.nii.gz"))
    summaries = sorted((out / "segmentations").glob("*_uncertainty.json"))
    assert masks and len(summaries) == len(metrics["cases"])
    assert json.loads(summaries[0].read_text())["samples_from"]["mc_passes"] == 2
    report = json.loads((out / "report" / "results.json").read_text())
    assert [(s["name"], s["status"]) for s in report["settings"]] == [("fp32", "ok"), ("4/6", "ok")]
    assert (out / "report" / "report.html").is_file() and (out / "report" / "example_slice.png").is_file()
    # Oracle: the float bundle through the runtime scores what PyTorch scored on the same test cases.
    runtime_fp32 = report["settings"][0]["per_class"]
    for name in ("sphere", "blob"):
        assert runtime_fp32[name]["dice"] == pytest.approx(metrics["summary"][name]["dice"]["mean"], abs=0.01)
    assert report["settings"][1]["bundle_bytes"] < report["settings"][0]["bundle_bytes"]
    with pytest.raises(UserError, match="--overwrite"):
        demo.run_demo(out, data=None, overwrite=False, console=Console(quiet=True))
