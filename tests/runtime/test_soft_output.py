"""Bundles of SoftSeg models (output_kind "normalized_relu"): the runtime serves soft maps and labels as their
argmax. Binary (2 classes, ivadomed's one-channel model): f = relu(s1 - s0) / max relu(s1 - s0) per tile sample,
served as (1 - f, f). More classes: relu(s) / max relu(s) per tile sample, then divided by the channel sum at each
voxel (unchanged). Oracle: values computed by hand for a scripted backend."""

from __future__ import annotations

import numpy as np
import pytest

from edgeseg.data.io import Volume
from edgeseg.errors import UserError
from edgeseg.runtime.bundle import FileEntry, Manifest, ModelForm
from edgeseg.runtime.pipeline import segment_volume

PREPROCESS = {"reorient": True, "target_spacing": None, "normalization": "zscore", "clip_percentiles": [0.5, 99.5],
              "label_map": {}}
SHAPE = (4, 4, 4)


def soft_manifest(output_kind: str = "normalized_relu", class_names: tuple[str, ...] = ("background", "cord")) -> Manifest:
    return Manifest(spatial_dims=3, in_channels=1, class_names=list(class_names), tile_size=list(SHAPE),
                    min_input_multiple=1, preprocess=dict(PREPROCESS),
                    forms={"float": ModelForm(file="m.onnx", backend="any", precision="fp32")},
                    files={"m.onnx": FileEntry(sha256="0" * 64, bytes=0)}, output_kind=output_kind)


def test_manifest_accepts_normalized_relu_with_one_channel_per_class():
    manifest = Manifest.from_dict(soft_manifest().to_dict())
    assert manifest.output_kind == "normalized_relu" and manifest.model_channels() == 2
    data = soft_manifest().to_dict()
    data["output_kind"] = "normalised_relu"
    with pytest.raises(UserError, match="output_kind must be one of"):
        Manifest.from_dict(data)


def test_soft_maps_and_labels_by_hand(scripted_backend):
    scores = np.empty((2, *SHAPE), np.float32)
    scores[0], scores[1] = 1.0, -2.0           # outside: s1 - s0 = -3 -> f = 0, background
    scores[:, 1:3, 1:3, 1:3] = [[[[-1.0]]], [[[3.0]]]]  # a 2^3 cord: s1 - s0 = 4, the tile's maximum -> f = 1
    scores[1, 0, 0, 0] = 3.5                   # s1 - s0 = 2.5 -> f = 2.5 / 4 = 0.625
    scores[:, 3, 3, 3] = [2.0, 3.0]            # s1 - s0 = 1 -> f = 0.25: both scores positive, still background
    volume = Volume(np.random.default_rng(0).normal(size=(1, *SHAPE)).astype(np.float32), np.eye(4), (1.0, 1.0, 1.0))
    seg = segment_volume(volume, soft_manifest(), scripted_backend([scores]), probabilities=True, blend="constant")
    expected = np.zeros((2, *SHAPE), np.float32)
    expected[0] = 1.0
    expected[:, 1:3, 1:3, 1:3] = [[[[0.0]]], [[[1.0]]]]
    expected[:, 0, 0, 0] = [0.375, 0.625]
    expected[:, 3, 3, 3] = [0.75, 0.25]
    np.testing.assert_allclose(seg.probabilities, expected, atol=1e-6)
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[0, 0, 0] = 1
    np.testing.assert_array_equal(seg.labels, labels)
    # the same scores read as logits give softmax probabilities instead: the output kind matters
    as_logits = segment_volume(volume, soft_manifest("logits"), scripted_backend([scores]), probabilities=True, blend="constant")
    assert as_logits.probabilities[1, 0, 0, 0] == pytest.approx(1 / (1 + np.exp(-2.5)), abs=1e-6)


def test_multiclass_soft_maps_by_hand_are_unchanged(scripted_backend):
    """Three classes keep the channel-sum form: the tile maximum (4) cancels, each voxel's relu divided by its sum."""
    scores = np.empty((3, *SHAPE), np.float32)
    scores[:] = np.array([1.0, -1.0, -1.0], np.float32).reshape(3, 1, 1, 1)  # relu / 4 = [.25, 0, 0] -> [1, 0, 0]
    scores[:, 0, 0, 0] = [-1.0, 4.0, 0.0]      # the tile maximum: [0, 1, 0]
    scores[:, 1, 1, 1] = [1.0, 2.0, 1.0]       # [.25, .5, .25] sums to 1: unchanged
    scores[:, 2, 2, 2] = [-1.0, -1.0, 0.0]     # nothing positive: zeros, argmax background
    scores[:, 3, 3, 3] = [0.0, 1.0, 3.0]       # [0, .25, .75]
    volume = Volume(np.random.default_rng(1).normal(size=(1, *SHAPE)).astype(np.float32), np.eye(4), (1.0, 1.0, 1.0))
    manifest = soft_manifest(class_names=("background", "anterior", "posterior"))
    seg = segment_volume(volume, manifest, scripted_backend([scores]), probabilities=True, blend="constant")
    expected = np.zeros((3, *SHAPE), np.float32)
    expected[0] = 1.0
    expected[:, 0, 0, 0] = [0.0, 1.0, 0.0]
    expected[:, 1, 1, 1] = [0.25, 0.5, 0.25]
    expected[:, 2, 2, 2] = [0.0, 0.0, 0.0]
    expected[:, 3, 3, 3] = [0.0, 0.25, 0.75]
    np.testing.assert_allclose(seg.probabilities, expected, atol=1e-6)
    labels = np.zeros(SHAPE, np.uint8)
    labels[0, 0, 0], labels[1, 1, 1], labels[3, 3, 3] = 1, 1, 2
    np.testing.assert_array_equal(seg.labels, labels)
