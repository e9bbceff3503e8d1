"""STIPPLE placement by KL-minimising translation and the prior-driven activations, against hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeseg.priors.activation import prior_sigmoid, prior_softmax, reweight_probabilities
from edgeseg.priors.placement import best_translation, kl_divergence, placed_centres, pool, shifted


def test_kl_of_tiny_arrays_by_hand():
    p = np.array([[0.5, 0.0], [0.5, 1.0]])  # (K=2, 2 voxels)
    q = np.array([[0.25, 0.5], [0.75, 0.5]])
    # voxel 0: 0.5 ln 2 + 0.5 ln(2/3); voxel 1: 0 ln 0 = 0, 1 ln 2
    assert kl_divergence(p, q) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3) + math.log(2))
    assert kl_divergence(q, q) == pytest.approx(0.0)


def test_shift_pads_with_background():
    p = np.stack([1 - np.eye(3)[0], np.eye(3)[0]])  # foreground at voxel 0, 1D
    out = shifted(p, (-1,), (3,))  # out[v] = p[v - 1]
    np.testing.assert_array_equal(out, [[1, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(pool(out, 2), [[0.5, 1.0], [0.5, 0.0]])


def _blob(shape, centre, sigma=2.5):
    grid = np.indices(shape, dtype=np.float64)
    r2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    fg = np.exp(-r2 / (2 * sigma**2))
    return np.stack([1 - fg, fg])


@pytest.mark.parametrize("factors", [(1,), (4, 2, 1)])
def test_translation_search_recovers_a_known_shift(factors):
    reference = _blob((16, 16, 16), (7, 8, 6))
    moving = _blob((16, 18, 16), (10, 6, 10))  # the same blob moved by (3, -2, 4), on another grid
    shift = best_translation(moving, reference, max_shift=5, factors=factors)
    assert shift == (3, -2, 4)
    assert placed_centres({1: (7, 8, 6)}, shift) == {1: (10, 6, 10)}


def test_prior_softmax_by_hand():
    logits = np.array([[1.0, 0.0], [0.0, 2.0]])  # (K=2, 2 voxels)
    prior = np.array([[0.25, 0.5], [0.75, 0.5]])
    out = prior_softmax(logits, prior)
    # voxel 0: e*0.25 / (e*0.25 + 0.75) = e / (e + 3); voxel 1: uniform prior -> plain softmax
    assert out[0, 0] == pytest.approx(math.e / (math.e + 3), rel=1e-6)
    assert out[1, 1] == pytest.approx(math.exp(2) / (1 + math.exp(2)), rel=1e-6)
    np.testing.assert_allclose(out.sum(axis=0), 1.0, rtol=1e-6)


def test_prior_sigmoid_by_hand():
    # sigma(0.5 + ln 0.2 - ln 0.8) = 1 / (1 + 4 e^-0.5); p = 1/2 leaves sigma(s)
    out = prior_sigmoid(np.array([0.5, 0.5]), np.array([0.2, 0.5]))
    assert out[0] == pytest.approx(1 / (1 + 4 * math.exp(-0.5)), rel=1e-6)
    assert out[1] == pytest.approx(1 / (1 + math.exp(-0.5)), rel=1e-6)
    assert np.isfinite(prior_sigmoid(np.array([0.0, 0.0]), np.array([0.0, 1.0]))).all()


def test_reweighting_probabilities_equals_prior_softmax():
    # softmax([1, 0]) = [e, 1] / (e + 1); times prior [0.25, 0.75] and renormalised: e / (e + 3), as by hand above
    probs = np.array([[math.e / (math.e + 1)], [1 / (math.e + 1)]])
    out = reweight_probabilities(probs, np.array([[0.25], [0.75]]))
    assert out[0, 0] == pytest.approx(math.e / (math.e + 3), rel=1e-6)
