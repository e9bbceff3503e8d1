"""`edgeseg bundle`: any ONNX segmentation model wrapped with a manifest from flags (torch-free)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edgeseg.errors import UserError
from edgeseg.export.third_party import make_bundle
from edgeseg.runtime.bundle import load_bundle


def _segmenter(path: Path, classes: int = 3, spatial=("H", "W"), inputs: int = 1) -> Path:
    """A 2D conv 'segmenter': input (N, 1, *spatial) -> scores (N, classes, *spatial)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((classes, 1, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["scores"], pads=[1, 1, 1, 1])]
    ins = [helper.make_tensor_value_info("input", T.FLOAT, ["N", 1, *spatial])]
    if inputs == 2:
        ins.append(helper.make_tensor_value_info("extra", T.FLOAT, [1]))
    graph = helper.make_graph(nodes, "seg", ins, [helper.make_tensor_value_info("scores", T.FLOAT, ["N", classes, *spatial])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_wrapped_model_runs_exactly_like_the_original(tmp_path):
    src = _segmenter(tmp_path / "seg.onnx")
    manifest = make_bundle(src, tmp_path / "bundle.zip", class_names=["bg", "a", "b"], tile=[32, 32],
                           min_input_multiple=8, normalization="percentile", target_spacing=[0.5, 0.5])
    bundle = load_bundle(tmp_path / "bundle.zip")
    x = np.random.default_rng(1).standard_normal((2, 1, 40, 24)).astype(np.float32)
    original = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    wrapped = bundle.ort_session("float").run(None, {"input": x})[0]
    assert np.array_equal(original, wrapped)
    m = bundle.manifest
    assert (m.spatial_dims, m.in_channels, m.tile_size, m.input_name, m.output_name) == (2, 1, [32, 32], "input", "scores")
    assert m.preprocess["normalization"] == "percentile" and m.preprocess["target_spacing"] == [0.5, 0.5]
    assert m.source["third_party"] and m.forms["float"].backend == "any" and m.parity["trt_rules"] == "passed"
    assert manifest.files == m.files


def test_fixed_spatial_size_is_the_default_tile(tmp_path):
    src = _segmenter(tmp_path / "seg.onnx", spatial=(16, 24))
    manifest = make_bundle(src, tmp_path / "b", class_names=["bg", "a", "b"])
    assert manifest.tile_size == [16, 24]


@pytest.mark.parametrize("kwargs, message", [
    ({"class_names": ["bg", "a"], "tile": [32, 32]}, "expected \\[1, 2, 32, 32\\]"),
    ({"class_names": ["bg", "a", "b"]}, "pass --tile"),
    ({"class_names": ["bg", "a", "b"], "tile": [32, 32, 32]}, "needs 2 values"),
    ({"class_names": ["bg", "a", "b"], "tile": [30, 30], "min_input_multiple": 8}, "multiples of --min-multiple"),
    ({"class_names": ["bg", "a", "b"], "tile": [32, 32], "normalization": "l2"}, "normalization"),
])
def test_flag_mistakes_are_one_clear_error(tmp_path, kwargs, message):
    src = _segmenter(tmp_path / "seg.onnx")
    with pytest.raises(UserError, match=message):
        make_bundle(src, tmp_path / "b", **kwargs)


def test_models_with_two_inputs_or_no_file_are_refused(tmp_path):
    with pytest.raises(UserError, match="2 inputs"):
        make_bundle(_segmenter(tmp_path / "two.onnx", inputs=2), tmp_path / "b", class_names=["a", "b", "c"],
                    tile=[8, 8])
    with pytest.raises(UserError, match="not found"):
        make_bundle(tmp_path / "missing.onnx", tmp_path / "b", class_names=["a"])
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a valid ONNX model"):
        make_bundle(tmp_path / "junk.onnx", tmp_path / "b", class_names=["a"])


def test_binary_sigmoid_model_segments_where_its_logit_is_positive(tmp_path):
    # ivadomed and many MONAI binary models emit one sigmoid logit. Oracle: the model's own logit
    # (run directly in ONNX Runtime on the same normalised image) is > 0 exactly where the runtime
    # labels foreground, and the foreground probability is sigmoid(logit) (scipy.special.expit).
    from scipy.special import expit

    from edgeseg.data.io import Volume
    from edgeseg.runtime.backends import open_backend
    from edgeseg.runtime.pipeline import segment_volume

    src = _segmenter(tmp_path / "seg.onnx", classes=1)
    with pytest.raises(UserError, match="exactly two names"):
        make_bundle(src, tmp_path / "bad", class_names=["bg", "a", "b"], tile=[16, 16], output_kind="sigmoid")
    with pytest.raises(UserError, match="one sigmoid channel"):
        make_bundle(_segmenter(tmp_path / "two.onnx", classes=2), tmp_path / "bad2", class_names=["bg", "fg"],
                    tile=[16, 16], output_kind="sigmoid")
    make_bundle(src, tmp_path / "bundle", class_names=["bg", "lesion"], tile=[16, 16], output_kind="sigmoid",
                normalization="none", reorient=False)
    bundle = load_bundle(tmp_path / "bundle")
    image = np.random.default_rng(2).standard_normal((16, 16)).astype(np.float32)
    volume = Volume(image[None], np.eye(4), (1.0, 1.0), None)
    backend = open_backend(bundle, "onnxruntime")
    seg = segment_volume(volume, bundle.manifest, backend, probabilities=True, tile=[16, 16])
    backend.close()
    logit = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"input": image[None, None]})[0][0, 0]
    np.testing.assert_array_equal(seg.labels, (logit > 0).astype(np.uint8))
    np.testing.assert_allclose(seg.probabilities[1], expit(logit), atol=1e-6)
    np.testing.assert_allclose(seg.probabilities.sum(axis=0), 1.0, atol=1e-6)
