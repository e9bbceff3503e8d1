"""Build the quantized twin of a float model from its config, and load the folded float weights into it.

The twin is the same architecture built through `QuantLayers` (not a second hand-written copy),
so its parameter names equal the float model's; only quantizer scales are new.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from edgeseg.config import ModelConfig, QuantConfig
from edgeseg.errors import UserError
from edgeseg.nets import FloatLayers, build_from_config
from edgeseg.quantize.bits import BitWidths, first_last_widths, parse_bits


@dataclass(frozen=True)
class TwinSpec:
    """Everything that decides how the twin is built, resolved and validated from QuantConfig."""

    bits: BitWidths
    first_last: BitWidths
    overrides: Mapping[str, BitWidths]
    norm: str  # norm of the twin: "none" (batch norm folded, or no norm) or "instance" (float island)
    power_of_two: bool
    learned_weight_scales: bool
    signed_concat: bool


def twin_spec(model_cfg: ModelConfig, quant: QuantConfig, bits: BitWidths | None = None) -> TwinSpec:
    """Resolve bit widths (`bits` overrides quant.bits) and the twin's norm and concat signedness.

    signed_concat: in the U-Net's "transposed" decoder the up-convolution has no ReLU, so its
    output (one concat input) is signed; the "upsample" decoder ends in a ReLU, so both concat
    inputs are non-negative and the concat can stay unsigned (uint8 into the next conv).
    """
    bits = bits if bits is not None else parse_bits(quant.bits, "quant.bits")
    overrides = {str(pattern): parse_bits(str(value), f"quant.layer_overrides '{pattern}'")
                 for pattern, value in quant.layer_overrides.items()}
    norm = "instance" if model_cfg.norm == "instance" else "none"
    return TwinSpec(bits=bits, first_last=first_last_widths(quant.first_last_bits, bits), overrides=overrides,
                    norm=norm, power_of_two=quant.power_of_two_scales,
                    learned_weight_scales=quant.learned_weight_scales,
                    signed_concat=model_cfg.decoder == "transposed")


def build_twin(model_cfg: ModelConfig, spec: TwinSpec, *, spatial_dims: int, in_channels: int,
               out_channels: int) -> tuple[nn.Module, dict[str, str]]:
    """The quantized twin (or, for fp32, the float model with norms folded away) and its per-layer plan.

    The plan maps factory layer names ("enc0.conv1", "dec1.cat", ...) to what each got ("w4",
    "a6 unsigned", "float", ...). Override patterns that match no layer raise UserError (typos).
    """
    if spec.bits.is_float:
        layers = FloatLayers(spatial_dims, norm=spec.norm)
        model = build_from_config(model_cfg, spatial_dims=spatial_dims, in_channels=in_channels,
                                  out_channels=out_channels, layers=layers)
        return model, {}
    from edgeseg.quantize.layers import QuantLayers

    qlayers = QuantLayers(spatial_dims, spec.bits, first_last=spec.first_last, overrides=spec.overrides,
                          norm=spec.norm, power_of_two=spec.power_of_two,
                          learned_weight_scales=spec.learned_weight_scales, signed_concat=spec.signed_concat)
    model = build_from_config(model_cfg, spatial_dims=spatial_dims, in_channels=in_channels,
                              out_channels=out_channels, layers=qlayers)
    unmatched = qlayers.unmatched_overrides()
    if unmatched:
        raise UserError(f"quant.layer_overrides pattern '{unmatched[0]}' matches no layer; layer names are: "
                        f"{', '.join(qlayers.plan)}")
    return model, dict(qlayers.plan)


def load_folded_weights(twin: nn.Module, folded: nn.Module) -> None:
    """Copy the folded float model's parameters into the twin; only quantizer state may be missing."""
    state = folded.state_dict()
    missing, unexpected = twin.load_state_dict(state, strict=False)
    not_quant = [k for k in missing if "_quant." not in k]
    if unexpected or not_quant:
        raise UserError(f"the float weights do not fit the quantized twin (unexpected {list(unexpected)[:3]}, "
                        f"missing {not_quant[:3]})")


def float_islands(model: nn.Module) -> list[str]:
    """Names of modules that compute in float inside a quantized model (reported, not hidden)."""
    from edgeseg.nets.layers import ISLAND_MODULES
    from edgeseg.quantize.layers import FLOAT_MODULES

    kinds = tuple(FLOAT_MODULES) + tuple(ISLAND_MODULES)
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bits_total(model: nn.Module) -> dict[str, int]:
    """Theoretical weight storage: bits summed over conv weights at their quantized width (float = 32).

    A computed number (what 4-bit packing would give), not a measured file size.
    """
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

    quant_bits = 0
    float_bits = 0
    for m in model.modules():
        if not isinstance(m, nn.modules.conv._ConvNd):
            continue
        weight = m.weight
        float_bits += 32 * weight.numel()
        if isinstance(m, QuantWeightBiasInputOutputLayer) and m.weight_quant.is_quant_enabled:
            quant_bits += int(m.weight_quant.bit_width().item()) * weight.numel()
        else:
            quant_bits += 32 * weight.numel()
    return {"float_weight_bits": float_bits, "quant_weight_bits": quant_bits}
