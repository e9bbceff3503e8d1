"""requantize_after_resize: exact, and only where nearest resizing keeps values on the quantization grid."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edgeseg.export.cpu_form import requantize_after_resize


def _graph(mode: str) -> onnx.ModelProto:
    """x -> Q -> DQ -> Resize(x2, mode) -> y, scale 0.1, uint8."""
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.uint8), "z"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("Resize", ["dq", "", "scales"], ["y"], mode=mode)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 2, 3, 4])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [1, 2, 6, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_nearest_resize_is_requantized_exactly():
    x = np.random.default_rng(0).uniform(-1, 20, (1, 2, 3, 4)).astype(np.float32)
    model = _graph("nearest")
    before = _run(model, x)
    assert requantize_after_resize(model) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["QuantizeLinear", "DequantizeLinear", "Resize", "QuantizeLinear", "DequantizeLinear"]
    np.testing.assert_array_equal(_run(model, x), before)  # bit-identical: the values were on the grid


def test_linear_resize_is_left_alone():
    model = _graph("linear")  # interpolated values fall between grid points: requantizing would change them
    assert requantize_after_resize(model) == 0
    assert [n.op_type for n in model.graph.node][-1] == "Resize"
