"""Attention U-Net (Oktay et al. 2018), 2D and 3D, built from a layer factory."""

from __future__ import annotations

import torch
from torch import nn

from edgeseg.nets.attention import AttentionGate
from edgeseg.nets.capabilities import Capabilities, NoOptions
from edgeseg.nets.layers import FloatLayers, LayerFactory
from edgeseg.nets.unet import ConvBlock, UpBlock


class AttentionUNet(nn.Module):
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
        layers = layers or FloatLayers(spatial_dims, norm=norm)
        self.spatial_dims = spatial_dims
        self.depth = depth
        self.min_input_multiple = 2**depth
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.input_quant = layers.input("input")
        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        cin = in_channels
        for level in range(depth):
            self.encoders.append(ConvBlock(layers, f"enc{level}", cin, widths[level], dropout if level > 0 else 0.0))
            self.pools.append(layers.pool(f"pool{level}"))
            cin = widths[level]
        self.bottleneck = ConvBlock(layers, "bottleneck", cin, widths[depth], dropout)
        self.gates = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            self.gates.append(AttentionGate(layers, f"gate{level}", widths[level], widths[level + 1],
                                            max(1, widths[level] // 2)))
            self.decoders.append(
                UpBlock(layers, f"dec{level}", widths[level + 1], widths[level], widths[level], decoder,
                        dropout if level > 0 else 0.0)
            )
        self.head = layers.head("head", widths[0], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quant(x)
        skips = []
        for enc, pool in zip(self.encoders, self.pools):
            x = enc(x)
            skips.append(x)
            x = pool(x)
        x = self.bottleneck(x)
        for gate, dec, skip in zip(self.gates, self.decoders, reversed(skips)):
            x = dec(x, gate(skip, x))  # g = the coarser decoder level's output
        return self.head(x)
