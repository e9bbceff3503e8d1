"""The static TensorRT-parser rule checker on hand-built graphs, one documented rule at a time.

These check `edgeseg.export.trt_rules` against onnx-tensorrt's documented operator/type rules;
they are not TensorRT tests (TensorRT is not installed here).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edgeseg.export.trt_rules import check_trt_onnx


def _model(nodes, inits, x_type=T.FLOAT, y_type=T.FLOAT, opset=17, shape=(1, 2, 4, 4, 4)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, list(shape))],
                              [helper.make_tensor_value_info("y", y_type, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _conv_qdq(zero=None, weight=None, w_zero=None):
    """x -> Q -> DQ -> Conv(DQ(weight)) -> Relu: the shape of a TensorRT-ready int8 conv (int8 zeros by default)."""
    zero = np.int8(0) if zero is None else zero
    weight = np.ones((2, 2, 3, 3, 3), np.int8) if weight is None else weight
    w_zero = np.int8(0) if w_zero is None else w_zero
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("DequantizeLinear", ["w", "s", "wz"], ["wf"]),
             helper.make_node("Conv", ["dq", "wf"], ["c"], pads=[1] * 6),
             helper.make_node("Relu", ["c"], ["y"])]
    return _model(nodes, {"s": np.float32(0.1), "z": zero, "w": weight, "wz": w_zero})


def test_a_symmetric_int8_qdq_conv_passes():
    assert check_trt_onnx(_conv_qdq()) == []


@pytest.mark.parametrize("model, expected", [
    (_conv_qdq(zero=np.uint8(0)), "TensorRT quantizes to INT8"),
    (_conv_qdq(zero=np.int8(3)), "y_zero_point must be a constant 0"),
    (_conv_qdq(weight=np.ones((2, 2, 3, 3, 3), np.int32), w_zero=np.int32(0)), "must be INT8/INT4/FP8/FP4"),
    (_model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("Clip", ["q", "lo", "hi"], ["c"]),
             helper.make_node("DequantizeLinear", ["c", "s", "z"], ["y"])],
            {"s": np.float32(0.1), "z": np.int8(0), "lo": np.int8(-32), "hi": np.int8(31)}), "Clip"),
    (_model([helper.make_node("Relu", ["x"], ["y"])], {}, opset=21), "opset 21"),
    (_model([helper.make_node("Cast", ["x"], ["u"], to=T.UINT8), helper.make_node("Cast", ["u"], ["y"], to=T.FLOAT)],
            {}), "UINT8 inside the network"),
    (_model([helper.make_node("Det", ["x"], ["y"])], {}, shape=(3, 3)), "not in edgeseg's checked"),
    (_model([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="cubic")],
            {"sc": np.ones(5, np.float32)}), "mode 'cubic'"),
    (_model([helper.make_node("Conv", ["x", "w"], ["y"])], {"w": np.ones((2, 2, 3), np.float32)}, shape=(1, 2, 8)),
     "only 2D or 3D"),
    (_model([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2, 2], dilations=[2, 2, 2])], {}),
     "dilations"),
    (_model([helper.make_node("Relu", ["x"], ["y"], domain="com.microsoft")], {}), "custom domain"),
])
def test_each_documented_rule_is_enforced(model, expected):
    problems = check_trt_onnx(model)
    assert any(expected in p for p in problems), problems


def test_uint8_is_allowed_as_network_input():
    model = _model([helper.make_node("Cast", ["x"], ["y"], to=T.FLOAT)], {}, x_type=T.UINT8)
    assert check_trt_onnx(model) == []


def test_max_opset_can_follow_newer_tensorrt():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], {}, opset=21)
    assert check_trt_onnx(model, max_opset=24) == []
