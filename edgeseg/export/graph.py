"""Small ONNX graph helpers shared by the export passes (uses the `onnx` package)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

DEFAULT_DOMAINS = ("", "ai.onnx")


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that outputs it."""
    return {out: node for node in model.graph.node for out in node.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> nodes that read it."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name:
                found.setdefault(name, []).append(node)
    return found


def array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of initializer `name`, or None when it is not an initializer."""
    tensor = initializers(model).get(name)
    return None if tensor is None else numpy_helper.to_array(tensor)


def add_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> str:
    """Add (or replace) initializer `name` holding `value`; returns the name."""
    remove_initializers(model, [name])
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def remove_initializers(model: onnx.ModelProto, names: Iterable[str]) -> None:
    drop = set(names)
    keep = [t for t in model.graph.initializer if t.name not in drop]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def remove_nodes(model: onnx.ModelProto, nodes: Iterable[onnx.NodeProto]) -> None:
    """Remove nodes, identified by their outputs (protobuf wrappers are not identity-stable)."""
    drop = {tuple(n.output) for n in nodes}
    keep = [n for n in model.graph.node if tuple(n.output) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def prune_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    remove_initializers(model, [t.name for t in model.graph.initializer if t.name not in used])


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Move `Constant` nodes holding a tensor into initializers (so weight passes see one kind)."""
    moved = []
    for node in model.graph.node:
        if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
            continue
        attrs = {a.name: a for a in node.attribute}
        if set(attrs) != {"value"}:
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attrs["value"].t)
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
        moved.append(node)
    remove_nodes(model, moved)
    return len(moved)


def opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return int(entry.version)
    raise ValueError("model has no default-domain opset")


def set_opset(model: onnx.ModelProto, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            entry.version = version


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def check(model: onnx.ModelProto) -> None:
    """onnx.checker with full (strict shape inference) checking."""
    onnx.checker.check_model(model, full_check=True)


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def input_names(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def compact_names(model: onnx.ModelProto) -> None:
    """Rename every tensor except the graph inputs/outputs to a short `t<N>`, in place.

    brevitas names each tensor after its full module and handler path
    ('/encoders.0/conv1/weight_quant/export_handler/Constant_2_output_0'); in a quantized graph
    these names weigh more than the 4-bit weights of a small model. Node names (which say which
    module a node came from, and which TensorRT reports per layer) are kept.
    """
    keep = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    mapping: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in mapping:
            mapping[name] = f"t{len(mapping)}"
        return mapping[name]

    for tensor in model.graph.initializer:
        tensor.name = short(tensor.name)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = short(name)
        for i, name in enumerate(node.output):
            node.output[i] = short(name)
    for info in model.graph.value_info:
        info.name = short(info.name)
    model.graph.ClearField("value_info")
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""


def drop_initializer_inputs(model: onnx.ModelProto) -> int:
    """Remove initializers from the graph inputs (old exporters list them there, which makes ONNX
    Runtime treat them as overridable and skip constant folding/fusion); returns how many."""
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    dropped = len(model.graph.input) - len(keep)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(keep)
    return dropped


def int32_bias(model: onnx.ModelProto, conv: onnx.NodeProto,
               producer_of: dict[str, onnx.NodeProto] | None = None) -> onnx.TensorProto | None:
    """The int32 tensor (initializer or Constant attribute, mutable in place) behind a Conv/ConvTranspose
    bias DequantizeLinear, or None (float or absent bias)."""
    producer_of = producers(model) if producer_of is None else producer_of
    if len(conv.input) < 3 or conv.input[2] not in producer_of:
        return None
    dq = producer_of[conv.input[2]]
    if dq.op_type != "DequantizeLinear":
        return None
    source = next((t for t in model.graph.initializer if t.name == dq.input[0]), None)
    node = producer_of.get(dq.input[0])
    if source is None and node is not None and node.op_type == "Constant" and node.attribute:
        source = node.attribute[0].t
    return source if source is not None and source.data_type == onnx.TensorProto.INT32 else None
