"""The U-Net encoder (conv blocks, pools, bottleneck), shared by the U-Net family.

The builders here and in `edgeseg.nets.blocks` return modules for the caller to assign rather
than wrapping them in a module of their own, so every network keeps its attribute names
(`encoders`, `pools`, `bottleneck`, `decoders`, ...): they are the state_dict keys of saved
checkpoints, and the factory names they pass ("enc0", "pool0", "bottleneck", "dec0") are the layer names that
`quant.layer_overrides` and the quantized twin's plan use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from edgeseg.nets.blocks import ConvBlock, level_dropout
from edgeseg.nets.layers import LayerFactory


class EncoderModules(NamedTuple):
    """The U-Net encoder's modules, for the network to assign under its own attribute names."""

    blocks: nn.ModuleList  # one ConvBlock per level, widths[level] channels
    pools: nn.ModuleList  # one 2x pooling per level
    bottleneck: ConvBlock  # widths[-1] channels, at 1/2**depth resolution


def build_encoder(layers: LayerFactory, in_channels: int, widths: list[int], dropout: float,
                  prefix: str = "") -> EncoderModules:
    """The U-Net encoder: for each of the len(widths) - 1 levels a ConvBlock then a pool, then the bottleneck ConvBlock.

    Factory names are `{prefix}enc{level}`, `{prefix}pool{level}` and `{prefix}bottleneck`.
    """
    depth = len(widths) - 1
    blocks, pools = nn.ModuleList(), nn.ModuleList()
    cin = in_channels
    for level in range(depth):
        blocks.append(ConvBlock(layers, f"{prefix}enc{level}", cin, widths[level], level_dropout(dropout, level)))
        pools.append(layers.pool(f"{prefix}pool{level}"))
        cin = widths[level]
    return EncoderModules(blocks, pools, ConvBlock(layers, f"{prefix}bottleneck", cin, widths[depth], dropout))


def encode(x: torch.Tensor, blocks: nn.ModuleList, pools: nn.ModuleList,
           after: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the encoder levels (not the bottleneck): returns the bottleneck's input and the skips, finest first.

    `after(level, features)`, when given, transforms each block's output before it becomes the
    skip and is pooled (the FiLMed U-Net's modulation).

    Shape: (B, C, *S) -> (B, widths[depth-1], *S/2**depth), [(B, widths[l], *S/2**l) for l = 0..depth-1].
    """
    skips = []
    for level, (block, pool) in enumerate(zip(blocks, pools)):
        x = block(x)
        if after is not None:
            x = after(level, x)
        skips.append(x)
        x = pool(x)
    return x, skips
