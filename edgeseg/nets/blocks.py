"""The U-Net's building blocks (Ronneberger 2015), built from a layer factory and shared by the U-Net family."""

from __future__ import annotations

import torch
from torch import nn

from edgeseg.nets.layers import LayerFactory


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


def level_dropout(dropout: float, level: int) -> float:
    """Dropout of a U-Net level's conv block: none at full resolution (level 0), `dropout` below it."""
    return dropout if level > 0 else 0.0


def unet_up_block(layers: LayerFactory, widths: list[int], level: int, decoder: str, dropout: float) -> UpBlock:
    """The U-Net decoder's `level`: widths[level + 1] channels up to widths[level], with that level's skip."""
    return UpBlock(layers, f"dec{level}", widths[level + 1], widths[level], widths[level], decoder,
                   level_dropout(dropout, level))


def unet_decoders(layers: LayerFactory, widths: list[int], decoder: str, dropout: float) -> nn.ModuleList:
    """The U-Net decoder's levels, coarsest first (the order they run in)."""
    return nn.ModuleList(unet_up_block(layers, widths, level, decoder, dropout)
                         for level in reversed(range(len(widths) - 1)))
