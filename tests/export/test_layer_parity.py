"""Per-layer integer parity of the QCDQ graph against brevitas (edgeseg/export/layer_parity.py).

Oracles: the layer list and sizes of the tiny depth-2 U-Net written out by hand; codes computed by
hand from brevitas' bias and activation scale when a layer is fed all-zero codes; and graphs
corrupted at one known place, which must fail at that layer and only there.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from brevitas.export import export_onnx_qcdq
from onnx import numpy_helper

from edgeseg.errors import UserError
from edgeseg.export.layer_parity import (
    FED_SUFFIX,
    LSB_TOLERANCE,
    PRE_ROUND_TOLERANCE,
    LayerParity,
    brevitas_codes,
    code_difference,
    cut_graph,
    layer_parity,
)
from edgeseg.export.torch_export import INT32_MAX, INT32_MIN, export_qcdq, repair_wrapped_biases

# The activation quantizers of the depth-2 U-Net (conftest MODEL_CFG), in execution order, and the
# number of codes each emits per 16^3 tile: channels x voxels (base width 4; 8 at level 1, 16 in the
# bottleneck; the concatenations hold both inputs' channels).
LAYERS = {
    "input_quant": 1 * 16 ** 3,
    "encoders.0.act1": 4 * 16 ** 3, "encoders.0.act2": 4 * 16 ** 3,
    "encoders.1.act1": 8 * 8 ** 3, "encoders.1.act2": 8 * 8 ** 3,
    "bottleneck.act1": 16 * 4 ** 3, "bottleneck.act2": 16 * 4 ** 3,
    "decoders.0.up.2": 8 * 8 ** 3, "decoders.0.cat.quant": 16 * 8 ** 3,
    "decoders.0.block.act1": 8 * 8 ** 3, "decoders.0.block.act2": 8 * 8 ** 3,
    "decoders.1.up.2": 4 * 16 ** 3, "decoders.1.cat.quant": 8 * 16 ** 3,
    "decoders.1.block.act1": 4 * 16 ** 3, "decoders.1.block.act2": 4 * 16 ** 3,
}


@pytest.fixture(scope="module")
def tiles():
    gen = torch.Generator().manual_seed(3)
    # a unit-variance tile and a large one that drives activations into their clip range (as the export uses)
    return [torch.randn(1, 1, 16, 16, 16, generator=gen), 3 * torch.randn(1, 1, 16, 16, 16, generator=gen)]


def _tensor(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    """The initializer or Constant-node tensor called `name` (mutable in place)."""
    for t in model.graph.initializer:
        if t.name == name:
            return t
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return node.attribute[0].t
    raise KeyError(name)


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    tensor = _tensor(model, name)
    tensor.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(tensor).dtype), name))


def test_every_layer_of_the_tiny_unet_agrees_within_one_lsb(qcdq, quant_model, tiles):
    report = layer_parity(qcdq, quant_model, tiles)
    assert [p.layer for p in report.layers] == list(LAYERS)
    assert [p.elements for p in report.layers] == [2 * n for n in LAYERS.values()]  # two tiles
    assert report.ok, report.failure()
    for p in report.layers:
        assert p.max_diff <= LSB_TOLERANCE and p.max_pre_round_diff <= PRE_ROUND_TOLERANCE
        assert p.exact_fraction >= 0.999
        assert "QuantizeLinear" in p.onnx_node
    assert report.output.unit == "output steps" and report.output.max_diff <= 1.0
    assert report.output.elements == 2 * 3 * 16 ** 3
    assert report.to_dict()["passed"] and report.to_dict()["layers_checked"] == len(LAYERS)


def test_each_layer_computes_from_the_fed_codes_not_from_upstream(qcdq, quant_model, tiles):
    """Fed all-zero codes at every cut, a conv layer's output is its bias: codes = clip(round(relu(b) / s), 0, 63)."""
    cut, points = cut_graph(qcdq)
    records, _ = brevitas_codes(quant_model, tiles[1])  # only for the shapes (and names) of the fed codes
    feeds = {"image": tiles[1].numpy()}
    for p, r in zip(points, records):
        feeds[p.codes + FED_SUFFIX] = np.zeros(r.codes.shape, onnx.helper.tensor_dtype_to_np_dtype(p.elem_type))
    session = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [p.codes for p in points]
    got = dict(zip(names, session.run(names, feeds)))
    logits = session.run(["logits"], feeds)[0]
    by_layer = {r.layer: got[p.codes] for p, r in zip(points, records)}

    with torch.no_grad():
        for conv, act in [(quant_model.encoders[0].conv2, quant_model.encoders[0].act2),
                          (quant_model.decoders[0].up[1], quant_model.decoders[0].up[2]),
                          (quant_model.decoders[1].block.conv1, quant_model.decoders[1].block.act1)]:
            scale = float(act.act_quant.scale())
            expected = np.clip(np.round(np.maximum(conv.bias.numpy(), 0) / scale), 0, 63)
            name = next(n for n, m in quant_model.named_modules() if m is act)
            codes = by_layer[name]
            assert np.array_equal(codes, np.broadcast_to(expected.reshape(1, -1, 1, 1, 1), codes.shape)), name
        assert not by_layer["decoders.0.cat.quant"].any()  # the concat of two zero inputs
        head_bias = quant_model.head.bias.numpy().reshape(1, -1, 1, 1, 1)
        np.testing.assert_allclose(logits, np.broadcast_to(head_bias, logits.shape), rtol=0, atol=1e-6)
    assert by_layer["input_quant"].any()  # the input quantizer still reads the image


