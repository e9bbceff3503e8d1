"""Sliding-window (tiled) inference with blending and bounded memory; numpy only.

Tiles are placed nnU-Net style: even steps from edge to edge, so the first tile starts at 0 and
the last ends at the volume's edge. Overlapping tile outputs are blended with an importance map:
Gaussian (sigma = tile/8) or constant.

Why hand-written: MONAI's `sliding_window_inference` and nnU-Net's predictor both need torch, and
both keep full-volume float accumulators for every class; the device runtime has neither torch nor
memory to spare. Here tiles are processed in order of their start along the first spatial axis,
and rows of the output are finished (normalised and handed to the caller) as soon as no later tile
can touch them, so the accumulator only spans one tile's extent along that axis (one "slab").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from itertools import product

import numpy as np

from edgeseg.errors import UserError

Predictor = Callable[[np.ndarray], np.ndarray]  # (B, C_in, *tile) -> (B, C_out, *tile)
BLEND_MODES = ("gaussian", "constant")


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles along one axis: even steps covering [0, size) edge to edge.

    n = ceil((size - tile) / (tile * (1 - overlap))) + 1 tiles at round(linspace(0, size - tile, n)).
    A size not larger than the tile gives one tile at 0 (the volume is padded up to the tile).
    """
    if not 0.0 <= overlap < 1.0:
        raise UserError(f"overlap must be within [0, 1), got {overlap}")
    if tile < 1:
        raise UserError(f"tile size must be positive, got {tile}")
    if size <= tile:
        return [0]
    target_step = max(tile * (1.0 - overlap), 1.0)
    n = int(math.ceil((size - tile) / target_step)) + 1
    return [int(round(x)) for x in np.linspace(0, size - tile, n)]


