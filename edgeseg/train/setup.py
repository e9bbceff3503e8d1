"""Turn an experiment config into the concrete pieces: data splits, preprocessing spec, model, optimizer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from edgeseg.config import ExperimentConfig, ModalitiesConfig, TrainConfig
from edgeseg.data.discovery import CaseRef, discover_cases, load_splits
from edgeseg.data.preprocess import PreprocessSpec
from edgeseg.errors import UserError


def preprocess_spec(cfg: ExperimentConfig) -> PreprocessSpec:
    d = cfg.data
    return PreprocessSpec(
        reorient=d.reorient,
        target_spacing=None if d.target_spacing is None else tuple(d.target_spacing),
        normalization=d.normalization,
        clip_percentiles=tuple(d.clip_percentiles),
        label_map=dict(d.label_map),
    )


def resolve_data_root(cfg: ExperimentConfig, out: Path, config_dir: Path | None) -> Path:
    """The dataset folder; for `root: synthetic`, phantoms are written once into OUT/synthetic_data."""
    if cfg.data.root == "synthetic":
        from edgeseg.data.phantoms import write_phantom_dataset

        root = out / "synthetic_data"
        if not (root / "splits.json").is_file():
            write_phantom_dataset(root, n_cases=cfg.data.synthetic_cases, shape=tuple(cfg.data.synthetic_shape),
                                  seed=cfg.train.seed, num_classes=cfg.data.num_classes,
                                  modalities=cfg.data.synthetic_modalities, missing=cfg.data.synthetic_missing,
                                  metadata=cfg.data.synthetic_metadata)
        return root
    root = cfg.data_root(config_dir)
    assert root is not None
    if not root.is_dir():
        raise UserError(f"data folder not found: {root} (set data.root in the config or --set data.root=PATH)")
    return root


def with_resolved_splits(cfg: ExperimentConfig, root: Path, config_dir: Path | None) -> ExperimentConfig:
    """data.splits as the run records it: unchanged when absolute, None or a file under the data root (so
    `evaluate --data` reads the other folder's split); else, when the file lies beside the config, its absolute
    path (a split shipped under configs/ for a read-only dataset). Otherwise unchanged: a missing file means
    the seeded split, as before."""
    splits = cfg.data.splits
    if splits is None:
        return cfg
    path = Path(splits).expanduser()
    if path.is_absolute() or (root / path).is_file() or config_dir is None or not (config_dir / path).is_file():
        return cfg
    return replace(cfg, data=replace(cfg.data, splits=str((config_dir / path).resolve())))


@dataclass
class Splits:
    root: Path
    train: list[CaseRef]
    val: list[CaseRef]
    test: list[CaseRef]

    def get(self, name: str) -> list[CaseRef]:
        if name not in ("train", "val", "test"):
            raise UserError(f"unknown split '{name}'; choose from train, val, test")
        cases = getattr(self, name)
        if not cases:
            raise UserError(f"split '{name}' of {self.root} is empty")
        return cases


def load_data_splits(root: Path, layout: str, splits_file: str | None, seed: int,
                     modalities: ModalitiesConfig | None = None, *,
                     label_suffixes: Sequence[str] | None = None) -> Splits:
    """The dataset's cases by split; with `modalities` (HeMIS data) cases may lack some channel files.

    label_suffixes: data.label_suffixes (sidecar layout); None = discovery's default list.
    """
    cases = discover_cases(root, layout, missing_channels=modalities is not None,
                           channels=len(modalities.names) if modalities is not None and modalities.names else None,
                           label_suffixes=label_suffixes)
    splits = load_splits(root, splits_file, cases, seed=seed)
    return Splits(root, list(splits.get("train", [])), list(splits.get("val", [])), list(splits.get("test", [])))


def labelled_train_refs(cfg: ExperimentConfig, refs: Sequence[CaseRef]) -> list[CaseRef]:
    """The training cases whose labels are used: the first data.labelled_train_cases of the split (the
    few-labelled-volumes setting), or all of them."""
    n = cfg.data.labelled_train_cases
    if n is None:
        return list(refs)
    if n > len(refs):
        raise UserError(f"data.labelled_train_cases is {n} but the training split has only {len(refs)} cases")
    return list(refs[:n])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device is '{name}' but no CUDA GPU is available")
    return torch.device(name)


def configure_torch(cfg: TrainConfig) -> None:
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def class_names_for(cfg: ExperimentConfig) -> Sequence[str]:
    return tuple(cfg.data.class_names)