def _negate_weights(model: onnx.ModelProto, layer: str) -> None:
    clip = _node(model, f"/{layer}/weight_quant/export_handler/Clip")
    _set(model, clip.input[0], -numpy_helper.to_array(_tensor(model, clip.input[0])))


def _scale_quantizer(model: onnx.ModelProto, layer: str) -> None:
    """Give one QuantizeLinear a 1.5x scale of its own (its DequantizeLinear keeps the right one)."""
    q = _node(model, f"/{layer}/act_quant/export_handler/QuantizeLinear")
    scale = numpy_helper.to_array(_tensor(model, q.input[1]))
    model.graph.initializer.append(numpy_helper.from_array(scale * np.float32(1.5), "corrupted_scale"))
    q.input[1] = "corrupted_scale"


def _shift_head_bias(model: onnx.ModelProto) -> None:
    dq = _node(model, "/head/bias_quant/export_handler/DequantizeLinear")
    bias = numpy_helper.to_array(_tensor(model, dq.input[0])).copy()
    bias[0] += 1000  # 1000 output steps on channel 0
    _set(model, dq.input[0], bias)


CORRUPTIONS = {
    "weights of decoders.0.block.conv1 negated": (lambda m: _negate_weights(m, "decoders.0/block/conv1"),
                                                   "decoders.0.block.act1"),
    "quantizer scale of encoders.1.act1 x1.5": (lambda m: _scale_quantizer(m, "encoders.1/act1"), "encoders.1.act1"),
    "head bias shifted": (_shift_head_bias, "output"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupted_layer_fails_alone_and_is_named(case, qcdq, quant_model, tiles):
    corrupt, layer = CORRUPTIONS[case]
    bad = copy.deepcopy(qcdq)
    corrupt(bad)
    report = layer_parity(bad, quant_model, tiles[:1])
    assert [p.layer for p in report.failing] == [layer]  # the layers after it are fed brevitas' codes: unaffected
    assert report.failing[0].max_diff > (1.0 if layer == "output" else LSB_TOLERANCE)
    assert f"failed at layer '{layer}'" in report.failure()


def test_an_error_below_one_lsb_is_caught_before_rounding(qcdq, quant_model, tiles):
    """A bias off by 0.3 LSB of the next activation flips at most one level, but not the value it rounds."""
    bad = copy.deepcopy(qcdq)
    dq = _node(bad, "/encoders.0/conv2/bias_quant/export_handler/DequantizeLinear")
    bias = numpy_helper.to_array(_tensor(bad, dq.input[0])).astype(np.int64)
    accumulator_step = numpy_helper.to_array(_tensor(bad, dq.input[1])).astype(np.float64)  # s_in * s_w, (C,)
    lsb = float(quant_model.encoders[0].act2.act_quant.scale())
    shift = np.round(0.3 * lsb / accumulator_step)  # whole accumulator steps: 0.3 LSB up to rounding
    _set(bad, dq.input[0], bias + shift.astype(np.int64))
    report = layer_parity(bad, quant_model, tiles)
    failing = report.failing
    assert [p.layer for p in failing] == ["encoders.0.act2"]
    assert failing[0].max_diff <= LSB_TOLERANCE  # the codes alone would have passed
    assert failing[0].max_pre_round_diff == pytest.approx((shift * accumulator_step / lsb).max(), abs=1e-3)


def test_the_export_gate_fails_with_the_layer_name(monkeypatch, quant_model, kit):
    """export_model refuses a QCDQ graph with one wrong layer, naming it (the end-to-end numbers no longer gate)."""
    from edgeseg.export import run_export

    def corrupted_export(model, args, spatial_dims, mc_sites=None):
        graph = export_qcdq(model, args, spatial_dims, mc_sites)
        _negate_weights(graph, "decoders.0/block/conv1")
        return graph

    monkeypatch.setattr(run_export, "export_qcdq", corrupted_export)
    info = kit.bundle_info(bits="4/6")
    with pytest.raises(UserError, match=r"per-layer parity failed at layer 'decoders\.0\.block\.act1' "
                                        r"\(ONNX node /decoders\.0/block/act1/act_quant/export_handler/QuantizeLinear\)"):
        run_export.export_model(quant_model, info)


def test_the_manifest_records_per_layer_parity(quant_export):
    parity = quant_export.manifest.parity
    per_layer = parity["qcdq_per_layer"]
    assert per_layer["passed"] and per_layer["layers_checked"] == len(LAYERS) and per_layer["inputs"] == 2
    assert [entry["layer"] for entry in per_layer["layers"]] == list(LAYERS)
    assert per_layer["max_lsb"] <= 1 and per_layer["max_pre_round_lsb"] <= PRE_ROUND_TOLERANCE
    assert per_layer["output"]["unit"] == "output steps"
    assert parity["qcdq_vs_brevitas"]["gated"] is False  # end to end: reported only
    assert any(line.startswith("per-layer parity") and line.endswith("passed") for line in quant_export.summary)


def test_the_criterion_by_hand():
    flip = code_difference(np.array([3, 4, 5], np.uint8), np.array([3, 5, 5], np.int32))
    assert flip.tolist() == [0, 1, 0]
    assert code_difference(np.array([0], np.uint8), np.array([63], np.int32)).tolist() == [63]  # no uint8 wrap

    def layer(max_diff: float, pre: float | None) -> LayerParity:
        return LayerParity(layer="l", onnx_node="n", unit="LSB", elements=3, exact_fraction=2 / 3, max_diff=max_diff,
                           tolerance=LSB_TOLERANCE, max_pre_round_diff=pre)

    assert layer(1, 0.0001).ok  # a near-tie rounded the other way
    assert not layer(2, 0.0001).ok  # two levels: not float rounding
    assert not layer(1, 0.3).ok  # a third of a level before rounding: not float rounding either
    assert layer(1, None).ok  # graph output: no rounding step


def test_a_positively_saturated_int32_bias_is_repaired(quant_model, tiles):
    """brevitas saturates bias / (s_in s_w) >= 2^31 and its exporter casts float32 2^31 to int32 -2^31 (sign flip)."""
    model = copy.deepcopy(quant_model)
    with torch.no_grad():
        model.encoders[1].conv2.bias[0] = 1e9  # far beyond 2^31 accumulator steps
        model.encoders[1].conv2.bias[1] = -1e9  # negative saturation: exported as -2^31, which is right
    args = (tiles[0],)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "raw.onnx"  # brevitas' own exporter, without edgeseg's repair
        export_onnx_qcdq(model, args=args, export_path=str(path), dynamo=False, opset_version=17,
                         input_names=["image"], output_names=["logits"])
        raw = onnx.load(str(path))
    dq = _node(raw, "/encoders.1/conv2/bias_quant/export_handler/DequantizeLinear")
    assert numpy_helper.to_array(_tensor(raw, dq.input[0]))[:2].tolist() == [INT32_MIN, INT32_MIN]
    broken = layer_parity(raw, model, args)
    assert [p.layer for p in broken.failing] == ["encoders.1.act2"]
    assert "int32 biases saturate in /encoders.1/conv2/Conv" in broken.failure()

    assert repair_wrapped_biases(raw, model, args) == 1
    assert numpy_helper.to_array(_tensor(raw, dq.input[0]))[:2].tolist() == [INT32_MAX, INT32_MIN]
    assert layer_parity(raw, model, args).ok
