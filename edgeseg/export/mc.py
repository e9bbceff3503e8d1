"""Monte Carlo dropout that survives export: dropout masks become model inputs.

An exported `nn.Dropout`/`F.dropout3d` is the identity in ONNX and TensorRT, so MC sampling
would silently return the same prediction every pass. Random ops inside the graph are no fix
either: TensorRT ignores their `seed` (onnx-tensorrt operators.md), and sampling would be out of
the runtime's hands. Instead every active `McDropout` becomes a `MaskedDropout` that multiplies
by a mask fed as an extra graph input: 0 for a dropped channel, 1/(1-p) for a kept one, the exact
channel dropout torch's dropout2d/dropout3d applies in training (and in `McDropout` with `mc`).
The runtime draws the masks (`edgeseg.runtime.bundle.make_mc_masks`); all ones gives the plain
prediction.

For a brevitas model the mask multiplies the QuantTensor's value and keeps its scale, exactly
as brevitas' own dropout handler does (`quant_invariant_handler`), so the exported graph matches
the brevitas model in MC mode.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from edgeseg.nets.layers import McDropout
from edgeseg.runtime.bundle import McSite

MASK_PREFIX = "mc_mask_"


class MaskedDropout(nn.Module):
    """Channel dropout with an externally supplied mask (identity while no mask is set).

    Shape: x (N, C, *S); mask (N, C, 1, ..., 1), values 0 or 1/(1-p).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.mask: torch.Tensor | None = None

    def forward(self, x):
        if self.mask is None:
            return x
        quant_tensor = sys.modules.get("brevitas.quant_tensor")
        if quant_tensor is not None and isinstance(x, quant_tensor.QuantTensor):
            return x.set(value=x.value * self.mask)
        return x * self.mask


class MaskInputs(nn.Module):
    """Wraps a model so that forward(image, *extra, *masks) feeds the model's `num_extra` extra inputs
    (FiLM metadata, HeMIS modality mask) to the model and one mask to each MaskedDropout."""

    def __init__(self, model: nn.Module, sites: list[MaskedDropout], num_extra: int = 0):
        super().__init__()
        self.model = model
        self.sites = sites
        self.num_extra = num_extra

    def forward(self, image, *inputs):
        extra, masks = inputs[:self.num_extra], inputs[self.num_extra:]
        if len(masks) != len(self.sites):
            raise ValueError(f"expected {len(self.sites)} masks, got {len(masks)}")
        for site, mask in zip(self.sites, masks):
            site.mask = mask
        try:
            return self.model(image, *extra)
        finally:
            for site in self.sites:
                site.mask = None


def with_mask_inputs(model: nn.Module, example: torch.Tensor,
                     extra: tuple[torch.Tensor, ...] = ()) -> tuple[MaskInputs, list[McSite]] | None:
    """A copy of `model` whose McDropout layers take masks as inputs, and the sites' descriptions.

    Returns None when the model has no active (p > 0) McDropout. The channel count of each site
    is read from one forward pass on `example` (Shape: (N, C, *S)) and the model's `extra` inputs.
    """
    twin = copy.deepcopy(model).eval()
    sites: list[MaskedDropout] = []
    for parent in list(twin.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, McDropout) and child.p > 0:
                site = MaskedDropout(child.p)
                setattr(parent, child_name, site)
                sites.append(site)
    if not sites:
        return None
    channels: dict[int, int] = {}
    hooks = [s.register_forward_pre_hook(lambda m, args, i=i: channels.__setitem__(i, int(args[0].shape[1])))
             for i, s in enumerate(sites)]
    with torch.no_grad():
        twin(example, *extra)
    for hook in hooks:
        hook.remove()
    if len(channels) != len(sites):
        raise RuntimeError("some MC dropout layers were not reached by a forward pass")
    described = [McSite(input=f"{MASK_PREFIX}{i}", channels=channels[i], p=float(s.p)) for i, s in enumerate(sites)]
    return MaskInputs(twin, sites, len(extra)).eval(), described


def random_masks(sites: list[McSite], batch: int, spatial_dims: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Channel-dropout masks like torch's dropout3d draws them. Shape: each (batch, C, 1, ..., 1)."""
    masks = []
    for site in sites:
        shape = (batch, site.channels) + (1,) * spatial_dims
        keep = torch.rand(shape, generator=generator) >= site.p
        masks.append(keep.float() / (1.0 - site.p))
    return masks
