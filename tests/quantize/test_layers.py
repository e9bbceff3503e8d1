"""The quantized twin: integer levels of weights and activations, gradients, save/load, per-layer widths.

Oracles: counting distinct values (a W-bit narrow symmetric quantizer has at most 2^W - 1 levels
per output channel, an A-bit activation at most 2^A), the bit-width *specification* (first conv
and head at first_last_bits, overrides by name), and the float model for closeness.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from brevitas.nn import (
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
    QuantIdentity,
    QuantReLU,
)
from brevitas.quant_tensor import QuantTensor
from torch import nn

from edgeseg.config import ModelConfig, QuantConfig
from edgeseg.errors import UserError
from edgeseg.nets import build_from_config, set_mc_dropout
from edgeseg.quantize.bits import parse_bits
from edgeseg.quantize.calibrate import calibrate
from edgeseg.quantize.fold import fold_batch_norms
from edgeseg.quantize.layers import FloatConv3d, QuantLayers, SharedScaleConcat
from edgeseg.quantize.twin import build_twin, load_folded_weights, twin_spec
from edgeseg.train.checkpoint import load_weights, save_weights

QUANT_CONVS = (QuantConv2d, QuantConv3d, QuantConvTranspose2d, QuantConvTranspose3d)
TRANSPOSED = (QuantConvTranspose2d, QuantConvTranspose3d)


def _shape(dims: int, batch: int = 2) -> tuple[int, ...]:
    return (batch, 1) + (16,) * dims


def make_twin(bits="4/6", *, dims=3, decoder="upsample", norm="batch", dropout=0.0, first_last=8, overrides=None,
              pot=False, learned=True, seed=0):
    """A folded tiny float U-Net and its calibrated quantized twin."""
    torch.manual_seed(seed)
    model_cfg = ModelConfig(depth=2, base_width=4, norm=norm, dropout=dropout, decoder=decoder)
    quant = QuantConfig(bits=bits, first_last_bits=first_last, layer_overrides=dict(overrides or {}),
                        power_of_two_scales=pot, learned_weight_scales=learned)
    float_model = build_from_config(model_cfg, spatial_dims=dims, in_channels=1, out_channels=3)
    if norm == "batch":  # give batch norm real running statistics
        float_model.train()
        with torch.no_grad():
            for _ in range(3):
                float_model(torch.randn(*_shape(dims, 4)))
    float_model.eval()
    fold_batch_norms(float_model)
    spec = twin_spec(model_cfg, quant)
    twin, plan = build_twin(model_cfg, spec, spatial_dims=dims, in_channels=1, out_channels=3)
    load_folded_weights(twin, float_model)
    if not spec.bits.is_float:
        calibrate(twin, [torch.randn(*_shape(dims)) for _ in range(3)])
    return float_model, twin, plan


def _quant_convs(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QUANT_CONVS)]


@pytest.mark.parametrize(("bits", "dims", "decoder", "pot"), [
    ("4/6", 3, "upsample", False),
    ("2/4", 3, "transposed", False),
    ("3/5", 2, "transposed", True),
    ("8/8", 2, "upsample", False),
])
def test_weights_take_at_most_2w_minus_1_values_per_channel(bits, dims, decoder, pot):
    _, twin, _ = make_twin(bits, dims=dims, decoder=decoder, pot=pot)
    w_bits = parse_bits(bits).weight
    convs = _quant_convs(twin)
    assert len(convs) >= 10
    for name, m in convs:
        expected_bits = 8 if name in ("encoders.0.conv1", "head") else w_bits  # first/last at 8 bits
        qw = m.quant_weight()
        assert int(qw.bit_width) == expected_bits, name
        values = qw.value.detach()
        axis = 1 if isinstance(m, TRANSPOSED) else 0  # output channels of ConvTranspose are dim 1
        per_channel = values.transpose(0, axis).reshape(values.shape[axis], -1)
        for c, row in enumerate(per_channel):
            assert len(torch.unique(row)) <= 2**expected_bits - 1, (name, c)
        # narrow symmetric grid: integers in [-(2^(W-1)-1), 2^(W-1)-1]
        scale = qw.scale.detach()
        ints = values / scale
        assert torch.allclose(ints, ints.round(), atol=1e-3), name
        assert ints.round().abs().max() <= 2 ** (expected_bits - 1) - 1, name


@pytest.mark.parametrize(("bits", "decoder"), [("4/6", "upsample"), ("2/4", "transposed"), ("8/8", "upsample")])
def test_activations_take_at_most_2a_levels(bits, decoder):
    _, twin, _ = make_twin(bits, decoder=decoder)
    a_bits = parse_bits(bits).act
    outputs: dict[str, list] = {}
    unsigned: set[str] = set()

    def hook(name):
        def record(module, args, out):
            outputs.setdefault(name, []).append(out)
        return record

    for name, m in twin.named_modules():
        if isinstance(m, (QuantReLU, QuantIdentity)):
            m.register_forward_hook(hook(name))
        # expected signedness from the specification: ReLU outputs, and concats in the upsample decoder
        if isinstance(m, QuantReLU) or (name.endswith("cat.quant") and decoder == "upsample"):
            unsigned.add(name)
    twin.eval()
    with torch.no_grad():
        logits = twin(torch.randn(*_shape(3)) * 5)  # wide input: saturation is exercised too
    assert type(logits) is torch.Tensor  # head output: plain float logits
    assert len(outputs) >= 12
    upper_half_used = False
    for name, outs in outputs.items():
        (out,) = outs
        assert isinstance(out, QuantTensor), name
        expected_bits = 8 if name == "input_quant" else a_bits
        values = out.value
        assert len(torch.unique(values)) <= 2**expected_bits, name
        ints = (values / out.scale).round()
        assert torch.allclose(values / out.scale, ints, atol=1e-3), name
        assert bool(out.signed) == (name not in unsigned), name
        if name in unsigned:
            assert ints.min() >= 0 and ints.max() <= 2**expected_bits - 1, name  # unsigned after ReLU
            upper_half_used |= bool(ints.max() > 2 ** (expected_bits - 1) - 1)  # impossible for a signed grid
        else:
            assert ints.min() >= -(2 ** (expected_bits - 1)) and ints.max() <= 2 ** (expected_bits - 1) - 1, name
            assert ints.min() < 0, name  # signed quantizers do see negative values here
    assert upper_half_used


@pytest.mark.parametrize("variant", [
    {"dims": 3, "decoder": "upsample"},
    {"dims": 3, "decoder": "transposed", "norm": "instance", "dropout": 0.2},
    {"dims": 2, "decoder": "upsample", "pot": True},
    {"dims": 3, "decoder": "upsample", "learned": False, "first_last": 32},
])
def test_gradients_reach_every_parameter(variant):
    dims = variant["dims"]
    _, twin, _ = make_twin(**variant)
    twin.train()
    x = torch.randn(*_shape(dims))
    y = torch.randint(0, 3, (x.shape[0],) + x.shape[2:])
    loss = nn.functional.cross_entropy(twin(x), y)
    loss.backward()
    params = dict(twin.named_parameters())
    assert any("scaling_impl" in n for n in params)  # activation (and weight) scales are learned
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_save_load_gives_identical_outputs(tmp_path):
    model_cfg = ModelConfig(depth=2, base_width=4, norm="batch", dropout=0.2, decoder="upsample")
    _, twin, _ = make_twin(dropout=0.2)
    opt = torch.optim.Adam(twin.parameters(), lr=1e-3)
    twin.train()
    for _ in range(2):  # a little QAT so that learned scales moved away from their initial values
        x = torch.randn(*_shape(3))
        loss = nn.functional.cross_entropy(twin(x), torch.randint(0, 3, (2, 16, 16, 16)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    twin.eval()
    x = torch.randn(*_shape(3))
    with torch.no_grad():
        expected = twin(x)
    save_weights(tmp_path / "q.safetensors", twin)

    spec = twin_spec(model_cfg, QuantConfig(bits="4/6"))
    fresh, _ = build_twin(model_cfg, spec, spatial_dims=3, in_channels=1, out_channels=3)
    load_weights(tmp_path / "q.safetensors", fresh)  # strict: raises on any missing/unexpected key
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    # a loaded model must not start collecting activation statistics again in training mode
    scales = {n: p.detach().clone() for n, p in fresh.named_parameters() if "scaling_impl" in n}
    fresh.train()
    with torch.no_grad():
        fresh(torch.randn(*_shape(3)) * 50)
    for n, p in fresh.named_parameters():
        if n in scales:
            torch.testing.assert_close(p.detach(), scales[n], rtol=0, atol=0, msg=n)


def test_quantized_output_approaches_float_with_more_bits():
    errors = {}
    for bits in ("8/8", "4/6", "2/4"):
        float_model, twin, _ = make_twin(bits, first_last=None, seed=3)
        twin.eval()
        x = torch.randn(*_shape(3), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            ref, out = float_model(x), twin(x)
        errors[bits] = ((out - ref).abs().mean() / ref.abs().mean()).item()
    assert errors["8/8"] < 0.05, errors
    assert errors["8/8"] < errors["4/6"] < errors["2/4"], errors


def test_first_last_and_overrides_set_widths_by_name():
    _, twin, plan = make_twin("4/6", overrides={"dec0.*": "8/8", "bottleneck.conv2": "2/4"})
    assert plan["input"] == "a8 signed"
    assert plan["enc0.conv1"] == "w8" and plan["head"] == "w8"
    assert plan["enc0.act1"] == "a6 unsigned" and plan["enc1.conv1"] == "w4"
    assert plan["dec0.block.conv1"] == "w8" and plan["dec0.block.act1"] == "a8 unsigned"
    assert plan["dec0.cat"] == "a8 unsigned shared" and plan["dec1.cat"] == "a6 unsigned shared"
    assert plan["bottleneck.conv2"] == "w2"
    modules = dict(twin.named_modules())
    assert int(modules["decoders.1.block.conv1"].quant_weight().bit_width) == 8  # dec0 is decoders[1]
    assert int(modules["bottleneck.conv2"].quant_weight().bit_width) == 2
    assert int(modules["decoders.1.block.act1"].act_quant.bit_width()) == 8


def test_float_first_and_last_as_in_the_2019_paper():
    float_model, twin, plan = make_twin("4/6", first_last=32)
    assert plan["input"] == "float" and plan["enc0.conv1"] == "float" and plan["head"] == "float"
    modules = dict(twin.named_modules())
    assert isinstance(modules["encoders.0.conv1"], FloatConv3d) and isinstance(modules["head"], FloatConv3d)
    assert isinstance(modules["input_quant"], nn.Identity)
    # the first and last convs compute with the float model's exact weights
    torch.testing.assert_close(modules["head"].weight, dict(float_model.named_modules())["head"].weight)


def test_bad_overrides_are_user_errors():
    with pytest.raises(UserError, match="'dec9.*'.*matches no layer"):
        make_twin("4/6", overrides={"dec9.*": "8/8"})
    with pytest.raises(UserError, match="'enc1.act1'.*cannot be fp32"):
        make_twin("4/6", overrides={"enc1.act1": "fp32"})
    with pytest.raises(UserError, match="layer_overrides 'enc1.\\*'"):
        make_twin("4/6", overrides={"enc1.*": "4/16"})


def test_power_of_two_scales():
    _, twin, _ = make_twin("4/6", pot=True)
    twin.eval()
    scales = [m.quant_weight().scale for _, m in _quant_convs(twin)]
    scales += [m.act_quant.scale() for m in twin.modules() if isinstance(m, (QuantReLU, QuantIdentity))]
    assert len(scales) > 20
    for s in scales:
        log2 = torch.log2(s.detach())
        torch.testing.assert_close(log2, log2.round(), rtol=0, atol=1e-5)


def test_unsupported_layers_are_refused_by_name():
    with pytest.raises(UserError, match="batch norm must be folded"):
        QuantLayers(3, parse_bits("4/6"), norm="batch")
    with pytest.raises(UserError, match="norm 'group'"):
        QuantLayers(3, parse_bits("4/6"), norm="group")


def test_signed_input_into_unsigned_concat_raises():
    layers = QuantLayers(3, parse_bits("4/6"), signed_concat=False)
    cat = layers.concat("dec0.cat", (2, 2))
    assert isinstance(cat, SharedScaleConcat)
    signed = QuantIdentity(bit_width=6, return_quant_tensor=True)(torch.randn(1, 2, 4, 4, 4))
    with pytest.raises(RuntimeError, match="signed_concat"):
        cat(signed, signed)
    with pytest.raises(RuntimeError, match="signed_concat"):  # e.g. a transposed conv's float output
        cat(torch.randn(1, 2, 4, 4, 4), torch.rand(1, 2, 4, 4, 4))
    # the U-Net with a transposed decoder and a wrongly unsigned concat fails loudly during calibration
    model_cfg = ModelConfig(depth=1, base_width=4, norm="none", decoder="transposed")
    spec = replace(twin_spec(model_cfg, QuantConfig(bits="4/6")), signed_concat=False)
    twin, _ = build_twin(model_cfg, spec, spatial_dims=3, in_channels=1, out_channels=2)
    with pytest.raises(RuntimeError, match="signed_concat"):
        calibrate(twin, [torch.randn(1, 1, 8, 8, 8)])


def test_mc_dropout_stays_switchable():
    _, twin, _ = make_twin(dropout=0.3)
    twin.eval()
    x = torch.randn(*_shape(3))
    with torch.no_grad():
        assert torch.equal(twin(x), twin(x))
        assert set_mc_dropout(twin, True) == 3  # enc1, bottleneck, dec1 blocks
        assert not torch.equal(twin(x), twin(x))
        set_mc_dropout(twin, False)
        assert torch.equal(twin(x), twin(x))


def test_fp32_twin_is_the_folded_float_model():
    float_model, twin, plan = make_twin("fp32")
    assert plan == {}
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in twin.modules())
    twin.eval()
    x = torch.randn(*_shape(3))
    with torch.no_grad():
        torch.testing.assert_close(twin(x), float_model(x), rtol=0, atol=0)


def test_pot_scales_are_not_silently_float():
    """Sanity of the oracle used above: float scales are generally not powers of two."""
    _, twin, _ = make_twin("4/6", pot=False)
    logs = [torch.log2(m.quant_weight().scale.detach()) for _, m in _quant_convs(twin)]
    assert any(not math.isclose(v, round(v), abs_tol=1e-5) for t in logs for v in t.flatten().tolist())
