"""U-Net (Ronneberger 2015) and 3D U-Net (Cicek 2016), built from a layer factory."""

from __future__ import annotations

import torch

from edgeseg.nets.base import UNetFamily
from edgeseg.nets.blocks import ConvBlock, UpBlock, unet_decoders, up_path
from edgeseg.nets.capabilities import Capabilities, NoOptions
from edgeseg.nets.encoder import build_encoder, encode
from edgeseg.nets.layers import LayerFactory

# ConvBlock, UpBlock and up_path now live in edgeseg.nets.blocks; re-exported for imports from their old home
__all__ = ["ConvBlock", "UNet", "UpBlock", "up_path"]


class UNet(UNetFamily):
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
        layers, widths = self._init_unet_front(spatial_dims, depth, base_width, norm, layers)
        self.encoders, self.pools, self.bottleneck = build_encoder(layers, in_channels, widths, dropout)
        self.decoders = unet_decoders(layers, widths, decoder, dropout)
        self.head = layers.head("head", widths[0], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = encode(self.input_quant(x), self.encoders, self.pools)
        x = self.bottleneck(x)
        for dec, skip in zip(self.decoders, reversed(skips)):
            x = dec(x, skip)
        return self.head(x)
