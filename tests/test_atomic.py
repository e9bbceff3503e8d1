import json
import os

import pytest

from edgeseg.atomic import atomic_path, write_json


def test_failed_write_leaves_nothing_and_keeps_old_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_permissions_follow_umask_and_json_is_strict(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"hd95": float("inf"), "nan": float("nan")})
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert json.loads(target.read_text()) == {"hd95": "inf", "nan": "nan"}


def test_temporary_keeps_the_suffix(tmp_path):
    with atomic_path(tmp_path / "mask.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
    assert (tmp_path / "mask.nii.gz").read_bytes() == b"x"
