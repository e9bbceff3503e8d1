"""Check an ONNX graph against the TensorRT ONNX parser's documented operator and type rules.

TensorRT cannot be installed on the build machines, so the TensorRT form is validated here,
statically, against what onnx-tensorrt documents (docs/operators.md, TensorRT 10.x; the rules
that matter for quantized graphs are also in deployment-facts.md section 3.1):

- TensorRT 10.0-10.x parses opsets 9..20 (10.15 reads up to 24; JetPack 6 ships 10.3, so 20);
- "INT8, INT4 and FP8 are treated as Quantized Types ... support only through quantization from
  a floating-point type": int8/int4 tensors may only be QuantizeLinear outputs or
  DequantizeLinear inputs;
- "UINT8 is only supported as network input or output tensor types";
- QuantizeLinear: input FP32/FP16/BF16, `y_zero_point` must be 0 (a UINT8 zero point is turned
  into INT8 with only a warning, which would saturate an unsigned 8-bit range at 127);
- DequantizeLinear: input INT8/FP8/FP4/INT4 (no INT32 bias DQ), `x_zero_point` must be zero;
- Clip, Conv, ConvTranspose, pooling, Resize, ...: floating-point types only (no int8 Clip);
  convolution and pooling 2D or 3D; Resize modes/coordinate modes from the documented list.

Only the operators listed in `_FLOAT_OPS`/`_ANY_OPS` are known to this checker; anything else is
reported (not necessarily unsupported by TensorRT, but unchecked). This is a static check of the
documented rules, not a TensorRT parse: the real parse happens in `edgeseg build-engine`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T

from edgeseg.export import graph as g

MIN_OPSET, MAX_OPSET = 9, 20
FLOATS = {T.FLOAT, T.FLOAT16, T.BFLOAT16}
INTS = {T.INT32, T.INT64}
QUANTIZED = {T.INT8, T.INT4, T.FLOAT8E4M3FN, T.FLOAT4E2M1}

# op -> allowed types of its first input (onnx-tensorrt docs/operators.md, 10.x)
_FLOAT_OPS = {op: FLOATS for op in (
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Clip",
    "BatchNormalization", "InstanceNormalization", "GroupNormalization", "LayerNormalization", "Sigmoid",
    "Softmax", "LogSoftmax", "Tanh", "LeakyRelu", "PRelu", "Elu", "Selu", "Resize", "Erf", "Exp", "Log",
    "Sqrt", "Reciprocal", "Gemm", "MatMul", "HardSigmoid", "Softplus", "Dropout", "Floor", "Ceil", "Round",
    "Sin", "Cos",  # FP32/FP16 (onnx-tensorrt docs/operators.md); the U-Transformer's positional encoding
)}
_NUMERIC_OPS = {op: FLOATS | INTS for op in (
    "Relu", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Neg", "Abs", "ArgMax", "ArgMin", "Pad",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "Equal", "Greater", "Less", "Range",
)}
_ANY_OPS = {op: FLOATS | INTS | {T.BOOL} for op in (
    "Concat", "Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Gather",
    "Slice", "Split", "Expand", "Where", "Tile", "Size", "Not", "And", "Or",
)}
_SPECIAL = {"QuantizeLinear", "DequantizeLinear", "Constant", "ConstantOfShape", "Cast"}
RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


def _types(model: onnx.ModelProto, problems: list[str]) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except onnx.shape_inference.InferenceError as exc:
        problems.append(f"ONNX type inference failed, types unchecked: {exc}")
        inferred = model
    types = {t.name: t.data_type for t in model.graph.initializer}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _name(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


def _type_name(dtype: int | None) -> str:
    return "unknown" if dtype is None else T.DataType.Name(dtype)


def _zero_is_zero(model: onnx.ModelProto, node: onnx.NodeProto) -> bool | None:
    if len(node.input) < 3 or not node.input[2]:
        return True
    value = g.array(model, node.input[2])
    return None if value is None else bool(np.all(value.astype(np.int64) == 0))


def check_trt_onnx(model: onnx.ModelProto, max_opset: int = MAX_OPSET) -> list[str]:
    """Every documented TensorRT-parser rule `model` breaks, one readable line each (empty = passes)."""
    problems: list[str] = []
    version = g.opset(model)
    if not MIN_OPSET <= version <= max_opset:
        problems.append(f"opset {version} outside the parser's {MIN_OPSET}..{max_opset}")
    types = _types(model, problems)
    io_names = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    q_outputs = {o for n in model.graph.node if n.op_type == "QuantizeLinear" for o in n.output}
    dq_inputs = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    qdq_params = {i for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]}
    for name, dtype in types.items():
        if dtype == T.UINT8 and name not in io_names:
            problems.append(f"tensor '{name}' is UINT8 inside the network (UINT8 only as network input/output)")
        if dtype in QUANTIZED and not ({name} & (q_outputs | dq_inputs | qdq_params)):
            problems.append(f"tensor '{name}' is {_type_name(dtype)} outside QuantizeLinear/DequantizeLinear")
    for node in model.graph.node:
        first = types.get(node.input[0]) if node.input and node.input[0] else None
        if node.domain not in g.DEFAULT_DOMAINS:
            problems.append(f"{_name(node)}: custom domain '{node.domain}'")
        elif node.op_type == "QuantizeLinear":
            if first not in FLOATS:
                problems.append(f"{_name(node)}: input is {_type_name(first)}, must be floating point")
            zero_type = types.get(node.input[2]) if len(node.input) > 2 and node.input[2] else T.UINT8
            if zero_type != T.INT8:
                problems.append(f"{_name(node)}: output type {_type_name(zero_type)}, TensorRT quantizes to INT8")
            if _zero_is_zero(model, node) is not True:
                problems.append(f"{_name(node)}: y_zero_point must be a constant 0")
        elif node.op_type == "DequantizeLinear":
            if first not in QUANTIZED:
                problems.append(f"{_name(node)}: input is {_type_name(first)}, must be INT8/INT4/FP8/FP4")
            if _zero_is_zero(model, node) is not True:
                problems.append(f"{_name(node)}: x_zero_point must be a constant 0")
        elif node.op_type in _SPECIAL:
            continue
        else:
            allowed = _FLOAT_OPS.get(node.op_type) or _NUMERIC_OPS.get(node.op_type) or _ANY_OPS.get(node.op_type)
            if allowed is None:
                problems.append(f"{_name(node)}: operator not in edgeseg's checked TensorRT subset")
                continue
            if first is not None and first not in allowed:
                problems.append(f"{_name(node)}: input type {_type_name(first)} not supported "
                                f"({', '.join(sorted(_type_name(t) for t in allowed))})")
            problems.extend(_op_specific(model, node))
    return problems


def _op_specific(model: onnx.ModelProto, node: onnx.NodeProto) -> list[str]:
    problems = []
    if node.op_type in ("Conv", "ConvTranspose", "MaxPool", "AveragePool"):
        kernel = _attr(node, "kernel_shape", None)
        if kernel is None and node.op_type.startswith("Conv"):
            weight = g.initializers(model).get(node.input[1])
            kernel = list(weight.dims[2:]) if weight is not None else None
        if kernel is not None and len(kernel) not in (2, 3):  # type: ignore[arg-type]
            problems.append(f"{_name(node)}: only 2D or 3D is supported")
        if node.op_type in ("MaxPool", "AveragePool"):
            if any(d != 1 for d in _attr(node, "dilations", [])):  # type: ignore[attr-defined]
                problems.append(f"{_name(node)}: dilations must be empty or all ones")
            if len(node.output) > 1 and node.output[1]:
                problems.append(f"{_name(node)}: the Indices output is unsupported")
    elif node.op_type == "Resize":
        mode = _attr(node, "mode", b"nearest")
        coord = _attr(node, "coordinate_transformation_mode", b"half_pixel")
        nearest = _attr(node, "nearest_mode", b"round_prefer_floor")
        for value, allowed, what in ((mode, RESIZE_MODES, "mode"), (coord, RESIZE_COORDS, "coordinate mode"),
                                     (nearest, RESIZE_NEAREST, "nearest mode")):
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text not in allowed:
                problems.append(f"{_name(node)}: {what} '{text}' unsupported")
        if _attr(node, "antialias", 0):
            problems.append(f"{_name(node)}: antialiasing is unsupported")
    elif node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        training = g.array(model, node.input[2])
        if training is None or bool(training):
            problems.append(f"{_name(node)}: is_training must be an initializer equal to False")
    return problems
