"""Tiny float and brevitas U-Nets, exported once per session (exports take seconds).

Helpers reach the tests through the `kit` fixture (test modules cannot import a conftest).
"""

from __future__ import annotations

import types
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeseg.config import ModelConfig, QuantConfig

PREPROCESS = {"reorient": True, "target_spacing": None, "normalization": "zscore", "clip_percentiles": [0.5, 99.5],
              "label_map": {}}
CLASSES = ["background", "left", "right"]
TILE = [16, 16, 16]
# depth 2 -> sizes must be multiples of 4; dropout 0.2 -> three MC dropout sites
MODEL_CFG = ModelConfig(depth=2, base_width=4, norm="batch", dropout=0.2, decoder="upsample")


def float_unet(cfg: ModelConfig = MODEL_CFG, spatial_dims: int = 3, seed: int = 0) -> torch.nn.Module:
    from edgeseg.nets import build_from_config

    torch.manual_seed(seed)
    model = build_from_config(cfg, spatial_dims=spatial_dims, in_channels=1, out_channels=len(CLASSES))
    # Non-trivial batch-norm statistics, so that folding/export mistakes would show.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def quant_unet(cfg: ModelConfig = MODEL_CFG, spatial_dims: int = 3, bits: str = "4/6", seed: int = 0,
               tile: list[int] = TILE) -> torch.nn.Module:
    """The brevitas twin (as `edgeseg quantize` builds it), activation scales calibrated on random tiles."""
    from edgeseg.quantize.calibrate import calibrate
    from edgeseg.quantize.twin import build_twin, twin_spec

    torch.manual_seed(seed)
    model, _ = build_twin(cfg, twin_spec(cfg, QuantConfig(bits=bits)), spatial_dims=spatial_dims, in_channels=1,
                          out_channels=len(CLASSES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrate(model, [torch.randn(2, 1, *tile) for _ in range(2)])
    return model.eval()


def bundle_info(bits: str = "fp32", spatial_dims: int = 3, tile: list[int] = TILE):
    from edgeseg.export.run_export import BundleInfo

    return BundleInfo(spatial_dims=spatial_dims, in_channels=1, class_names=list(CLASSES), tile_size=list(tile),
                      preprocess=dict(PREPROCESS), bits=bits, training={"patch_size": list(tile)})


def export_to(model: torch.nn.Module, info, out: Path):
    from edgeseg.export.bundle_writer import write_bundle
    from edgeseg.export.run_export import export_model, verify_bundle

    result = export_model(model, info)
    result.manifest = write_bundle(out, result.files, result.manifest)
    result.path = out
    result.summary.extend(verify_bundle(out, result))
    return result


def torch_out(model: torch.nn.Module, *args: torch.Tensor):
    """Model output as numpy (brevitas may return a QuantTensor)."""
    with torch.no_grad():
        out = model(*args)
    return (out.value if hasattr(out, "value") else out).numpy()


def output_step(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Oracle for one output quantization step, from brevitas itself: head input scale x weight scale (per channel)."""
    seen = {}

    def record(module, args):  # returns None: the input passes unchanged
        seen["scale"] = args[0].scale

    hook = model.head.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            model(x)
            weight_scale = model.head.quant_weight().scale.reshape(-1)
    finally:
        hook.remove()
    return (seen["scale"].reshape(()) * weight_scale).numpy()


@pytest.fixture(scope="session")
def kit() -> types.SimpleNamespace:
    return types.SimpleNamespace(CLASSES=CLASSES, TILE=TILE, MODEL_CFG=MODEL_CFG, float_unet=float_unet,
                                 quant_unet=quant_unet, bundle_info=bundle_info, export_to=export_to,
                                 torch_out=torch_out, output_step=output_step)


@pytest.fixture(scope="session")
def float_model():
    return float_unet()


@pytest.fixture(scope="session")
def quant_model():
    return quant_unet()


@pytest.fixture(scope="module")
def qcdq(quant_model):
    """The brevitas QCDQ graph of `quant_model` (module scope: a module may alter its copy)."""
    from edgeseg.export.torch_export import export_qcdq

    return export_qcdq(quant_model, (torch.randn(1, 1, 16, 16, 16),), spatial_dims=3)


@pytest.fixture(scope="session")
def float_export(float_model, tmp_path_factory):
    return export_to(float_model, bundle_info(), tmp_path_factory.mktemp("float") / "bundle")


@pytest.fixture(scope="session")
def quant_export(quant_model, tmp_path_factory):
    return export_to(quant_model, replace(bundle_info(), bits="4/6"), tmp_path_factory.mktemp("quant") / "bundle")
