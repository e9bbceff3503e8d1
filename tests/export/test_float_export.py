"""Float export: ONNX Runtime against PyTorch (the independent oracle), dynamic axes, valid ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from edgeseg.runtime.bundle import load_bundle

FLOAT_TOLERANCE = 1e-4  # max |delta logit|, float32 (issue 4)


def test_float_bundle_matches_pytorch_on_new_shapes(float_export, float_model, kit):
    bundle = load_bundle(float_export.path)
    session = bundle.ort_session("float")
    # batch 2 and a tile the export never saw: the batch and spatial axes are dynamic
    x = torch.randn(2, 1, 20, 12, 16, generator=torch.Generator().manual_seed(1))
    out = session.run(None, {"image": x.numpy()})[0]
    ref = kit.torch_out(float_model, x)
    assert out.shape == (2, len(kit.CLASSES), 20, 12, 16)
    assert np.abs(out - ref).max() <= FLOAT_TOLERANCE


def test_float_export_reports_its_parity(float_export):
    parity = float_export.manifest.parity["float_vs_pytorch"]
    assert 0 <= parity["max_abs"] <= FLOAT_TOLERANCE
    assert any("float ONNX vs PyTorch" in line for line in float_export.summary)


def test_loaded_float_model_is_valid_onnx_at_a_recent_opset(float_export):
    bundle = load_bundle(float_export.path)
    model = onnx.load_from_string(bundle.model_bytes("float"))
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["N", "", "D", "H", "W"]
    assert bundle.manifest.forms["float"].backend == "any"
    assert bundle.manifest.bits["nominal"] == "fp32"


def test_manifest_describes_the_model(float_export, kit):
    m = load_bundle(float_export.path).manifest
    assert (m.spatial_dims, m.in_channels, m.class_names) == (3, 1, kit.CLASSES)
    assert m.tile_size == [16, 16, 16] and m.min_input_multiple == 4
    assert m.preprocess["normalization"] == "zscore"
    assert set(m.files) == {"model.onnx", "model_mc.onnx", "weights.bin"}
