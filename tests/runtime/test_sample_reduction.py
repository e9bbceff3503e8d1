"""Averaging samples per tile batch (no per-sample outputs asked for) vs keeping every sample.

Oracle: each sample (flip set x MC pass) tiled on its own by `sliding_window_probabilities` with a
hand-written predictor (flip the tiles, run the model, softmax, flip back), independent of
`tta_predictor` and `model_predictor`. Blending is linear, so the mean of the blended samples equals
blending the per-tile mean; the two differ only by float32 rounding (probabilities in [0, 1], means
of at most 16 terms: measured up to 2.4e-7, asserted at 1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from edgeseg.data.io import Volume
from edgeseg.runtime.bundle import FileEntry, Manifest, ModelForm
from edgeseg.runtime.pipeline import Sampling, model_predictor, predict_on_grid, segment_volume
from edgeseg.runtime.tiling import sliding_window_probabilities
from edgeseg.runtime.tta import flip_sets
from edgeseg.runtime.uncertainty import entropy_map

CLASSES = ["background", "a", "b"]
TILE = (8, 8, 8)
ATOL = 1e-6  # float32 rounding of sums of at most 16 probabilities, see the module docstring


class RampBackend:
    """Deterministic per tile, not flip-equivariant (a ramp along each tile axis), scaled by an MC mask."""

    name, form, description = "ramp", "float", "ramp"

    def run(self, image, masks=None):
        spatial = image.shape[2:]
        ramp = sum(np.linspace(-1, 1, s, dtype=np.float32).reshape([-1 if i == a else 1 for i in range(3)]) * (a + 1)
                   for a, s in enumerate(spatial))
        x = image[:, 0]
        logits = np.stack([x + ramp, 1.5 * np.sin(2 * x) - ramp, 0.5 * x * x + 0.3 * ramp], axis=1)
        scale = 1.0 if masks is None else masks["drop"].reshape(len(image), 1, 1, 1, 1)
        return (logits * scale).astype(np.float32)

    def close(self):
        pass


def manifest() -> Manifest:
    return Manifest(spatial_dims=3, in_channels=1, class_names=list(CLASSES), tile_size=list(TILE),
                    min_input_multiple=1,
                    preprocess={"reorient": True, "target_spacing": None, "normalization": "none",
                                "clip_percentiles": [0.5, 99.5], "label_map": {}},
                    forms={"float": ModelForm(file="m.onnx", backend="any", precision="fp32")},
                    files={"m.onnx": FileEntry(sha256="0" * 64, bytes=0)})


def reference_samples(image, sampling: Sampling) -> np.ndarray:
    """Every sample blended on its own. Shape: (C, *P) -> (S, K, *P), s = flip index * N + MC pass."""
    backend = RampBackend()
    out = []
    for f in sampling.flips:
        axes = [a + 2 for a in f]
        for masks in sampling.mc_masks or [None]:
            def predict(batch, masks=masks, axes=axes):
                repeated = None if masks is None else {k: np.repeat(v, len(batch), 0) for k, v in masks.items()}
                logits = backend.run(np.ascontiguousarray(np.flip(batch, axes)), repeated)
                return np.flip(softmax(logits, axis=1), axes)
            out.append(sliding_window_probabilities(image, predict, TILE, batch_size=2))
    return np.stack(out)


def mc_masks(values) -> list[dict[str, np.ndarray]]:
    return [{"drop": np.full((1, 1, 1, 1, 1), v, np.float32)} for v in values]


@pytest.mark.parametrize("flips,passes", [(flip_sets(3), (0.6, 1.7)), (flip_sets(3, [0, 2]), ()),
                                         ([()], (0.5, 1.0, 2.0))])
@pytest.mark.parametrize("shape", [(20, 18, 13), (12, 18, 6)])  # the second is padded along its last axis
def test_mean_path_equals_the_mean_of_the_per_sample_path(flips, passes, shape):
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    sampling = Sampling(flips=list(flips), mc_masks=mc_masks(passes))
    count = sampling.num_samples
    reference = reference_samples(image, sampling)  # (S, K, *P)
    expected = reference.mean(axis=0, dtype=np.float64)
    common = {"num_classes": 3, "model_dims": 3, "tile": TILE, "batch_size": 2, "keep_probabilities": True}
    kept = predict_on_grid(image, model_predictor(RampBackend(), manifest(), sampling, keep_samples=True,
                                                  batch_size=2), num_samples=count, keep_uncertainty=True, **common)
    averaged = predict_on_grid(image, model_predictor(RampBackend(), manifest(), sampling, keep_samples=False,
                                                      batch_size=2), num_samples=1, **common)
    np.testing.assert_allclose(kept.probabilities, expected, atol=ATOL)
    np.testing.assert_allclose(averaged.probabilities, expected, atol=ATOL)
    np.testing.assert_allclose(averaged.probabilities, kept.probabilities, atol=ATOL)
    top2 = np.sort(expected, axis=0)[-2:]
    clear = top2[1] - top2[0] > 10 * ATOL  # labels compared where no rounding can flip the argmax
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(averaged.labels[clear], expected.argmax(0)[clear])
    np.testing.assert_array_equal(averaged.labels[clear], kept.labels[clear])
    np.testing.assert_allclose(kept.entropy, entropy_map(expected.astype(np.float32)), atol=1e-5)
    ref_top2 = np.sort(reference, axis=1)[:, -2:]
    sure = ref_top2[:, 1] - ref_top2[:, 0] > 10 * ATOL
    np.testing.assert_array_equal(kept.sample_labels[sure], reference.argmax(1)[sure])
    assert averaged.sample_labels is None and averaged.entropy is None
    assert np.abs(reference[0] - reference[-1]).max() > 0.05  # samples really differ: the means are not trivial


def test_segment_volume_with_and_without_uncertainty_agree():
    """Through preprocessing, tiling and the return to the input grid: --tta alone vs --tta --uncertainty."""
    array = np.random.default_rng(1).normal(size=(1, 14, 12, 10)).astype(np.float32)
    volume = Volume(array, np.eye(4), (1.0, 1.0, 1.0))
    plain = segment_volume(volume, manifest(), RampBackend(), tta_axes=[0, 1, 2], probabilities=True)
    kept = segment_volume(volume, manifest(), RampBackend(), tta_axes=[0, 1, 2], probabilities=True, uncertainty=True)
    assert plain.uncertainty is None and kept.uncertainty is not None
    np.testing.assert_allclose(plain.probabilities, kept.probabilities, atol=ATOL)
    expected = reference_samples(array, Sampling(flips=flip_sets(3))).mean(axis=0)  # normalization "none", RAS
    np.testing.assert_allclose(plain.probabilities, expected, atol=ATOL)
