"""Registry: capabilities and options are queryable, validated like the rest of the config, and listed."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeseg.config import ModelConfig, from_dict, load_experiment, to_dict
from edgeseg.errors import UserError
from edgeseg.nets import (
    Capabilities,
    UNet,
    build_from_config,
    create_model,
    model_capabilities,
    model_options,
    registry,
)
from edgeseg.nets.registry import require_capability

REPO = Path(__file__).resolve().parents[2]


def test_capabilities_summary_and_validation():
    caps = Capabilities(spatial_dims=(2,), quantizable=False, exportable=True, mc_dropout=False,
                        extra_inputs=("metadata",))
    assert caps.summary() == "2D, not quantizable, exportable, needs metadata"
    assert model_capabilities("unet").summary() == "2D/3D, quantizable, exportable, MC dropout"
    with pytest.raises(ValueError, match="subset of"):
        Capabilities(spatial_dims=(4,), quantizable=True, exportable=True, mc_dropout=True)


def test_require_capability_names_model_and_reason():
    require_capability("unet", "quantizable", "quantized")
    require_capability("hemis_unet", "exportable", "exported")  # float export carries the modality mask
    with pytest.raises(UserError, match=r"model 'hemis_unet' cannot be quantized \(its capabilities say "
                                        r"quantizable=False\): it needs a modality-mask input"):
        require_capability("hemis_unet", "quantizable", "quantized")


@pytest.mark.parametrize(("name", "options", "message"), [
    ("utransformer", {"head": 2}, "unknown config key 'model.options.head' (did you mean 'heads'?)"),
    ("utransformer", {"heads": "two"}, "config 'model.options.heads': expected an integer, got 'two'"),
    ("utransformer", {"heads": 0}, "model.options.heads must be >= 1"),
    ("unet", {"heads": 2}, "unknown config key 'model.options.heads'"),
])
def test_model_options_are_validated(name, options, message):
    with pytest.raises(UserError) as info:
        model_options(name, options)
    assert message in str(info.value)


def test_build_from_config_passes_options_through():
    cfg = from_dict(ModelConfig, {"name": "utransformer", "depth": 2, "base_width": 4,
                                  "options": {"heads": 2, "cross_attention_levels": 1}})
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg  # options survive a run directory's config.yaml
    model = build_from_config(cfg, spatial_dims=2, in_channels=1, out_channels=2)
    assert model.mhsa.heads == 2
    assert [dec.mhca is not None for dec in model.decoders] == [True, False]  # only the deepest skip
    bad = ModelConfig(name="utransformer", depth=2, base_width=4, options={"heads": 3})
    with pytest.raises(UserError, match="cannot be split into 3 attention heads"):
        build_from_config(bad, spatial_dims=2, in_channels=1, out_channels=2)


def test_create_model_refuses_undeclared_dimensionality(monkeypatch):
    class Only2D(UNet):
        capabilities = Capabilities(spatial_dims=(2,), quantizable=True, exportable=True, mc_dropout=True)

    monkeypatch.setitem(registry._MODELS, "only2d", (Only2D, "test model"))
    create_model("only2d", spatial_dims=2, in_channels=1, out_channels=2, depth=1, base_width=2)
    with pytest.raises(UserError, match="model 'only2d' is 2D only; data.spatial_dims is 3"):
        create_model("only2d", spatial_dims=3, in_channels=1, out_channels=2)


def test_registration_requires_declarations():
    class Undeclared(UNet):
        capabilities = None

    with pytest.raises(TypeError, match="must declare `capabilities"):
        registry.register_model("undeclared", "x")(Undeclared)
    assert "undeclared" not in registry.available_models()


@pytest.mark.parametrize(("config", "name", "options"), [
    ("hippocampus_3d_attention_unet.yaml", "attention_unet", {}),
    ("hippocampus_3d_utransformer.yaml", "utransformer", {"heads": 4, "cross_attention_levels": 2}),
])
def test_shipped_configs_build_their_model(config, name, options):
    cfg = load_experiment(REPO / "configs" / config)
    assert cfg.model.name == name and cfg.model.options == options
    reference = load_experiment(REPO / "configs" / "hippocampus_3d.yaml")
    assert cfg.data == reference.data and cfg.train == reference.train  # only the model differs
    model = build_from_config(cfg.model, spatial_dims=3, in_channels=1, out_channels=3)
    assert type(model).__name__ == {"attention_unet": "AttentionUNet", "utransformer": "UTransformer"}[name]


def test_list_models_shows_capabilities_and_options():
    from edgeseg.cli.app import app

    result = CliRunner().invoke(app, ["list", "models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    at = lines.index(next(ln for ln in lines if ln.startswith("utransformer ")))
    assert lines[at + 1].strip() == "supports: 2D/3D, quantizable, exportable, MC dropout"
    assert lines[at + 2].strip() == "model.options: heads=4, cross_attention_levels=None"
    assert "supports: 2D/3D, not quantizable, exportable, MC dropout, needs metadata" in result.output
