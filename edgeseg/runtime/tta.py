"""Flip test-time augmentation inside the tile pass.

Each tile batch is predicted once per flip set (flip the tiles, predict, flip the outputs back),
and the samples are returned side by side as channels, so the tiler blends every sample exactly
as it blends a single prediction and the caller reduces them slab by slab (mean probabilities,
per-sample labels for uncertainty) without S full-volume copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np

from edgeseg.errors import UserError
from edgeseg.runtime.tiling import Predictor


def flip_sets(spatial_dims: int, axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """All subsets of the spatial `axes` (default: all), identity first: 2**len(axes) flip sets."""
    axes = tuple(range(spatial_dims)) if axes is None else tuple(axes)
    bad = [a for a in axes if not 0 <= a < spatial_dims]
    if bad or len(set(axes)) != len(axes):
        raise UserError(f"TTA axes {list(axes)} must be distinct spatial axes in 0..{spatial_dims - 1}")
    return [c for k in range(len(axes) + 1) for c in combinations(axes, k)]


def flip(batch: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Flip spatial `axes` of a (B, C, *S) batch; its own inverse."""
    return np.flip(batch, axis=tuple(a + 2 for a in axes)) if axes else batch


def tta_predictor(predict: Predictor, flips: Sequence[tuple[int, ...]]) -> Predictor:
    """Predictor returning every flip's (un-flipped) output stacked on the channel axis.

    Shape: (B, C_in, *T) -> (B, S * C_out, *T), sample s occupying channels [s*C_out, (s+1)*C_out).
    """

    def run(batch: np.ndarray) -> np.ndarray:
        outs = [flip(np.asarray(predict(np.ascontiguousarray(flip(batch, f)))), f) for f in flips]
        return np.concatenate(outs, axis=1)

    return run


def split_samples(block: np.ndarray, num_samples: int) -> np.ndarray:
    """(S * C, *X) -> (S, C, *X)."""
    return block.reshape(num_samples, block.shape[0] // num_samples, *block.shape[1:])
