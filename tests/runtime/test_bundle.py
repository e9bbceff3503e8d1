"""Bundle loading: manifest schema, hash verification and tamper refusal, INT4 expansion without `onnx`.

The bundle under test is built by hand (no torch): an int8 Q/DQ conv whose 4-bit weights are packed as INT4.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx import TensorProto as T

from edgeseg.errors import UserError
from edgeseg.runtime.bundle import MANIFEST, Manifest, McSite, load_bundle, make_mc_masks, read_manifest
from edgeseg.runtime.onnx_wire import encode_varint, inline_model, iter_fields

PREPROCESS = {"reorient": True, "target_spacing": None, "normalization": "zscore", "clip_percentiles": [0.5, 99.5],
              "label_map": {}}


def qdq_conv_model() -> onnx.ModelProto:
    """image (N, 4, H, W) -> Q/DQ (int8) -> Conv5x5(DQ(int8 weights in [-7, 7], per channel), float bias) -> logits."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-7, 8, size=(3, 4, 5, 5)).astype(np.int8)  # 300 values: 150 bytes as INT4
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "s": np.float32(0.05), "z": np.int8(0), "w": weight, "ws": rng.uniform(0.01, 0.1, 3).astype(np.float32),
        "wz": np.zeros(3, np.int8), "b": rng.standard_normal(3).astype(np.float32)}.items()]
    nodes = [helper.make_node("QuantizeLinear", ["image", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=0),
             helper.make_node("Conv", ["dq", "wf", "b"], ["logits"], pads=[2, 2, 2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", T.FLOAT, ["N", 4, "H", "W"])],
                              [helper.make_tensor_value_info("logits", T.FLOAT, ["N", 3, "H", "W"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_qdq_bundle(out: Path, **manifest_changes) -> onnx.ModelProto:
    """Pack, externalize and write the QDQ model as form 'q'; returns the unpacked original."""
    from edgeseg.export import graph as g
    from edgeseg.export.bundle_writer import write_bundle
    from edgeseg.export.packing import externalize, pack_int4_weights
    from edgeseg.runtime.bundle import Manifest, ModelForm

    original = qdq_conv_model()
    packed = g.copy(original)
    result = pack_int4_weights(packed)
    assert result.packed == 1
    blob = externalize({"q": packed})
    manifest = Manifest(spatial_dims=2, in_channels=4, class_names=["bg", "a", "b"], tile_size=[8, 8],
                        min_input_multiple=4, preprocess=dict(PREPROCESS), files={},
                        forms={"q": ModelForm(file="model_q.onnx", backend="any", precision="int8", packed_int4=True,
                                              opset=result.opset, ir_version=result.ir_version)},
                        output_name="logits")
    write_bundle(out, {"model_q.onnx": packed.SerializeToString(), "weights.bin": blob},
                 replace(manifest, **manifest_changes))
    return original


@pytest.fixture
def qdq_bundle(tmp_path) -> types.SimpleNamespace:
    """A fresh bundle directory per test, plus the writer for variants (tests cannot import a conftest)."""
    out = tmp_path / "bundle"
    original = write_qdq_bundle(out)
    return types.SimpleNamespace(path=out, original=original, write=write_qdq_bundle, model=qdq_conv_model)


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]


X = np.random.default_rng(1).standard_normal((2, 4, 8, 12)).astype(np.float32)


def test_loaded_model_is_the_original_graph(qdq_bundle):
    bundle = load_bundle(qdq_bundle.path)
    loaded = bundle.model_bytes("q")
    assert np.array_equal(_run(loaded, X), _run(qdq_bundle.original.SerializeToString(), X))
    model = onnx.load_from_string(loaded)  # the onnx package parses what the hand-written wire code produced
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8 and model.opset_import[0].version == 17
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in qdq_bundle.original.graph.initializer}
    assert weights["w"].dtype == np.int8 and np.array_equal(weights["w"], original["w"])
    assert np.array_equal(weights["ws"], original["ws"]) and np.array_equal(weights["b"], original["b"])


def test_weights_are_stored_as_int4(qdq_bundle):
    at_rest = onnx.load(str(qdq_bundle.path / "model_q.onnx"), load_external_data=False)
    types = {t.name: t.data_type for t in at_rest.graph.initializer}
    assert types["w"] == TensorProto.INT4 and at_rest.opset_import[0].version == 21
    assert (qdq_bundle.path / "weights.bin").stat().st_size == 150  # 300 4-bit values (smaller tensors stay inline)


def test_archive_and_directory_load_the_same_model(qdq_bundle, tmp_path):
    archive = tmp_path / "b.zip"
    qdq_bundle.write(archive)
    assert load_bundle(archive).model_bytes("q") == load_bundle(qdq_bundle.path).model_bytes("q")
    with zipfile.ZipFile(archive) as zf:
        assert MANIFEST in zf.namelist()


def test_loading_needs_neither_torch_nor_onnx(qdq_bundle):
    code = (f"import sys; from edgeseg.runtime.bundle import load_bundle; import edgeseg.runtime.trt_build; "
            f"b = load_bundle({str(qdq_bundle.path)!r}); b.ort_session('q'); "
            f"bad = [m for m in ('torch', 'onnx', 'google.protobuf') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sessions_do_not_keep_a_memory_pattern_unless_asked(qdq_bundle, monkeypatch):
    """ONNX Runtime's memory pattern doubled the memory above the session (measured); it is off by default."""
    monkeypatch.delenv("EDGESEG_ORT_MEM_PATTERN", raising=False)
    assert load_bundle(qdq_bundle.path).ort_session("q").get_session_options().enable_mem_pattern is False
    monkeypatch.setenv("EDGESEG_ORT_MEM_PATTERN", "1")
    assert load_bundle(qdq_bundle.path).ort_session("q").get_session_options().enable_mem_pattern is True


# ---- tampering and damage ---------------------------------------------------------------------


def test_a_modified_file_is_refused(qdq_bundle):
    path = qdq_bundle.path / "weights.bin"
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"weights.bin does not match its SHA-256"):
        load_bundle(qdq_bundle.path)


def test_a_missing_file_is_refused(qdq_bundle):
    (qdq_bundle.path / "model_q.onnx").unlink()
    with pytest.raises(UserError, match="model_q.onnx is missing"):
        load_bundle(qdq_bundle.path)


def test_a_modified_archive_member_is_refused(qdq_bundle, tmp_path):
    archive, tampered = tmp_path / "b.zip", tmp_path / "t.zip"
    qdq_bundle.write(archive)
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(tampered, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data + b"\0" if name == "model_q.onnx" else data)
    with pytest.raises(UserError, match="model_q.onnx does not match"):
        load_bundle(tampered)


def test_hashes_are_rechecked_on_every_read(qdq_bundle):
    bundle = load_bundle(qdq_bundle.path)
    (qdq_bundle.path / "weights.bin").write_bytes(b"x")  # swapped after loading
    with pytest.raises(UserError, match="SHA-256"):
        bundle.model_bytes("q")


def _edit_manifest(path, edit):
    file = path / MANIFEST
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=4), "schema version 4 is newer"),
    (lambda d: d.update(metadata={"fields": ["age"], "method": "zscore", "mean": [0], "std": [1]}),
     "field 'metadata' .* needs schema_version 2"),
    (lambda d: d.update(schema_version=2, metadata={"fields": ["age"], "method": "zscore", "mean": [0], "std": [1]}),
     r"forms.q.inputs \['image'\] do not match the model input, extra inputs \['metadata'\]"),
    (lambda d: d.update(schema_version=2, metadata={"fields": ["age"], "method": "zscore", "mean": [0], "std": [0]}),
     "metadata: metadata normalization: means must be finite and stds positive"),
    (lambda d: d.update(schema_version=2, metadata={"fields": ["age", "age"], "method": "zscore", "mean": [0, 0],
                                                    "std": [1, 1]}), "metadata.fields must be a non-empty list of distinct"),
    (lambda d: d.update(schema_version=2, metadata={"fields": ["age"], "method": "minmax", "mean": [0], "std": [1]}),
     "unknown metadata normalization 'minmax'"),
    (lambda d: d.update(schema_version=2, modalities={"names": ["t1", "t2"]}), "lists 2 modalities but in_channels is 4"),
    (lambda d: d.update(schema_version=2, modalities={"names": ["t1", "t2", "t1", "x"]}), "distinct names"),
    (lambda d: d.update(schema_version=2, modalities={"input": "image", "names": ["a", "b", "c", "d"]}),
     "must be distinct"),
    (lambda d: d.update(format="something"), "not an edgeseg bundle manifest"),
    (lambda d: d.pop("class_names"), "missing field 'class_names'"),
    (lambda d: d.update(spatial_dims=4), "spatial_dims must be 2 or 3"),
    (lambda d: d.update(in_channels="2"), "'in_channels' must be int"),
    (lambda d: d.update(tile_size=[8, 10]), "multiples of min_input_multiple"),
    (lambda d: d.update(tile_size=[8, 8, 8]), "needs 2 values"),
    (lambda d: d["files"].update({"../evil": {"sha256": "0" * 64, "bytes": 1}}), "unsafe or reserved file name"),
    (lambda d: d["forms"]["q"].update(file="other.onnx"), "not listed in files"),
    (lambda d: d["forms"]["q"].update(backend="cuda"), r"forms.q.backend must be one of"),
    (lambda d: d["forms"]["q"].update(mc=True), "mc_dropout.sites is empty"),
    (lambda d: (d["forms"]["q"].update(mc=True), d["mc_dropout"].update(sites=[{"input": "m", "channels": 3, "p": 0.1}])),
     "do not match the model input and MC mask inputs"),
    (lambda d: d["files"]["weights.bin"].update(sha256="XYZ"), "not a lowercase hex SHA-256"),
    (lambda d: d["mc_dropout"].update(sites=[{"input": "m", "channels": 3, "p": 1.5}]), r"p must be within \(0, 1\)"),
    (lambda d: d["preprocess"].update(normalization="l2"), "normalization"),
    (lambda d: d.update(output_kind="softmax"), "output_kind must be one of"),
])
def test_an_invalid_manifest_is_refused_with_the_field_named(qdq_bundle, edit, message):
    _edit_manifest(qdq_bundle.path, edit)
    with pytest.raises(UserError, match=message):
        load_bundle(qdq_bundle.path)


def test_unreadable_bundles_are_clear_errors(qdq_bundle, tmp_path):
    (qdq_bundle.path / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(qdq_bundle.path)
    with pytest.raises(UserError, match="bundle not found"):
        load_bundle(tmp_path / "nothing")
    (tmp_path / "file.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a bundle directory or .zip"):
        load_bundle(tmp_path / "file.zip")


def test_manifest_round_trips_through_json(qdq_bundle):
    manifest = load_bundle(qdq_bundle.path).manifest
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again == manifest
    assert manifest.to_dict()["mc_dropout"] == {"available": False, "sites": []}


def test_pick_form_prefers_the_backend_specific_form(qdq_bundle):
    m = load_bundle(qdq_bundle.path).manifest
    assert m.pick_form("onnxruntime") == "q" and m.pick_form("tensorrt") == "q"  # backend "any"
    with pytest.raises(UserError, match="no onnxruntime form for Monte Carlo dropout"):
        m.pick_form("onnxruntime", mc=True)
    with pytest.raises(UserError, match="did you mean 'q'"):
        m.form("qq")


# ---- MC masks -----------------------------------------------------------------------------


def test_mc_masks_are_channel_dropout_masks(qdq_bundle):
    m = replace(load_bundle(qdq_bundle.path).manifest, mc_sites=[McSite("m0", 64, 0.25), McSite("m1", 8, 0.5)])
    masks = make_mc_masks(m, 50, np.random.default_rng(0))
    assert masks["m0"].shape == (50, 64, 1, 1) and masks["m0"].dtype == np.float32
    assert set(np.unique(masks["m0"])) == {0.0, np.float32(1 / 0.75)}
    keep = np.mean(masks["m0"] > 0)  # 3200 Bernoulli(0.75) draws: sd 0.0077
    assert abs(keep - 0.75) < 0.04
    assert abs(masks["m0"].mean() - 1.0) < 0.05  # inverted dropout keeps the expected activation
    again = make_mc_masks(m, 50, np.random.default_rng(0))
    assert all(np.array_equal(masks[k], again[k]) for k in masks)


# ---- the wire-format reader against the onnx package ------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31, 2**62, -1, -300])
def test_varints_round_trip(value):
    data = b"\x08" + encode_varint(value)  # field 1, varint
    (field, wire, decoded, _), = iter_fields(data)
    assert (field, wire) == (1, 0)
    assert decoded == (value if value >= 0 else value + 2**64)


def test_inline_model_keeps_everything_else(qdq_bundle):
    model = qdq_bundle.model()
    model.doc_string = "kept"
    model.graph.node[3].doc_string = "also kept"
    data = model.SerializeToString()
    out = onnx.load_from_string(inline_model(data, lambda *a: b"", expand_int4=True))
    assert out == model  # nothing external, no INT4: an identical model
    changed = onnx.load_from_string(inline_model(data, lambda *a: b"", opset=18, ir_version=9))
    assert changed.opset_import[0].version == 18 and changed.ir_version == 9 and changed.graph == model.graph
