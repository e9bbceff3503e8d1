"""Per-case extra model inputs at run time (torch-free): FiLM metadata and HeMIS modality masks.

A bundle whose manifest has `metadata` (schema version 2) needs each case's raw metadata values, by
field name, from (highest priority first):

1. `--metadata field=value,...` (the same values for every input of the call);
2. a CSV/TSV table (`--metadata-table`; rows keyed by the case name, its stem, or its group), else
3. the case's JSON sidecar `<folder of its first image>/<case stem>.json`, the convention training
   reads (`edgeseg.data.metadata`; e.g. `phantom_003.json` beside `phantom_003.nii.gz`,
   `brain.json` beside `brain_0000.nii.gz` ... `brain_0002.nii.gz`).

The raw vector is normalised exactly as training did, with the statistics the bundle recorded
(`MetadataInput.normalization()`, training's own `MetadataNormalization.apply`). A field found
nowhere is one UserError naming the case and the field.

A bundle with `modalities` (HeMIS) takes a case from any non-empty subset of its modalities: channel
files `<case>_0000 ...` may be missing (absent modalities), `--modalities a,b` keeps only those (the
others absent even where a file exists), and a file without the channel suffix holds the `--modalities`
listed, in that order. Absent channels are zero-filled after preprocessing and 0 in the mask, as in
training (`edgeseg.data.cases.prepare_case`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgeseg.data.discovery import CaseRef
from edgeseg.data.io import Volume
from edgeseg.data.metadata import read_metadata, sidecar_path
from edgeseg.errors import UserError, unknown_name
from edgeseg.runtime.bundle import Manifest, MetadataInput, ModalityInput

TRUE_FALSE = {"true": 1.0, "false": 0.0}


# ------------------------------------------------------------------------------------- options


def parse_metadata_values(text: str | None) -> dict[str, float]:
    """`contrast=1,gain=0.8` -> {"contrast": 1.0, "gain": 0.8} (true/false read as 1/0); None -> {}."""
    if text is None:
        return {}
    values: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise UserError(f"--metadata '{item}': expected field=value pairs separated by commas, e.g. contrast=1,age=63")
        try:
            value = TRUE_FALSE[raw.lower()] if raw.lower() in TRUE_FALSE else float(raw)
        except ValueError:
            raise UserError(f"--metadata {key}={raw}: not a number (encode categories as numbers, e.g. 0/1)") from None
        if not math.isfinite(value):
            raise UserError(f"--metadata {key}={raw}: not a finite number")
        if key in values:
            raise UserError(f"--metadata gives field '{key}' twice")
        values[key] = value
    return values


def check_input_options(manifest: Manifest, metadata: Mapping[str, float] | None, metadata_table: str | Path | None,
                        modalities: Sequence[str] | None) -> None:
    """Refuse extra-input options the bundle cannot use, and metadata fields it does not know (UserError)."""
    if (metadata or metadata_table is not None) and manifest.metadata is None:
        raise UserError("--metadata / --metadata-table: this bundle's model takes no metadata input")
    if metadata and manifest.metadata is not None:
        for key in metadata:
            if key not in manifest.metadata.fields:
                raise unknown_name("metadata field (the bundle's model takes these)", key, manifest.metadata.fields)
    if metadata_table is not None and not Path(metadata_table).is_file():
        raise UserError(f"metadata table {metadata_table} not found (--metadata-table)")
    if modalities is not None:
        if manifest.modalities is None:
            raise UserError("--modalities: this bundle's model takes every channel (it is not a HeMIS model with a "
                            "modality-mask input)")
        modality_indices(manifest.modalities, modalities)


def modality_indices(spec: ModalityInput, names: Sequence[str]) -> tuple[int, ...]:
    """Indices of the modality `names` (in the order given): a non-empty subset of the bundle's, each once."""
    unknown = [n for n in names if n not in spec.names]
    if unknown or not names or len(set(names)) != len(names):
        raise UserError(f"--modalities {list(names)}: choose a non-empty subset of {list(spec.names)}, each once")
    return tuple(spec.names.index(n) for n in names)


