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


def test_float_gate_scales_with_the_outputs_magnitude():
    """The gate is absolute for logit-sized outputs and relative for large ones (an untrained Count-ception's
    heatmaps reach 120 and differed by 2.1e-4 between ONNX Runtime and PyTorch: float32 rounding, not a bug)."""
    from edgeseg.export.parity import difference
    from edgeseg.export.run_export import float_tolerance

    def worst_case(magnitude: float, delta: float):
        reference = np.full((1, 2, 4, 4), magnitude, np.float32)
        reference[0, 1] = 0.0
        actual = reference.copy()
        actual[0, 0, 0, 0] += delta
        d = difference(actual, reference)
        assert d.reference_max_abs == magnitude and np.isclose(d.max_abs, delta, rtol=0.05)  # float32 steps
        return d.max_abs <= float_tolerance(d)

    assert worst_case(5.0, 5e-5) and not worst_case(5.0, 3e-4)  # logits: 1e-4 + 5e-5
    assert worst_case(120.0, 2.1e-4) and not worst_case(120.0, 2e-3)  # heatmaps: 1e-4 + 1.2e-3
