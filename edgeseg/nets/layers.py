"""Layer factories: the one place that decides which concrete modules a network is built from.

Networks never instantiate `nn.Conv3d` & co. directly; they ask a `LayerFactory`. The float
factory below returns plain PyTorch layers; `edgeseg.quantize` supplies a factory that returns
brevitas layers, so the quantized twin is built from the same architecture code (no second
hand-written copy of each network).
"""

from __future__ import annotations

import sys
from typing import Protocol

import torch
from torch import nn


class LayerFactory(Protocol):
    """What a network may ask for. `name` lets a factory apply per-layer settings."""

    spatial_dims: int

    def input(self, name: str) -> nn.Module: ...
    def conv(self, name: str, cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = True) -> nn.Module: ...
    def conv_transpose(self, name: str, cin: int, cout: int, kernel: int, stride: int) -> nn.Module: ...
    def norm(self, name: str, channels: int) -> nn.Module: ...
    def act(self, name: str) -> nn.Module: ...
    def pool(self, name: str) -> nn.Module: ...
    def upsample(self, name: str) -> nn.Module: ...
    def concat(self, name: str, channels: tuple[int, int]) -> nn.Module: ...
    def dropout(self, name: str, p: float) -> nn.Module: ...
    def head(self, name: str, cin: int, cout: int) -> nn.Module: ...


class Concat(nn.Module):
    """Channel concatenation as a module, so a quantizing factory can replace it."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b], dim=1)


def as_float(x):  # type: ignore[no-untyped-def]
    """The float tensor behind `x`: a brevitas QuantTensor carries it as `.value`.

    Float math inside a quantized network (attention, gating) must start from plain tensors:
    brevitas' QuantTensor + Tensor returns a QuantTensor with a stale scale. Looked up through
    sys.modules so that nets never import brevitas.
    """
    quant_tensor = sys.modules.get("brevitas.quant_tensor")
    if quant_tensor is not None and isinstance(x, quant_tensor.QuantTensor):
        return x.value
    return x


class _FloatInput:
    """Mixin: compute in float on the float value of the input (QuantTensor or tensor)."""

    def forward(self, input, *args, **kwargs):  # type: ignore[no-untyped-def]
        return super().forward(as_float(input), *args, **kwargs)  # type: ignore[misc]


class IslandConv2d(_FloatInput, nn.Conv2d):
    """A convolution that stays float in every build (a "float island" in a quantized network)."""


class IslandConv3d(_FloatInput, nn.Conv3d):
    """A convolution that stays float in every build (a "float island" in a quantized network)."""


class IslandConvTranspose2d(_FloatInput, nn.ConvTranspose2d):
    """A transposed convolution that stays float in every build."""


class IslandConvTranspose3d(_FloatInput, nn.ConvTranspose3d):
    """A transposed convolution that stays float in every build."""


ISLAND_MODULES = (IslandConv2d, IslandConv3d, IslandConvTranspose2d, IslandConvTranspose3d)


def island_conv(spatial_dims: int, cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = True,
                transposed: bool = False) -> nn.Module:
    """A float convolution for inputs that are float in the quantized twin too (attention outputs).

    The quantizing factory cannot take such inputs: its convolutions carry an int32 bias whose
    scale is the input's, and a float tensor has none. Same parameter names as nn.ConvNd, so batch
    norm folds into it and folded weights load into the twin unchanged.
    """
    if transposed:
        return (IslandConvTranspose2d, IslandConvTranspose3d)[spatial_dims - 2](cin, cout, kernel, stride=stride,
                                                                                  bias=bias)
    return (IslandConv2d, IslandConv3d)[spatial_dims - 2](cin, cout, kernel, stride=stride, padding=kernel // 2,
                                                          bias=bias)


class McDropout(nn.Module):
    """Channel dropout that can stay active at inference for Monte Carlo sampling.

    `mc` turns sampling on in eval mode; it is an explicit attribute (set through
    `set_mc_dropout`) rather than relying on `model.train()`, which would also flip batch
    norm into training mode (an ivadomed pitfall).
    """

    def __init__(self, p: float, spatial_dims: int):
        super().__init__()
        self.p = p
        self.spatial_dims = spatial_dims
        self.mc = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not (self.training or self.mc):
            return x
        fn = nn.functional.dropout3d if self.spatial_dims == 3 else nn.functional.dropout2d
        return fn(x, self.p, training=True)


def set_mc_dropout(model: nn.Module, enabled: bool) -> int:
    """Switch Monte Carlo dropout on or off in every McDropout; returns how many there are."""
    count = 0
    for module in model.modules():
        if isinstance(module, McDropout):
            module.mc = enabled
            count += 1
    return count


class FloatLayers:
    """Plain PyTorch layers for 2D or 3D networks."""

    def __init__(self, spatial_dims: int, norm: str = "batch", upsample_mode: str = "nearest"):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.norm_kind = norm
        self.upsample_mode = upsample_mode

    def _nd(self, stem: str) -> type[nn.Module]:
        return getattr(nn, f"{stem}{self.spatial_dims}d")

    def input(self, name: str) -> nn.Module:
        return nn.Identity()

    def conv(self, name: str, cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = True) -> nn.Module:
        return self._nd("Conv")(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias)

    def conv_transpose(self, name: str, cin: int, cout: int, kernel: int, stride: int) -> nn.Module:
        return self._nd("ConvTranspose")(cin, cout, kernel, stride=stride)

    def norm(self, name: str, channels: int) -> nn.Module:
        if self.norm_kind == "batch":
            return self._nd("BatchNorm")(channels)
        if self.norm_kind == "instance":
            return self._nd("InstanceNorm")(channels, affine=True)
        return nn.Identity()

    def act(self, name: str) -> nn.Module:
        return nn.ReLU(inplace=False)

    def pool(self, name: str) -> nn.Module:
        return self._nd("MaxPool")(2)

    def upsample(self, name: str) -> nn.Module:
        return nn.Upsample(scale_factor=2, mode=self.upsample_mode)

    def concat(self, name: str, channels: tuple[int, int]) -> nn.Module:
        return Concat()

    def dropout(self, name: str, p: float) -> nn.Module:
        return McDropout(p, self.spatial_dims) if p > 0 else nn.Identity()

    def head(self, name: str, cin: int, cout: int) -> nn.Module:
        return self._nd("Conv")(cin, cout, 1)
