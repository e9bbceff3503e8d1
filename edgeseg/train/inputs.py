"""Extra model inputs from the config: the one place that matches a model's extra inputs (FiLM metadata,
HeMIS modality masks; `Capabilities.extra_inputs`) with `data.metadata` and `data.modalities`, refuses the
combinations that are not plumbed, and attaches normalised metadata to prepared cases.

Training fits the metadata normalisation on the training split and records it in run.json
(`RunInfo.metadata`); a resumed run, evaluation and export read it back from there, never refit it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgeseg.config import ExperimentConfig
from edgeseg.data.cases import PreparedCase
from edgeseg.data.discovery import CaseRef, dataset_info
from edgeseg.data.metadata import MetadataNormalization, read_metadata
from edgeseg.errors import UserError


def model_extra_inputs(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The configured model's inputs besides the image, in forward order."""
    from edgeseg.nets.registry import model_capabilities

    return model_capabilities(cfg.model.name).extra_inputs


def check_extra_inputs(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The model's extra inputs, after checking the config feeds each one and nothing else (UserError)."""
    names = model_extra_inputs(cfg)
    model, data = cfg.model.name, cfg.data
    if "metadata" in names and data.metadata is None:
        raise UserError(f"model '{model}' needs per-case metadata: set data.metadata {{fields: [...]}} (read from a "
                        "JSON sidecar beside each image, or from data.metadata.table); see configs/film_phantoms.yaml")
    if data.metadata is not None and "metadata" not in names:
        raise UserError(f"data.metadata is set but model '{model}' takes no metadata input (use film_unet, or "
                        "drop data.metadata)")
    if "modality_mask" in names and data.modalities is None:
        raise UserError(f"model '{model}' needs modality masks: set data.modalities (MSD layout, one file per "
                        "modality, missing files allowed); see configs/hemis_phantoms.yaml")
    if (names or data.modalities is not None) and cfg.augment.mixup_alpha > 0:
        raise UserError(f"augment.mixup_alpha is not supported with model '{model}' or data.modalities (mixup of "
                        "samples with different metadata or modality masks is not plumbed); set it to 0")
    if names and cfg.train.scheme == "inerrant":
        raise UserError(f"train.scheme inerrant does not feed model '{model}' its extra inputs "
                        f"({', '.join(names)}) when relabelling; use another scheme")
    return names


def with_metadata_dim(cfg: ExperimentConfig) -> ExperimentConfig:
    """model.options.metadata_dim set to the number of data.metadata fields (or checked against it)."""
    if cfg.data.metadata is None or "metadata" not in model_extra_inputs(cfg):
        return cfg
    dim = len(cfg.data.metadata.fields)
    given = cfg.model.options.get("metadata_dim")
    if given is not None and given != dim:
        raise UserError(f"model.options.metadata_dim is {given} but data.metadata.fields lists {dim} fields "
                        f"({list(cfg.data.metadata.fields)}); leave metadata_dim out to take it from the fields")
    return replace(cfg, model=replace(cfg.model, options={**cfg.model.options, "metadata_dim": dim}))


def with_resolved_table(cfg: ExperimentConfig, root: Path, config_dir: Path | None) -> ExperimentConfig:
    """data.metadata.table as the run records it: kept relative when it lies under the data root (so
    `evaluate --data` reads the other folder's table), else absolute (found beside the config)."""
    meta = cfg.data.metadata
    if meta is None or meta.table is None:
        return cfg
    table = Path(meta.table).expanduser()
    if table.is_absolute() or (root / table).is_file():
        return cfg
    if config_dir is not None and (config_dir / table).is_file():
        resolved = str((config_dir / table).resolve())
        return replace(cfg, data=replace(cfg.data, metadata=replace(meta, table=resolved)))
    raise UserError(f"metadata table {meta.table} not found in {root}"
                    + ("" if config_dir is None else f" nor in {config_dir}") + " (data.metadata.table)")


def _table_path(cfg: ExperimentConfig, root: Path) -> Path | None:
    meta = cfg.data.metadata
    if meta is None or meta.table is None:
        return None
    table = Path(meta.table).expanduser()
    return table if table.is_absolute() else root / table


def raw_metadata(cfg: ExperimentConfig, refs: Sequence[CaseRef], root: Path) -> dict[str, np.ndarray]:
    """Case name -> raw metadata vector, as data.metadata says."""
    meta = cfg.data.metadata
    assert meta is not None
    return read_metadata(refs, meta.fields, _table_path(cfg, root), meta.case_column)


def fit_metadata(cfg: ExperimentConfig, refs: Sequence[CaseRef], root: Path) -> MetadataNormalization:
    """The metadata normalisation fitted on the (training) cases `refs`."""
    meta = cfg.data.metadata
    assert meta is not None
    raw = raw_metadata(cfg, refs, root)
    return MetadataNormalization.fit(np.stack([raw[r.name] for r in refs]), meta.fields, meta.normalization)


def recorded_metadata(record: dict | None, cfg: ExperimentConfig, source: str) -> MetadataNormalization:
    """The normalisation a run recorded in run.json (UserError when it is missing or names other fields)."""
    meta = cfg.data.metadata
    assert meta is not None
    if record is None:
        raise UserError(f"{source} records no metadata normalization (run.json 'metadata'); was it trained "
                        "with data.metadata?")
    norm = MetadataNormalization.from_dict(record)
    if norm.fields != tuple(meta.fields):
        raise UserError(f"{source}: recorded metadata fields {list(norm.fields)} differ from the config's "
                        f"{list(meta.fields)}")
    return norm


def attach_metadata(cases: Sequence[PreparedCase], refs: Sequence[CaseRef], cfg: ExperimentConfig, root: Path,
                    norm: MetadataNormalization) -> None:
    """Set each case's normalised metadata vector (cases and refs in the same order)."""
    raw = raw_metadata(cfg, refs, root)
    for case, ref in zip(cases, refs):
        case.metadata = norm.apply(raw[ref.name])


def modality_names(cfg: ExperimentConfig, root: Path, channels: int) -> list[str] | None:
    """Names of the modalities (data.modalities.names, else dataset.json's channel names, else 0, 1, ...)."""
    if cfg.data.modalities is None:
        return None
    if cfg.data.modalities.names:
        return list(cfg.data.modalities.names)
    info = dataset_info(root)
    if info is not None and len(info.channel_names) == channels:
        return list(info.channel_names)
    return [str(i) for i in range(channels)]


def keep_modalities(cases: Sequence[PreparedCase], names: Sequence[str],
                    keep: Sequence[str]) -> tuple[list[PreparedCase], list[str]]:
    """Evaluate with only the modalities `keep`: the others become absent (mask 0, channel zero-filled).

    Returns the cases that still have one of them, and the names of those left out (none of `keep` on disk).
    """
    unknown = [k for k in keep if k not in names]
    if unknown or not keep:
        raise UserError(f"modalities {list(keep)}: choose a non-empty subset of {list(names)}")
    wanted = np.array([n in keep for n in names])
    kept, skipped = [], []
    for case in cases:
        mask = case.present_modalities() & wanted
        if not mask.any():
            skipped.append(case.name)
            continue
        case.modality_mask = mask
        case.image = case.image.copy()
        case.image[~mask] = 0.0
        kept.append(case)
    if not kept:
        raise UserError(f"no case of this split has any of the modalities {list(keep)}")
    return kept, skipped
