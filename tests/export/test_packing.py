"""INT4 storage at rest: packing checked against ONNX's own INT4 codec, the size ratio, and load-time expansion."""

from __future__ import annotations

from dataclasses import replace

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from edgeseg.config import ModelConfig
from edgeseg.runtime.bundle import load_bundle
from edgeseg.runtime.onnx_wire import pack_int4, unpack_int4


@pytest.mark.parametrize("count", [1, 2, 7, 64])
def test_int4_packing_agrees_with_onnx(count):
    values = np.random.default_rng(count).integers(-8, 8, size=count).astype(np.int8)
    ours = TensorProto(name="w", data_type=TensorProto.INT4, dims=[count], raw_data=pack_int4(values))
    assert np.array_equal(numpy_helper.to_array(ours).astype(np.int8), values)  # ONNX decodes what we encode
    theirs = numpy_helper.from_array(values.astype(ml_dtypes.int4), "w")  # ONNX encodes, we decode
    assert np.array_equal(unpack_int4(theirs.raw_data, count), values)


def test_pack_int4_refuses_values_outside_4_bits():
    with pytest.raises(ValueError):
        pack_int4(np.array([8], np.int8))


@pytest.fixture(scope="module")
def bundles_2d(tmp_path_factory, kit):
    """The same 2D U-Net architecture exported as float32 and as 4/6 (weights dominate the graph)."""
    cfg = ModelConfig(depth=2, base_width=32, norm="batch", dropout=0.0, decoder="upsample")
    tile = [32, 32]
    info = kit.bundle_info(spatial_dims=2, tile=tile)
    root = tmp_path_factory.mktemp("sizes")
    float_result = kit.export_to(kit.float_unet(cfg, spatial_dims=2), info, root / "float")
    quant_result = kit.export_to(kit.quant_unet(cfg, spatial_dims=2, tile=tile), replace(info, bits="4/6"),
                                 root / "quant")
    return float_result, quant_result


def test_a_4_6_bundle_is_about_8x_smaller_than_float(bundles_2d):
    float_result, quant_result = bundles_2d
    # The manifest (a few kB of JSON: parity rows, hashes) does not grow with the model, and on this small
    # test model it would dominate the ratio; the model files are compared, the manifest bounded apart.
    def model_bytes(path):
        return sum(p.stat().st_size for p in path.iterdir() if p.name != "manifest.json")

    float_bytes, quant_bytes = model_bytes(float_result.path), model_bytes(quant_result.path)
    weights = quant_result.manifest.sizes["weights"]
    print(f"float model files {float_bytes} B, 4/6 {quant_bytes} B, ratio {float_bytes / quant_bytes:.2f}; "
          f"weights {weights}")
    assert float_bytes / quant_bytes >= 6.5  # 8x on 4-bit weights, less the 8-bit first/last convs and graph text
    assert weights["float32_bytes"] / weights["at_rest_bytes"] >= 7.0  # the weights alone (measured 7.57)
    assert (quant_result.path / "manifest.json").stat().st_size < 32_000
    assert weights["at_rest_bytes"] <= 1.1 * weights["nominal_bytes"]  # stored at (about) the nominal width
    assert weights["float32_bytes"] == float_result.manifest.sizes["weights"]["float32_bytes"]


def test_weights_are_int4_at_rest_and_int8_when_loaded(bundles_2d):
    _, quant_result = bundles_2d
    bundle = load_bundle(quant_result.path)
    for name in ("cpu_int8", "trt"):
        form = bundle.manifest.forms[name]
        at_rest = onnx.load(str(quant_result.path / form.file), load_external_data=False)
        assert any(t.data_type == TensorProto.INT4 for t in at_rest.graph.initializer)
        assert next(o.version for o in at_rest.opset_import if o.domain == "") == 21
        loaded = onnx.load_from_string(bundle.model_bytes(name))
        assert not any(t.data_type == TensorProto.INT4 for t in loaded.graph.initializer)
        assert next(o.version for o in loaded.opset_import if o.domain == "") == form.opset == 17
        assert loaded.ir_version == form.ir_version
        onnx.checker.check_model(loaded, full_check=True)


def test_files_at_rest_run_in_onnxruntime_with_the_same_output(bundles_2d):
    """The at-rest files are valid ONNX by themselves (INT4 DequantizeLinear, external data)."""
    _, quant_result = bundles_2d
    bundle = load_bundle(quant_result.path)
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for name in ("cpu_int8", "trt"):
        direct = ort.InferenceSession(str(quant_result.path / bundle.manifest.forms[name].file), options,
                                      providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
        loaded = ort.InferenceSession(bundle.model_bytes(name), options,
                                      providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
        assert np.array_equal(direct, loaded)
