"""`edgeseg segment --workers N`: volumes over worker processes, a failed case in the middle, skip on re-run.

The bundle wraps one 3x3x3 convolution (`edgeseg bundle`'s code path, no torch) and each volume is
exactly one tile, so every mask has an oracle: scipy's zero-padded correlation of the z-scored
volume, argmax over classes.
"""

from __future__ import annotations

import json
import queue
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer
from scipy import ndimage
from typer.testing import CliRunner

from edgeseg.cli.segment_cmd import segment

SHAPE = (16, 16, 16)
WEIGHT = np.random.default_rng(0).normal(size=(3, 1, 3, 3, 3)).astype(np.float32)


def cli() -> typer.Typer:
    from edgeseg.cli.app import app

    if any((c.name or c.callback.__name__) == "segment" for c in app.registered_commands):
        return app
    local = typer.Typer()
    local.command()(segment)
    local.callback()(lambda: None)
    return local


def run(*args):
    return CliRunner().invoke(cli(), ["segment", *map(str, args)])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from edgeseg.export.third_party import make_bundle

    root = tmp_path_factory.mktemp("bundle")
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["logits"], pads=[1] * 6)], "g",
                              [helper.make_tensor_value_info("image", T.FLOAT, ["N", 1, "D", "H", "W"])],
                              [helper.make_tensor_value_info("logits", T.FLOAT, ["N", 3, "D", "H", "W"])],
                              [numpy_helper.from_array(WEIGHT, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(root / "m.onnx"))
    make_bundle(root / "m.onnx", root / "bundle", class_names=["background", "a", "b"], tile=list(SHAPE))
    return root / "bundle"


def write_volumes(folder: Path, count: int, broken: int | None = None) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    names = []
    for i in range(count):
        name = f"case_{i}.nii.gz"
        if i == broken:
            (folder / name).write_bytes(b"not a NIfTI file")
        else:
            nib.save(nib.Nifti1Image(rng.normal(size=SHAPE).astype(np.float32), np.eye(4)), str(folder / name))
        names.append(name)
    return names


def oracle(image_path: Path) -> np.ndarray:
    x = np.asarray(nib.load(str(image_path)).dataobj, dtype=np.float64)
    z = (x - x.mean()) / x.std()
    return np.argmax([ndimage.correlate(z, WEIGHT[c, 0].astype(np.float64), mode="constant") for c in range(3)],
                     axis=0)


def summary(out: Path) -> dict:
    return json.loads((out / "segment_summary.json").read_text())


def test_two_workers_keep_going_past_a_broken_case_and_a_rerun_does_only_that_case(bundle, tmp_path):
    names = write_volumes(tmp_path / "in", 5, broken=2)
    out = tmp_path / "out"
    result = run(bundle, tmp_path / "in", "-o", out, "--workers", "2", "--backend", "onnxruntime")
    assert result.exit_code == 1, result.output + repr(result.exception)
    assert "2 worker processes" in result.output
    assert "failed case_2.nii.gz" in result.output
    report = summary(out)
    assert report["counts"] == {"done": 4, "skipped": 0, "failed": 1}
    by_case = {c["case"]: c for c in report["cases"]}
    assert [c["case"] for c in report["cases"]] == names  # input order, whatever order they finished in
    assert by_case["case_2.nii.gz"]["status"] == "failed" and by_case["case_2.nii.gz"]["reason"]
    assert {by_case[n]["worker"] for n in names if n != "case_2.nii.gz"} <= {0, 1}
    assert not (out / "case_2.nii.gz").exists()
    for name in names:
        if name != "case_2.nii.gz":
            np.testing.assert_array_equal(np.asarray(nib.load(str(out / name)).dataobj), oracle(tmp_path / "in" / name))

    # fix the broken input: the re-run segments only it, the finished cases are left untouched
    before = {n: (out / n).stat().st_mtime_ns for n in names if n != "case_2.nii.gz"}
    write_volumes(tmp_path / "fixed", 5)
    (tmp_path / "in" / "case_2.nii.gz").write_bytes((tmp_path / "fixed" / "case_2.nii.gz").read_bytes())
    again = run(bundle, tmp_path / "in", "-o", out, "--workers", "2", "--backend", "onnxruntime")
    assert again.exit_code == 0, again.output + repr(again.exception)
    assert summary(out)["counts"] == {"done": 1, "skipped": 4, "failed": 0}
    assert {n: (out / n).stat().st_mtime_ns for n in before} == before
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "case_2.nii.gz")).dataobj),
                                  oracle(tmp_path / "in" / "case_2.nii.gz"))


def test_rerun_skips_complete_cases_redoes_incomplete_ones_and_overwrite_redoes_all(bundle, tmp_path):
    write_volumes(tmp_path / "in", 3)
    out = tmp_path / "out"
    args = [bundle, tmp_path / "in", "-o", out, "--backend", "onnxruntime", "--tta", "--uncertainty"]
    assert run(*args).exit_code == 0
    files = sorted(p.name for p in out.iterdir())
    assert "case_1_uncertainty.json" in files and "case_1_uncertainty.nii.gz" in files
    (out / "case_1_uncertainty.json").unlink()  # as if killed between the case's last two writes
    stamps = {n: (out / n).stat().st_mtime_ns for n in files if n.startswith(("case_0", "case_2"))}
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "skipping 2 case(s)" in result.output
    assert summary(out)["counts"] == {"done": 1, "skipped": 2, "failed": 0}
    assert (out / "case_1_uncertainty.json").is_file()
    assert {n: (out / n).stat().st_mtime_ns for n in stamps} == stamps
    assert run(*args, "--overwrite").exit_code == 0
    assert summary(out)["counts"] == {"done": 3, "skipped": 0, "failed": 0}
    assert any((out / n).stat().st_mtime_ns != t for n, t in stamps.items())


def test_bad_worker_count_is_a_one_line_error(bundle, tmp_path):
    write_volumes(tmp_path / "in", 1)
    result = run(bundle, tmp_path / "in", "-o", tmp_path / "out", "--workers", "0")
    assert result.exit_code != 0 and "--workers must be >= 1" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_gpus_are_assigned_round_robin_from_cuda_visible_devices(monkeypatch):
    from edgeseg.runtime import batch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    gpus = batch.visible_gpus()
    assert gpus == ["2", "3"]
    seen = []
    for index in range(3):
        ids: queue.Queue[int] = queue.Queue()
        ids.put(index)
        batch._init_worker(ids, None, gpus)
        seen.append(batch._WORKER["gpu"])
        assert batch.os.environ["CUDA_VISIBLE_DEVICES"] == seen[-1]
    assert seen == ["2", "3", "2"]
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert batch.visible_gpus() == []
