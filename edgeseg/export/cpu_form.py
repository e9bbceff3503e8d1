"""The CPU deployment form of a brevitas QCDQ graph, and the check that ONNX Runtime really runs int8.

brevitas writes a sub-8-bit weight as int8 const -> Clip(lo, hi) -> DequantizeLinear. The Clip
on a constant is folded here (values are already inside [lo, hi]; `np.clip` keeps it exact if
not), leaving const -> DequantizeLinear: the pattern ONNX Runtime fuses into QLinearConv and
the one INT4 packing needs (Clip has no INT4 type). Activation Q -> Clip -> DQ stays: ONNX
Runtime keeps the int Clip between its int8 kernels (deployment-facts.md section 2.3).

Whether the convolutions really run int8 is decided by ONNX Runtime's graph optimiser (matching
signedness around each conv, a Q after it, ...). `optimized_op_counts` reports what it produced,
counting `QLinearConv` against the float `Conv`/`FusedConv` left over.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from edgeseg.export import graph as g


def strip_weight_clips(model: onnx.ModelProto) -> int:
    """Fold Clip nodes applied to integer constants that feed DequantizeLinear, in place; returns how many."""
    inits = g.initializers(model)
    users = g.consumers(model)
    outputs = {o.name for o in model.graph.output}
    folded = []
    for node in model.graph.node:
        if node.op_type != "Clip" or len(node.input) < 3 or node.input[0] not in inits:
            continue
        if inits[node.input[0]].data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            continue
        readers = users.get(node.output[0], [])
        if node.output[0] in outputs or not readers or any(r.op_type != "DequantizeLinear" or r.input[0] != node.output[0]
                                                            for r in readers):
            continue
        values = g.array(model, node.input[0])
        lo, hi = g.array(model, node.input[1]), g.array(model, node.input[2])
        if values is None or lo is None or hi is None:
            continue
        clipped = np.clip(values, lo, hi).astype(values.dtype)
        source = node.input[0]
        if not np.array_equal(clipped, values):
            source = g.add_initializer(model, f"{node.output[0]}::folded", clipped)
        for reader in readers:
            reader.input[0] = source
        folded.append(node)
    g.remove_nodes(model, folded)
    g.prune_unused_initializers(model)
    return len(folded)


def requantize_after_resize(model: onnx.ModelProto) -> int:
    """Insert Q -> DQ (the input's own scale and zero point) after each nearest Resize of a dequantized tensor.

    brevitas passes a quantized tensor through nearest upsampling and exports DQ -> Resize -> Conv:
    the conv then has a float input and ONNX Runtime leaves it a float Conv. Nearest resizing only
    copies values, all of which are already on the input's grid, so re-quantizing with the same
    scale/zero point is exact; it gives ONNX Runtime DQ -> Resize -> Q (an int8 Resize) and
    Q -> DQ -> Conv -> Q (a QLinearConv). Returns how many Resize nodes were requantized.
    """
    producers = g.producers(model)
    nodes = list(model.graph.node)
    rebuilt: list[onnx.NodeProto] = []
    count = 0
    for node in nodes:
        rebuilt.append(node)
        if node.op_type != "Resize":
            continue
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
        source = producers.get(node.input[0])
        if mode != "nearest" or source is None or source.op_type != "DequantizeLinear":
            continue
        out = node.output[0]
        node.output[0] = f"{out}::resized"
        params = list(source.input[1:])  # scale (and zero point) of the tensor being resized
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in source.attribute}
        rebuilt.append(onnx.helper.make_node("QuantizeLinear", [node.output[0], *params], [f"{out}::q"],
                                             name=f"{node.name}::requantize", **attrs))
        rebuilt.append(onnx.helper.make_node("DequantizeLinear", [f"{out}::q", *params], [out],
                                             name=f"{node.name}::dequantize", **attrs))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    return count


def cpu_form(qcdq: onnx.ModelProto) -> onnx.ModelProto:
    """The QCDQ graph with weight Clips folded and resized tensors requantized (same numbers; int8
    kernels in ONNX Runtime)."""
    model = g.copy(qcdq)
    g.constants_to_initializers(model)
    strip_weight_clips(model)
    requantize_after_resize(model)
    return model


def optimized_op_counts(model_bytes: bytes, session_config: dict[str, str] | None = None) -> Counter[str]:
    """Operator counts of the graph ONNX Runtime (CPU, all optimisations) actually executes."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(path)
        options.intra_op_num_threads = 1
        options.log_severity_level = 3  # the optimised file is only read back for counting
        for key, value in (session_config or {}).items():
            options.add_session_config_entry(key, value)
        ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        return g.op_counts(onnx.load(str(path), load_external_data=False))


def conv_kernel_summary(counts: Counter[str]) -> dict[str, int]:
    """How many convolutions run as int8 kernels vs in float, from `optimized_op_counts`."""
    return {
        "int8_conv": counts.get("QLinearConv", 0),
        "float_conv": counts.get("Conv", 0) + counts.get("FusedConv", 0),
        "float_conv_transpose": counts.get("ConvTranspose", 0),
    }
