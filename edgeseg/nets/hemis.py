"""HeMIS U-Net (Havaei et al. 2016), 2D and 3D: segmentation from any subset of the input modalities."""

from __future__ import annotations

import torch
from torch import nn

from edgeseg.errors import UserError
from edgeseg.nets.base import UNetFamily
from edgeseg.nets.blocks import UpBlock, level_dropout
from edgeseg.nets.capabilities import Capabilities, NoOptions
from edgeseg.nets.encoder import build_encoder, encode
from edgeseg.nets.layers import LayerFactory, as_float


def fuse_modalities(features: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """HeMIS abstraction layer: mean and variance over the modalities present, concatenated on channels.

    Havaei et al. 2016, Sec. 2: E[C] = (1/|K|) Σ_{k∈K} C_k and Var[C] = 1/(|K|-1) Σ_{k∈K} (C_k - E[C])²,
    with Var = 0 when a single modality is present; K = the modalities with mask 1 for that case.
    The features of absent modalities never reach the result (their weight is 0).

    Shape: features M tensors (B, C, *S), mask (B, M) of 0/1 -> (B, 2C, *S) = [mean, variance].
    """
    f = torch.stack([as_float(t) for t in features], dim=1)  # (B, M, C, *S)
    w = mask.to(f.dtype).reshape(mask.shape + (1,) * (f.dim() - 2))  # (B, M, 1, ..., 1)
    count = w.sum(dim=1)  # (B, 1, ..., 1)
    mean = (w * f).sum(dim=1) / count
    var = (w * (f - mean.unsqueeze(1)).square()).sum(dim=1) / (count - 1).clamp(min=1)
    return torch.cat([mean, var], dim=1)


class ModalityEncoder(nn.Module):
    """The U-Net encoder (conv blocks, pools, bottleneck) of one modality; returns every level's features.

    Shape: (B, 1, *S) -> [ (B, widths[l], *S/2^l) for l = 0..depth ].
    """

    def __init__(self, layers: LayerFactory, name: str, widths: list[int], dropout: float):
        super().__init__()
        self.blocks, self.pools, self.bottleneck = build_encoder(layers, 1, widths, dropout, prefix=f"{name}.")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, skips = encode(x, self.blocks, self.pools)
        return [*skips, self.bottleneck(x)]


class HeMISUNet(UNetFamily):
    """U-Net with one encoder per modality and HeMIS fusion, so any subset of modalities may be missing.

    Havaei et al. 2016, "HeMIS: Hetero-Modal Image Segmentation" (MICCAI): each modality has its
    own encoder ("back end"); an abstraction layer fuses the modalities present by their mean and
    variance (`fuse_modalities`); the shared "front end" segments from the fused features. In the
    U-Net form (as in Dorent et al. 2019 and ivadomed's HeMIS-UNet) the fusion happens at every
    encoder level and the bottleneck, and the fused maps are the decoder's skips.

    forward(x, modality_mask): x holds the M = in_channels modalities as channels; modality_mask
    (B, M) is 1 where a modality is present, 0 where it is missing (its channel is ignored).
    Training on random subsets (the paper's way to learn robustness) is the data pipeline's job:
    `data.modalities` in `edgeseg train` (missing files zero-filled and masked, present modalities
    dropped at random with at least one kept; `edgeseg.train.sampling`). `edgeseg export` makes the mask a
    graph input `modality_mask` (N, M) and records the modality names in the bundle; `edgeseg segment`
    builds it from the modality files given (docs/bundle.md). Quantization does not carry the mask yet.

    Shape: x (B, M, *S) with every S divisible by 2**depth -> logits (B, out_channels, *S).
    """

    capabilities = Capabilities(
        spatial_dims=(2, 3), quantizable=False, exportable=True, mc_dropout=True, extra_inputs=("modality_mask",),
        notes="it needs a modality-mask input, which the quantization pipeline does not carry yet (float export "
              "and the runtime do)",
    )
    Options = NoOptions

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        depth: int = 3,
        base_width: int = 16,
        norm: str = "batch",
        dropout: float = 0.0,
        decoder: str = "upsample",
        layers: LayerFactory | None = None,
    ):
        super().__init__()
        layers, widths = self._init_unet_front(spatial_dims, depth, base_width, norm, layers)
        self.modalities = in_channels
        self.modality_encoders = nn.ModuleList(ModalityEncoder(layers, f"mod{m}", widths, dropout)
                                               for m in range(in_channels))
        self.decoders = nn.ModuleList()
        cin = 2 * widths[depth]  # fused bottleneck: mean and variance
        for level in reversed(range(depth)):
            self.decoders.append(UpBlock(layers, f"dec{level}", cin, 2 * widths[level], widths[level], decoder,
                                         level_dropout(dropout, level)))
            cin = widths[level]
        self.head = layers.head("head", widths[0], out_channels)

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor | None = None) -> torch.Tensor:
        if modality_mask is None:
            raise UserError("model 'hemis_unet' needs its modality-mask input (forward(x, modality_mask)); this "
                            "pipeline step does not provide one")
        if modality_mask.shape != (x.shape[0], self.modalities):
            raise UserError(f"hemis_unet expects a modality mask of shape ({x.shape[0]}, {self.modalities}), "
                            f"got {tuple(modality_mask.shape)}")
        if not torch.jit.is_tracing() and bool((modality_mask.sum(dim=1) < 1).any()):
            raise UserError("hemis_unet: every case needs at least one modality present in its modality mask")
        x = self.input_quant(x)
        per_modality = [enc(x[:, m:m + 1]) for m, enc in enumerate(self.modality_encoders)]
        fused = [fuse_modalities([levels[i] for levels in per_modality], modality_mask) for i in range(self.depth + 1)]
        y = fused[-1]
        for dec, skip in zip(self.decoders, reversed(fused[:-1])):
            y = dec(y, skip)
        return self.head(y)