def gaussian_importance(tile_shape: Sequence[int], sigma_scale: float = 0.125, mode: str = "monai") -> np.ndarray:
    """Gaussian blending weights for one tile. Shape: (*tile_shape) float32.

    mode "monai": exactly MONAI's `compute_importance_map(mode="gaussian")` (unnormalised product of
    1D Gaussians on arange(-(s-1)/2, (s-1)/2 + 1), clamped below at max(min, 1e-3)), so MONAI's
    `sliding_window_inference` is an exact oracle. mode "nnunet": nnU-Net's map (max-normalised,
    zeros replaced by the smallest positive value). The two differ most at volume borders, where
    every covering tile sees the voxel near its own edge (shared/research/reference-runs.md).
    """
    if mode == "monai":
        weights = np.ones((), dtype=np.float32)
        for s in tile_shape:
            x = np.arange(-(s - 1) / 2.0, (s - 1) / 2.0 + 1, dtype=np.float32)
            g = np.exp(x**2 / np.float32(-2 * (s * sigma_scale) ** 2)).astype(np.float32)
            weights = np.multiply.outer(weights, g) if weights.ndim else g
        return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)
    if mode == "nnunet":
        from scipy.ndimage import gaussian_filter

        delta = np.zeros(tile_shape, dtype=np.float64)
        delta[tuple(s // 2 for s in tile_shape)] = 1.0
        g = gaussian_filter(delta, [s * sigma_scale for s in tile_shape], mode="constant", cval=0.0)
        g = g / g.max()
        g[g == 0] = g[g > 0].min()
        return g.astype(np.float32)
    raise UserError(f"unknown Gaussian mode '{mode}'; choose monai or nnunet")


def importance_map(tile_shape: Sequence[int], blend: str) -> np.ndarray:
    if blend == "gaussian":
        return gaussian_importance(tile_shape)
    if blend == "constant":
        return np.ones(tuple(tile_shape), dtype=np.float32)
    from edgeseg.errors import unknown_name

    raise unknown_name("blend mode", blend, BLEND_MODES)


def _padding(spatial: Sequence[int], tile: Sequence[int]) -> list[tuple[int, int]]:
    """Symmetric padding (as MONAI pads) of axes smaller than the tile."""
    out = []
    for s, t in zip(spatial, tile):
        extra = max(t - s, 0)
        out.append((extra // 2, extra - extra // 2))
    return out


def iter_slabs(
    image: np.ndarray,
    predict: Predictor,
    tile: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 1,
    blend: str = "gaussian",
    on_batch: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Run `predict` over tiles of `image` and yield finished slabs (z0, z1, blended[:, z0:z1]).

    The slabs partition the first spatial axis in order; each block is (C_out, z1 - z0, *rest)
    float32, the importance-weighted mean of the tile outputs covering it. Peak memory: the input,
    one tile-deep accumulator and its weights, and one batch of tiles.
    Shape: image (C_in, *S) with len(S) == len(tile).
    """
    tile = tuple(int(t) for t in tile)
    if image.ndim - 1 != len(tile):
        raise UserError(f"image has {image.ndim - 1} spatial axes but the tile has {len(tile)}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    spatial = image.shape[1:]
    pads = _padding(spatial, tile)
    if any(p != (0, 0) for p in pads):
        image = np.pad(image, [(0, 0), *pads])
    padded = image.shape[1:]
    weights = importance_map(tile, blend)
    starts = [tile_starts(s, t, overlap) for s, t in zip(padded, tile)]
    rest_positions = list(product(*starts[1:]))
    total_batches = sum(math.ceil(len(rest_positions) / batch_size) for _ in starts[0])
    done = 0
    depth = tile[0]
    acc: np.ndarray | None = None
    wsum = np.zeros((depth, *padded[1:]), dtype=np.float32)
    base = 0  # padded z index of acc[:, 0]
    emitted = 0  # padded z index up to which rows were emitted

    def emit(z_end: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """Normalise and yield padded rows [emitted, z_end), cropped back to the unpadded volume."""
        nonlocal emitted
        lo, hi = emitted - base, z_end - base
        block = acc[:, lo:hi] / wsum[lo:hi][None]
        block = block[(slice(None), slice(None), *[slice(p[0], p[0] + s) for p, s in zip(pads[1:], spatial[1:])])]
        z0, z1 = emitted - pads[0][0], z_end - pads[0][0]
        c0, c1 = max(z0, 0), min(z1, spatial[0])
        if c1 > c0:
            yield c0, c1, np.ascontiguousarray(block[:, c0 - z0:c1 - z0])
        emitted = z_end

    for z in starts[0]:
        if acc is not None and z > base:
            yield from emit(z)  # rows before z: no later tile reaches them
            shift = z - base
            acc[:, :depth - shift] = acc[:, shift:]
            acc[:, depth - shift:] = 0
            wsum[:depth - shift] = wsum[shift:]
            wsum[depth - shift:] = 0
            base = z
        for i in range(0, len(rest_positions), batch_size):
            group = rest_positions[i:i + batch_size]
            batch = np.stack([image[(slice(None), slice(z, z + depth),
                                     *[slice(p, p + t) for p, t in zip(pos, tile[1:])])] for pos in group])
            out = np.asarray(predict(batch), dtype=np.float32)
            if out.shape[0] != len(group) or out.shape[2:] != tile:
                raise ValueError(f"predictor returned {out.shape} for a batch of {batch.shape}")
            if acc is None:
                acc = np.zeros((out.shape[1], depth, *padded[1:]), dtype=np.float32)
            for tile_out, pos in zip(out, group):
                region = tuple(slice(p, p + t) for p, t in zip(pos, tile[1:]))
                acc[(slice(None), slice(None), *region)] += tile_out * weights
                wsum[(slice(None), *region)] += weights
            done += 1
            if on_batch is not None:
                on_batch(done, total_batches)
    assert acc is not None
    yield from emit(min(base + depth, padded[0]))


def sliding_window_probabilities(
    image: np.ndarray,
    predict: Predictor,
    tile: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 1,
    blend: str = "gaussian",
    on_batch: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The whole blended output volume. Shape: image (C_in, *S) -> (C_out, *S) float32."""
    blocks = []
    for _, _, block in iter_slabs(image, predict, tile, overlap=overlap, batch_size=batch_size, blend=blend,
                                  on_batch=on_batch):
        blocks.append(block)
    return np.concatenate(blocks, axis=1)
