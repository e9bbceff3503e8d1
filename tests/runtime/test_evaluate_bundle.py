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
