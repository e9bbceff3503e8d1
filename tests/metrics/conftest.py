"""Seeded random blob masks for the metric tests (smoothed noise, thresholded)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy import ndimage


def make_blob_pair(shape: tuple[int, ...], seed: int, fill: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(pred, ref) bool masks: ref = smoothed noise above its (1 - fill) quantile; pred = ref's noise plus
    independent smoothed noise, so the two overlap partially (Dice ~0.5-0.8) and have several blobs each.
    """
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
    other = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
    ref = base > np.quantile(base, 1 - fill)
    mixed = base + 0.6 * other
    pred = mixed > np.quantile(mixed, 1 - fill * rng.uniform(0.7, 1.3))
    return pred, ref


@pytest.fixture
def blob_pair() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    return make_blob_pair