# ------------------------------------------------------------------------------------- metadata


def case_metadata(name: str, images: Sequence[Path], spec: MetadataInput, given: Mapping[str, float],
                  table: Path | None = None) -> tuple[float, ...]:
    """A case's raw metadata in `spec.fields` order: `given` values, the rest from `table` or the sidecar."""
    values = {k: float(v) for k, v in given.items() if k in spec.fields}
    missing = [f for f in spec.fields if f not in values]
    if missing:
        ref = CaseRef(name=name, images=tuple(Path(p) for p in images), label=None)
        if table is None and not sidecar_path(ref).is_file():
            raise UserError(f"case '{name}': metadata field '{missing[0]}' not given: no sidecar {sidecar_path(ref)} "
                            f"and not in --metadata (the bundle's model needs {', '.join(spec.fields)})")
        read = read_metadata([ref], missing, table, spec.case_column)[name]  # training's reader and its errors
        values.update(zip(missing, (float(v) for v in read)))
    return tuple(values[f] for f in spec.fields)


def normalized_metadata(spec: MetadataInput, raw: Sequence[float] | np.ndarray) -> np.ndarray:
    """(raw - mean) / std per field, as training fed the model. Shape: (D,) -> (D,) float32."""
    return spec.normalization().apply(np.asarray(raw, dtype=np.float64))


# ------------------------------------------------------------------------------------- modalities


def assemble_modalities(volume: Volume, channels: Sequence[int], spec: ModalityInput,
                        selected: Sequence[int] | None = None, source: str = "input") -> tuple[Volume, np.ndarray]:
    """Place the channels read into their modality slots; returns the M-channel volume and which are present.

    `channels[i]`: the modality of the volume's channel i; slots without one stay zero. `selected`: only these
    modalities count as present (the others are zeroed too). Shape: array (len(channels), *S) -> (M, *S);
    present (M,) bool with at least one True (else UserError).
    """
    count = len(spec.names)
    given = volume.array.shape[0]
    if given != len(channels):
        raise UserError(f"{source}: {given} channel(s), but {len(channels)} modalities were named for it "
                        f"({', '.join(spec.names[c] for c in channels)})")
    present = np.zeros(count, dtype=bool)
    present[list(channels)] = True
    if selected is not None:
        present &= np.isin(np.arange(count), list(selected))
    if not present.any():
        have = ", ".join(spec.names[c] for c in channels)
        wanted = ", ".join(spec.names[c] for c in selected or ())
        raise UserError(f"{source}: none of the modalities {wanted} is given (it has {have})")
    if given == count and list(channels) == list(range(count)) and present.all():
        return volume, present
    full = np.zeros((count, *volume.array.shape[1:]), dtype=volume.array.dtype)
    for index, channel in enumerate(channels):
        if present[channel]:
            full[channel] = volume.array[index]
    return replace(volume, array=full), present


def model_inputs(manifest: Manifest, raw_metadata: Sequence[float] | np.ndarray | None, present: np.ndarray | None,
                 case: str = "input") -> dict[str, np.ndarray]:
    """The case's extra model inputs by graph input name, unbatched: metadata (D,), modality_mask (M,) float32."""
    inputs: dict[str, np.ndarray] = {}
    if manifest.metadata is not None:
        if raw_metadata is None:
            raise UserError(f"case '{case}': the bundle's model needs metadata ({', '.join(manifest.metadata.fields)})")
        inputs[manifest.metadata.input] = normalized_metadata(manifest.metadata, raw_metadata)
    if manifest.modalities is not None:
        mask = np.ones(manifest.in_channels, bool) if present is None else np.asarray(present, bool)
        inputs[manifest.modalities.input] = mask.astype(np.float32)
    return inputs


def batched(inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """Each per-case input repeated for every tile of a batch. Shape: (D,) -> (batch, D)."""
    return {name: np.repeat(np.asarray(value, np.float32)[None], batch, axis=0) for name, value in inputs.items()}
