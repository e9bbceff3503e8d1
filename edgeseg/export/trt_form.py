"""Rewrite a brevitas QCDQ graph into the int8 Q/DQ form TensorRT's ONNX parser accepts.

TensorRT's parser has no integer `Clip`, takes UINT8 only as a network input/output, supports
only symmetric (zero point 0) Q/DQ and dequantizes only INT8/INT4/FP8, i.e. no int32 bias
DequantizeLinear (onnx-tensorrt docs/operators.md; deployment-facts.md section 3). The rewrite
(verified bit-exact in ONNX Runtime, deployment-facts.md section 3.3):

1. weight: int const -> Clip -> DQ  =>  int8 const -> DQ  (`cpu_form.strip_weight_clips`);
2. activation: x -> Q(s, u8|s8) -> Clip(lo, hi) -> DQ  =>  x -> Clip(lo*s, hi*s) (float) ->
   Q(s, int8, zp 0) -> DQ(int8, zp 0). Exact: Q rounds x/s and lo/hi are integers, so clamping
   before or after rounding gives the same integer; the int8 container holds any range inside
   [-128, 127], which excludes unsigned 8-bit activations (0..255): those are refused;
3. int32 bias: DQ(b_int32, s_in*s_w) => float32 initializer b_int32 * scale (what the DQ computes).
"""

from __future__ import annotations

import numpy as np
import onnx

from edgeseg.errors import UserError
from edgeseg.export import graph as g
from edgeseg.export.cpu_form import strip_weight_clips

INT8_MIN, INT8_MAX = -128, 127
_RANGES: dict[int, tuple[int, int]] = {onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255)}
ZERO_INT8 = "edgeseg::zero_point_int8"


def _zero_point(model: onnx.ModelProto, node: onnx.NodeProto, index: int) -> tuple[int, np.ndarray | None]:
    """(onnx dtype, value) of a Q/DQ zero point; default uint8 when absent (ONNX rule)."""
    if len(node.input) <= index or not node.input[index]:
        return onnx.TensorProto.UINT8, None
    tensor = g.initializers(model).get(node.input[index])
    if tensor is None:
        raise UserError(f"TensorRT form: zero point of {node.name or node.op_type} is not a constant")
    return tensor.data_type, g.array(model, node.input[index])


def _fold_int32_biases(model: onnx.ModelProto) -> int:
    users = g.consumers(model)
    folded = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        x = g.initializers(model).get(node.input[0])
        if x is None or x.data_type != onnx.TensorProto.INT32:
            continue
        values = g.array(model, node.input[0])
        scale = g.array(model, node.input[1])
        _, zero = _zero_point(model, node, 2)
        assert values is not None and scale is not None
        zero_f = np.zeros(1, np.float32) if zero is None else zero.astype(np.float32)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and values.ndim > 1:  # per-axis: broadcast scale along `axis`
            shape = [1] * values.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
            zero_f = zero_f.reshape(shape) if zero_f.size > 1 else zero_f
        # Exactly what DequantizeLinear computes, in float32: (x - zp) * scale.
        bias = ((values.astype(np.float32) - zero_f) * scale.astype(np.float32)).astype(np.float32)
        name = g.add_initializer(model, f"{node.output[0]}::float", bias)
        for reader in users.get(node.output[0], []):
            for i, inp in enumerate(reader.input):
                if inp == node.output[0]:
                    reader.input[i] = name
        folded.append(node)
    g.remove_nodes(model, folded)
    return len(folded)


