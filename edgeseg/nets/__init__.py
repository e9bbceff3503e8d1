"""Segmentation networks and their registry. Importing this package imports torch."""

from edgeseg.nets.attention_unet import AttentionUNet
from edgeseg.nets.capabilities import Capabilities, NoOptions
from edgeseg.nets.countception import Countception
from edgeseg.nets.film import FiLMedUNet
from edgeseg.nets.hemis import HeMISUNet
from edgeseg.nets.layers import FloatLayers, LayerFactory, McDropout, set_mc_dropout
from edgeseg.nets.registry import (
    available_models,
    create_model,
    model_capabilities,
    model_class,
    model_options,
    option_defaults,
    register_model,
    require_capability,
)
from edgeseg.nets.unet import UNet
from edgeseg.nets.utransformer import UTransformer

register_model("unet", "U-Net / 3D U-Net (Ronneberger 2015, Cicek 2016): depth, width, norm, dropout, decoder")(UNet)
register_model("attention_unet", "Attention U-Net (Oktay 2018): additive attention gates on the skips")(AttentionUNet)
register_model("utransformer", "U-Transformer (Petit 2021): self-attention bottleneck with positional encoding, "
                               "cross-attention skips")(UTransformer)
register_model("film_unet", "FiLMed U-Net (Perez 2018, Lemay 2021): metadata -> MLP -> per-channel gamma, beta "
                            "after every conv block")(FiLMedUNet)
register_model("hemis_unet", "HeMIS U-Net (Havaei 2016): one encoder per modality, mean/variance fusion over the "
                             "modalities present")(HeMISUNet)
register_model("countception", "Count-ception (Cohen 2017, ivadomed): 2D keypoint heatmaps, one channel per class")(Countception)


def build_from_config(model_cfg, *, spatial_dims: int, in_channels: int, out_channels: int, layers=None):
    """Build the network an experiment config describes (the one place that reads ModelConfig).

    `model_cfg.options` is validated against the model's Options first (UserError on a bad key,
    type or value).
    """
    options = model_options(model_cfg.name, model_cfg.options)
    return create_model(
        model_cfg.name,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        layers=layers,
        depth=model_cfg.depth,
        base_width=model_cfg.base_width,
        norm=model_cfg.norm,
        dropout=model_cfg.dropout,
        decoder=model_cfg.decoder,
        **options,
    )


__all__ = [
    "AttentionUNet",
    "Capabilities",
    "Countception",
    "FiLMedUNet",
    "FloatLayers",
    "HeMISUNet",
    "LayerFactory",
    "McDropout",
    "NoOptions",
    "UNet",
    "UTransformer",
    "available_models",
    "build_from_config",
    "create_model",
    "model_capabilities",
    "model_class",
    "model_options",
    "option_defaults",
    "register_model",
    "require_capability",
    "set_mc_dropout",
]
