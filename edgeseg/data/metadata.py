"""Per-case metadata vectors for conditioned models (FiLM): read, checked, normalised (numpy + stdlib only).

Sources (`read_metadata`):
- a JSON sidecar beside each case's image, `<image folder>/<case stem>.json` (`sidecar_path`), the BIDS
  convention (e.g. `sub-01/anat/sub-01_T1w.json` for `sub-01_T1w.nii.gz`; `imagesTr/<id>.json` for an MSD
  case whose channels are `<id>_0000.nii.gz` ...), holding a JSON object with the named fields;
- a CSV/TSV table (by its suffix) with one row per case: its `case_column` holds the case name, the name
  without its suffix, or the case's group (the BIDS subject, so a participants.tsv works).

Values must be finite numbers (true/false read as 1/0; table cells are parsed as numbers). Anything
missing or malformed is a UserError naming the case, the field and the file.

Normalisation (`MetadataNormalization`): "zscore" subtracts each field's mean over the training cases and
divides by its population standard deviation (1 when the field is constant there, so it is only centred);
"none" passes values through. The fitted statistics are stored in the run (run.json) and reused as-is by
evaluation and export, never refitted on other data.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.data.discovery import CaseRef
from edgeseg.data.io import strip_suffix
from edgeseg.data.jsonfile import read_json_object
from edgeseg.errors import UserError, unknown_name

NORMALIZATIONS = ("zscore", "none")
STD_FLOOR = 1e-8  # a field whose training std is below this is only centred
TABLE_DELIMITERS = {".tsv": "\t", ".tab": "\t", ".csv": ","}
MISSING_CELLS = ("", "n/a", "na", "nan", "none", "null")


def sidecar_path(ref: CaseRef) -> Path:
    """The JSON sidecar of a case: `<folder of its first image file>/<case name's stem>.json`."""
    stem = strip_suffix(ref.name).rsplit("/", 1)[-1]
    return ref.images[0].parent / f"{stem}.json"


def read_metadata(refs: Sequence[CaseRef], fields: Sequence[str], table: Path | None = None,
                  case_column: str = "case") -> dict[str, np.ndarray]:
    """Raw metadata of each case: case name -> (len(fields),) float64, from sidecars or `table`."""
    fields = tuple(fields)
    if not fields:
        raise UserError("metadata: no fields to read (data.metadata.fields)")
    if table is not None:
        rows = _read_table(Path(table), fields, case_column)
        return {ref.name: _table_vector(ref, rows, fields, Path(table)) for ref in refs}
    return {ref.name: _sidecar_vector(ref, fields) for ref in refs}


def _number(value: Any, case: str, field: str, source: Path) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in MISSING_CELLS:
            raise UserError(f"case '{case}': metadata field '{field}' is empty in {source}")
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"case '{case}': metadata field '{field}' in {source} is {value!r}, not a number "
                            "(encode categories as numbers, e.g. 0/1)") from None
    if not isinstance(value, (int, float)):
        raise UserError(f"case '{case}': metadata field '{field}' in {source} is {value!r}, not a number")
    if not math.isfinite(value):
        raise UserError(f"case '{case}': metadata field '{field}' in {source} is {value}, not a finite number")
    return float(value)


def _sidecar_vector(ref: CaseRef, fields: tuple[str, ...]) -> np.ndarray:
    path = sidecar_path(ref)
    if not path.is_file():
        raise UserError(f"case '{ref.name}': metadata sidecar {path} not found (data.metadata reads fields "
                        f"{list(fields)} from a JSON file beside each image, or set data.metadata.table)")
    data = read_json_object(path, f"case '{ref.name}': metadata sidecar")
    values = []
    for field in fields:
        if field not in data:
            raise UserError(f"case '{ref.name}': metadata field '{field}' missing from {path} "
                            f"(it has: {', '.join(sorted(map(str, data))) or 'nothing'})")
        values.append(_number(data[field], ref.name, field, path))
    return np.array(values, dtype=np.float64)


def _read_table(path: Path, fields: tuple[str, ...], case_column: str) -> dict[str, dict[str, str]]:
    """Rows of a CSV/TSV table keyed by their case column (each key once)."""
    suffix = path.suffix.lower()
    if suffix not in TABLE_DELIMITERS:
        raise UserError(f"metadata table {path}: unknown format '{suffix}' (use .csv or .tsv)")
    if not path.is_file():
        raise UserError(f"metadata table {path} not found (data.metadata.table)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh, delimiter=TABLE_DELIMITERS[suffix])
            header = [h.strip() for h in (reader.fieldnames or [])]
            raw_rows = [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"metadata table {path} is not readable ({exc})") from None
    if case_column not in header:
        raise UserError(f"metadata table {path} has no case column '{case_column}' (columns: {', '.join(header)}; "
                        "set data.metadata.case_column)")
    for field in fields:
        if field not in header:
            raise unknown_name(f"metadata field (a column of {path})", field, [h for h in header if h != case_column])
    rows: dict[str, dict[str, str]] = {}
    for row in raw_rows:
        key = row.get(case_column, "").strip()
        if not key:
            continue
        if key in rows:
            raise UserError(f"metadata table {path}: case '{key}' has two rows")
        rows[key] = row
    return rows


def _table_vector(ref: CaseRef, rows: Mapping[str, dict[str, str]], fields: tuple[str, ...], path: Path) -> np.ndarray:
    for key in (ref.name, strip_suffix(ref.name), ref.group):
        if key and key in rows:
            row = rows[key]
            return np.array([_number(row.get(f, ""), ref.name, f, path) for f in fields], dtype=np.float64)
    keys = [k for k in (ref.name, strip_suffix(ref.name), ref.group) if k]
    raise UserError(f"case '{ref.name}': no row in metadata table {path} (looked for {' or '.join(map(repr, keys))})")


@dataclass(frozen=True)
class MetadataNormalization:
    """How raw metadata vectors become model inputs: (raw - mean) / std per field, fitted on training cases."""

    fields: tuple[str, ...]
    method: str  # "zscore" or "none"
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.method not in NORMALIZATIONS:
            raise unknown_name("metadata normalization", self.method, NORMALIZATIONS)
        if not (len(self.fields) == len(self.mean) == len(self.std)) or not self.fields:
            raise UserError(f"metadata normalization: {len(self.fields)} fields but {len(self.mean)} means and "
                            f"{len(self.std)} stds")
        if any(not (s > 0 and math.isfinite(s)) for s in self.std) or not all(map(math.isfinite, self.mean)):
            raise UserError("metadata normalization: means must be finite and stds positive")

    @classmethod
    def fit(cls, raw: np.ndarray, fields: Sequence[str], method: str) -> MetadataNormalization:
        """Statistics of training vectors `raw` (N, D): mean and population std per field ("none": 0 and 1)."""
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != len(fields) or not len(raw):
            raise ValueError(f"expected ({len(fields)} fields) rows, got shape {raw.shape}")
        if method == "none":
            return cls(tuple(fields), method, (0.0,) * len(fields), (1.0,) * len(fields))
        std = raw.std(axis=0)
        std = np.where(std < STD_FLOOR, 1.0, std)
        return cls(tuple(fields), method, tuple(float(v) for v in raw.mean(axis=0)), tuple(float(v) for v in std))

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Normalised vectors. Shape: (D,) or (N, D) -> the same, float32."""
        raw = np.asarray(raw, dtype=np.float64)
        if raw.shape[-1] != len(self.fields):
            raise ValueError(f"metadata of {raw.shape[-1]} values, expected {len(self.fields)} ({list(self.fields)})")
        return ((raw - np.array(self.mean)) / np.array(self.std)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"fields": list(self.fields), "method": self.method, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetadataNormalization:
        try:
            return cls(tuple(data["fields"]), str(data["method"]), tuple(float(v) for v in data["mean"]),
                       tuple(float(v) for v in data["std"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"unreadable metadata normalization record {dict(data)!r} ({exc})") from None
