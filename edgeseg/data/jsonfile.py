"""Reading a small JSON file that must hold one object (dataset.json, a splits file, a metadata sidecar,
a partial-labels file): a user's file, so every way it can be wrong is one UserError line naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeseg.errors import UserError


def read_json_object(path: Path, what: str, shape: str = "") -> dict[str, Any]:
    """The JSON object in `path`. `what` names the file in messages ("dataset.json", "metadata sidecar"),
    `shape` shows the expected object, e.g. '{"train": [...]}'. UserError when unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{what} {path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a JSON object{f' like {shape}' if shape else ''}")
    return data
