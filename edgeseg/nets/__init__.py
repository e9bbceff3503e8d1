"""Segmentation networks and their registry. Importing this package imports torch."""

from edgeseg.nets.layers import FloatLayers, LayerFactory, McDropout, set_mc_dropout
from edgeseg.nets.registry import available_models, create_model, register_model
from edgeseg.nets.unet import UNet

register_model("unet", "U-Net / 3D U-Net (Ronneberger 2015, Cicek 2016): depth, width, norm, dropout, decoder")(UNet)


def build_from_config(model_cfg, *, spatial_dims: int, in_channels: int, out_channels: int, layers=None):
    """Build the network an experiment config describes (the one place that reads ModelConfig)."""
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
    )


__all__ = [
    "FloatLayers",
    "LayerFactory",
    "McDropout",
    "UNet",
    "available_models",
    "build_from_config",
    "create_model",
    "register_model",
    "set_mc_dropout",
]
