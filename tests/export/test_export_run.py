"""`edgeseg export RUN_DIR` end to end on tiny (untrained) float and quantized run directories, and the CLI."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from edgeseg.cli.export_cmd import build_engine, bundle, export
from edgeseg.config import load_experiment
from edgeseg.data.preprocess import PreprocessSpec
from edgeseg.errors import UserError
from edgeseg.export.run_export import export_run
from edgeseg.runtime.bundle import load_bundle
from edgeseg.train.checkpoint import save_weights
from edgeseg.train.rundir import RunDir, RunInfo

OVERRIDES = ["data.root=synthetic", "data.class_names=[background, left, right]", "data.patch_size=[16, 16, 16]",
             "model.depth=2", "model.base_width=4", "model.dropout=0.2"]
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _run_dir(path: Path, model: torch.nn.Module, cfg, bits: str = "fp32", parent: str | None = None) -> Path:
    run = RunDir(path)
    path.mkdir(parents=True)
    run.write_config(cfg)
    run.write_info(RunInfo(spatial_dims=3, in_channels=1, class_names=["background", "left", "right"],
                           patch_size=[16, 16, 16], tile_size=[16, 16, 16],
                           preprocess=PreprocessSpec(target_spacing=(1.0, 1.0, 1.5)).to_dict(), data_root=None,
                           bits=bits, parent_run=parent))
    save_weights(run.best, model)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from edgeseg.nets import build_from_config
    from edgeseg.quantize.calibrate import calibrate
    from edgeseg.quantize.twin import build_twin, twin_spec

    cfg = load_experiment(None, OVERRIDES)
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    float_model = build_from_config(cfg.model, spatial_dims=3, in_channels=1, out_channels=3).eval()
    float_run = _run_dir(root / "float", float_model, cfg)
    twin, _ = build_twin(cfg.model, twin_spec(cfg.model, cfg.quant), spatial_dims=3, in_channels=1, out_channels=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrate(twin, [torch.randn(2, 1, 16, 16, 16) for _ in range(2)])
        twin.train()(torch.randn(2, 1, 16, 16, 16))  # one QAT-like step initialises the learned weight scales
    twin.eval()
    quant_run = _run_dir(root / "quant", twin, cfg, bits="4/6", parent=str(float_run))
    return float_run, quant_run


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(export)
    app.command()(bundle)
    app.command("build-engine")(build_engine)
    return app


def test_cli_exports_a_float_run_to_an_archive(runs, tmp_path):
    out = tmp_path / "float.zip"
    result = CliRunner().invoke(_app(), ["export", str(runs[0]), "--out", str(out), "--tile", "14,14,14"])
    assert result.exit_code == 0, result.output
    assert "float ONNX vs PyTorch" in result.output and "re-loaded" in result.output
    m = load_bundle(out).manifest
    assert m.tile_size == [16, 16, 16]  # 14 rounded up to the model's multiple (2**depth = 4)
    assert m.training == {"patch_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.5], "orientation": "RAS"}
    assert m.source["run_dir"] == str(runs[0].resolve()) and set(m.forms) == {"float", "mc"}


def test_quantized_run_exports_cpu_trt_and_mc_forms(runs, tmp_path):
    from edgeseg.quantize.qat import load_quant_model

    result = export_run(runs[1], tmp_path / "q", batch=2)
    m = load_bundle(tmp_path / "q").manifest
    assert set(m.forms) == {"cpu_int8", "trt", "mc"} and m.batch == 2
    assert m.bits["nominal"] == "4/6" and m.source["parent_run"] == str(runs[0])
    assert any("QLinearConv" in line for line in result.summary)
    model, _, _ = load_quant_model(runs[1])
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        ref = model(x)
    ref = (ref.value if hasattr(ref, "value") else ref).numpy()
    out = load_bundle(tmp_path / "q").ort_session("cpu_int8").run(None, {"image": x.numpy()})[0]
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.99


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown where TensorRT is missing")
def test_tensorrt_target_without_tensorrt_fails_in_one_line_before_exporting(runs, tmp_path):
    with pytest.raises(UserError, match=r"pip install 'edgeseg\[trt\]'.*build-engine") as info:
        export_run(runs[0], tmp_path / "b", target="tensorrt")
    assert "\n" not in str(info.value) and "JetPack" in str(info.value)
    assert not (tmp_path / "b").exists()


def test_user_mistakes_are_clear_errors(runs, tmp_path):
    with pytest.raises(UserError, match="did you mean 'onnx'"):
        export_run(runs[0], tmp_path / "b", target="onx")
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="--overwrite"):
        export_run(runs[0], tmp_path / "exists")
    with pytest.raises(UserError, match="needs 3 values"):
        export_run(runs[0], tmp_path / "b", tile=[16, 16])
    result = CliRunner().invoke(_app(), ["export", str(runs[0]), "--out", str(tmp_path / "c"), "--tile", "a,b"])
    assert isinstance(result.exception, UserError) and "--tile" in str(result.exception)


def test_cli_bundle_and_build_engine(tmp_path):
    import onnx
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", T.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 2, 8, 8])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    result = CliRunner().invoke(_app(), ["bundle", "--onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "b"),
                                         "--classes", "bg,fg", "--spacing", "1,1", "--no-reorient"])
    assert result.exit_code == 0, result.output
    m = load_bundle(tmp_path / "b").manifest
    assert m.preprocess["reorient"] is False and m.preprocess["target_spacing"] == [1.0, 1.0]
    if not HAS_TENSORRT:
        result = CliRunner().invoke(_app(), ["build-engine", str(tmp_path / "b")])
        assert isinstance(result.exception, UserError) and "pip install 'edgeseg[trt]'" in str(result.exception)
