"""Bundles of SoftSeg models (output_kind "normalized_relu"): the runtime serves soft maps (relu(s) / max relu(s)
per tile sample, then divided by the channel sum at each voxel) and labels as their argmax. Oracle: values
computed by hand for a scripted backend."""

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


def soft_manifest(output_kind: str = "normalized_relu") -> Manifest:
    return Manifest(spatial_dims=3, in_channels=1, class_names=["background", "cord"], tile_size=list(SHAPE),
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
    scores[0], scores[1] = 1.0, -2.0           # outside: background score 1, cord negative
    scores[:, 1:3, 1:3, 1:3] = [[[[-1.0]]], [[[3.0]]]]  # a 2^3 cord: max relu = 3 over the tile
    scores[1, 0, 0, 0] = 1.5                   # a weak cord voxel: [1, 1.5] / 3 = [1/3, 1/2] -> / (5/6)
    volume = Volume(np.random.default_rng(0).normal(size=(1, *SHAPE)).astype(np.float32), np.eye(4), (1.0, 1.0, 1.0))
    seg = segment_volume(volume, soft_manifest(), scripted_backend([scores]), probabilities=True, blend="constant")
    expected = np.zeros((2, *SHAPE), np.float32)
    expected[0] = 1.0                          # [1/3, 0] / (1/3)
    expected[0, 1:3, 1:3, 1:3] = 0.0
    expected[1, 1:3, 1:3, 1:3] = 1.0
    expected[:, 0, 0, 0] = [0.4, 0.6]
    np.testing.assert_allclose(seg.probabilities, expected, atol=1e-6)
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[0, 0, 0] = 1
    np.testing.assert_array_equal(seg.labels, labels)
    # the same scores read as logits give softmax probabilities instead: the output kind matters
    as_logits = segment_volume(volume, soft_manifest("logits"), scripted_backend([scores]), probabilities=True, blend="constant")
    assert as_logits.probabilities[1, 0, 0, 0] == pytest.approx(1 / (1 + np.exp(-0.5)), abs=1e-6)
