"""Attention building blocks for 2D/3D U-Nets: additive attention gates, self- and cross-attention.

Quantization: whatever a block computes from a quantized tensor through a convolution + ReLU is
built by the layer factory (so it is quantized in the twin); the attention math itself
(positional encoding, Q/K/V projections, softmax, sigmoid filters, their resampling and the
gating product) stays float, and convolutions that read such float results are `island_conv`s.
Every float part starts from `as_float`, so the blocks accept brevitas QuantTensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from edgeseg.errors import UserError
from edgeseg.nets.layers import LayerFactory, as_float, island_conv

_LINEAR_MODE = {2: "bilinear", 3: "trilinear"}


def positional_encoding(x: torch.Tensor) -> torch.Tensor:
    """Fixed sinusoidal encoding of absolute position (Vaswani 2017), one block of channels per axis.

    For C channels and k spatial axes each axis gets c = 2*ceil(C / 2k) channels: sin(p*w_j) for
    j < c/2, then cos(p*w_j), with p the voxel index along that axis and w_j = 10000^(-2j/c) (the
    2D form of Wang & Liu 2019 / Parmar 2018, extended to 3D); the axes' blocks are concatenated
    and cut to C. Positions are a range over the input's own size (an ONNX Range on its Shape), so
    an exported graph computes them for any tile size.

    Computed in float32 (bf16 cannot count positions past 256) and returned in x's dtype.

    Shape: x (B, C, *S) -> (1, C, *S).
    """
    channels, k = x.shape[1], x.dim() - 2
    per_axis = 2 * math.ceil(channels / (2 * k))
    f32 = torch.float32
    freqs = torch.exp(torch.arange(0, per_axis, 2, dtype=f32, device=x.device) * (-math.log(10000.0) / per_axis))
    freqs = freqs.reshape(-1, *([1] * k))  # (c/2, 1, ..., 1)
    ones = torch.ones_like(x[0, :1], dtype=f32)  # (1, *S)
    parts = []
    for axis in range(k):
        pos = torch.arange(x.shape[2 + axis], dtype=f32, device=x.device)
        pos = pos.reshape([-1 if i == axis else 1 for i in range(k)])  # (1, .., S_axis, .., 1)
        angle = pos * freqs * ones  # (c/2, *S)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=0)[:channels].unsqueeze(0).to(x.dtype)


def _heads_split(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, n, C) -> (B, heads, n, C/heads)."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q_h K_hᵀ / sqrt(d_h)) V_h for each head h, heads concatenated again.

    Shape: q (B, n, C), k (B, m, C), v (B, m, C) -> (B, n, C), with d_h = C / heads.
    """
    out = F.scaled_dot_product_attention(_heads_split(q, heads), _heads_split(k, heads), _heads_split(v, heads))
    return out.transpose(1, 2).flatten(2)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, n, C) with n = prod(S)."""
    return x.flatten(2).transpose(1, 2)


def _check_heads(channels: int, heads: int, where: str) -> None:
    if heads < 1 or channels % heads:
        raise UserError(f"{where}: {channels} channels cannot be split into {heads} attention heads "
                         f"(choose model.options.heads dividing every attention level's width)")


class AttentionGate(nn.Module):
    """Additive attention gate of Attention U-Net (Oktay et al. 2018, "Attention U-Net: Learning Where
    to Look for the Pancreas", eq. 1-2 and Fig. 2).

        α = σ₂(ψᵀ σ₁(W_xᵀ x + W_gᵀ g + b_g) + b_ψ),   output α ⊙ x

    σ₁ = ReLU, σ₂ = sigmoid, W_x, W_g, ψ channel-wise (1x1) convolutions. As in the paper's Fig. 2,
    W_x maps x onto the coarser grid of the gating signal g (a 1x1 convolution with stride 2), and
    the coefficients α are resampled to x's grid by (bi/tri)linear interpolation. W_x has no bias
    (the paper's single additive bias is b_g, on W_g).

    Quantized twin: W_x, W_g, σ₁ and ψ come from the layer factory; σ₂, the resampling and the
    product stay float.

    Shape: x (B, Cx, *S), g (B, Cg, *S/2) -> (B, Cx, *S).
    """

    def __init__(self, layers: LayerFactory, name: str, x_channels: int, g_channels: int, inter_channels: int):
        super().__init__()
        self.spatial_dims = layers.spatial_dims
        self.w_x = layers.conv(f"{name}.w_x", x_channels, inter_channels, 1, stride=2, bias=False)
        self.w_g = layers.conv(f"{name}.w_g", g_channels, inter_channels, 1)
        self.act = layers.act(f"{name}.act")
        self.psi = layers.conv(f"{name}.psi", inter_channels, 1, 1)

    def coefficients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """α on x's grid, in (0, 1). Shape: (B, 1, *S)."""
        q = self.psi(self.act(as_float(self.w_x(x)) + as_float(self.w_g(g))))
        alpha = torch.sigmoid(as_float(q))
        return F.interpolate(alpha, scale_factor=2.0, mode=_LINEAR_MODE[self.spatial_dims], align_corners=False)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return as_float(x) * self.coefficients(x, g)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention over every voxel of a feature map, with positional encoding
    (U-Transformer's MHSA module, Petit et al. 2021, "U-Net Transformer: Self and Cross Attention
    for Medical Image Segmentation", Sec. 2.1).

    The map X (C x S) is flattened to n = prod(S) tokens, a fixed sinusoidal positional encoding is
    added so that absolute position is available, and
    MultiHead(X) = Concat_h softmax(Q_h K_hᵀ / sqrt(d_h)) V_h · W_O with Q = X W_Q, K = X W_K,
    V = X W_V (Vaswani 2017); the result is reshaped back to C x S.

    Float in every build (a float island in the quantized twin).

    Shape: (B, C, *S) -> (B, C, *S).
    """

    def __init__(self, channels: int, heads: int):
        super().__init__()
        _check_heads(channels, heads, "self-attention")
        self.heads = heads
        self.query = nn.Linear(channels, channels, bias=False)
        self.key = nn.Linear(channels, channels, bias=False)
        self.value = nn.Linear(channels, channels, bias=False)
        self.out = nn.Linear(channels, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_float(x)
        t = _tokens(x + positional_encoding(x))
        out = self.out(multi_head_attention(self.query(t), self.key(t), self.value(t), self.heads))
        return out.transpose(1, 2).reshape(x.shape)


class MultiHeadCrossAttention(nn.Module):
    """Multi-head cross-attention on a skip connection (U-Transformer's MHCA, Petit et al. 2021,
    "U-Net Transformer: Self and Cross Attention for Medical Image Segmentation", Sec. 2.2, Fig. 3).

    A gating of the skip S by attention on the higher-level (coarser, semantically richer) map Y:
    positional encodings are added to Y and S; Y -> 1x1 conv, norm, ReLU gives queries and keys;
    S -> 2x max pool (onto Y's grid), 1x1 conv, norm, ReLU gives the values; multi-head attention
    (as in `MultiHeadSelfAttention`) -> 1x1 conv, norm, sigmoid -> upsampled to S's grid gives the
    filter Z in (0, 1). The output Z ⊙ S replaces the skip (the caller concatenates it with the
    upsampled Y).

    Quantized twin: the norms and ReLUs come from the factory (so the ReLU outputs are quantized),
    the convolutions are float `island_conv`s (their inputs carry float positional encodings or
    attention results), and the attention, sigmoid, resampling and product are float.

    Shape: y (B, Cy, *S/2), s (B, Cs, *S) -> (B, Cs, *S).
    """

    def __init__(self, layers: LayerFactory, name: str, y_channels: int, s_channels: int, heads: int):
        super().__init__()
        _check_heads(s_channels, heads, f"cross-attention {name}")
        d = layers.spatial_dims
        self.spatial_dims = d
        self.heads = heads
        self.y_embed = nn.Sequential(island_conv(d, y_channels, s_channels, 1), layers.norm(f"{name}.y_norm", s_channels),
                                     layers.act(f"{name}.y_act"))
        self.s_embed = nn.Sequential(layers.pool(f"{name}.s_pool"), island_conv(d, s_channels, s_channels, 1),
                                     layers.norm(f"{name}.s_norm", s_channels), layers.act(f"{name}.s_act"))
        self.query = nn.Linear(s_channels, s_channels, bias=False)
        self.key = nn.Linear(s_channels, s_channels, bias=False)
        self.value = nn.Linear(s_channels, s_channels, bias=False)
        self.out = nn.Linear(s_channels, s_channels, bias=False)
        self.filter = nn.Sequential(island_conv(d, s_channels, s_channels, 1), layers.norm(f"{name}.z_norm", s_channels))

    def coefficients(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The filter Z on S's grid, in (0, 1). Shape: (B, Cs, *S)."""
        y, s = as_float(y), as_float(s)
        y1 = _tokens(as_float(self.y_embed(y + positional_encoding(y))))  # (B, n, Cs), n voxels of Y
        s1 = as_float(self.s_embed(s + positional_encoding(s)))  # (B, Cs, *S/2)
        attended = self.out(multi_head_attention(self.query(y1), self.key(y1), self.value(_tokens(s1)), self.heads))
        z = torch.sigmoid(as_float(self.filter(attended.transpose(1, 2).reshape(s1.shape))))
        return F.interpolate(z, scale_factor=2.0, mode=_LINEAR_MODE[self.spatial_dims], align_corners=False)

    def forward(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return as_float(s) * self.coefficients(y, s)
