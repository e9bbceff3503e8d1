"""data.label_suffixes: sidecar discovery restricted to some label kinds (the spinal-cord grey-matter cases).

Oracles: hand-written case -> label tables for a tiny folder that mirrors spinalcord_mri's names (discovery
looks only at names, so the files are empty), and the real dataset when it is present.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeseg.data.discovery import discover_cases, load_splits
from edgeseg.train.setup import load_data_splits

GM = ("_gmseg_manual", "_gmseg_goldstandard")
FILES = (
    "sct/t1/t1w.nii.gz", "sct/t1/t1w_seg-manual.nii.gz",
    "sct/t2s/t2s.nii.gz", "sct/t2s/t2s_gmseg_manual.nii.gz", "sct/t2s/t2s_seg.nii.gz",
    "sct/t2s/t2s_uncropped.nii.gz", "sct/t2s/t2s_uncropped_gmseg_manual.nii.gz",
    "sct/mt/mt0.nii.gz", "sct/mt/mt1.nii.gz", "sct/mt/mt1_gmseg_goldstandard.nii.gz", "sct/mt/mt1_seg.nii.gz",
)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sidecar(tmp_path: Path) -> Path:
    for name in FILES:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return tmp_path


def labels_of(cases) -> dict[str, str | None]:
    return {c.name: (c.label.name if c.label else None) for c in cases}


def test_grey_matter_suffixes_label_only_the_grey_matter_cases(sidecar):
    cases = discover_cases(sidecar, "sidecar", label_suffixes=GM)
    labelled = {n: lab for n, lab in labels_of(cases).items() if lab is not None}
    assert labelled == {"sct/t2s/t2s.nii.gz": "t2s_gmseg_manual.nii.gz",
                        "sct/t2s/t2s_uncropped.nii.gz": "t2s_uncropped_gmseg_manual.nii.gz",
                        "sct/mt/mt1.nii.gz": "mt1_gmseg_goldstandard.nii.gz"}
    # images without a grey-matter label (and the cord masks, no longer label files) are unlabelled cases
    unlabelled = sorted(n for n, lab in labels_of(cases).items() if lab is None)
    assert unlabelled == ["sct/mt/mt0.nii.gz", "sct/mt/mt1_seg.nii.gz", "sct/t1/t1w.nii.gz",
                          "sct/t1/t1w_seg-manual.nii.gz", "sct/t2s/t2s_seg.nii.gz"]
    # the default list mixes cord and grey-matter labels (the issue): t1w gets its cord mask
    assert labels_of(discover_cases(sidecar, "sidecar"))["sct/t1/t1w.nii.gz"] == "t1w_seg-manual.nii.gz"


def test_unlabelled_cases_never_train(sidecar):
    (sidecar / "splits.json").write_text(json.dumps({"train": ["sct/t1", "sct/t2s"], "val": ["sct/mt"], "test": []}))
    cases = discover_cases(sidecar, "sidecar", label_suffixes=GM)
    splits = load_splits(sidecar, "splits.json", cases)
    assert [c.name for c in splits["train"]] == ["sct/t2s/t2s.nii.gz", "sct/t2s/t2s_uncropped.nii.gz"]
    assert all(c.label is not None for c in splits["train"])
    # val keeps the folder's unlabelled images, with no label: evaluation skips them
    assert labels_of(splits["val"]) == {"sct/mt/mt0.nii.gz": None, "sct/mt/mt1.nii.gz": "mt1_gmseg_goldstandard.nii.gz",
                                        "sct/mt/mt1_seg.nii.gz": None}
    # without a file: the seeded split takes labelled cases only, one folder (acquisition) per split
    seeded = load_splits(sidecar, None, cases, seed=3)
    placed = {c.name: split for split, refs in seeded.items() for c in refs}
    assert sorted(placed) == ["sct/mt/mt1.nii.gz", "sct/t2s/t2s.nii.gz", "sct/t2s/t2s_uncropped.nii.gz"]
    assert placed["sct/t2s/t2s.nii.gz"] == placed["sct/t2s/t2s_uncropped.nii.gz"]


def test_load_data_splits_passes_the_suffixes_and_an_absolute_splits_file(sidecar, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("configs") / "gm_splits.json"
    elsewhere.write_text(json.dumps({"train": ["sct/t2s/t2s.nii.gz", "sct/t2s/t2s_uncropped.nii.gz"], "val": [],
                                     "test": ["sct/mt/mt1.nii.gz"]}))
    splits = load_data_splits(sidecar, "sidecar", str(elsewhere), 0, label_suffixes=list(GM))
    assert labels_of(splits.train) == {"sct/t2s/t2s.nii.gz": "t2s_gmseg_manual.nii.gz",
                                       "sct/t2s/t2s_uncropped.nii.gz": "t2s_uncropped_gmseg_manual.nii.gz"}
    assert splits.val == []
    assert labels_of(splits.test) == {"sct/mt/mt1.nii.gz": "mt1_gmseg_goldstandard.nii.gz"}
    default = load_data_splits(sidecar, "sidecar", str(elsewhere), 0)  # None = the default list
    assert labels_of(default.train)["sct/t2s/t2s.nii.gz"] == "t2s_gmseg_manual.nii.gz"
    cord_only = load_data_splits(sidecar, "sidecar", None, 0, label_suffixes=["_seg"])
    assert {c.label.name for s in (cord_only.train, cord_only.val, cord_only.test) for c in s} == {
        "t2s_seg.nii.gz", "mt1_seg.nii.gz"}


def test_shipped_grey_matter_split_on_the_real_data(shared_data):
    root = shared_data / "spinalcord_mri"
    if not root.is_dir():
        pytest.skip(f"shared dataset spinalcord_mri not found at {root}")
    splits = load_data_splits(root, "sidecar", str(REPO / "configs" / "spinalcord_gm_splits.json"), 0,
                              label_suffixes=GM)
    t2s = "sct_testing_data/t2s/"
    assert labels_of(splits.train) == {t2s + "t2s.nii.gz": "t2s_gmseg_manual.nii.gz",
                                       t2s + "t2s_uncropped.nii.gz": "t2s_uncropped_gmseg_manual.nii.gz"}
    assert splits.val == []
    assert labels_of(splits.test) == {"sct_testing_data/mt/mt1.nii.gz": "mt1_gmseg_goldstandard.nii.gz"}
