"""Attention U-Net (Oktay et al. 2018), 2D and 3D, built from a layer factory."""

from __future__ import annotations

import torch
from torch import nn

from edgeseg.nets.attention import AttentionGate
from edgeseg.nets.base import UNetFamily
from edgeseg.nets.blocks import unet_up_block
from edgeseg.nets.capabilities import Capabilities, NoOptions
from edgeseg.nets.encoder import build_encoder, encode
from edgeseg.nets.layers import LayerFactory


class AttentionUNet(UNetFamily):
    """U-Net with additive attention gates on every skip connection.

    Oktay et al. 2018, "Attention U-Net: Learning Where to Look for the Pancreas" (MIDL): before
    the skip x of level l is concatenated in the decoder, it is multiplied by coefficients
    α = σ₂(ψᵀ σ₁(W_xᵀ x + W_gᵀ g + b_g) + b_ψ) (`AttentionGate`), where the gating signal g is the
    coarser decoder level's output (the bottleneck for the deepest skip). The gate's intermediate
    width is half the skip's width (at least 1). Encoder, decoder, depth, widths, norm, dropout and
    decoder kind are the U-Net's (`edgeseg.nets.unet`); the paper's optional deep supervision is
    not included.

    Shape: input (B, in_channels, *S) with every S divisible by 2**depth; output logits
    (B, out_channels, *S).
    """

    capabilities = Capabilities(
        spatial_dims=(2, 3), quantizable=True, exportable=True, mc_dropout=True,
        notes="in the quantized model the gates' sigmoid, the linear resampling of the coefficients and the "
              "gating product stay float; every convolution has quantized weights, but the gates' 1x1 convolutions "
              "run in float on ONNX Runtime's CPU form (their outputs feed an addition or the sigmoid, not a "
              "requantizer)",
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
        self.encoders, self.pools, self.bottleneck = build_encoder(layers, in_channels, widths, dropout)
        self.gates = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            self.gates.append(AttentionGate(layers, f"gate{level}", widths[level], widths[level + 1],
                                            max(1, widths[level] // 2)))
            self.decoders.append(unet_up_block(layers, widths, level, decoder, dropout))
        self.head = layers.head("head", widths[0], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = encode(self.input_quant(x), self.encoders, self.pools)
        x = self.bottleneck(x)
        for gate, dec, skip in zip(self.gates, self.decoders, reversed(skips)):
            x = dec(x, gate(skip, x))  # g = the coarser decoder level's output
        return self.head(x)
