"""Base classes of the networks: the constructor prologue they all share.

Each sets the attributes the pipeline reads (`spatial_dims`, `min_input_multiple`, and `depth` for
the U-Net family) and registers `input_quant`, the layer factory's input quantizer, first: it
has parameters in a quantized twin, and saved checkpoints list it first.
"""

from __future__ import annotations

from torch import nn

from edgeseg.nets.layers import FloatLayers, LayerFactory


class SegmentationNet(nn.Module):
    """A network built from a layer factory; subclasses call `_init_front` right after `nn.Module.__init__`."""

    spatial_dims: int
    min_input_multiple: int  # every spatial size of the input must be a multiple of it
    input_quant: nn.Module

    def _init_front(self, spatial_dims: int, norm: str, layers: LayerFactory | None,
                    min_input_multiple: int) -> LayerFactory:
        """Set the shared attributes and add `input_quant`; returns `layers`, or float layers with `norm` when None."""
        layers = layers or FloatLayers(spatial_dims, norm=norm)
        self.spatial_dims = spatial_dims
        self.min_input_multiple = min_input_multiple
        self.input_quant = layers.input("input")
        return layers


class UNetFamily(SegmentationNet):
    """A U-Net-shaped network: `depth` 2x poolings, level widths doubling from `base_width`."""

    depth: int

    def _init_unet_front(self, spatial_dims: int, depth: int, base_width: int, norm: str,
                         layers: LayerFactory | None) -> tuple[LayerFactory, list[int]]:
        """`_init_front` with inputs a multiple of 2**depth; also sets `depth`.

        Returns the factory and the level widths [base_width * 2**l for l = 0..depth] (the last is the bottleneck's).
        """
        layers = self._init_front(spatial_dims, norm, layers, min_input_multiple=2**depth)
        self.depth = depth
        return layers, [base_width * 2**level for level in range(depth + 1)]
