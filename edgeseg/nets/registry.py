"""Model registry: one name -> class map behind `create_model`, with each class's capabilities and options.

A registered class declares two class attributes:
- `capabilities`: a `Capabilities` (2D/3D, quantizable, exportable, MC dropout, extra inputs);
- `Options`: a frozen dataclass of its architecture-specific settings (`model.options` in a
  config), validated by the config loader's rules (unknown keys get the nearest name, types are
  checked); `NoOptions` when there are none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from edgeseg.config.loader import from_dict
from edgeseg.errors import UserError, unknown_name
from edgeseg.nets.capabilities import Capabilities
from edgeseg.nets.layers import LayerFactory

ModelBuilder = Callable[..., nn.Module]
_MODELS: dict[str, tuple[ModelBuilder, str]] = {}

# Settings every model takes from ModelConfig's own fields; `Options` must not repeat them.
COMMON_SETTINGS = ("depth", "base_width", "norm", "dropout", "decoder")


def register_model(name: str, description: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def deco(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise ValueError(f"model '{name}' registered twice")
        if not isinstance(getattr(builder, "capabilities", None), Capabilities):
            raise TypeError(f"model '{name}' must declare `capabilities = Capabilities(...)` on its class")
        options = getattr(builder, "Options", None)
        if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
            raise TypeError(f"model '{name}' must declare an `Options` dataclass (NoOptions when it has none)")
        clash = {f.name for f in dataclasses.fields(options)} & set(COMMON_SETTINGS)
        if clash:
            raise TypeError(f"model '{name}': Options repeats ModelConfig fields {sorted(clash)}")
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


def model_capabilities(name: str) -> Capabilities:
    """What the registered model `name` declares it supports."""
    return model_class(name).capabilities


def model_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """`model.options` from a config, validated against the model's Options; returns every option's value.

    Raises UserError for an unknown key (with the nearest valid one), a wrong type, or a value
    the Options' own `validate` refuses.
    """
    opts = from_dict(model_class(name).Options, dict(options), "model.options")
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}


def option_defaults(name: str) -> dict[str, Any]:
    """The model's options with their defaults (MISSING for required ones), for listings."""
    return {f.name: (f.default if f.default is not dataclasses.MISSING else "required")
            for f in dataclasses.fields(model_class(name).Options)}


def require_capability(name: str, capability: str, action: str) -> None:
    """Raise UserError when model `name` declares it lacks `capability` ("quantizable" or "exportable").

    `action` completes the message: "model 'x' cannot be <action>: <the model's notes>".
    """
    caps = model_capabilities(name)
    if not getattr(caps, capability):
        reason = f": {caps.notes}" if caps.notes else ""
        raise UserError(f"model '{name}' cannot be {action} (its capabilities say {capability}=False){reason}")


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
    if spatial_dims not in builder.capabilities.spatial_dims:
        dims = "/".join(f"{d}D" for d in builder.capabilities.spatial_dims)
        raise UserError(f"model '{name}' is {dims} only; data.spatial_dims is {spatial_dims}")
    return builder(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, layers=layers,
                   **options)
