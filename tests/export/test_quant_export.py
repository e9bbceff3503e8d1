"""Quantized export: QCDQ against brevitas, the CPU int8 form (QLinearConv), the TensorRT form (exact).

The per-layer gate has its own tests in test_layer_parity.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from edgeseg.errors import UserError
from edgeseg.export.trt_form import trt_form
from edgeseg.export.trt_rules import check_trt_onnx
from edgeseg.runtime.bundle import load_bundle


def _run(model_bytes: bytes, feeds: dict, optimize: bool) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(7)
    # batch 2, a tile the export never saw, and a large amplitude that drives activations into their clip range
    return [torch.randn(2, 1, 16, 16, 16, generator=gen), 5 * torch.randn(1, 1, 20, 12, 16, generator=gen)]


def test_qcdq_matches_brevitas_within_one_quantization_step(qcdq, quant_model, inputs, kit):
    for x in inputs:
        ref = kit.torch_out(quant_model, x)
        out = _run(qcdq.SerializeToString(), {"image": x.numpy()}, optimize=False)
        step = kit.output_step(quant_model, x).reshape(1, -1, 1, 1, 1)
        assert np.max(np.abs(out - ref) / step) <= 1.0


def test_cpu_form_runs_int8_conv_kernels(quant_export):
    bundle = load_bundle(quant_export.path)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(path)
        options.log_severity_level = 3
        ort.InferenceSession(bundle.model_bytes("cpu_int8"), options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    n_convs = 13  # depth-2 U-Net: 2 per block x 5 blocks + 2 upsample convs + head
    # Every conv but the head runs int8: the head emits float logits (no Q after it, so no QLinearConv);
    # the convs after nearest upsampling do too, thanks to the Q -> DQ requantize_after_resize inserts.
    assert ops.count("QLinearConv") == n_convs - 1
    assert ops.count("QLinearConv") + ops.count("Conv") + ops.count("FusedConv") == n_convs
    assert quant_export.manifest.parity["cpu_int8_vs_qcdq"]["int8_conv"] == ops.count("QLinearConv")


def test_cpu_form_with_int8_kernels_agrees_with_brevitas(quant_export, quant_model, inputs, kit):
    session = load_bundle(quant_export.path).ort_session("cpu_int8")
    for x in inputs:
        ref = kit.torch_out(quant_model, x)
        out = session.run(None, {"image": x.numpy()})[0]
        # int8 kernels may requantize an intermediate activation 1 LSB differently (deployment-facts 2.3),
        # which moves logits slightly; labels must (almost) never change.
        assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()
        assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.99


def test_trt_form_is_exact_against_qcdq_in_onnxruntime(quant_export, qcdq, inputs):
    trt_bytes = load_bundle(quant_export.path).model_bytes("trt")
    for x in inputs:
        feeds = {"image": x.numpy()}
        assert np.array_equal(_run(trt_bytes, feeds, optimize=False), _run(qcdq.SerializeToString(), feeds, False))


def test_trt_form_follows_the_parser_rules(quant_export):
    model = onnx.load_from_string(load_bundle(quant_export.path).model_bytes("trt"))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info})
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert TensorProto.UINT8 not in types.values()
    for node in model.graph.node:
        if node.op_type == "Clip":
            assert types[node.input[0]] == TensorProto.FLOAT  # no integer Clip
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = inits[node.input[2]]
            assert zero.dtype == np.int8 and not zero.any()  # symmetric int8
        if node.op_type == "DequantizeLinear":
            assert types[node.input[0]] == TensorProto.INT8  # no int32 bias, no uint8
    assert check_trt_onnx(model) == []
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 20


def test_trt_rules_reject_the_raw_qcdq_graph(qcdq):
    problems = "\n".join(check_trt_onnx(qcdq))
    assert "Clip" in problems and "input type INT8" in problems
    assert "DequantizeLinear" in problems and "INT32" in problems
    assert "UINT8" in problems


def test_manifest_records_bits_and_forms(quant_export):
    m = load_bundle(quant_export.path).manifest
    assert set(m.forms) == {"cpu_int8", "trt", "mc"}
    assert m.bits["nominal"] == "4/6" and m.bits["weights_at_rest"] == "int4"
    assert m.bits["weight_bit_widths"] == [4, 8]  # first conv and head keep 8 bits (quant.first_last_bits)
    assert m.bits["deployed"]["cpu_int8"] == {"weights": ["int8"], "activations": ["int8", "uint8"]}
    assert m.bits["deployed"]["trt"] == {"weights": ["int8"], "activations": ["int8"]}
    assert m.pick_form("onnxruntime") == "cpu_int8" and m.pick_form("tensorrt") == "trt"
    assert m.parity["trt_vs_qcdq"]["max_abs"] == 0.0


def _qdq_graph(zero_type: int, lo: int, hi: int) -> onnx.ModelProto:
    """x -> Q(scale 0.1, zero point of `zero_type`) -> Clip(lo, hi) -> DQ -> Relu."""
    np_type = {TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}[zero_type]
    inits = [
        onnx.numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        onnx.numpy_helper.from_array(np.array(0, np_type), "z"),
        onnx.numpy_helper.from_array(np.array(lo, np_type), "lo"),
        onnx.numpy_helper.from_array(np.array(hi, np_type), "hi"),
    ]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("Clip", ["q", "lo", "hi"], ["c"]),
             helper.make_node("DequantizeLinear", ["c", "s", "z"], ["d"]),
             helper.make_node("Relu", ["d"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_trt_rewrite_of_a_6bit_unsigned_activation_is_exact():
    model = _qdq_graph(TensorProto.UINT8, 0, 63)
    x = np.array([-1.0, 0.26, 3.14, 9.0], np.float32)  # below, inside (rounds), inside, above the 6-bit range
    expected = np.clip(np.round(x / 0.1), 0, 63) * np.float32(0.1)  # hand-computed Q -> Clip -> DQ
    rewritten = trt_form(model)
    out = _run(rewritten.SerializeToString(), {"x": x}, optimize=False)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)
    assert check_trt_onnx(rewritten) == []


def test_trt_rewrite_refuses_unsigned_8bit_activations():
    with pytest.raises(UserError, match="unsigned 8-bit"):
        trt_form(_qdq_graph(TensorProto.UINT8, 0, 255))


def test_unsigned_8bit_models_get_cpu_forms_only(kit):
    """8/8 with unsigned (ReLU) activations has no TensorRT int8 form; the export says so instead of failing."""
    from dataclasses import replace

    from edgeseg.config import ModelConfig
    from edgeseg.export.run_export import export_model

    cfg = ModelConfig(depth=1, base_width=4, norm="batch", dropout=0.0)
    model = kit.quant_unet(cfg, spatial_dims=2, bits="8/8", tile=[8, 8])
    result = export_model(model, replace(kit.bundle_info(spatial_dims=2, tile=[8, 8]), bits="8/8"))
    assert set(result.manifest.forms) == {"cpu_int8"}
    assert "unsigned 8-bit" in result.manifest.parity["trt_vs_qcdq"]["skipped"]
    assert result.manifest.bits["weights_at_rest"] == "int8"
    with pytest.raises(UserError, match="no tensorrt form"):
        result.manifest.pick_form("tensorrt")


def test_parity_gate_accepts_rounding_flips_but_not_label_changes():
    """_within: a flipped requantization rounding (many output steps, same labels) passes; changed labels fail."""
    import numpy as np

    from edgeseg.export.parity import difference
    from edgeseg.export.run_export import _within

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(1, 3, 8, 8, 8)).astype(np.float32) * 5
    step = np.full(3, 1e-3, np.float32)
    nudged = reference.copy()
    nudged[0, 0, 0, 0, 0] += 0.05  # 50 output steps, 1% of the logit range, labels almost all equal
    assert _within(difference(nudged, reference, step))
    swapped = reference[:, ::-1].copy()  # every label changes
    assert not _within(difference(swapped, reference, step))
    assert _within(difference(reference + 5e-4, reference, step))  # within one step


def test_qcdq_matches_brevitas_in_float64_and_the_export_records_it(qcdq, quant_model, inputs, kit, quant_export):
    # The float64 brevitas forward is the exact-sum oracle the export gate also accepts: the QCDQ graph
    # must be within one output step of it too (brevitas-fp32 and ORT both round float32 sums).
    import copy

    double = copy.deepcopy(quant_model).double()
    for x in inputs:
        with torch.no_grad():
            ref64 = double(x.double())
        ref64 = (ref64.value if hasattr(ref64, "value") else ref64).float().numpy()
        out = _run(qcdq.SerializeToString(), {"image": x.numpy()}, optimize=False)
        step = kit.output_step(quant_model, x).reshape(1, -1, 1, 1, 1)
        assert np.max(np.abs(out - ref64) / step) <= 1.0
    recorded = quant_export.manifest.parity["qcdq_vs_brevitas_float64"]
    assert recorded["max_steps"] is not None and recorded["max_steps"] <= 1.0
