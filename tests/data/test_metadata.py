"""FiLM metadata: sidecar and table reading, hand-computed normalisation, and one-line errors naming case and field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgeseg.data.discovery import CaseRef
from edgeseg.data.metadata import MetadataNormalization, read_metadata, sidecar_path
from edgeseg.errors import UserError


def pairs_case(root: Path, name: str, meta: dict | None) -> CaseRef:
    image = root / "images" / f"{name}.nii.gz"
    image.parent.mkdir(parents=True, exist_ok=True)
    if meta is not None:
        (root / "images" / f"{name}.json").write_text(json.dumps(meta))
    return CaseRef(f"{name}.nii.gz", (image,), None)


def test_sidecar_path_follows_each_layout(tmp_path):
    assert sidecar_path(CaseRef("a.nii.gz", (tmp_path / "images" / "a.nii.gz",), None)) == tmp_path / "images" / "a.json"
    msd = CaseRef("BRATS_001.nii.gz", (tmp_path / "imagesTr" / "BRATS_001_0001.nii.gz",), None, missing_channels=(0,))
    assert sidecar_path(msd) == tmp_path / "imagesTr" / "BRATS_001.json"
    bids = CaseRef("sub-01/anat/sub-01_T1w.nii.gz", (tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz",), None)
    assert sidecar_path(bids) == tmp_path / "sub-01" / "anat" / "sub-01_T1w.json"  # the BIDS sidecar


def test_sidecars_are_read_in_field_order_and_zscored_by_hand(tmp_path):
    values = {"c0": {"age": 1, "tesla": 3.0, "other": "x"}, "c1": {"age": 2, "tesla": 3.0},
              "c2": {"age": 3, "tesla": 3.0}, "c3": {"age": 4, "tesla": 3.0, "contrast_agent": True}}
    refs = [pairs_case(tmp_path, n, v) for n, v in values.items()]
    raw = read_metadata(refs, ["tesla", "age"])
    np.testing.assert_array_equal(raw["c2.nii.gz"], [3.0, 3.0])
    np.testing.assert_array_equal(raw["c3.nii.gz"], [3.0, 4.0])
    norm = MetadataNormalization.fit(np.stack([raw[r.name] for r in refs]), ["tesla", "age"], "zscore")
    # by hand: age 1..4 -> mean 2.5, population std sqrt(((1.5**2 + 0.5**2) * 2) / 4) = sqrt(1.25);
    # tesla is constant -> mean 3, std taken as 1 (only centred)
    assert norm.mean == pytest.approx((3.0, 2.5)) and norm.std == pytest.approx((1.0, math.sqrt(1.25)))
    np.testing.assert_allclose(norm.apply(np.array([3.0, 5.0])), [0.0, 2.5 / math.sqrt(1.25)], rtol=1e-6)
    np.testing.assert_allclose(norm.apply(np.array([[2.0, 1.0]])), [[-1.0, -1.5 / math.sqrt(1.25)]], rtol=1e-6)
    assert norm.apply(np.array([3.0, 5.0])).dtype == np.float32
    assert MetadataNormalization.from_dict(json.loads(json.dumps(norm.to_dict()))) == norm
    none = MetadataNormalization.fit(np.stack([raw[r.name] for r in refs]), ["tesla", "age"], "none")
    np.testing.assert_array_equal(none.apply(np.array([3.0, 5.0])), [3.0, 5.0])
    flag = read_metadata(refs[3:], ["contrast_agent"])  # JSON true reads as 1
    np.testing.assert_array_equal(flag["c3.nii.gz"], [1.0])


@pytest.mark.parametrize("suffix,sep", [(".tsv", "\t"), (".csv", ",")])
def test_table_rows_match_by_name_stem_or_group(tmp_path, suffix, sep):
    table = tmp_path / f"meta{suffix}"
    rows = [["case", "age", "te"], ["a.nii.gz", "30", "0.1"], ["b", "40", "0.2"], ["sub-03", "50", "n/a"]]
    table.write_text("\n".join(sep.join(r) for r in rows) + "\n")
    a = CaseRef("a.nii.gz", (tmp_path / "a.nii.gz",), None)
    b = CaseRef("b.nii.gz", (tmp_path / "b.nii.gz",), None)
    c = CaseRef("sub-03/anat/sub-03_T1w.nii.gz", (tmp_path / "x.nii.gz",), None, group="sub-03")
    raw = read_metadata([a, b, c], ["age"], table)
    assert {k: v.tolist() for k, v in raw.items()} == {"a.nii.gz": [30.0], "b.nii.gz": [40.0],
                                                       "sub-03/anat/sub-03_T1w.nii.gz": [50.0]}
    with pytest.raises(UserError, match=r"case 'sub-03/anat/sub-03_T1w.nii.gz': metadata field 'te' is empty"):
        read_metadata([a, b, c], ["age", "te"], table)
    with pytest.raises(UserError, match=r"unknown metadata field .*'tee' \(did you mean 'te'\?\)"):
        read_metadata([a], ["tee"], table)
    with pytest.raises(UserError, match=r"no case column 'subject'"):
        read_metadata([a], ["age"], table, case_column="subject")
    d = CaseRef("d.nii.gz", (tmp_path / "d.nii.gz",), None)
    with pytest.raises(UserError, match=r"case 'd.nii.gz': no row in metadata table .*meta"):
        read_metadata([a, d], ["age"], table)


def test_missing_or_bad_metadata_are_one_line_errors_naming_case_and_field(tmp_path):
    ok = pairs_case(tmp_path, "ok", {"age": 3})
    no_file = pairs_case(tmp_path, "lost", None)
    with pytest.raises(UserError, match=r"case 'lost.nii.gz': metadata sidecar .*lost.json not found"):
        read_metadata([ok, no_file], ["age"])
    no_field = pairs_case(tmp_path, "partial", {"weight": 70})
    with pytest.raises(UserError, match=r"case 'partial.nii.gz': metadata field 'age' missing from .*partial.json "
                                        r"\(it has: weight\)"):
        read_metadata([ok, no_field], ["age"])
    text = pairs_case(tmp_path, "text", {"age": "old"})
    with pytest.raises(UserError, match=r"case 'text.nii.gz': metadata field 'age' .* is 'old', not a number"):
        read_metadata([text], ["age"])
    nan = pairs_case(tmp_path, "nan", {"age": float("nan")})
    with pytest.raises(UserError, match=r"case 'nan.nii.gz': metadata field 'age' .* not a finite number"):
        read_metadata([nan], ["age"])
    broken = pairs_case(tmp_path, "broken", None)
    (tmp_path / "images" / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match=r"case 'broken.nii.gz': metadata sidecar .* not readable JSON"):
        read_metadata([broken], ["age"])
    dup = tmp_path / "dup.csv"
    dup.write_text("case,age\nok,1\nok,2\n")
    with pytest.raises(UserError, match=r"case 'ok' has two rows"):
        read_metadata([ok], ["age"], dup)
    with pytest.raises(UserError, match=r"unknown format '.xlsx'"):
        read_metadata([ok], ["age"], tmp_path / "m.xlsx")
