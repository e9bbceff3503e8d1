"""Attention blocks against their definitions: hand-computed positional encodings, torch's own
multi-head attention (an independent implementation) for MHSA/MHCA, and the attention-gate formula
re-derived with functional convolutions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from edgeseg.nets import create_model
from edgeseg.nets.attention import (
    AttentionGate,
    MultiHeadCrossAttention,
    MultiHeadSelfAttention,
    positional_encoding,
)
from edgeseg.nets.layers import ISLAND_MODULES, FloatLayers


def test_positional_encoding_hand_values_2d():
    # C = 4, 2 axes: one frequency (w = 1) per axis -> [sin h, cos h, sin w, cos w]
    pe = positional_encoding(torch.zeros(1, 4, 3, 5))
    assert pe.shape == (1, 4, 3, 5)
    expected = torch.tensor([math.sin(1), math.cos(1), math.sin(2), math.cos(2)])
    torch.testing.assert_close(pe[0, :, 1, 2], expected)
    # C = 6: 4 channels per axis, w = 1 and 10000^(-2/4) = 0.01 -> [sin h, sin .01h, cos h, cos .01h, sin w, sin .01w]
    pe = positional_encoding(torch.zeros(2, 6, 4, 6))
    h, w = 3, 5
    expected = torch.tensor([math.sin(h), math.sin(0.01 * h), math.cos(h), math.cos(0.01 * h), math.sin(w),
                             math.sin(0.01 * w)])
    torch.testing.assert_close(pe[0, :, h, w], expected)


def test_positional_encoding_hand_values_3d_and_unique_positions():
    pe = positional_encoding(torch.randn(2, 6, 2, 3, 4))  # values of x do not matter, only its shape
    expected = torch.tensor([math.sin(1), math.cos(1), math.sin(2), math.cos(2), math.sin(3), math.cos(3)])
    torch.testing.assert_close(pe[0, :, 1, 2, 3], expected)
    torch.testing.assert_close(pe[0, :, 0, 0, 0], torch.tensor([0.0, 1.0] * 3))
    codes = pe[0].flatten(1).T  # (voxels, C): every voxel has its own code (absolute position is available)
    assert torch.cdist(codes, codes).add(torch.eye(len(codes))).min() > 1e-3


def _torch_mha(channels: int, heads: int, q, k, v, o) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(channels, heads, bias=False, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        mha.out_proj.weight.copy_(o.weight)
    return mha


@pytest.mark.parametrize("shape", [(2, 8, 4, 6), (1, 8, 2, 3, 4)])
def test_self_attention_equals_torch_multihead_attention(shape):
    torch.manual_seed(0)
    block = MultiHeadSelfAttention(8, heads=2)
    x = torch.randn(*shape)
    mha = _torch_mha(8, 2, block.query, block.key, block.value, block.out)
    tokens = (x + positional_encoding(x)).flatten(2).transpose(1, 2)
    expected = mha(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(shape)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)


def test_self_attention_sees_position():
    torch.manual_seed(0)
    block = MultiHeadSelfAttention(8, heads=2)
    out = block(torch.ones(1, 8, 4, 4))  # the same feature everywhere: only the encoding tells voxels apart
    assert out.flatten(2).std(dim=2).max() > 1e-3


def test_cross_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    block = MultiHeadCrossAttention(FloatLayers(2, norm="batch"), "c", y_channels=8, s_channels=4, heads=2).eval()
    y, s = torch.randn(2, 8, 4, 4), torch.randn(2, 4, 8, 8)
    mha = _torch_mha(4, 2, block.query, block.key, block.value, block.out)
    with torch.no_grad():
        y1 = block.y_embed(y + positional_encoding(y)).flatten(2).transpose(1, 2)  # queries and keys from Y
        s1 = block.s_embed(s + positional_encoding(s))  # values from the pooled skip
        attended = mha(y1, y1, s1.flatten(2).transpose(1, 2), need_weights=False)[0]
        z = torch.sigmoid(block.filter(attended.transpose(1, 2).reshape(s1.shape)))
        z = F.interpolate(z, scale_factor=2.0, mode="bilinear", align_corners=False)
        torch.testing.assert_close(block.coefficients(y, s), z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(block(y, s), s * z, rtol=1e-5, atol=1e-6)
        assert z.min() > 0 and z.max() < 1


def test_attention_gate_formula():
    torch.manual_seed(0)
    gate = AttentionGate(FloatLayers(3), "g", x_channels=4, g_channels=8, inter_channels=2)
    x, g = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 8, 4, 4, 4)
    with torch.no_grad():
        # α = σ₂(ψᵀ σ₁(W_xᵀ x + W_gᵀ g + b_g) + b_ψ), W_x onto g's grid, α resampled trilinearly
        inner = F.relu(F.conv3d(x, gate.w_x.weight, stride=2) + F.conv3d(g, gate.w_g.weight, gate.w_g.bias))
        alpha = torch.sigmoid(F.conv3d(inner, gate.psi.weight, gate.psi.bias))
        alpha = F.interpolate(alpha, scale_factor=2.0, mode="trilinear", align_corners=False)
        torch.testing.assert_close(gate(x, g), x * alpha)
    assert gate.w_x.bias is None  # the single additive bias is b_g


def test_attention_gate_hand_case():
    gate = AttentionGate(FloatLayers(2), "g", x_channels=3, g_channels=6, inter_channels=2)
    with torch.no_grad():
        for p in gate.parameters():
            p.zero_()  # W_x = W_g = ψ = 0, b_g = b_ψ = 0: α = σ(0) = 1/2 everywhere
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(gate(x, torch.randn(2, 6, 4, 4)), x / 2)
        gate.psi.bias.fill_(math.log(3.0))  # σ(ln 3) = 3/4
        torch.testing.assert_close(gate(x, torch.randn(2, 6, 4, 4)), 0.75 * x)


def test_quantized_twins_quantize_the_gates_and_keep_attention_float():
    from brevitas.nn import QuantConv2d

    from edgeseg.quantize.bits import parse_bits
    from edgeseg.quantize.layers import QuantLayers

    layers = QuantLayers(2, parse_bits("4/6"), norm="none")
    twin = create_model("attention_unet", spatial_dims=2, in_channels=1, out_channels=2, depth=2, base_width=4,
                        layers=layers)
    for level in (0, 1):
        for part, kind in (("w_x", "w4"), ("w_g", "w4"), ("psi", "w4"), ("act", "a6 unsigned")):
            assert layers.plan[f"gate{level}.{part}"] == kind
    assert isinstance(twin.gates[0].psi, QuantConv2d)

    layers = QuantLayers(2, parse_bits("4/6"), norm="none")
    twin = create_model("utransformer", spatial_dims=2, in_channels=1, out_channels=2, depth=2, base_width=4,
                        heads=2, layers=layers)
    islands = [name for name, m in twin.named_modules() if isinstance(m, ISLAND_MODULES)]
    # per cross-attention: Y, S and filter 1x1 convs; plus the up-convolution reading the self-attention output
    assert sorted(islands) == sorted([f"decoders.{i}.mhca.{p}.{j}" for i in (0, 1)
                                      for p, j in (("y_embed", 0), ("s_embed", 1), ("filter", 0))]
                                     + ["decoders.0.up.1"])
    assert layers.plan["dec0.mhca.y_act"] == "a6 unsigned"
