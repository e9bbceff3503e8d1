"""Extra model inputs through export: FiLM metadata and HeMIS modality masks as ONNX graph inputs.

A model declares its inputs besides the image (`Capabilities.extra_inputs`, in forward order). Export
traces it with example values for them, names them as graph inputs (`metadata` (N, D) and
`modality_mask` (N, M) float32, batch axis dynamic) and records in the manifest what the runtime needs
to feed them per case (`MetadataInput`: the field names and the run's training-time normalisation;
`ModalityInput`: the modality names). The examples are non-trivial (random metadata, masks with a
modality missing) so that parity is measured where the inputs matter, and a gate checks each input is
live in the exported graph (changing it changes the output), as the MC form's two-pass gate does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeseg.errors import UserError
from edgeseg.runtime.bundle import MetadataInput, ModalityInput

METADATA = "metadata"
MODALITY_MASK = "modality_mask"
GRAPH_ORDER = (METADATA, MODALITY_MASK)  # the manifest's order of extra graph inputs (Manifest.extra_inputs)


def model_extra_inputs(model: nn.Module) -> tuple[str, ...]:
    """The model's declared inputs besides the image, in forward order (empty for image-only models)."""
    capabilities = getattr(type(model), "capabilities", None)
    names = tuple(getattr(capabilities, "extra_inputs", ()) or ())
    unknown = [n for n in names if n not in GRAPH_ORDER]
    if unknown:
        raise UserError(f"export does not know how to feed the model input(s) {unknown} (known: {list(GRAPH_ORDER)})")
    if list(names) != [n for n in GRAPH_ORDER if n in names]:
        raise RuntimeError(f"extra inputs {names} are not in the bundle's order {GRAPH_ORDER}")
    return names


def model_int(model: nn.Module, name: str) -> int:
    """An integer attribute of the model (metadata_dim of FiLM, modalities of HeMIS)."""
    value = getattr(model, name, None)
    if not isinstance(value, int):
        raise TypeError(f"{type(model).__name__} has no integer attribute '{name}' to size its extra input")
    return value


def example_inputs(model: nn.Module, names: Sequence[str], batch: int, variant: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Non-trivial example values for the extra inputs `names`, one row per batch item.

    metadata: standard normal values times (1 + variant) (the scale of z-scored fields, and beyond);
    modality_mask: with M >= 2 modalities one is missing, the last (variant 0) or the first (variant 1).
    Shape: metadata (batch, D); modality_mask (batch, M).
    """
    out = []
    for name in names:
        if name == METADATA:
            dim = model_int(model, "metadata_dim")
            out.append((1.0 + variant) * torch.randn(batch, dim, generator=generator))
        elif name == MODALITY_MASK:
            count = model_int(model, "modalities")
            mask = torch.ones(batch, count)
            if count > 1:
                mask[:, -1 if variant % 2 == 0 else 0] = 0.0
            out.append(mask)
    return tuple(out)


def manifest_specs(names: Sequence[str], model: nn.Module, metadata: Mapping[str, Any] | None,
                   modalities: Sequence[str] | None,
                   in_channels: int) -> tuple[MetadataInput | None, ModalityInput | None]:
    """The manifest's records of the extra inputs, from what the run recorded (run.json), checked against the model.

    metadata: the run's `MetadataNormalization.to_dict()` (fields, method, mean, std), optionally with
    `table` and `case_column`; modalities: the run's modality names (default "0", "1", ... as training names them).
    """
    meta_spec = mod_spec = None
    if METADATA in names:
        if metadata is None:
            raise UserError("the model takes metadata but the run records no metadata normalization (run.json "
                            "'metadata'); was it trained with data.metadata?")
        try:
            meta_spec = MetadataInput(input=METADATA, fields=[str(f) for f in metadata["fields"]],
                                      method=str(metadata["method"]), mean=[float(v) for v in metadata["mean"]],
                                      std=[float(v) for v in metadata["std"]], table=metadata.get("table"),
                                      case_column=str(metadata.get("case_column") or "case"))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"unreadable metadata normalization record {dict(metadata)!r} ({exc})") from None
        meta_spec.normalization()  # UserError on a bad record
        dim = getattr(model, "metadata_dim", None)
        if dim is not None and dim != len(meta_spec.fields):
            raise UserError(f"the model takes {dim} metadata values but the run records {len(meta_spec.fields)} "
                            f"fields {meta_spec.fields}")
    if MODALITY_MASK in names:
        chosen = list(modalities) if modalities else [str(i) for i in range(in_channels)]
        if len(chosen) != in_channels or len(set(chosen)) != len(chosen):
            raise UserError(f"modality names {chosen} must be {in_channels} distinct names, one per image channel")
        mod_spec = ModalityInput(input=MODALITY_MASK, names=chosen)
    return meta_spec, mod_spec


def liveness(run: Any, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, float]:
    """How much the output of `run(feeds)` moves when each extra input changes (max |delta|; must be > 0).

    metadata: every value + 1; modality_mask: all modalities present (the examples have one missing).
    An input traced into a constant would give 0. `run`: feeds -> output array.
    """
    base = run(feeds)
    moved = {}
    for name in names:
        changed = dict(feeds)
        if name == METADATA:
            changed[name] = feeds[name] + np.float32(1.0)
        elif name == MODALITY_MASK:
            if feeds[name].shape[1] < 2:  # a single modality is always present: nothing to vary
                continue
            changed[name] = np.ones_like(feeds[name])
        moved[name] = float(np.abs(run(changed) - base).max())
    return moved
