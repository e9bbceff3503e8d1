"""The full `--config/--bits` report on a tiny synthetic setup: files, JSON, failures, resume."""

import json

import pytest

import edgeseg.export.run_export as run_export_mod
import edgeseg.quantize.qat as qat_mod
from edgeseg.errors import UserError
from edgeseg.report.sweep import export_existing_runs, parse_bits_list, run_existing, run_sweep, setting_tag
from edgeseg.runtime.bundle import read_manifest

TINY = """
data:
  root: synthetic
  spatial_dims: 3
  class_names: [background, sphere, blob]
  synthetic_cases: 6
  synthetic_shape: [16, 16, 16]
  patch_size: [16, 16, 16]
model:
  depth: 2
  base_width: 4
train:
  epochs: 1
  steps_per_epoch: 1
  batch_size: 1
  val_every: 1
  num_threads: 2
quant:
  epochs: 0
  calibration_batches: 1
"""


def test_bits_list_parsing():
    assert parse_bits_list("fp32, 8/8,4/6") == ["fp32", "8/8", "4/6"]
    assert setting_tag("4/6") == "w4a6" and setting_tag("float") == "fp32"
    with pytest.raises(UserError, match="twice"):
        parse_bits_list("4/6,4/6")
    with pytest.raises(UserError, match="--bits"):
        parse_bits_list("4/9")


@pytest.fixture
def spies(monkeypatch):
    """Count QAT and export calls (the report reuses finished ones on a re-run)."""
    calls = {"quantize": [], "export": []}
    real_q, real_e = qat_mod.quantize_run, run_export_mod.export_run

    def quantize_run(run_dir, bits, out, **kw):
        calls["quantize"].append(bits)
        if bits == "2/4" and calls.get("fail_2_4"):
            raise RuntimeError("brevitas exploded")
        return real_q(run_dir, bits, out, **kw)

    def export_run(run_dir, out, **kw):
        calls["export"].append(out.name)
        return real_e(run_dir, out, **kw)

    monkeypatch.setattr(qat_mod, "quantize_run", quantize_run)
    monkeypatch.setattr(run_export_mod, "export_run", export_run)
    return calls


def test_sweep_writes_report_then_resumes(tmp_path, spies, fake_evaluator):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    out = tmp_path / "report"
    spies["fail_2_4"] = True
    fake = fake_evaluator({"fp32": (0.9, 0.8), "w8a8": (0.85, 0.75), "w2a4": (0.5, 0.4)})
    results = run_sweep(out, ["fp32", "8/8", "2/4"], config=config, evaluate=fake, measure_memory=None)
    assert spies["quantize"] == ["8/8", "2/4"] and spies["export"] == ["fp32", "w8a8"]
    by_name = {s["name"]: s for s in results["settings"]}
    assert [s["name"] for s in results["settings"]] == ["fp32", "8/8", "2/4"]
    assert by_name["2/4"]["status"] == "failed" and "brevitas exploded" in by_name["2/4"]["error"]
    # Sizes come from the real exported bundles' manifests; the 8/8 bundle holds int8 weights.
    for name, tag in (("fp32", "fp32"), ("8/8", "w8a8")):
        manifest = read_manifest(out / "bundles" / tag)
        assert by_name[name]["bundle_bytes"] == manifest.sizes["bundle_bytes"]
        assert by_name[name]["bits_nominal"] == manifest.bits["nominal"] == name
    assert by_name["8/8"]["bundle_bytes"] < by_name["fp32"]["bundle_bytes"]
    for name in ("results.json", "report.md", "report.html", "dice_vs_size.png"):
        assert (out / name).is_file()
    assert json.loads((out / "results.json").read_text())["settings"][2]["status"] == "failed"

    # Half-finished: drop the 8/8 bundle and row (its QAT run stays); the re-run adds 4/6 and retries 2/4.
    import shutil

    shutil.rmtree(out / "bundles" / "w8a8")
    (out / "settings" / "8_8.json").unlink()
    spies["fail_2_4"] = False
    spies["quantize"].clear()
    spies["export"].clear()
    fake.calls.clear()
    fake.dice["w4a6"] = (0.8, 0.7)
    results = run_sweep(out, ["fp32", "8/8", "4/6", "2/4"], config=config, evaluate=fake, measure_memory=None)
    assert spies["quantize"] == ["4/6", "2/4"]  # no float training, no 8/8 QAT again
    assert spies["export"] == ["w8a8", "w4a6", "w2a4"]
    assert sorted(fake.calls) == ["w2a4", "w4a6", "w8a8"]  # fp32's row was reused
    assert [s["status"] for s in results["settings"]] == ["ok"] * 4

    # The existing-runs form: the same float and 8/8 runs, exported again into another report dir,
    # plus a folder that is no run (a failed row, not an error).
    other = tmp_path / "other"
    settings, failed = export_existing_runs(other, [out / "float_run", out / "runs" / "w8a8", tmp_path / "nope"])
    assert [n for n, _ in settings] == ["fp32", "8/8"]
    assert len(failed) == 1 and failed[0]["status"] == "failed"
    results = run_existing(other, settings, data=None, evaluate=fake, measure_memory=None, failed=failed)
    assert [s["status"] for s in results["settings"]] == ["ok", "ok", "failed"]
    assert (other / "report.html").is_file()


@pytest.mark.parametrize("extra, reason", [
    ("train:\n  scheme: stipple\ndata:\n  labelled_train_cases: 3\n", "prior-driven loss"),
    ("model:\n  name: hemis_unet\n", "cannot be quantized"),
])
def test_a_method_that_cannot_be_quantized_is_refused_before_training(tmp_path, extra, reason):
    import yaml

    cfg = yaml.safe_load(TINY)
    for section, values in yaml.safe_load(extra).items():
        cfg.setdefault(section, {}).update(values)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "report"
    with pytest.raises(UserError, match=f"{reason}.*for a float-only report pass --bits fp32"):
        run_sweep(out, ["fp32", "8/8"], config=config, measure_memory=None)
    assert not (out / "float_run").exists()  # refused in seconds, nothing trained
