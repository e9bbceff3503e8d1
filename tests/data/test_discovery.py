"""Case discovery for every layout and split loading, on tiny folders; the shared datasets when present."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from edgeseg.data.discovery import (
    dataset_info,
    detect_layout,
    discover_cases,
    load_splits,
    split_names,
)
from edgeseg.data.io import read_image, read_label
from edgeseg.errors import UserError


def touch(root: Path, *names: str) -> None:
    """Empty files: discovery looks only at names."""
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def names(cases) -> list[str]:
    return [c.name for c in cases]


# -------------------------------------------------------------------------------------- layouts


def test_pairs_layout(tmp_path):
    touch(tmp_path, "images/case_10.nii.gz", "images/case_2.nii.gz", "images/case_3.nii.gz",
          "labels/case_10.nii.gz", "labels/case_2.nii.gz",
          "images/._case_2.nii.gz", "images/.DS_Store", "images/notes.txt", "splits.json")
    assert detect_layout(tmp_path) == "pairs"
    cases = discover_cases(tmp_path)
    assert names(cases) == ["case_2.nii.gz", "case_3.nii.gz", "case_10.nii.gz"]  # natural order
    assert cases[0].images == (tmp_path / "images" / "case_2.nii.gz",)
    assert cases[0].label == tmp_path / "labels" / "case_2.nii.gz"
    assert cases[1].label is None  # unlabelled image


def test_pairs_orphan_label_is_an_error(tmp_path):
    touch(tmp_path, "images/a.nii.gz", "labels/a.nii.gz", "labels/b.nii.gz")
    with pytest.raises(UserError, match=r"labels: 1 label\(s\) without an image: \['b.nii.gz'\]"):
        discover_cases(tmp_path, "pairs")


def test_png_layout_with_stem_matching(tmp_path):
    touch(tmp_path, "images/0.png", "images/1.tif", "images/10.png", "labels/0.png", "labels/1.png",
          "labels/10.png")
    assert detect_layout(tmp_path) == "png"
    cases = discover_cases(tmp_path)
    assert names(cases) == ["0.png", "1.tif", "10.png"]
    assert cases[1].label == tmp_path / "labels" / "1.png"


def test_msd_layout_with_channels_and_dataset_json(tmp_path):
    touch(tmp_path, "imagesTr/pro_01_0000.nii.gz", "imagesTr/pro_01_0001.nii.gz",
          "imagesTr/pro_02_0001.nii.gz", "imagesTr/pro_02_0000.nii.gz",
          "labelsTr/pro_01.nii.gz", "labelsTr/pro_02.nii.gz",
          "imagesTs/pro_09_0000.nii.gz", "imagesTs/pro_09_0001.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "PZ": 1, "TZ": 2},
         "numTraining": 2, "file_ending": ".nii.gz"}))
    assert detect_layout(tmp_path) == "msd"
    cases = discover_cases(tmp_path)
    assert names(cases) == ["pro_01.nii.gz", "pro_02.nii.gz", "pro_09.nii.gz"]
    assert [p.name for p in cases[1].images] == ["pro_02_0000.nii.gz", "pro_02_0001.nii.gz"]
    assert cases[1].label == tmp_path / "labelsTr" / "pro_02.nii.gz"
    assert cases[2].label is None
    info = dataset_info(tmp_path)
    assert info.channel_names == ("T2", "ADC") and info.class_names == ("background", "PZ", "TZ")


def test_msd_channel_errors(tmp_path):
    touch(tmp_path, "imagesTr/a_0000.nii.gz", "imagesTr/a_0002.nii.gz", "labelsTr/a.nii.gz")
    with pytest.raises(UserError, match="a.nii.gz: channel files"):
        discover_cases(tmp_path, "msd")
    (tmp_path / "imagesTr/a_0002.nii.gz").rename(tmp_path / "imagesTr/a_0001.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}))
    with pytest.raises(UserError, match="2 channel file.*dataset.json lists 1"):
        discover_cases(tmp_path, "msd")
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(UserError, match="dataset description .*dataset.json is not readable JSON"):
        discover_cases(tmp_path, "msd")


def test_msd_original_layout_without_suffixes(tmp_path):
    touch(tmp_path, "imagesTr/hippocampus_001.nii.gz", "imagesTr/hippocampus_003.nii.gz",
          "labelsTr/hippocampus_001.nii.gz", "labelsTr/hippocampus_003.nii.gz",
          "imagesTs/hippocampus_002.nii.gz", "imagesTr/._hippocampus_001.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}}))
    cases = discover_cases(tmp_path)
    assert names(cases) == ["hippocampus_001.nii.gz", "hippocampus_002.nii.gz", "hippocampus_003.nii.gz"]
    assert cases[1].label is None and cases[2].images == (tmp_path / "imagesTr/hippocampus_003.nii.gz",)
    assert dataset_info(tmp_path).class_names == ("background", "Anterior", "Posterior")


def test_bids_layout(tmp_path):
    touch(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_T2w.nii.gz",
          "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz", "sub-01/anat/sub-01_T1w.json",
          "derivatives/labels/sub-01/anat/sub-01_T1w_seg-manual.nii.gz",
          "derivatives/labels/sub-02/ses-1/anat/sub-02_ses-1_T1w_seg-manual.nii.gz")
    assert detect_layout(tmp_path) == "bids"
    cases = discover_cases(tmp_path)
    assert names(cases) == ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_T2w.nii.gz",
                            "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"]
    assert cases[0].label == tmp_path / "derivatives/labels/sub-01/anat/sub-01_T1w_seg-manual.nii.gz"
    assert cases[1].label is None
    assert [c.group for c in cases] == ["sub-01", "sub-01", "sub-02"]


def test_sidecar_layout(tmp_path):
    touch(tmp_path, "grp/a/img.nii.gz", "grp/a/img_seg-manual.nii.gz",
          "grp/b/x.nii.gz", "grp/b/x_seg.nii.gz", "grp/b/x_gmseg_manual.nii.gz", "grp/b/y.nii.gz")
    assert detect_layout(tmp_path) == "sidecar"
    cases = discover_cases(tmp_path)
    assert names(cases) == ["grp/a/img.nii.gz", "grp/b/x.nii.gz", "grp/b/y.nii.gz"]
    assert cases[0].label.name == "img_seg-manual.nii.gz"
    assert cases[1].label.name == "x_gmseg_manual.nii.gz"  # earlier suffix in the list wins over _seg
    assert cases[2].label is None
    custom = discover_cases(tmp_path, "sidecar", label_suffixes=("_seg",))
    assert {c.name: c.label.name if c.label else None for c in custom}["grp/b/x.nii.gz"] == "x_seg.nii.gz"
    assert "grp/b/x_gmseg_manual.nii.gz" in names(custom)  # no longer a label suffix: an image


def test_layout_errors(tmp_path):
    with pytest.raises(UserError, match="data folder not found"):
        discover_cases(tmp_path / "nope")
    with pytest.raises(UserError, match="no cases found"):
        discover_cases(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(UserError, match="no cases found"):
        discover_cases(tmp_path)
    with pytest.raises(UserError, match="unknown layout 'pair'.*did you mean 'pairs'"):
        discover_cases(tmp_path, "pair")


# --------------------------------------------------------------------------------------- splits


@pytest.fixture
def pairs(tmp_path):
    touch(tmp_path, *[f"images/c{i}.nii.gz" for i in range(20)], *[f"labels/c{i}.nii.gz" for i in range(18)])
    return tmp_path, discover_cases(tmp_path)


def test_splits_from_file(pairs):
    root, cases = pairs
    (root / "splits.json").write_text(json.dumps(
        {"train": ["c0.nii.gz", "c1"], "val": ["c2.nii.gz"], "test": ["c18.nii.gz"], "unit": "ignored"}))
    splits = load_splits(root, "splits.json", cases)
    assert {k: names(v) for k, v in splits.items()} == {
        "train": ["c0.nii.gz", "c1.nii.gz"], "val": ["c2.nii.gz"], "test": ["c18.nii.gz"]}


def test_split_errors(pairs):
    root, cases = pairs
    path = root / "splits.json"
    path.write_text(json.dumps({"train": ["c0.nii.gz", "c99.nii.gz", "zz"], "val": [], "test": []}))
    with pytest.raises(UserError, match=r"splits.json: 2 unknown case name\(s\) \['c99.nii.gz', 'zz'\]"):
        load_splits(root, "splits.json", cases)
    path.write_text(json.dumps({"train": ["c0.nii.gz"], "val": ["c0"], "test": []}))
    with pytest.raises(UserError, match="'c0.nii.gz' is in both 'train' and 'val'"):
        load_splits(root, "splits.json", cases)
    path.write_text(json.dumps({"train": ["c19.nii.gz"], "val": [], "test": []}))
    with pytest.raises(UserError, match="training case 'c19.nii.gz' has no label"):
        load_splits(root, "splits.json", cases)
    path.write_text(json.dumps({"train": "c0.nii.gz"}))
    with pytest.raises(UserError, match='"train" must be a list'):
        load_splits(root, "splits.json", cases)
    path.write_text("[1, 2")
    with pytest.raises(UserError, match="splits file .*splits.json is not readable JSON"):
        load_splits(root, "splits.json", cases)
    with pytest.raises(UserError, match="no cases"):
        load_splits(root, "splits.json", [])


@pytest.mark.parametrize("splits_file", [None, "missing.json"])
def test_seeded_split_when_no_file(pairs, splits_file):
    root, cases = pairs
    splits = load_splits(root, splits_file, cases, seed=3)
    labelled = {c.name for c in cases if c.label is not None}
    counts = {k: len(v) for k, v in splits.items()}
    assert counts == {"train": 12, "val": 3, "test": 3}  # 18 labelled: round(2.7) = 3 each for val/test
    all_names = [n for v in splits.values() for n in names(v)]
    assert sorted(all_names) == sorted(labelled) and len(set(all_names)) == 18
    assert load_splits(root, splits_file, cases, seed=3) == splits
    assert load_splits(root, splits_file, cases, seed=4) != splits


def test_split_names_small_counts():
    assert {k: len(v) for k, v in split_names(["a"], 0).items()} == {"train": 1, "val": 0, "test": 0}
    assert {k: len(v) for k, v in split_names(["a", "b"], 0).items()} == {"train": 1, "val": 1, "test": 0}
    assert {k: len(v) for k, v in split_names(list("abc"), 0).items()} == {"train": 1, "val": 1, "test": 1}
    assert {k: len(v) for k, v in split_names([str(i) for i in range(195)], 0).items()} == {
        "train": 137, "val": 29, "test": 29}


def test_seeded_split_keeps_groups_together(tmp_path):
    for s in range(8):
        touch(tmp_path, f"sub-{s}/anat/sub-{s}_T1w.nii.gz", f"sub-{s}/anat/sub-{s}_T2w.nii.gz",
              f"derivatives/labels/sub-{s}/anat/sub-{s}_T1w_seg-manual.nii.gz",
              f"derivatives/labels/sub-{s}/anat/sub-{s}_T2w_seg-manual.nii.gz")
    splits = load_splits(tmp_path, None, discover_cases(tmp_path), seed=0)
    where = {c.name.split("/")[0]: set() for v in splits.values() for c in v}
    for split, members in splits.items():
        for c in members:
            where[c.name.split("/")[0]].add(split)
    assert len(where) == 8 and all(len(s) == 1 for s in where.values())


def test_folder_prefix_entries(tmp_path):
    touch(tmp_path, "data/t1/t1w.nii.gz", "data/t1/t1w_seg-manual.nii.gz",
          "data/mt/mt1.nii.gz", "data/mt/mt1_seg-manual.nii.gz", "data/mt/mt0.nii.gz")
    cases = discover_cases(tmp_path, "sidecar")
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["data/t1", "data/mt/"], "val": [], "test": []}))
    splits = load_splits(tmp_path, "splits.json", cases)
    # entries keep the file's order; the unlabelled mt0 reached through a folder is left out of training
    assert names(splits["train"]) == ["data/t1/t1w.nii.gz", "data/mt/mt1.nii.gz"]
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["data/t1"], "val": ["data/mt"], "test": []}))
    assert names(load_splits(tmp_path, "splits.json", cases)["val"]) == ["data/mt/mt0.nii.gz", "data/mt/mt1.nii.gz"]


# --------------------------------------------------------------------------------- shared data


def shared_dataset(shared_data: Path, name: str) -> Path:
    path = shared_data / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {name} not found at {path}")
    return path


def split_counts(root: Path, cases) -> dict[str, int]:
    return {k: len(v) for k, v in load_splits(root, "splits.json", cases).items()}


def first_case_reads(case) -> None:
    image = read_image(case.images)
    label = read_label(case.label, image)
    assert label.spatial_shape == image.spatial_shape


def test_shared_hippocampus(shared_data):
    root = shared_dataset(shared_data, "msd_hippocampus")
    cases = discover_cases(root)
    assert detect_layout(root) == "pairs" and len(cases) == 195
    assert all(c.label is not None and c.label.name == c.name for c in cases)
    assert split_counts(root, cases) == {"train": 137, "val": 29, "test": 29}
    first_case_reads(cases[0])


def test_shared_em(shared_data):
    root = shared_dataset(shared_data, "isbi2012_em")
    cases = discover_cases(root)
    assert detect_layout(root) == "png" and len(cases) == 22
    assert names(cases)[:3] == ["0.png", "1.png", "2.png"]
    assert split_counts(root, cases) == {"train": 16, "val": 3, "test": 3}
    first_case_reads(cases[0])


def test_shared_spleen_bids(shared_data):
    root = shared_dataset(shared_data, "msd_spleen_ct_crop")
    cases = discover_cases(root)
    assert detect_layout(root) == "bids" and len(cases) == 1
    assert cases[0].name == "sub-spleen2/ct/sub-spleen2_ct.nii.gz"
    assert cases[0].label == root / "derivatives/labels/sub-spleen2/ct/sub-spleen2_ct_seg-manual.nii.gz"
    splits = load_splits(root, "splits.json", cases)  # no file here: seeded split of one case
    assert names(splits["train"]) == [cases[0].name]
    first_case_reads(cases[0])
    # oracle: the label file read by nibabel directly
    np.testing.assert_array_equal(read_label(cases[0].label, read_image(cases[0].images)).array,
                                  np.asanyarray(nib.load(str(cases[0].label)).dataobj))


def test_shared_spinalcord_groups(shared_data):
    root = shared_dataset(shared_data, "spinalcord_mri")
    cases = discover_cases(root)
    assert detect_layout(root) == "sidecar"
    by_name = {c.name: (c.label.name if c.label else None) for c in cases}
    assert by_name == {
        "sct_testing_data/mt/mt0.nii.gz": None,
        "sct_testing_data/mt/mt1.nii.gz": "mt1_gmseg_goldstandard.nii.gz",
        "sct_testing_data/t1/t1w.nii.gz": "t1w_seg-manual.nii.gz",
        "sct_testing_data/t2/t2.nii.gz": "t2_seg-manual.nii.gz",
        "sct_testing_data/t2s/t2s.nii.gz": "t2s_gmseg_manual.nii.gz",
        "sct_testing_data/t2s/t2s_uncropped.nii.gz": "t2s_uncropped_gmseg_manual.nii.gz",
    }
    splits = load_splits(root, "splits.json", cases)
    assert names(splits["train"]) == ["sct_testing_data/t1/t1w.nii.gz", "sct_testing_data/t2/t2.nii.gz",
                                      "sct_testing_data/t2s/t2s.nii.gz", "sct_testing_data/t2s/t2s_uncropped.nii.gz"]
    assert names(splits["val"]) == ["sct_testing_data/mt/mt0.nii.gz", "sct_testing_data/mt/mt1.nii.gz"]
    assert splits["test"] == []
    for case in cases:
        if case.label is not None:
            first_case_reads(case)
