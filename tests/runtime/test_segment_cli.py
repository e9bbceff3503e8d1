"""`edgeseg segment` end to end on real data (hippocampus NIfTI, EM PNG) and its one-line errors.

Bundles here wrap single convolutions (`edgeseg bundle`'s code path, no torch), so outputs have
an oracle: scipy's correlation of the z-scored image, argmax over classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from edgeseg.cli.segment_cmd import segment
from edgeseg.errors import UserError

CLASSES = ["background", "anterior", "posterior"]


def cli() -> typer.Typer:
    """The real `edgeseg` app once `segment` is registered there, else a stand-in with the same command."""
    from edgeseg.cli.app import app

    if any((c.name or c.callback.__name__) == "segment" for c in app.registered_commands):
        return app
    local = typer.Typer()
    local.command()(segment)
    local.callback()(lambda: None)
    return local


def run(*args: str):
    return CliRunner().invoke(cli(), ["segment", *map(str, args)])


def conv_bundle(out: Path, weight: np.ndarray, tile: list[int]) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from edgeseg.export.third_party import make_bundle

    dims = weight.ndim - 2
    spatial = ["D", "H", "W"][-dims:]
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["logits"], pads=[1] * (2 * dims))], "g",
                              [helper.make_tensor_value_info("image", T.FLOAT, ["N", 1, *spatial])],
                              [helper.make_tensor_value_info("logits", T.FLOAT, ["N", len(weight), *spatial])],
                              [numpy_helper.from_array(weight, "w")])
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(out.parent / "m.onnx"))
    make_bundle(out.parent / "m.onnx", out, class_names=CLASSES[: len(weight)], tile=tile)
    return out


def zscore(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.mean()) / x.std()


@pytest.fixture(scope="module")
def bundle3d(tmp_path_factory) -> Path:
    weight = np.random.default_rng(0).normal(size=(3, 1, 3, 3, 3)).astype(np.float32)
    return conv_bundle(tmp_path_factory.mktemp("b3") / "bundle", weight, [16, 16, 16])


@pytest.fixture
def hippo(shared_data) -> Path:
    folder = shared_data / "msd_hippocampus" / "images"
    if not (folder / "hippocampus_001.nii.gz").is_file():
        pytest.skip(f"{folder} has no hippocampus_001.nii.gz")
    return folder


def test_hippocampus_masks_keep_the_input_grid_and_header(bundle3d, hippo, tmp_path):
    pattern = str(hippo / "hippocampus_00[13].nii.gz")  # a uint8 and a float32 volume
    result = run(bundle3d, pattern, "-o", tmp_path / "out", "--backend", "onnxruntime", "--batch-size", "2")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "backend: onnxruntime" in result.output
    for name in ("hippocampus_001.nii.gz", "hippocampus_003.nii.gz"):
        image, mask = nib.load(str(hippo / name)), nib.load(str(tmp_path / "out" / name))
        assert mask.shape == image.shape
        np.testing.assert_array_equal(mask.affine, image.affine)
        for coded in ("get_qform", "get_sform"):
            a, a_code = getattr(image.header, coded)(coded=True)
            b, b_code = getattr(mask.header, coded)(coded=True)
            np.testing.assert_array_equal(a, b)
            assert a_code == b_code
        np.testing.assert_array_equal(mask.header["pixdim"][1:4], image.header["pixdim"][1:4])
        assert mask.get_data_dtype() == np.uint8
        labels = np.asarray(mask.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2} and len(np.unique(labels)) > 1


def test_png_input_gives_a_png_mask_equal_to_the_oracle(shared_data, tmp_path):
    source = shared_data / "isbi2012_em" / "images" / "0.png"
    if not source.is_file():
        pytest.skip(f"{source} not found")
    weight = np.random.default_rng(1).normal(size=(2, 1, 3, 3)).astype(np.float32)
    bundle = conv_bundle(tmp_path / "b2" / "bundle", weight, [512, 512])  # one tile: exact zero-padding oracle
    result = run(bundle, source, "-o", tmp_path / "out", "--backend", "onnxruntime")
    assert result.exit_code == 0, result.output + repr(result.exception)
    mask = Image.open(tmp_path / "out" / "0.png")
    assert mask.size == Image.open(source).size and mask.mode == "L"
    z = zscore(np.asarray(Image.open(source), dtype=np.float64))
    expected = np.argmax([ndimage.correlate(z, weight[c, 0], mode="constant") for c in range(2)], axis=0)
    np.testing.assert_array_equal(np.asarray(mask), expected)


def test_uncertainty_outputs_and_summary(bundle3d, hippo, tmp_path):
    out = tmp_path / "out"
    result = run(bundle3d, hippo / "hippocampus_001.nii.gz", "-o", out, "--tta", "--uncertainty", "--probabilities",
                 "--iou-threshold", "0.2", "--backend", "onnxruntime", "--blend", "constant", "--overlap", "0.25")
    assert result.exit_code == 0, result.output + repr(result.exception)
    image = nib.load(str(hippo / "hippocampus_001.nii.gz"))
    mask = np.asarray(nib.load(str(out / "hippocampus_001.nii.gz")).dataobj)
    probs = nib.load(str(out / "hippocampus_001_probabilities.nii.gz"))
    entropy = nib.load(str(out / "hippocampus_001_uncertainty.nii.gz"))
    assert probs.shape == (*image.shape, 3) and entropy.shape == image.shape
    p = np.clip(np.asarray(probs.dataobj), 1e-12, 1)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy.dataobj), -(p * np.log(p)).sum(-1), atol=1e-4)
    summary = json.loads((out / "hippocampus_001_uncertainty.json").read_text())
    assert summary["num_samples"] == 8 and summary["samples_from"] == {"tta_flips": 8, "mc_passes": 1}
    voxel = float(np.prod(image.header.get_zooms()[:3]))
    for index, name in enumerate(CLASSES):
        assert summary["class_volumes_mm3"][name] == pytest.approx((mask == index).sum() * voxel)
    kept = [s for s in summary["structures"] if not s["removed"]]
    assert all(s["iou_across_samples"] >= 0.2 for s in kept)
    assert summary["structures_removed"] == len(summary["structures"]) - len(kept)
    assert f"{len(summary['structures'])} structures" in result.output


def test_rerun_skips_finished_cases_and_overwrite_redoes_them(bundle3d, hippo, tmp_path):
    # Batch segmentation resumes: a re-run never clobbers a finished output, it skips it;
    # --overwrite recomputes it.
    args = [bundle3d, hippo / "hippocampus_001.nii.gz", "-o", tmp_path / "out", "--backend", "onnxruntime"]
    assert run(*args).exit_code == 0
    mask = tmp_path / "out" / "hippocampus_001.nii.gz"
    before = mask.stat().st_mtime_ns
    again = run(*args)
    assert again.exit_code == 0 and "skipping 1 case(s)" in again.output
    assert mask.stat().st_mtime_ns == before
    assert run(*args, "--overwrite").exit_code == 0
    assert mask.stat().st_mtime_ns > before


@pytest.mark.parametrize("extra, message", [
    (["--overlap", "-0.5"], "--overlap must be within"),
    (["--uncertainty"], "needs several samples"),
    (["--mc", "4"], "no Monte Carlo dropout form"),
    (["--tta-axes", "0,5"], "TTA axes"),
    (["--tile", "16,16"], "needs 3 values"),
    (["--backend", "tensorrtt"], "unknown backend"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_options_are_one_line_errors(bundle3d, hippo, tmp_path, extra, message):
    result = run(bundle3d, hippo / "hippocampus_001.nii.gz", "-o", tmp_path / "out", *extra)
    assert isinstance(result.exception, UserError), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_bad_inputs_are_one_line_errors(bundle3d, hippo, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        ([bundle3d, tmp_path / "missing.nii.gz"], "input not found"),
        ([bundle3d, tmp_path / "empty"], "no image files in this folder"),
        ([bundle3d, str(tmp_path / "*.nii.gz")], "matches no image files"),
        ([tmp_path / "no_bundle", hippo / "hippocampus_001.nii.gz"], "bundle not found"),
    ]
    for args, message in cases:
        result = run(*args, "-o", tmp_path / "out")
        assert isinstance(result.exception, UserError), (args, result.output)
        assert message in str(result.exception) and "\n" not in str(result.exception)
    # writing next to the inputs would replace them
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.nii.gz").write_bytes((hippo / "hippocampus_001.nii.gz").read_bytes())
    result = run(bundle3d, tmp_path / "in", "-o", tmp_path / "in", "--overwrite")
    assert isinstance(result.exception, UserError) and "replace an input" in str(result.exception)


def test_segment_is_registered_in_the_edgeseg_app():
    from edgeseg.cli.app import app

    if not any((c.name or c.callback.__name__) == "segment" for c in app.registered_commands):
        pytest.skip("`segment` is not registered in edgeseg.cli.app yet (the lead wires it)")
    result = CliRunner().invoke(app, ["segment", "--help"])
    assert result.exit_code == 0 and "--tta-axes" in result.output



def test_tiles_smaller_than_the_training_patch_are_warned_about(bundle3d, hippo, tmp_path):
    from dataclasses import replace

    from edgeseg.runtime.bundle import read_manifest
    from edgeseg.runtime.pipeline import tile_warning

    manifest = replace(read_manifest(bundle3d), training={"patch_size": [40, 56, 40]})
    assert "smaller than the training patch [40, 56, 40]" in tile_warning(manifest, [32, 64, 48])
    assert tile_warning(manifest, [48, 64, 48]) is None
    assert tile_warning(replace(manifest, training={}), [8, 8, 8]) is None
    result = run(bundle3d, hippo / "hippocampus_001.nii.gz", "-o", tmp_path / "out", "--tile", "8,8,8")
    assert result.exit_code == 0 and "warning" not in result.output  # this bundle records no training patch
