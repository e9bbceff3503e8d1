"""`QuantLayers`: the brevitas implementation of the `LayerFactory` protocol.

A network built with this factory is the quantized twin of the float one: same module tree,
same parameter names, so folded float weights load straight in. The quantizers are chosen for
real integer engines (onnxruntime QLinearConv, TensorRT explicit Q/DQ), see
shared/research/deployment-facts.md sections 1-3:

- weights: symmetric, narrow range (4 bits -> -7..7), one scale per output channel
  (`Int8WeightPerChannelFloat` with `weight_bit_width=W`); the scale is a learned parameter
  initialised from max|W| (`learned_weight_scales`) or recomputed from max|W| every step;
- activations: per-tensor, zero point 0; unsigned after ReLU (6 bits -> 0..63) so that
  conv -> ReLU -> conv runs uint8 -> uint8 in onnxruntime; signed for the network input and
  for concatenations fed by a transposed conv (whose output has no ReLU); the scale is a
  learned parameter initialised from the 99.999th percentile seen during calibration;
- bias: int32 with scale s_in * s_w (`Int32Bias`), so exported graphs are bit-exact in
  onnxruntime (a float bias makes ORT re-quantize it differently, ~1 LSB errors);
- optional power-of-two scales (brevitas fixed-point quantizers, ceil of log2);
- concatenations: one activation quantizer on the concatenated tensor, i.e. both inputs are
  re-quantized to ONE scale (what ORT's QLinearConcat/QLinearConv and TensorRT need; two
  scales made the reference export run its decoder convs in float);
- batch norm must be folded into the preceding conv first (`edgeseg.quantize.fold`); instance
  norm cannot be folded (its statistics depend on the input) and stays a float island between
  the int32 conv output and the next activation quantizer;
- max pooling and nearest upsampling commute with quantization, so plain torch modules are
  used and brevitas passes the QuantTensor's scale through (works for 2D and 3D; brevitas has
  no 3D upsampling layer, and needs none);
- the head (last 1x1 conv) has quantized weights and an int32 bias; its logits stay float.

Bit widths: `bits` for every layer; `first_last` for the network input quantizer, the first
conv built and the head (2019 paper: first and last conv float); then `overrides`, a mapping
from layer-name glob (fnmatch, e.g. "dec0.*" or "enc0.conv1") to widths, applied in order so
that the last matching pattern wins. Weight widths apply to convs, activation widths to
activation/input/concat quantizers.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import torch
from brevitas import nn as qnn
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Int32Bias, Uint8ActPerTensorFloat
from brevitas.quant.fixed_point import (
    Int8ActPerTensorFixedPoint,
    Int8WeightPerChannelFixedPoint,
    Uint8ActPerTensorFixedPoint,
)
from brevitas.quant_tensor import QuantTensor
from torch import nn

from edgeseg.errors import UserError
from edgeseg.nets.layers import McDropout
from edgeseg.quantize.bits import BitWidths

NORMS = ("none", "instance")


def dequant(x: torch.Tensor | QuantTensor) -> torch.Tensor:
    """The float value of a QuantTensor (or the tensor itself)."""
    return x.value if isinstance(x, QuantTensor) else x


class _DequantInput:
    """Mixin for float layers inside a quantized network: accept a QuantTensor, compute in float."""

    def forward(self, input, *args, **kwargs):  # type: ignore[no-untyped-def]
        return super().forward(dequant(input), *args, **kwargs)  # type: ignore[misc]


class FloatConv2d(_DequantInput, nn.Conv2d):
    """A conv kept in float (e.g. first/last at `first_last_bits: 32`); same parameter names as nn.Conv2d."""


class FloatConv3d(_DequantInput, nn.Conv3d):
    """A conv kept in float; same parameter names as nn.Conv3d."""


class FloatConvTranspose2d(_DequantInput, nn.ConvTranspose2d):
    """A transposed conv kept in float."""


class FloatConvTranspose3d(_DequantInput, nn.ConvTranspose3d):
    """A transposed conv kept in float."""


class FloatInstanceNorm2d(_DequantInput, nn.InstanceNorm2d):
    """Instance norm as a float island (cannot be folded: it normalises by per-input statistics)."""


class FloatInstanceNorm3d(_DequantInput, nn.InstanceNorm3d):
    """Instance norm as a float island (cannot be folded: it normalises by per-input statistics)."""


class SharedScaleConcat(nn.Module):
    """Channel concatenation followed by ONE activation quantizer: the output has a single scale.

    Quantizing the concatenated tensor is the same as quantizing each input with the shared
    quantizer (per-tensor quantization is elementwise), and exports as DQ, DQ -> Concat -> Q ->
    DQ -> Conv, which onnxruntime fuses into QLinearConcat + QLinearConv.
    `signed` must be True when an input can be negative; a signed QuantTensor entering an
    unsigned concat raises instead of silently clipping negatives to zero.
    Shape: a (B, Ca, *S), b (B, Cb, *S) -> (B, Ca + Cb, *S).
    """

    def __init__(self, quant: nn.Module, signed: bool):
        super().__init__()
        self.quant = quant
        self.signed = signed

    def forward(self, a, b):  # type: ignore[no-untyped-def]
        if not self.signed and not torch.onnx.is_in_onnx_export():
            for t in (a, b):
                # QuantTensors carry their signedness; plain tensors (calibration, float layers) are checked
                negative = bool(t.signed) if isinstance(t, QuantTensor) else bool((t < 0).any())
                if negative:
                    raise RuntimeError("a signed tensor enters an unsigned concat quantizer; "
                                       "build QuantLayers with signed_concat=True")
        return self.quant(torch.cat([dequant(a), dequant(b)], dim=1))


class QuantLayers:
    """brevitas layers for 2D/3D networks; see the module docstring for every quantizer choice.

    After the network is built, `plan` maps each layer name to what it got (e.g. "w4", "a6 unsigned")
    and `unmatched_overrides()` lists override patterns that matched no layer (likely typos).
    """

    def __init__(
        self,
        spatial_dims: int,
        bits: BitWidths,
        *,
        first_last: BitWidths | None = None,
        overrides: Mapping[str, BitWidths] | None = None,
        norm: str = "none",
        power_of_two: bool = False,
        learned_weight_scales: bool = True,
        signed_concat: bool = False,
    ):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if bits.is_float:
            raise ValueError("QuantLayers needs integer bit widths; use FloatLayers for fp32")
        if norm == "batch":
            raise UserError("batch norm must be folded into the convs before quantization "
                            "(edgeseg.quantize.fold.fold_batch_norms); build the twin with norm='none'")
        if norm not in NORMS:
            raise UserError(f"cannot quantize norm '{norm}'; supported: batch (folded), {', '.join(NORMS)}")
        self.spatial_dims = spatial_dims
        self.bits = bits
        self.first_last = first_last if first_last is not None else bits
        self.overrides = dict(overrides or {})
        self.norm_kind = norm
        self.power_of_two = power_of_two
        self.learned_weight_scales = learned_weight_scales
        self.signed_concat = signed_concat
        self.plan: dict[str, str] = {}
        self._matched: set[str] = set()
        self._first_conv_done = False
        self._input_is_float = False

    # ---- bit-width resolution -------------------------------------------------------------

    def widths(self, name: str, first_or_last: bool = False) -> BitWidths:
        """Bit widths of layer `name`: base, then first/last, then matching overrides (last wins)."""
        result = self.first_last if first_or_last else self.bits
        for pattern, widths in self.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                self._matched.add(pattern)
                result = widths
        return result

    def unmatched_overrides(self) -> list[str]:
        return [p for p in self.overrides if p not in self._matched]

    # ---- quantizer choices ----------------------------------------------------------------

    def _weight_kwargs(self, bit_width: int) -> dict:
        quant = Int8WeightPerChannelFixedPoint if self.power_of_two else Int8WeightPerChannelFloat
        kwargs: dict = {"weight_quant": quant, "weight_bit_width": bit_width}
        if self.learned_weight_scales:
            kwargs["weight_scaling_impl_type"] = "parameter_from_stats"
        return kwargs

    def _act_quant(self, signed: bool):  # type: ignore[no-untyped-def]
        if signed:
            return Int8ActPerTensorFixedPoint if self.power_of_two else Int8ActPerTensorFloat
        return Uint8ActPerTensorFixedPoint if self.power_of_two else Uint8ActPerTensorFloat

    def _act_bits(self, name: str, first_or_last: bool = False) -> int:
        act = self.widths(name, first_or_last).act
        if act is None:
            raise UserError(f"layer '{name}': activations cannot be fp32 (the next conv's int32 bias needs a "
                            "quantized input); use 8 bits, or make the neighbouring convs fp32 instead")
        return act

    def _nd(self, stem: str) -> type:
        return getattr(nn, f"{stem}{self.spatial_dims}d")

    def _conv_like(self, kind: str, name: str, cin: int, cout: int, kernel: int, stride: int, padding: int,
                   bias: bool, widths: BitWidths) -> nn.Module:
        d = self.spatial_dims
        float_input = self._input_is_float and not self._first_conv_done and kind == "Conv"
        if widths.weight is None:
            self.plan[name] = "float"
            cls = {"Conv": (FloatConv2d, FloatConv3d), "ConvTranspose": (FloatConvTranspose2d, FloatConvTranspose3d)}
            return cls[kind][d - 2](cin, cout, kernel, stride=stride, padding=padding, bias=bias)
        # An int32 bias needs the input scale; after a float input the bias stays float.
        bias_quant = Int32Bias if bias and not float_input else None
        self.plan[name] = f"w{widths.weight}" + (" float-bias" if bias and bias_quant is None else "")
        cls = getattr(qnn, f"Quant{kind}{d}d")
        return cls(cin, cout, kernel, stride=stride, padding=padding, bias=bias, bias_quant=bias_quant,
                   return_quant_tensor=False, **self._weight_kwargs(widths.weight))

    # ---- the LayerFactory protocol ----------------------------------------------------------

    def input(self, name: str) -> nn.Module:
        """Signed quantizer on the (normalised, possibly negative) network input."""
        widths = self.widths(name, first_or_last=True)
        if widths.act is None:
            self._input_is_float = True
            self.plan[name] = "float"
            return nn.Identity()
        self.plan[name] = f"a{widths.act} signed"
        return qnn.QuantIdentity(act_quant=self._act_quant(signed=True), bit_width=widths.act,
                                 return_quant_tensor=True)

    def conv(self, name: str, cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = True) -> nn.Module:
        widths = self.widths(name, first_or_last=not self._first_conv_done)
        module = self._conv_like("Conv", name, cin, cout, kernel, stride, kernel // 2, bias, widths)
        self._first_conv_done = True
        return module

    def conv_transpose(self, name: str, cin: int, cout: int, kernel: int, stride: int) -> nn.Module:
        return self._conv_like("ConvTranspose", name, cin, cout, kernel, stride, 0, True, self.widths(name))

    def norm(self, name: str, channels: int) -> nn.Module:
        if self.norm_kind == "instance":
            self.plan[name] = "float (instance norm)"
            return (FloatInstanceNorm2d, FloatInstanceNorm3d)[self.spatial_dims - 2](channels, affine=True)
        return nn.Identity()

    def act(self, name: str) -> nn.Module:
        """ReLU fused with an unsigned quantizer: 0..2^A-1, so the next conv sees uint8."""
        bits = self._act_bits(name)
        self.plan[name] = f"a{bits} unsigned"
        return qnn.QuantReLU(act_quant=self._act_quant(signed=False), bit_width=bits, return_quant_tensor=True)

    def pool(self, name: str) -> nn.Module:
        return self._nd("MaxPool")(2)  # max commutes with a monotonic quantizer: the scale passes through

    def upsample(self, name: str) -> nn.Module:
        # Nearest upsampling copies values: brevitas' F.interpolate handler keeps the QuantTensor scale.
        return nn.Upsample(scale_factor=2, mode="nearest")

    def concat(self, name: str, channels: tuple[int, int]) -> nn.Module:
        bits = self._act_bits(name)
        signed = self.signed_concat
        self.plan[name] = f"a{bits} {'signed' if signed else 'unsigned'} shared"
        quant = qnn.QuantIdentity(act_quant=self._act_quant(signed=signed), bit_width=bits, return_quant_tensor=True)
        return SharedScaleConcat(quant, signed)

    def dropout(self, name: str, p: float) -> nn.Module:
        # McDropout stays switchable for MC sampling. brevitas treats dropout as scale-invariant: in
        # training / MC mode the kept values are x/(1-p) carried with x's scale (exact in the float
        # simulation); in plain eval it is the identity, so the deployed graph has no dropout.
        return McDropout(p, self.spatial_dims) if p > 0 else nn.Identity()

    def head(self, name: str, cin: int, cout: int) -> nn.Module:
        """Last 1x1 conv: quantized weights (first/last widths), int32 bias, float logits out."""
        return self._conv_like("Conv", name, cin, cout, 1, 1, 0, True, self.widths(name, first_or_last=True))


FLOAT_MODULES = (FloatConv2d, FloatConv3d, FloatConvTranspose2d, FloatConvTranspose3d, FloatInstanceNorm2d,
                 FloatInstanceNorm3d)


__all__ = ["FLOAT_MODULES", "QuantLayers", "SharedScaleConcat", "dequant"]
