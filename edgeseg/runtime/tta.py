"""Flip test-time augmentation inside the tile pass; numpy only.

Each tile batch is predicted once per flip set (flip the tiles, predict, flip the outputs back),
and the samples are returned side by side as channels, so the tiler blends every sample exactly
as it blends a single prediction. The caller then reduces each finished slab (`reduce_samples`:
mean probabilities and per-sample argmax labels) and never holds S float copies of the volume:
memory is S x C_out channels of one slab while tiling, then S bytes per voxel of per-sample labels
(what structure-wise uncertainty needs) plus the mean. Callers that need only the mean ask
`tta_predictor(..., mean=True)` for it per tile batch, and the tiler blends C_out channels.

Where the tile placement is mirror-symmetric (even steps that need no rounding) this equals the
usual whole-volume TTA, mean_f flip(tiler(flip(x, f)), f), because the Gaussian map is symmetric;
otherwise tiles sit up to one voxel differently, as they would for any tiler.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np

from edgeseg.errors import UserError
from edgeseg.runtime.tiling import Predictor


def flip_sets(spatial_dims: int, axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """All subsets of the spatial `axes` (default: all), identity first: 2**len(axes) flip sets.

    Axes are spatial (0 = first spatial axis), ordered by subset size then lexicographically.
    """
    axes = tuple(range(spatial_dims)) if axes is None else tuple(int(a) for a in axes)
    bad = [a for a in axes if not 0 <= a < spatial_dims]
    if bad or len(set(axes)) != len(axes):
        raise UserError(f"TTA axes {list(axes)} must be distinct spatial axes in 0..{spatial_dims - 1}")
    return [c for k in range(len(axes) + 1) for c in combinations(axes, k)]


def flip(batch: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Apply a flip set to the spatial `axes` of a (B, C, *S) batch (a view).

    A flip is its own inverse, so the same call undoes it: flip(flip(x, f), f) == x.
    """
    return np.flip(batch, axis=tuple(a + 2 for a in axes)) if axes else batch


undo_flip = flip  # named for readability where an output is flipped back


def tta_predictor(predict: Predictor, flips: Sequence[tuple[int, ...]], max_batch: int | None = None, *,
                  mean: bool = False) -> Predictor:
    """Predictor returning every flip's (un-flipped) output stacked on the channel axis, or their mean.

    Shape: (B, C_in, *T) -> (B, S * C_out, *T), sample s (flip set flips[s]) in channels
    [s*C_out, (s+1)*C_out); with `mean`, (B, C_out, *T), the mean of the S samples (what callers
    that need no per-sample output blend: blending is linear, so it equals the mean of blended samples).
    The S x B flipped tiles (flip-major) are packed into `predict` calls of `max_batch` tiles
    (default B), so a slab of 3 tiles with 8 flips costs 6 full calls of 4, not 8 of 3. Each call's
    output is flipped back straight into its place in one preallocated result (added to it with
    `mean`), so the peak is that result plus one call's input and output, never S copies of the batch.
    """
    if not flips:
        raise UserError("TTA needs at least one flip set (the identity is ())")
    if max_batch is not None and max_batch < 1:
        raise UserError(f"batch size must be >= 1, got {max_batch}")
    flips = list(flips)

    def run(batch: np.ndarray) -> np.ndarray:
        size, count = len(batch), len(flips)
        chunk = max_batch or size
        out: np.ndarray | None = None
        for first in range(0, count * size, chunk):
            last = min(first + chunk, count * size)
            # (flip index, first tile, end tile) of each flip set this call covers
            pieces = [(k, max(first - k * size, 0), min(last - k * size, size))
                      for k in range(first // size, (last - 1) // size + 1)]
            inputs = np.concatenate([flip(batch[b0:b1], flips[k]) for k, b0, b1 in pieces])  # contiguous
            result = np.asarray(predict(inputs))
            if result.ndim != batch.ndim or len(result) != len(inputs):
                raise ValueError(f"predictor returned {result.shape} for a batch of {inputs.shape}")
            channels = result.shape[1]
            if out is None:
                dtype = np.result_type(result.dtype, np.float32) if mean else result.dtype
                out = np.zeros((size, channels if mean else count * channels, *result.shape[2:]), dtype)
            done = 0
            for k, b0, b1 in pieces:
                part = undo_flip(result[done:done + b1 - b0], flips[k])
                if mean:
                    out[b0:b1] += part
                else:
                    out[b0:b1, k * channels:(k + 1) * channels] = part
                done += b1 - b0
        assert out is not None
        if mean and count > 1:
            out /= count
        return out

    return run


def split_samples(block: np.ndarray, num_samples: int) -> np.ndarray:
    """Separate the samples stacked on the channel axis (a view). Shape: (S * C, *X) -> (S, C, *X)."""
    if num_samples < 1 or block.shape[0] % num_samples:
        raise ValueError(f"{block.shape[0]} channels do not split into {num_samples} samples")
    return block.reshape(num_samples, block.shape[0] // num_samples, *block.shape[1:])


def reduce_samples(block: np.ndarray, num_samples: int, label_dtype: type = np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """Mean probabilities and each sample's argmax labels of one blended slab.

    Shape: block (S * C, *X) float32 -> mean (C, *X) float32, labels (S, *X) `label_dtype`.
    """
    samples = split_samples(block, num_samples)
    mean = samples[0].astype(np.float32) if num_samples == 1 else samples.mean(axis=0, dtype=np.float32)
    return mean, samples.argmax(axis=1).astype(label_dtype)
