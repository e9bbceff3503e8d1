"""U-Net (Ronneberger 2015) and 3D U-Net (Cicek 2016), built from a layer factory."""

from __future__ import annotations

import torch
from torch import nn

from edgeseg.nets.capabilities import Capabilities, NoOptions
from edgeseg.nets.layers import FloatLayers, LayerFactory


class ConvBlock(nn.Sequential):
    """conv -> norm -> ReLU, twice (dropout between the two when asked)."""

    def __init__(self, layers: LayerFactory, name: str, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.add_module("conv1", layers.conv(f"{name}.conv1", cin, cout, 3))
        self.add_module("norm1", layers.norm(f"{name}.norm1", cout))
        self.add_module("act1", layers.act(f"{name}.act1"))
        if dropout > 0:
            self.add_module("drop", layers.dropout(f"{name}.drop", dropout))
        self.add_module("conv2", layers.conv(f"{name}.conv2", cout, cout, 3))
        self.add_module("norm2", layers.norm(f"{name}.norm2", cout))
        self.add_module("act2", layers.act(f"{name}.act2"))


def up_path(layers: LayerFactory, name: str, cin: int, cout: int, decoder: str) -> nn.Module:
    """Coarse map -> twice the resolution with `cout` channels: a transposed conv, or nearest upsample + 1x1 conv + ReLU."""
    if decoder == "transposed":
        return layers.conv_transpose(f"{name}.up", cin, cout, 2, 2)
    return nn.Sequential(
        layers.upsample(f"{name}.up"),
        layers.conv(f"{name}.up_conv", cin, cout, 1),
        layers.act(f"{name}.up_act"),
    )


class UpBlock(nn.Module):
    """Upsample the coarser map, concatenate the skip, then a ConvBlock."""

    def __init__(self, layers: LayerFactory, name: str, cin: int, cskip: int, cout: int, decoder: str, dropout: float):
        super().__init__()
        self.up = up_path(layers, name, cin, cout, decoder)
        self.cat = layers.concat(f"{name}.cat", (cout, cskip))
        self.block = ConvBlock(layers, f"{name}.block", cout + cskip, cout, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(self.cat(self.up(x), skip))


class UNet(nn.Module):
    """Configurable 2D/3D U-Net.

    Shape: input (B, in_channels, *S) with every S divisible by 2**depth; output logits
    (B, out_channels, *S).
    """

    capabilities = Capabilities(spatial_dims=(2, 3), quantizable=True, exportable=True, mc_dropout=True)
    Options = NoOptions
    # older flag names, kept for callers that read them
    supports_2d = True
    supports_3d = True
    quantizable = True
    exportable = True
    has_mc_dropout = True  # when dropout > 0
    extra_inputs: tuple[str, ...] = ()

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
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
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
        for dec, skip in zip(self.decoders, reversed(skips)):
            x = dec(x, skip)
        return self.head(x)
