"""Model registry: one name -> builder map behind `create_model`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from edgeseg.errors import unknown_name
from edgeseg.nets.layers import LayerFactory

ModelBuilder = Callable[..., nn.Module]
_MODELS: dict[str, tuple[ModelBuilder, str]] = {}


def register_model(name: str, description: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def deco(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise ValueError(f"model '{name}' registered twice")
        _MODELS[name] = (builder, description)
        return builder

    return deco


def available_models() -> dict[str, str]:
    """Registered model names with one-line descriptions."""
    return {name: desc for name, (_, desc) in sorted(_MODELS.items())}


def model_class(name: str) -> Any:
    if name not in _MODELS:
        raise unknown_name("model", name, _MODELS)
    return _MODELS[name][0]


def create_model(
    name: str,
    *,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    layers: LayerFactory | None = None,
    **options: Any,
) -> nn.Module:
    """Build a registered model; `layers` selects float (default) or quantized layers."""
    builder = model_class(name)
    return builder(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, layers=layers,
                   **options)
