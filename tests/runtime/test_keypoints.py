"""Keypoint bundles (output_kind "heatmap"): manifest section, the runtime's heatmap activation, and export ->
`edgeseg segment` end to end: heatmaps NIfTI + keypoints JSON that agree with PyTorch's decoded heatmaps.
(`edgeseg evaluate BUNDLE` on keypoint bundles: tests/runtime/test_evaluate_keypoints.py.)

Oracles: sigmoid values by hand; the PyTorch model run on the same preprocessed image, decoded with the same
rule; world coordinates from nibabel's own `apply_affine` on the input file's affine.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from edgeseg.errors import UserError
from edgeseg.runtime.bundle import FileEntry, Manifest, ModelForm
from edgeseg.runtime.pipeline import heatmaps, segment_options

PREPROCESS = {"reorient": True, "target_spacing": None, "normalization": "zscore", "clip_percentiles": [0.5, 99.5],
              "label_map": {}}
CLASSES = ["background", "disc1", "disc2"]
DECODING = {"radius_mm": 3.0, "threshold": 0.5, "max_per_class": 2}


def manifest(output_kind: str = "heatmap", keypoints: dict | None = None) -> Manifest:
    return Manifest(spatial_dims=2, in_channels=1, class_names=list(CLASSES), tile_size=[16, 16],
                    min_input_multiple=1, preprocess=dict(PREPROCESS),
                    forms={"float": ModelForm(file="m.onnx", backend="any", precision="fp32")},
                    files={"m.onnx": FileEntry(sha256="0" * 64, bytes=0)}, output_kind=output_kind,
                    keypoints=keypoints)


def test_manifest_keypoints_section():
    loaded = Manifest.from_dict(manifest(keypoints=dict(DECODING)).to_dict())
    assert loaded.output_kind == "heatmap" and loaded.keypoints == DECODING and loaded.model_channels() == 3
    assert "keypoints" not in manifest("logits").to_dict()  # other bundles stay as they were
    with pytest.raises(UserError, match="only|for output_kind 'heatmap'"):
        Manifest.from_dict(manifest("logits", keypoints=dict(DECODING)).to_dict())
    with pytest.raises(UserError, match="threshold"):
        Manifest.from_dict(manifest(keypoints={"threshold": 2.0}).to_dict())
    with pytest.raises(UserError, match="--uncertainty"):
        segment_options(manifest(), tta=True, uncertainty=True)
    assert segment_options(manifest()).probabilities  # the heatmaps are always the output


def test_runtime_heatmaps_by_hand_and_as_training_reads_them():
    torch = pytest.importorskip("torch")
    from edgeseg.train.keypoints import heatmap_activation

    scores = np.array([[[7.0, -7.0], [0.0, np.log(3.0)], [np.log(1 / 9), 50.0]]], np.float32)  # (1, 3, 2)
    out = heatmaps(scores)
    np.testing.assert_allclose(out, [[[0.0, 0.0], [0.5, 0.75], [0.1, 1.0]]], atol=1e-6)
    np.testing.assert_allclose(out, heatmap_activation(torch.from_numpy(scores)).numpy(), atol=1e-7)
    assert scores[0, 0, 0] == 7.0  # the backend's output is not modified


def test_export_and_segment_write_keypoints_that_match_pytorch(tmp_path):
    torch = pytest.importorskip("torch")
    from edgeseg.data.heatmaps import KeypointDecoding, decode_keypoints
    from edgeseg.data.io import read_image
    from edgeseg.data.preprocess import PreprocessSpec, preprocess_case, undo_spatial
    from edgeseg.export.bundle_writer import write_bundle
    from edgeseg.export.run_export import BundleInfo, export_model
    from edgeseg.nets import create_model
    from edgeseg.runtime.pipeline import segment_files
    from edgeseg.train.keypoints import predict_heatmaps

    torch.manual_seed(0)
    model = create_model("countception", spatial_dims=2, in_channels=1, out_channels=3, base_width=1).eval()
    with torch.no_grad():
        model.head.bias.zero_()  # heatmaps around 0.5 (not the trained-from prior 0.01): peaks above threshold
    info = BundleInfo(spatial_dims=2, in_channels=1, class_names=list(CLASSES), tile_size=[24, 20],
                      preprocess=dict(PREPROCESS), output_kind="heatmap", keypoints=dict(DECODING))
    result = export_model(model, info)
    bundle = tmp_path / "bundle"
    write_bundle(bundle, result.files, result.manifest)

    # a 2D NIfTI whose first axis runs right to left (reoriented before the model, restored after), with
    # anisotropic voxels and an offset: voxel and world positions differ on every axis
    affine = np.array([[-0.8, 0, 0, 30.0], [0, 1.2, 0, -7.0], [0, 0, 1.0, 2.5], [0, 0, 0, 1]])
    image = np.random.default_rng(1).normal(size=(24, 20)).astype(np.float32)
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), str(path))
    out = tmp_path / "out"
    segment_files(bundle, [path], out, backend="onnxruntime")
    record = json.loads((out / "case_keypoints.json").read_text())
    written = np.asarray(nib.load(str(out / "case_heatmaps.nii.gz")).dataobj)
    assert np.allclose(nib.load(str(out / "case_heatmaps.nii.gz")).affine, affine)

    # PyTorch on the same preprocessed image, back on the input's grid, decoded with the bundle's rule
    volume = read_image(path)
    spec = PreprocessSpec.from_dict(PREPROCESS)
    prepared, _, _ = preprocess_case(volume, None, spec)
    reference = undo_spatial(predict_heatmaps(model, prepared, (24, 20), torch.device("cpu"), 2), spec, volume)
    np.testing.assert_allclose(np.moveaxis(written[:, :, 0, :], -1, 0), reference[1:], atol=1e-4)
    points = decode_keypoints(reference[1:], volume.spacing, [1, 2], KeypointDecoding(**DECODING))
    assert len(points) >= 2  # something to compare
    scores = sorted(p.score for p in points)
    assert min(np.diff(scores), default=1.0) > 1e-3  # no near-ties that float differences could reorder

    assert record["heatmap_classes"] == ["disc1", "disc2"] and record["decoding"] == DECODING
    got = record["keypoints"]
    assert [(r["label"], r["voxel"]) for r in got] == [(p.label, list(p.position)) for p in points]
    for r, p in zip(got, points):
        assert r["class"] == CLASSES[p.label] and r["score"] == pytest.approx(p.score, abs=1e-4)
        world = nib.affines.apply_affine(nib.load(str(path)).affine, [*p.position, 0.0])  # as stored (float32)
        np.testing.assert_allclose(r["world_mm"], world, atol=1e-9)
        assert np.abs(np.asarray(r["world_mm"][:2]) - r["voxel"]).min() > 0.1  # world is not voxel
