import numpy as np
import pytest

from edgeseg.errors import UserError
from edgeseg.runtime.tiling import sliding_window_probabilities
from edgeseg.runtime.tta import flip, flip_sets, split_samples, tta_predictor


def test_flip_sets():
    assert flip_sets(3) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert flip_sets(2, [1]) == [(), (1,)]
    with pytest.raises(UserError, match="TTA axes"):
        flip_sets(2, [2])


def test_flip_is_invertible():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 6))
    for axes in flip_sets(3):
        np.testing.assert_array_equal(flip(flip(x, axes), axes), x)


def test_equivariant_predictor_gives_identical_samples_through_the_tiler():
    image = np.random.default_rng(1).normal(size=(1, 30, 26, 20)).astype(np.float32)
    square = lambda b: np.concatenate([b**2, -b], axis=1)  # pointwise, so flip-equivariant
    flips = flip_sets(3)
    out = sliding_window_probabilities(image, tta_predictor(square, flips), (16, 16, 16))
    samples = split_samples(out, len(flips))
    plain = sliding_window_probabilities(image, square, (16, 16, 16))
    for s in samples:
        np.testing.assert_allclose(s, plain, atol=1e-5)


def test_non_equivariant_predictor_samples_differ_but_are_aligned():
    image = np.zeros((1, 8, 8), np.float32)
    image[0, 0, 0] = 1.0
    shifted = lambda b: np.concatenate([np.roll(b, 1, axis=2), b], axis=1)  # first channel not equivariant
    out = split_samples(tta_predictor(shifted, flip_sets(2))(image[None])[0], 4)  # (S, C, H, W)
    for s in out:  # second channel (identity) is aligned back in every sample
        np.testing.assert_array_equal(s[1], image[0])
    assert not np.array_equal(out[0][0], out[1][0])
