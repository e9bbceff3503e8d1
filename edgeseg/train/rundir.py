"""The run directory: what `edgeseg train` writes and every later stage reads.

    RUN_DIR/
      config.yaml                 resolved experiment config
      run.json                    what a model needs to be rebuilt and fed (RunInfo)
      checkpoints/last.safetensors   full training state (resume)
      checkpoints/best.safetensors   weights with the best validation Dice
      log.jsonl                   one JSON line per epoch
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgeseg import __version__
from edgeseg.atomic import write_json, write_text
from edgeseg.config import ExperimentConfig, from_dict, to_dict
from edgeseg.config.loader import read_yaml
from edgeseg.errors import UserError

_SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")


@dataclass(frozen=True)
class RunInfo:
    """Facts fixed by the data at training time, needed to rebuild and feed the model."""

    spatial_dims: int
    in_channels: int
    class_names: list[str]
    patch_size: list[int]  # training patch
    tile_size: list[int]  # inference tile (volumes within it run as one padded tile)
    preprocess: dict[str, Any]  # PreprocessSpec.to_dict()
    data_root: str | None
    slice_axis: int = 2
    evaluate_background: bool = False
    bits: str = "fp32"  # "W/A" for quantized runs
    parent_run: str | None = None  # the float run a quantized run came from
    metadata: dict[str, Any] | None = None  # MetadataNormalization.to_dict(): fields, method, mean, std (FiLM)
    modalities: list[str] | None = None  # channel (modality) names when modalities may be missing (HeMIS)
    edgeseg_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    @property
    def last(self) -> Path:
        return self.path / "checkpoints" / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.path / "checkpoints" / "best.safetensors"

    @property
    def log(self) -> Path:
        return self.path / "log.jsonl"

    def write_config(self, cfg: ExperimentConfig) -> None:
        write_text(self.config_path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def read_config(self) -> ExperimentConfig:
        if not self.config_path.is_file():
            raise UserError(f"{self.path} is not an edgeseg run directory (no config.yaml)")
        return from_dict(ExperimentConfig, read_yaml(self.config_path))

    def write_info(self, info: RunInfo) -> None:
        write_json(self.info_path, asdict(info))

    def read_info(self) -> RunInfo:
        if not self.info_path.is_file():
            raise UserError(f"{self.path} is not an edgeseg run directory (no run.json)")
        try:
            return RunInfo(**json.loads(self.info_path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise UserError(f"{self.info_path}: unreadable run info ({exc})") from None

    def weights(self) -> Path:
        """The weights to use downstream: best if validation ran, else last."""
        for path in (self.best, self.last):
            if path.is_file():
                return path
        raise UserError(f"{self.path}: no checkpoint found (train first)")

    def append_log(self, record: dict[str, Any]) -> None:
        with open(self.log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def last_logged_epoch(self) -> int:
        """The epoch of the log's last line (0 without a log)."""
        if not self.log.is_file():
            return 0
        lines = [ln for ln in self.log.read_text().splitlines() if ln.strip()]
        return int(json.loads(lines[-1]).get("epoch", 0)) if lines else 0

    def truncate_log(self, after_epoch: int) -> None:
        """Drop log lines of epochs after `after_epoch` (written by a run that was killed later)."""
        if not self.log.is_file():
            return
        keep = []
        for line in self.log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line half-written when the process was killed: its epoch is re-run
                continue
            if isinstance(record, dict) and record.get("epoch", 0) <= after_epoch:
                keep.append(line)
        write_text(self.log, "".join(ln + "\n" for ln in keep))

    def remove_orphaned_temporaries(self) -> list[str]:
        """Delete the hidden temporaries of checkpoint writes a kill interrupted; the rename never happened,
        so the checkpoint itself is the previous one. There are two layers of them: edgeseg.atomic names its
        temporary .<target>.<random><suffix>, and safetensors itself (seen with 0.8: strace shows it) writes
        that file through its own .tmp<6 random characters> (Rust's tempfile crate) before renaming it."""
        folder = self.last.parent
        if not folder.is_dir():
            return []
        targets = (self.last.name, self.best.name)
        removed = [p for p in folder.iterdir() if p.is_file() and (any(p.name.startswith(f".{t}.") for t in targets)
                                                                   or _SAFETENSORS_TEMPORARY.fullmatch(p.name))]
        for path in removed:
            path.unlink(missing_ok=True)
        return [p.name for p in removed]