def _rewrite_activations(model: onnx.ModelProto) -> int:
    users = g.consumers(model)
    clip_before: dict[str, onnx.NodeProto] = {}  # Q output -> the float Clip to insert before that Q
    drop: list[onnx.NodeProto] = []
    rewritten = 0
    for q in list(model.graph.node):
        if q.op_type != "QuantizeLinear":
            continue
        where = q.name or q.output[0]
        scale = g.array(model, q.input[1])
        if scale is None or scale.size != 1:
            raise UserError(f"TensorRT form: activation quantizer {where} needs one constant scale")
        dtype, zero = _zero_point(model, q, 2)
        if dtype not in _RANGES:
            raise UserError(f"TensorRT form: {where} quantizes to an unsupported type ({dtype})")
        if zero is not None and np.any(zero != 0):
            raise UserError(f"TensorRT form: {where} is asymmetric (zero point {zero.tolist()}); TensorRT "
                            "supports symmetric quantization only")
        lo, hi = _RANGES[dtype]
        readers = users.get(q.output[0], [])
        clip = None
        if len(readers) == 1 and readers[0].op_type == "Clip":
            clip = readers[0]
            lo_v, hi_v = g.array(model, clip.input[1]), g.array(model, clip.input[2])
            if lo_v is None or hi_v is None:
                raise UserError(f"TensorRT form: the Clip after {where} has non-constant bounds")
            lo, hi = max(lo, int(lo_v)), min(hi, int(hi_v))
            readers = users.get(clip.output[0], [])
            drop.append(clip)
        if hi > INT8_MAX or lo < INT8_MIN:
            raise UserError(f"TensorRT form: activation {where} spans [{lo}, {hi}], outside int8; TensorRT has "
                            "no unsigned 8-bit activations (use <= 7-bit unsigned or signed quantizers)")
        if any(r.op_type != "DequantizeLinear" for r in readers):
            raise UserError(f"TensorRT form: {where} feeds {readers[0].op_type}, expected DequantizeLinear")
        s = np.float32(scale.reshape(()))
        base = q.output[0]
        x = q.input[0]
        if (lo, hi) != (INT8_MIN, INT8_MAX):
            lo_name = g.add_initializer(model, f"{base}::clip_lo", np.array(np.float32(lo) * s, np.float32))
            hi_name = g.add_initializer(model, f"{base}::clip_hi", np.array(np.float32(hi) * s, np.float32))
            clipped = f"{base}::clipped"
            clip_before[q.output[0]] = onnx.helper.make_node("Clip", [x, lo_name, hi_name], [clipped],
                                                             name=f"{q.name or base}::float_clip")
            x = clipped
        q.input[0] = x
        if len(q.input) > 2:
            q.input[2] = ZERO_INT8
        else:
            q.input.append(ZERO_INT8)
        for dq in readers:
            _, dq_zero = _zero_point(model, dq, 2)
            dq_scale = g.array(model, dq.input[1])
            if dq_scale is None or not np.array_equal(dq_scale.reshape(()), scale.reshape(())) or (
                    dq_zero is not None and np.any(dq_zero != 0)):
                raise UserError(f"TensorRT form: the DequantizeLinear after {where} uses another scale/zero point")
            dq.input[0] = q.output[0]
            if len(dq.input) > 2:
                dq.input[2] = ZERO_INT8
            else:
                dq.input.append(ZERO_INT8)
        rewritten += 1
    g.add_initializer(model, ZERO_INT8, np.array(0, np.int8))
    g.remove_nodes(model, drop)
    ordered: list[onnx.NodeProto] = []
    for node in model.graph.node:  # keep topological order: each float Clip right before its Q
        if node.output[0] in clip_before:
            ordered.append(clip_before[node.output[0]])
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return rewritten


def _check_weights(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        tensor = g.initializers(model).get(node.input[0])
        if tensor is not None and tensor.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.INT4):
            raise UserError(f"TensorRT form: weight {tensor.name} is {onnx.TensorProto.DataType.Name(tensor.data_type)}; "
                            "TensorRT dequantizes INT8/INT4 only")
        dtype, zero = _zero_point(model, node, 2)
        if zero is not None and np.any(zero != 0):
            raise UserError(f"TensorRT form: weight {node.input[0]} has a non-zero zero point")
        if tensor is not None and len(node.input) > 2 and dtype != tensor.data_type:
            raise UserError(f"TensorRT form: weight {node.input[0]} and its zero point differ in type")


def trt_form(qcdq: onnx.ModelProto) -> onnx.ModelProto:
    """The TensorRT-parsable int8 Q/DQ graph; numerically identical to `qcdq` in ONNX Runtime."""
    model = g.copy(qcdq)
    g.constants_to_initializers(model)
    strip_weight_clips(model)
    _fold_int32_biases(model)
    _rewrite_activations(model)
    _check_weights(model)
    g.prune_unused_initializers(model)
    return model
