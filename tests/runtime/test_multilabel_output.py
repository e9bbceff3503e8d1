"""Bundles of INERRANT models (output_kind "sigmoid_multilabel", Petit et al. 2021): one logit channel per class
name, channels 1..K read as independent sigmoids, channel 0 unused; labels follow INERRANT's rule (class of
maximum probability, background when every probability is below 0.5). Oracle: values computed by hand for a
scripted backend."""

from __future__ import annotations

import numpy as np
import pytest

from edgeseg.data.io import Volume
from edgeseg.errors import UserError
from edgeseg.runtime.bundle import MULTILABEL_BACKGROUND, FileEntry, Manifest, ModelForm
from edgeseg.runtime.pipeline import segment_volume, sigmoid_multilabel

PREPROCESS = {"reorient": True, "target_spacing": None, "normalization": "zscore", "clip_percentiles": [0.5, 99.5],
              "label_map": {}}
SHAPE = (4, 4, 4)
LN3 = float(np.log(3.0))  # sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4


def manifest(output_kind: str = "sigmoid_multilabel") -> Manifest:
    return Manifest(spatial_dims=3, in_channels=1, class_names=["background", "anterior", "posterior"],
                    tile_size=list(SHAPE), min_input_multiple=1, preprocess=dict(PREPROCESS),
                    forms={"float": ModelForm(file="m.onnx", backend="any", precision="fp32")},
                    files={"m.onnx": FileEntry(sha256="0" * 64, bytes=0)}, output_kind=output_kind)


def test_manifest_accepts_sigmoid_multilabel_with_one_channel_per_class():
    loaded = Manifest.from_dict(manifest().to_dict())
    assert loaded.output_kind == "sigmoid_multilabel" and loaded.model_channels() == 3
    data = manifest().to_dict()
    data["output_kind"] = "sigmoid_multi_label"
    with pytest.raises(UserError, match="output_kind must be one of"):
        Manifest.from_dict(data)


def test_background_channel_is_the_largest_float32_below_one_half():
    assert np.float32(MULTILABEL_BACKGROUND) < np.float32(0.5)
    assert np.nextafter(np.float32(MULTILABEL_BACKGROUND), np.float32(1.0)) == np.float32(0.5)


def test_inerrant_rule_by_hand():
    # logits of (unused background, anterior, posterior) at five voxels
    scores = np.array([[[9.0, 9.0, 9.0, 9.0, 9.0],   # channel 0 is never read, however large
                        [-LN3, LN3, 0.0, LN3, -1e-3],
                        [-LN3, -LN3, -LN3, LN3, -5.0]]], np.float32)
    probs = sigmoid_multilabel(scores)
    expected = np.array([[[MULTILABEL_BACKGROUND] * 5,
                          [0.25, 0.75, 0.5, 0.75, 0.49975],
                          [0.25, 0.25, 0.25, 0.75, 0.0066929]]], np.float32)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    # all below 0.5 -> background; 0.75 -> anterior; exactly 0.5 -> anterior (not below 0.5); a tie 0.75/0.75 ->
    # the lower class; 0.49975 -> background
    np.testing.assert_array_equal(probs.argmax(axis=1), [[0, 1, 1, 1, 0]])
    assert scores[0, 0, 0] == 9.0  # the backend's output is not modified


def test_segment_volume_reads_sigmoids_and_labels_by_the_rule(scripted_backend):
    scores = np.full((3, *SHAPE), -LN3, np.float32)
    scores[0] = 50.0                                # the untrained background channel: ignored
    scores[1, 1:3, 1:3, 1:3] = LN3                  # an anterior cube at 3/4
    scores[2, 1:3, 1:3, 2] = 2 * LN3                # posterior 9/10 overrides anterior on its half
    scores[2, 0, 0, 0] = 0.0                        # a lone voxel at exactly 1/2: posterior
    volume = Volume(np.random.default_rng(0).normal(size=(1, *SHAPE)).astype(np.float32), np.eye(4), (1.0, 1.0, 1.0))
    seg = segment_volume(volume, manifest(), scripted_backend([scores]), probabilities=True, blend="constant")
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[1:3, 1:3, 2] = 2
    labels[0, 0, 0] = 2
    np.testing.assert_array_equal(seg.labels, labels)
    np.testing.assert_allclose(seg.probabilities[0], MULTILABEL_BACKGROUND, atol=1e-7)
    assert seg.probabilities[1, 1, 1, 1] == pytest.approx(0.75, abs=1e-6)
    assert seg.probabilities[2, 1, 1, 2] == pytest.approx(0.9, abs=1e-6)
    assert seg.probabilities[2, 0, 0, 0] == pytest.approx(0.5, abs=1e-7)
    # read as softmax logits, the huge background channel would win everywhere: the output kind matters
    as_logits = segment_volume(volume, manifest("logits"), scripted_backend([scores]), blend="constant")
    assert not as_logits.labels.any()
