"""PyTorch / brevitas -> ONNX, in memory.

Both exporters use torch's TorchScript-based path (`dynamo=False`): brevitas' QCDQ export needs
it (the dynamo path refuses int32 bias and leaves weights as graph inputs, which stops ONNX
Runtime from fusing int8 kernels; deployment-facts.md section 1.3), and using it for the float
model too keeps the two graphs alike. The batch and spatial axes are dynamic (names N, D, H, W),
so one graph serves any tile size that is a multiple of the model's `min_input_multiple`.

Opset 17: recent, and inside every parser we target (TensorRT 10.0-10.x parses opsets 9-20).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from edgeseg.export.graph import drop_initializer_inputs
from edgeseg.runtime.bundle import McSite

EXPORT_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
_SPATIAL = ("D", "H", "W")


def io_names(mc_sites: list[McSite] | None) -> list[str]:
    return [INPUT_NAME] + [s.input for s in mc_sites or []]


def dynamic_axes(spatial_dims: int, mc_sites: list[McSite] | None) -> dict[str, dict[int, str]]:
    spatial = {2 + i: name for i, name in enumerate(_SPATIAL[-spatial_dims:])}
    axes = {INPUT_NAME: {0: "N", **spatial}, OUTPUT_NAME: {0: "N", **spatial}}
    for site in mc_sites or []:
        axes[site.input] = {0: "N"}
    return axes


def export_float(model: nn.Module, args: tuple[torch.Tensor, ...], spatial_dims: int,
                 mc_sites: list[McSite] | None = None) -> onnx.ModelProto:
    """Float model (or its MaskInputs wrapper, with masks in `args`) -> ONNX model."""
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer warnings
        path = Path(tmp) / "float.onnx"
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=EXPORT_OPSET, do_constant_folding=True,
                          input_names=io_names(mc_sites), output_names=[OUTPUT_NAME],
                          dynamic_axes=dynamic_axes(spatial_dims, mc_sites))
        model = onnx.load(str(path))
    drop_initializer_inputs(model)
    return model


def export_qcdq(model: nn.Module, args: tuple[torch.Tensor, ...], spatial_dims: int,
                mc_sites: list[McSite] | None = None) -> onnx.ModelProto:
    """brevitas model (or its MaskInputs wrapper) -> QCDQ ONNX model (int8 containers + Clip)."""
    from brevitas.export import export_onnx_qcdq

    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        path = Path(tmp) / "qcdq.onnx"
        export_onnx_qcdq(model, args=args, export_path=str(path), dynamo=False, opset_version=EXPORT_OPSET,
                         input_names=io_names(mc_sites), output_names=[OUTPUT_NAME],
                         dynamic_axes=dynamic_axes(spatial_dims, mc_sites))
        model = onnx.load(str(path))
    drop_initializer_inputs(model)  # brevitas lists the weights of float-kept convs as graph inputs
    return model


def is_brevitas_model(model: nn.Module) -> bool:
    """True when any submodule is a brevitas quantized layer."""
    try:
        from brevitas.nn.mixin.base import QuantLayerMixin
    except ImportError:
        return False
    return any(isinstance(m, QuantLayerMixin) for m in model.modules())
