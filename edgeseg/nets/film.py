"""FiLMed U-Net (Perez et al. 2018 FiLM layers; Lemay et al. 2021), 2D and 3D: a U-Net conditioned on metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgeseg.errors import UserError
from edgeseg.nets.base import UNetFamily
from edgeseg.nets.blocks import unet_decoders
from edgeseg.nets.capabilities import Capabilities
from edgeseg.nets.encoder import build_encoder, encode
from edgeseg.nets.layers import LayerFactory, as_float


@dataclass(frozen=True)
class FiLMOptions:
    """`model.options` of the FiLMed U-Net."""

    metadata_dim: int | None = None  # metadata values per case (required)
    hidden: int = 64  # hidden width of each FiLM generator

    def validate(self) -> None:
        if self.metadata_dim is None or self.metadata_dim < 1:
            raise ValueError("model.options.metadata_dim is required: the number of metadata values per case (>= 1)")
        if self.hidden < 1:
            raise ValueError("model.options.hidden must be >= 1")


class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al. 2018, "FiLM: Visual Reasoning with a General
    Conditioning Layer", AAAI): FiLM(F | m) = γ(m) ⊙ F + β(m), one (γ, β) per channel.

    The generator is a small MLP, metadata -> Linear -> ReLU -> Linear -> (Δγ, β), with
    γ = 1 + Δγ: the same function class as predicting γ directly (the offset is the last layer's
    bias), chosen so that a generator near zero starts as the identity.

    Shape: features (B, C, *S), metadata (B, metadata_dim) -> (B, C, *S).
    """

    def __init__(self, metadata_dim: int, channels: int, hidden: int):
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(metadata_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * channels))

    def parameters_for(self, metadata: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(γ, β), each (B, C)."""
        delta_gamma, beta = self.generator(metadata).chunk(2, dim=1)
        return 1.0 + delta_gamma, beta

    def forward(self, features: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        features = as_float(features)
        gamma, beta = self.parameters_for(metadata)
        shape = gamma.shape + (1,) * (features.dim() - 2)
        return gamma.reshape(shape) * features + beta.reshape(shape)


class FiLMedUNet(UNetFamily):
    """U-Net with a FiLM layer after every conv block (encoder levels, bottleneck, decoder levels).

    Lemay et al. 2021, "Benefits of Linear Conditioning for Segmentation using Metadata" (MIDL;
    the FiLMed U-Net of ivadomed): case metadata (e.g. contrast, acquisition parameters, tumour
    type, encoded as numbers) -> one FiLM generator per block -> per-channel (γ, β) applied as
    γ·F + β to the block's output. Everything else is the U-Net of `edgeseg.nets.unet`.

    forward(x, metadata): metadata (B, metadata_dim) float, one row per case. `edgeseg train` and
    `edgeseg evaluate` feed it from `data.metadata` (JSON sidecars or a table, z-scored with the training
    split's statistics recorded in run.json; `edgeseg.train.inputs`). `edgeseg export` makes it a graph
    input `metadata` (N, metadata_dim) and records the fields and their normalisation in the bundle, so
    `edgeseg segment` feeds each case's raw values normalised as in training (docs/bundle.md). Quantization
    does not carry it yet, so the model is exportable (float) but not quantizable.

    Shape: x (B, in_channels, *S) with every S divisible by 2**depth -> logits (B, out_channels, *S).
    """

    capabilities = Capabilities(
        spatial_dims=(2, 3), quantizable=False, exportable=True, mc_dropout=True, extra_inputs=("metadata",),
        notes="it needs a per-case metadata input, which the quantization pipeline does not carry yet (float "
              "export and the runtime do)",
    )
    Options = FiLMOptions

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
        metadata_dim: int | None = None,
        hidden: int = 64,
    ):
        super().__init__()
        FiLMOptions(metadata_dim=metadata_dim, hidden=hidden).validate()  # ValueError unless metadata_dim >= 1
        metadata_dim = int(metadata_dim or 0)
        layers, widths = self._init_unet_front(spatial_dims, depth, base_width, norm, layers)
        self.metadata_dim = metadata_dim
        encoder = build_encoder(layers, in_channels, widths, dropout)
        # registered in the order of earlier checkpoints: each part's FiLMs right after it
        self.encoders = encoder.blocks
        self.encoder_films = nn.ModuleList(FiLM(metadata_dim, w, hidden) for w in widths[:depth])
        self.pools, self.bottleneck = encoder.pools, encoder.bottleneck
        self.bottleneck_film = FiLM(metadata_dim, widths[depth], hidden)
        self.decoders = unet_decoders(layers, widths, decoder, dropout)
        self.decoder_films = nn.ModuleList(FiLM(metadata_dim, widths[level], hidden) for level in reversed(range(depth)))
        self.head = layers.head("head", widths[0], out_channels)

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        if metadata is None:
            raise UserError("model 'film_unet' needs its metadata input (forward(x, metadata)); this pipeline "
                            "step does not provide one")
        if metadata.dim() != 2 or metadata.shape[1] != self.metadata_dim:
            raise UserError(f"film_unet expects metadata of shape (batch, {self.metadata_dim}), "
                            f"got {tuple(metadata.shape)}")
        metadata = metadata.to(x.dtype)
        x, skips = encode(self.input_quant(x), self.encoders, self.pools,
                          after=lambda level, features: self.encoder_films[level](features, metadata))
        x = self.bottleneck_film(self.bottleneck(x), metadata)
        for dec, film, skip in zip(self.decoders, self.decoder_films, reversed(skips)):
            x = film(dec(x, skip), metadata)
        return self.head(x)
