"""Checkpoints as single safetensors files: no pickle, atomic, complete enough to resume exactly.

A training checkpoint holds the model weights ("model/..."), the optimizer's tensors
("optim/<param>/<name>"), torch's RNG state, a training scheme's own tensors ("extra/...", e.g.
INERRANT's pseudo-labels), and everything else (optimizer hyper-parameters,
scheduler state, trainer counters, the numpy sampler's RNG state) as JSON in the safetensors
metadata. One file means one atomic rename: a kill at any moment leaves either the previous
checkpoint or the new one.

Checkpoints hold the plain module's state (a DistributedDataParallel wrapper is looked through)
and nothing that depends on the number of processes, so a run resumes under any world size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from edgeseg.atomic import atomic_path
from edgeseg.errors import UserError
from edgeseg.train.distributed import unwrap

FORMAT = "edgeseg-checkpoint-1"


def save_weights(path: Path, model: torch.nn.Module, metadata: dict[str, Any] | None = None) -> None:
    """Model weights only (what export and evaluation need)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in unwrap(model).state_dict().items()}
    meta = {"format": FORMAT, "kind": "weights", "meta": json.dumps(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_weights(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights saved by `save_weights` or `save_training_state`; returns the stored metadata."""
    tensors, meta = _read(path)
    if meta.get("kind") == "training":
        tensors = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit this model (missing {list(missing)[:3]}, "
                        f"unexpected {list(unexpected)[:3]})")
    return json.loads(meta.get("meta", "{}"))


def save_training_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Everything `--resume` needs, in one safetensors file; `extra_tensors` come back from `load_extra_tensors`."""
    tensors: dict[str, torch.Tensor] = {
        f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in unwrap(model).state_dict().items()
    }
    for name, value in (extra_tensors or {}).items():
        tensors[f"extra/{name}"] = value.detach().cpu().contiguous().clone()
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in opt["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{pid}/{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {
        "format": FORMAT,
        "kind": "training",
        "optim_param_groups": json.dumps(opt["param_groups"]),
        "optim_scalars": json.dumps(scalars),
        "scheduler": json.dumps(scheduler.state_dict()),
        "trainer": json.dumps(trainer_state),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_training_state(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and torch RNG; returns the trainer state dict."""
    tensors, meta = _read(path)
    if meta.get("kind") != "training":
        raise UserError(f"{path}: not a training checkpoint (cannot resume from it)")
    unwrap(model).load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, extra in json.loads(meta["optim_scalars"]).items():
        state.setdefault(int(pid), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["optim_param_groups"])})
    scheduler.load_state_dict(json.loads(meta["scheduler"]))
    torch.set_rng_state(tensors["rng/torch"])
    return json.loads(meta["trainer"])


def load_extra_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The `extra_tensors` a training checkpoint was saved with (empty when none)."""
    tensors, meta = _read(path)
    if meta.get("kind") != "training":
        raise UserError(f"{path}: not a training checkpoint (cannot resume from it)")
    return {k[len("extra/"):]: v for k, v in tensors.items() if k.startswith("extra/")}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable checkpoint ({exc})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    return tensors, meta
