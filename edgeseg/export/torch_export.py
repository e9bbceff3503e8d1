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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeseg.export import graph as g
from edgeseg.runtime.bundle import McSite

EXPORT_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
_SPATIAL = ("D", "H", "W")


def io_names(mc_sites: list[McSite] | None, extra_inputs: Sequence[str] = ()) -> list[str]:
    """Graph input names in forward order: the image, the model's extra inputs (FiLM metadata, HeMIS
    modality mask), the MC dropout masks."""
    return [INPUT_NAME, *extra_inputs] + [s.input for s in mc_sites or []]


def dynamic_axes(spatial_dims: int, mc_sites: list[McSite] | None,
                 extra_inputs: Sequence[str] = ()) -> dict[str, dict[int, str]]:
    spatial = {2 + i: name for i, name in enumerate(_SPATIAL[-spatial_dims:])}
    axes = {INPUT_NAME: {0: "N", **spatial}, OUTPUT_NAME: {0: "N", **spatial}}
    for name in [*extra_inputs, *(site.input for site in mc_sites or [])]:
        axes[name] = {0: "N"}  # one row (or mask) per tile of the batch
    return axes


def export_float(model: nn.Module, args: tuple[torch.Tensor, ...], spatial_dims: int,
                 mc_sites: list[McSite] | None = None, extra_inputs: Sequence[str] = ()) -> onnx.ModelProto:
    """Float model (or its MaskInputs wrapper) -> ONNX model. `args`: the image, then one example per name
    in `extra_inputs` (the model's extra inputs, e.g. ("metadata",)), then the MC masks."""
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")  # TorchScript-exporter deprecation and tracer warnings
        path = Path(tmp) / "float.onnx"
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=EXPORT_OPSET, do_constant_folding=True,
                          input_names=io_names(mc_sites, extra_inputs), output_names=[OUTPUT_NAME],
                          dynamic_axes=dynamic_axes(spatial_dims, mc_sites, extra_inputs))
        model = onnx.load(str(path))
    g.drop_initializer_inputs(model)
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
        exported = onnx.load(str(path))
    g.drop_initializer_inputs(exported)  # brevitas lists the weights of float-kept convs as graph inputs
    repair_wrapped_biases(exported, model, args)
    return exported


INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def repair_wrapped_biases(exported: onnx.ModelProto, model: nn.Module, args: tuple[torch.Tensor, ...]) -> int:
    """Undo brevitas' int32 wrap-around of positively saturated biases, in place; returns how many entries.

    brevitas' Int32Bias saturates round(bias / (s_in * s_w)) at 2^31 - 1, computed in float32 where
    that is 2^31, and its QCDQ exporter casts it to int32: -2^31, a bias with the wrong sign (seen
    when an input activation scale collapses to brevitas' minimum, e.g. a dead ReLU). Entries equal
    to -2^31 whose float bias is positive become 2^31 - 1, which ONNX Runtime dequantizes to the
    same float32 value brevitas computes with. Convs are paired with the graph's Conv/ConvTranspose
    nodes in call order (one forward with hooks, only when a -2^31 entry exists); nothing changes
    when the pairing does not line up (the per-layer parity check then names the layer).
    """
    producers = g.producers(exported)
    convs = [n for n in exported.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    suspect = [(i, t) for i, n in enumerate(convs) if (t := g.int32_bias(exported, n, producers)) is not None
               and np.any(onnx.numpy_helper.to_array(t) == INT32_MIN)]
    if not suspect:
        return 0
    called: list[nn.modules.conv._ConvNd] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _: called.append(mod)) for m in model.modules()
             if isinstance(m, nn.modules.conv._ConvNd)]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    if len(called) != len(convs):
        return 0
    fixed = 0
    for index, tensor in suspect:
        bias = called[index].bias
        values = onnx.numpy_helper.to_array(tensor)
        if bias is None or bias.numel() != values.size:
            continue
        flat = values.reshape(-1).copy()
        wrapped = (flat == INT32_MIN) & (bias.detach().reshape(-1).numpy() > 0)
        if wrapped.any():
            flat[wrapped] = INT32_MAX
            tensor.CopyFrom(onnx.numpy_helper.from_array(flat.reshape(values.shape), tensor.name))
            fixed += int(wrapped.sum())
    return fixed


def is_brevitas_model(model: nn.Module) -> bool:
    """True when any submodule is a brevitas quantized layer."""
    try:
        from brevitas.nn.mixin.base import QuantLayerMixin
    except ImportError:
        return False
    return any(isinstance(m, QuantLayerMixin) for m in model.modules())
