"""Bundle evaluation scores exactly what `edgeseg segment` writes (oracle: Dice by hand on those files)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from edgeseg.errors import UserError
from edgeseg.runtime.evaluate_bundle import evaluate_bundle, is_bundle_path
from edgeseg.runtime.pipeline import segment_files

CLASSES = ["background", "anterior", "posterior"]
CASES = ["hippocampus_001.nii.gz", "hippocampus_003.nii.gz", "hippocampus_004.nii.gz"]


@pytest.fixture(scope="module")
def bundle(intensity_detector_bundle) -> Path:
    return intensity_detector_bundle


@pytest.fixture
def dataset(shared_data, tmp_path) -> Path:
    """A pairs-layout dataset of three hippocampus cases (symlinks) with its own splits.json."""
    source = shared_data / "msd_hippocampus"
    if not all((source / "images" / c).is_file() for c in CASES):
        pytest.skip(f"hippocampus cases {CASES} not found in {source}")
    root = tmp_path / "data"
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
        for case in CASES:
            (root / sub / case).symlink_to(source / sub / case)
    (root / "splits.json").write_text(json.dumps({"train": [CASES[0]], "val": [], "test": CASES[1:]}))
    return root


def hand_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    inter = np.logical_and(pred, ref).sum()
    total = pred.sum() + ref.sum()
    return 1.0 if total == 0 else 2.0 * inter / total


@pytest.mark.parametrize("tta", [False, True])
def test_bundle_metrics_are_those_of_the_segmented_files(bundle, dataset, tmp_path, tta):
    result = evaluate_bundle(bundle, dataset, "test", backend="onnxruntime", tta=tta, batch_size=2)
    assert sorted(result["cases"]) == sorted(CASES[1:])
    out = tmp_path / "masks"
    segment_files(bundle, [dataset / "images" / c for c in CASES[1:]], out, tta=tta, backend="onnxruntime",
                  batch_size=2)
    dices = {c: [] for c in CLASSES[1:]}
    for case in CASES[1:]:
        pred = np.asarray(nib.load(str(out / case)).dataobj)
        ref = np.asarray(nib.load(str(dataset / "labels" / case)).dataobj).astype(int)
        for index, name in enumerate(CLASSES[1:], start=1):
            expected = hand_dice(pred == index, ref == index)
            assert result["cases"][case][name]["dice"] == pytest.approx(expected, abs=1e-12)
            dices[name].append(expected)
    assert 0.0 < np.mean(dices["anterior"]) < 1.0
    for name, values in dices.items():
        assert result["summary"][name]["dice"]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
    assert "background" not in result["cases"][CASES[1]]
    assert result["settings"]["tta_axes"] == ([0, 1, 2] if tta else None)
    assert result["backend"].startswith("onnxruntime")
    assert len(result["seconds_per_case"]) == 2 and all(t > 0 for t in result["seconds_per_case"])


def test_all_split_background_and_errors(bundle, dataset):
    result = evaluate_bundle(bundle, dataset, "all", backend="onnxruntime", include_background=True)
    assert len(result["cases"]) == 3 and "background" in result["cases"][CASES[0]]
    with pytest.raises(UserError, match="unknown split"):
        evaluate_bundle(bundle, dataset, "tset")
    with pytest.raises(UserError, match="no labelled cases in the 'val' split"):
        evaluate_bundle(bundle, dataset, "val")
    with pytest.raises(UserError, match="data folder not found"):
        evaluate_bundle(bundle, dataset / "nope", "test")


def test_bundle_paths_are_told_from_run_directories(bundle, tmp_path):
    assert is_bundle_path(bundle)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    assert not is_bundle_path(tmp_path / "run") and not is_bundle_path(tmp_path / "missing")


@pytest.fixture
def sidecar_dataset(shared_data, tmp_path) -> tuple[Path, Path]:
    """A sidecar dataset whose images carry two label files: `<case>_gm` (the hippocampus label) and a decoy
    `<case>_seg` (all background), plus a split file outside the data folder (as for a read-only dataset)."""
    source = shared_data / "msd_hippocampus"
    if not all((source / "images" / c).is_file() for c in CASES):
        pytest.skip(f"hippocampus cases {CASES} not found in {source}")
    root = tmp_path / "data"
    root.mkdir()
    for case in CASES:
        stem = case.removesuffix(".nii.gz")
        (root / case).symlink_to(source / "images" / case)
        (root / f"{stem}_gm.nii.gz").symlink_to(source / "labels" / case)
        label = nib.load(str(source / "labels" / case))
        nib.save(nib.Nifti1Image(np.zeros(label.shape, np.uint8), label.affine), str(root / f"{stem}_seg.nii.gz"))
    splits = tmp_path / "gm_splits.json"
    splits.write_text(json.dumps({"train": [CASES[0]], "val": [], "test": CASES[1:]}))
    return root, splits


def test_label_suffixes_and_an_outside_split_file_choose_what_is_scored(bundle, sidecar_dataset, tmp_path):
    from typer.testing import CliRunner

    from edgeseg.cli.app import app

    root, splits = sidecar_dataset
    out = tmp_path / "masks"
    segment_files(bundle, [root / c for c in CASES[1:]], out, backend="onnxruntime")
    expected = {}
    for case in CASES[1:]:
        pred = np.asarray(nib.load(str(out / case)).dataobj)
        ref = np.asarray(nib.load(str(root / f"{case.removesuffix('.nii.gz')}_gm.nii.gz")).dataobj).astype(int)
        expected[case] = hand_dice(pred == 1, ref == 1)
    assert 0.0 < np.mean(list(expected.values())) < 1.0
    result = evaluate_bundle(bundle, root, "test", backend="onnxruntime", splits_file=str(splits),
                             label_suffixes=["_gm"])
    assert {c: result["cases"][c]["anterior"]["dice"] for c in CASES[1:]} == pytest.approx(expected, abs=1e-12)
    # the default suffix list reads the decoy `_seg` files: an empty reference, which a prediction never matches
    decoy = evaluate_bundle(bundle, root, "test", backend="onnxruntime", splits_file=str(splits))
    assert all(decoy["cases"][c]["anterior"]["dice"] == 0.0 for c in CASES[1:])
    # the CLI passes both options through; they are refused for run directories and for a missing file
    json_out = tmp_path / "m.json"
    ok = CliRunner().invoke(app, ["evaluate", str(bundle), "--data", str(root), "--splits", str(splits),
                                  "--label-suffixes", "_gm", "--json", str(json_out)])
    assert ok.exit_code == 0, ok.output
    written = json.loads(json_out.read_text())
    assert {c: written["cases"][c]["anterior"]["dice"] for c in CASES[1:]} == pytest.approx(expected, abs=1e-12)
    missing = CliRunner().invoke(app, ["evaluate", str(bundle), "--data", str(root), "--splits", str(tmp_path / "x")])
    # (the app raises UserError; `edgeseg`'s main() prints it as one line)
    assert isinstance(missing.exception, UserError) and "--splits file not found" in str(missing.exception)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    refused = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run"), "--label-suffixes", "_gm"])
    assert isinstance(refused.exception, UserError) and "apply to bundles" in str(refused.exception)
