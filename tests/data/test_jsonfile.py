"""read_json_object: a user's JSON file is an object, or one UserError line that names the file and its role."""

from __future__ import annotations

import pytest

from edgeseg.data.jsonfile import read_json_object
from edgeseg.errors import UserError


def test_an_object_is_returned_and_every_other_content_is_a_user_error(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"train": ["a"], "n": 2}')
    assert read_json_object(good, "splits file") == {"train": ["a"], "n": 2}
    array = tmp_path / "array.json"
    array.write_text('["a", "b"]')
    with pytest.raises(UserError, match=r'splits file .*array.json must hold a JSON object like \{"train": \[\]\}'):
        read_json_object(array, "splits file", '{"train": []}')
    broken = tmp_path / "broken.json"
    broken.write_text('{"train": ')
    with pytest.raises(UserError, match=r"metadata sidecar .*broken.json is not readable JSON \(Expecting value"):
        read_json_object(broken, "metadata sidecar")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="is not readable JSON"):
        read_json_object(binary, "dataset description")
    with pytest.raises(UserError, match=r"missing.json is not readable JSON \(\[Errno 2\]"):
        read_json_object(tmp_path / "missing.json", "dataset description")
