"""Flip TTA: flip sets, invertibility, TTA inside the tile pass vs whole-volume TTA, sample reduction."""

import numpy as np
import pytest
from scipy import ndimage

from edgeseg.errors import UserError
from edgeseg.runtime.tiling import sliding_window_probabilities, tile_starts
from edgeseg.runtime.tta import flip, flip_sets, reduce_samples, split_samples, tta_predictor, undo_flip


def test_flip_sets():
    assert flip_sets(3) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert flip_sets(2, [1]) == [(), (1,)]
    assert flip_sets(3, [2, 0]) == [(), (2,), (0,), (2, 0)]
    for bad in ([2], [0, 0], [-1]):
        with pytest.raises(UserError, match="TTA axes"):
            flip_sets(2, bad)


def test_undo_flip_inverts_flip_and_flips_only_spatial_axes():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 6))
    for axes in flip_sets(3):
        np.testing.assert_array_equal(undo_flip(flip(x, axes), axes), x)
    np.testing.assert_array_equal(flip(x, (0, 2)), x[:, :, ::-1, :, ::-1])  # oracle: plain slicing


def _conv_softmax(batch):
    """A non-equivariant predictor: an asymmetric 3D kernel per class (constant borders), then softmax."""
    kernels = np.random.default_rng(42).normal(size=(3, 3, 3, 3))
    logits = np.stack([np.stack([ndimage.correlate(b[0], k, mode="constant") for k in kernels]) for b in batch])
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_tta_inside_the_tile_pass_equals_whole_volume_tta():
    """Mirror-symmetric tile placement (steps of exactly 8) makes the two the same computation order aside."""
    shape, tile = (40, 48, 32), (16, 16, 16)
    for s, t in zip(shape, tile):  # the premise
        starts = tile_starts(s, t, 0.5)
        assert starts == [s - t - x for x in reversed(starts)]
    image = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
    flips = flip_sets(3)
    ours = split_samples(sliding_window_probabilities(image, tta_predictor(_conv_softmax, flips), tile,
                                                      batch_size=4), len(flips))
    for sample, f in zip(ours, flips):
        whole = flip(sliding_window_probabilities(np.ascontiguousarray(flip(image[None], f))[0], _conv_softmax, tile,
                                                  batch_size=4)[None], f)[0]
        np.testing.assert_allclose(sample, whole, atol=1e-6)
    assert np.abs(ours[0] - ours[-1]).max() > 1e-2  # the predictor is not flip-equivariant: samples differ


def test_equivariant_predictor_gives_identical_samples():
    image = np.random.default_rng(1).normal(size=(1, 30, 26, 20)).astype(np.float32)
    square = lambda b: np.concatenate([b**2, -b], axis=1)  # pointwise, so flip-equivariant
    flips = flip_sets(3)
    samples = split_samples(sliding_window_probabilities(image, tta_predictor(square, flips), (16, 16, 16)), 8)
    plain = sliding_window_probabilities(image, square, (16, 16, 16))
    for s in samples:
        np.testing.assert_allclose(s, plain, atol=1e-6)


def test_samples_are_aligned_back_and_identity_comes_first():
    image = np.zeros((1, 1, 8, 8), np.float32)
    image[0, 0, 0, 0] = 1.0
    shifted = lambda b: np.concatenate([np.roll(b, 1, axis=2), b], axis=1)  # channel 0 is not equivariant
    out = split_samples(tta_predictor(shifted, flip_sets(2))(image)[0], 4)  # (S, C, H, W)
    for s in out:  # channel 1 (identity) is aligned back in every sample
        np.testing.assert_array_equal(s[1], image[0, 0])
    np.testing.assert_array_equal(out[0, 0], np.roll(image[0, 0], 1, axis=0))  # sample 0: no flip
    np.testing.assert_array_equal(out[1, 0], np.roll(image[0, 0], -1, axis=0))  # flipped axis 0: shift reversed


def test_reduce_samples():
    rng = np.random.default_rng(3)
    samples = rng.dirichlet(np.ones(3), size=(4, 5, 6)).transpose(0, 3, 1, 2).astype(np.float32)  # (S=4, C=3, 5, 6)
    mean, labels = reduce_samples(samples.reshape(12, 5, 6), 4)
    np.testing.assert_allclose(mean, samples.mean(axis=0), atol=1e-7)
    assert labels.dtype == np.uint8 and labels.shape == (4, 5, 6)
    for s in range(4):
        np.testing.assert_array_equal(labels[s], np.argmax(samples[s], axis=0))
    with pytest.raises(ValueError, match="do not split"):
        split_samples(np.zeros((7, 2)), 2)
