"""U-Transformer (Petit et al. 2021), 2D and 3D, built from a layer factory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgeseg.nets.attention import MultiHeadCrossAttention, MultiHeadSelfAttention
from edgeseg.nets.base import UNetFamily
from edgeseg.nets.blocks import ConvBlock, level_dropout, up_path
from edgeseg.nets.capabilities import Capabilities
from edgeseg.nets.encoder import build_encoder, encode
from edgeseg.nets.layers import LayerFactory, island_conv


@dataclass(frozen=True)
class UTransformerOptions:
    """`model.options` of the U-Transformer."""

    heads: int = 4  # attention heads; must divide the bottleneck width and every cross-attended skip's width
    # how many of the deepest skips get cross-attention (None = all, as in the paper); the others are
    # plain U-Net skips. Attention memory grows with the square of a level's voxel count.
    cross_attention_levels: int | None = None

    def validate(self) -> None:
        if self.heads < 1:
            raise ValueError("model.options.heads must be >= 1")
        if self.cross_attention_levels is not None and self.cross_attention_levels < 0:
            raise ValueError("model.options.cross_attention_levels must be >= 0 (or null for all)")


class CrossAttentionUp(nn.Module):
    """Decoder level of the U-Transformer: the skip S filtered by cross-attention on Y, concatenated with
    the upsampled Y, then a ConvBlock. Without cross-attention it is the U-Net's UpBlock.

    `float_input`: Y is the (float) self-attention output, so the up path's convolution is an
    `island_conv` (the quantizing factory's convolutions need a quantized input).

    Shape: y (B, cin, *S/2), s (B, cskip, *S) -> (B, cout, *S).
    """

    def __init__(self, layers: LayerFactory, name: str, cin: int, cskip: int, cout: int, decoder: str, dropout: float,
                 heads: int, cross_attention: bool, float_input: bool):
        super().__init__()
        d = layers.spatial_dims
        if not float_input:
            self.up: nn.Module = up_path(layers, name, cin, cout, decoder)
        elif decoder == "transposed":
            self.up = island_conv(d, cin, cout, 2, stride=2, transposed=True)
        else:
            self.up = nn.Sequential(layers.upsample(f"{name}.up"), island_conv(d, cin, cout, 1),
                                    layers.act(f"{name}.up_act"))
        self.mhca = MultiHeadCrossAttention(layers, f"{name}.mhca", cin, cskip, heads) if cross_attention else None
        self.cat = layers.concat(f"{name}.cat", (cout, cskip))
        self.block = ConvBlock(layers, f"{name}.block", cout + cskip, cout, dropout)

    def forward(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        skip = self.mhca(y, s) if self.mhca is not None else s
        return self.block(self.cat(self.up(y), skip))


class UTransformer(UNetFamily):
    """U-Net with multi-head self-attention at the bottleneck and multi-head cross-attention on the skips.

    Petit et al. 2021, "U-Net Transformer: Self and Cross Attention for Medical Image Segmentation"
    (MLMI @ MICCAI): the bottleneck ConvBlock's output goes through MHSA with positional encoding
    (`MultiHeadSelfAttention`: every voxel attends to every other, absolute position available);
    on each skip connection, MHCA (`MultiHeadCrossAttention`) turns the attention of the skip S on
    the higher-level map Y into a sigmoid filter Z, and Z ⊙ S is concatenated with the upsampled Y.
    Encoder, ConvBlocks, depth, widths, norm, dropout and decoder kind are the U-Net's
    (`edgeseg.nets.unet`).

    Options (`UTransformerOptions`): `heads`; `cross_attention_levels` limits MHCA to the deepest
    skips (the top skip of a 3D volume has too many voxels for full attention on a CPU).

    Shape: input (B, in_channels, *S) with every S divisible by 2**depth; output logits
    (B, out_channels, *S).
    """

    capabilities = Capabilities(
        spatial_dims=(2, 3), quantizable=True, exportable=True, mc_dropout=True,
        notes="in the quantized model self- and cross-attention stay float (positional encodings, Q/K/V projections, "
              "softmax, sigmoid filters and the 1x1 convolutions that read them), as does the first up-convolution "
              "(it reads the self-attention output); the U-Net convolutions are quantized",
    )
    Options = UTransformerOptions

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
        heads: int = 4,
        cross_attention_levels: int | None = None,
    ):
        super().__init__()
        layers, widths = self._init_unet_front(spatial_dims, depth, base_width, norm, layers)
        attended = depth if cross_attention_levels is None else min(cross_attention_levels, depth)
        self.encoders, self.pools, self.bottleneck = build_encoder(layers, in_channels, widths, dropout)
        self.mhsa = MultiHeadSelfAttention(widths[depth], heads)
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            self.decoders.append(CrossAttentionUp(
                layers, f"dec{level}", widths[level + 1], widths[level], widths[level], decoder,
                level_dropout(dropout, level), heads, cross_attention=level >= depth - attended,
                float_input=level == depth - 1,
            ))
        self.head = layers.head("head", widths[0], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = encode(self.input_quant(x), self.encoders, self.pools)
        x = self.mhsa(self.bottleneck(x))
        for dec, skip in zip(self.decoders, reversed(skips)):
            x = dec(x, skip)
        return self.head(x)
