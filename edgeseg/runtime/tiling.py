"""Sliding-window (tiled) inference with blending and bounded memory; numpy only.

Tiles are placed nnU-Net style: even steps from edge to edge, so the first tile starts at 0 and
the last ends at the volume's edge. Overlapping tile outputs are blended with an importance map
(`importance_map`): MONAI's Gaussian, nnU-Net's Gaussian or constant. The predictor should return
probabilities (softmax/sigmoid applied per tile), as MONAI's and nnU-Net's predictors blend them;
the tiler itself is a pure function of the predictor and blends whatever it returns.

Why hand-written: MONAI's `sliding_window_inference` and nnU-Net's predictor both need torch, and
both keep full-volume float accumulators for every class; the device runtime has neither torch nor
memory to spare. Here tiles are processed in order of their start along the first spatial axis,
and rows of the output are finished (normalised and handed to the caller) as soon as no later tile
can touch them, so the accumulator only spans one tile's extent along that axis (one "slab").

Entry points:
- `iter_slabs`: a generator of finished slabs (z0, z1, block) for callers that reduce on the fly
  (argmax labels, per-sample labels, entropy) and never hold the float volume;
- `sliding_window_probabilities`: the whole blended float32 volume;
- `iter_slices` / `predict_slices`: a 2D model over a 3D volume, plane by plane along an axis, tiles
  of consecutive planes sharing batches.

Where the volume is smaller than the tile along an axis it is zero-padded symmetrically (the extra
voxel after, as MONAI's `sliding_window_inference` pads) and the output is cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from itertools import product

import numpy as np

from edgeseg.errors import UserError, unknown_name

Predictor = Callable[[np.ndarray], np.ndarray]  # (B, C_in, *tile) -> (B, C_out, *tile)
OnBatch = Callable[[int, int], None]  # (batches done, batches in total)
# "gaussian" is MONAI's map (so training-time MONAI evaluation and the runtime agree); see
# `gaussian_importance` for why nnU-Net's differs and is offered too.
BLEND_MODES = ("gaussian", "constant", "gaussian-nnunet")


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles along one axis: even steps covering [0, size) edge to edge.

    nnU-Net's rule: n = ceil((size - tile) / (tile * (1 - overlap))) + 1 tiles at
    round(i * (size - tile) / (n - 1)), i = 0..n-1 (the target step is at least one voxel, so a
    high overlap on a small tile never repeats a start). A size not larger than the tile gives
    one tile at 0 (the volume is padded up to the tile).
    """
    if not 0.0 <= overlap < 1.0:
        raise UserError(f"overlap must be within [0, 1), got {overlap}")
    if tile < 1:
        raise UserError(f"tile size must be positive, got {tile}")
    if size <= tile:
        return [0]
    target_step = max(tile * (1.0 - overlap), 1.0)
    n = math.ceil((size - tile) / target_step) + 1
    step = (size - tile) / (n - 1)
    return [round(step * i) for i in range(n)]  # half to even, as nnU-Net's np.round


def gaussian_importance(tile_shape: Sequence[int], sigma_scale: float = 0.125, mode: str = "monai") -> np.ndarray:
    """Gaussian blending weights for one tile, sigma = sigma_scale * tile size per axis. Shape: (*tile_shape) float32.

    mode "monai": exactly MONAI's `compute_importance_map(mode="gaussian")`: the unnormalised product
    of 1D Gaussians sampled on arange(-(s-1)/2, (s-1)/2 + 1), clamped below at max(min, 1e-3), so
    MONAI's `sliding_window_inference` is an exact oracle for the tiler.
    mode "nnunet": nnU-Net's map: a centred delta (at s // 2) smoothed by `scipy.ndimage.gaussian_filter`,
    max-normalised, zeros replaced by the smallest positive value (no 1e-3 floor).

    Why two: both are "Gaussian, sigma = tile/8", but they differ in centring (MONAI's is symmetric,
    nnU-Net's peaks at s // 2) and above all in the floor. At a volume border every covering tile
    sees the voxel near its own edge, so the floor decides which tile wins there: measured on a
    random 3D U-Net, an unfloored map gave border probabilities up to 0.57 away from MONAI's,
    a floored max-normalised one 5.7e-3 (shared/research/reference-runs.md, "Blending"). MONAI's
    map is the default because training-time evaluation uses MONAI; nnU-Net's is kept to measure
    which is more accurate at borders on our data.
    """
    shape = tuple(int(s) for s in tile_shape)
    if not shape or any(s < 1 for s in shape):
        raise UserError(f"tile shape must be positive sizes, got {list(tile_shape)}")
    if not sigma_scale > 0:
        raise UserError(f"sigma_scale must be positive, got {sigma_scale}")
    if mode == "monai":
        weights = np.ones((), dtype=np.float32)
        for s in shape:
            x = np.arange(-(s - 1) / 2.0, (s - 1) / 2.0 + 1, dtype=np.float32)
            g = np.exp(x**2 / np.float32(-2 * (s * sigma_scale) ** 2)).astype(np.float32)
            weights = np.multiply.outer(weights, g)
        return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)
    if mode == "nnunet":
        from scipy.ndimage import gaussian_filter

        delta = np.zeros(shape, dtype=np.float64)
        delta[tuple(s // 2 for s in shape)] = 1.0
        g = gaussian_filter(delta, [s * sigma_scale for s in shape], mode="constant", cval=0.0)
        g = (g / g.max()).astype(np.float32)
        g[g == 0] = g[g > 0].min()
        return g
    raise unknown_name("Gaussian mode", mode, ("monai", "nnunet"))


def importance_map(tile_shape: Sequence[int], blend: str) -> np.ndarray:
    """Blending weights for one tile by blend mode (`BLEND_MODES`). Shape: (*tile_shape) float32."""
    if blend == "gaussian":
        return gaussian_importance(tile_shape, mode="monai")
    if blend == "gaussian-nnunet":
        return gaussian_importance(tile_shape, mode="nnunet")
    if blend == "constant":
        return np.ones(tuple(tile_shape), dtype=np.float32)
    raise unknown_name("blend mode", blend, BLEND_MODES)


def _padding(spatial: Sequence[int], tile: Sequence[int]) -> list[tuple[int, int]]:
    """Symmetric zero padding of axes smaller than the tile, the odd voxel after (as MONAI pads)."""
    out = []
    for s, t in zip(spatial, tile):
        extra = max(t - s, 0)
        out.append((extra // 2, extra - extra // 2))
    return out


def _check(image: np.ndarray, tile: Sequence[int], spatial_dims: int, batch_size: int) -> tuple[int, ...]:
    tile = tuple(int(t) for t in tile)
    if image.ndim - 1 != spatial_dims:
        raise UserError(f"image has {image.ndim - 1} spatial axes, expected {spatial_dims} (Shape: (C, *spatial))")
    if any(t < 1 for t in tile):
        raise UserError(f"tile sizes must be positive, got {list(tile)}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    return tile


def _run(predict: Predictor, batch: np.ndarray, tile: tuple[int, ...]) -> np.ndarray:
    out = np.asarray(predict(batch), dtype=np.float32)
    if out.ndim != batch.ndim or out.shape[0] != batch.shape[0] or out.shape[2:] != tile:
        raise ValueError(f"predictor returned {out.shape} for a batch of {batch.shape}")
    return out


def _accumulate(acc: np.ndarray, tile_out: np.ndarray, weights: np.ndarray) -> None:
    """acc += tile_out * weights, one channel at a time: the temporary is one channel of a tile, not all
    C_out of them (S x K channels with per-sample outputs). Shape: acc, tile_out (C, *tile); weights (*tile)."""
    for channel, values in zip(acc, tile_out):
        channel += values * weights


def iter_slabs(
    image: np.ndarray,
    predict: Predictor,
    tile: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 1,
    blend: str = "gaussian",
    on_batch: OnBatch | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Run `predict` over tiles of `image` and yield finished slabs (z0, z1, blended[:, z0:z1]).

    The slabs partition the first spatial axis in order; each block is (C_out, z1 - z0, *rest)
    float32, the importance-weighted mean of the tile outputs covering it (a copy, except the last
    block: a view of the accumulator, which nothing touches after it). Tiles are predicted in
    order of their start along axis 0, `batch_size` at a time (a batch never spans two starts).
    Peak memory: the input (plus a padded copy when smaller than the tile), one tile-deep
    accumulator of C_out channels and its weight sum, and one batch of tiles.
    Shape: image (C_in, *S) with len(S) == len(tile) (2D or 3D).
    """
    tile = _check(image, tile, len(tile), batch_size)
    spatial = image.shape[1:]
    pads = _padding(spatial, tile)
    if any(p != (0, 0) for p in pads):
        image = np.pad(image, [(0, 0), *pads])
    padded = image.shape[1:]
    weights = importance_map(tile, blend)
    starts = [tile_starts(s, t, overlap) for s, t in zip(padded, tile)]
    rest_positions = list(product(*starts[1:]))
    batches_per_start = math.ceil(len(rest_positions) / batch_size)
    total_batches = batches_per_start * len(starts[0])
    done = 0
    depth = tile[0]
    crop_rest = tuple(slice(p[0], p[0] + s) for p, s in zip(pads[1:], spatial[1:]))
    acc: np.ndarray | None = None  # (C_out, depth, *padded[1:]): padded rows [base, base + depth)
    wsum = np.zeros((depth, *padded[1:]), dtype=np.float32)
    base = 0  # padded z index of acc[:, 0]
    emitted = 0  # padded z index up to which rows were emitted

    def emit(z_end: int, last: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
        """Normalise and yield padded rows [emitted, z_end), cropped back to the unpadded volume.

        A copy, as the accumulator is reused, except for the `last` block (up to a tile deep): nothing
        touches the accumulator after it, so it is yielded as a view and its copy saved."""
        nonlocal emitted
        assert acc is not None
        lo, hi = emitted - base, z_end - base
        block = acc[:, lo:hi]
        block /= wsum[lo:hi][None]  # in place: these rows are shifted out (or final) once emitted
        block = block[(slice(None), slice(None), *crop_rest)]
        z0, z1 = emitted - pads[0][0], z_end - pads[0][0]
        c0, c1 = max(z0, 0), min(z1, spatial[0])
        if c1 > c0:
            block = block[:, c0 - z0:c1 - z0]
            yield c0, c1, block if last else np.ascontiguousarray(block)
        emitted = z_end

    for z in starts[0]:
        if acc is not None and z > base:
            yield from emit(z)  # rows before z: no later tile reaches them
            shift = z - base  # <= depth: steps never exceed the tile
            acc[:, :depth - shift] = acc[:, shift:]
            acc[:, depth - shift:] = 0
            wsum[:depth - shift] = wsum[shift:]
            wsum[depth - shift:] = 0
            base = z
        for i in range(0, len(rest_positions), batch_size):
            group = rest_positions[i:i + batch_size]
            batch = np.stack([image[(slice(None), slice(z, z + depth),
                                     *[slice(p, p + t) for p, t in zip(pos, tile[1:])])] for pos in group])
            out = _run(predict, batch, tile)
            if acc is None:
                acc = np.zeros((out.shape[1], depth, *padded[1:]), dtype=np.float32)
            for tile_out, pos in zip(out, group):
                region = tuple(slice(p, p + t) for p, t in zip(pos, tile[1:]))
                _accumulate(acc[(slice(None), slice(None), *region)], tile_out, weights)
                wsum[(slice(None), *region)] += weights
            done += 1
            if on_batch is not None:
                on_batch(done, total_batches)
    yield from emit(min(base + depth, padded[0]), last=True)


def sliding_window_probabilities(
    image: np.ndarray,
    predict: Predictor,
    tile: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 1,
    blend: str = "gaussian",
    on_batch: OnBatch | None = None,
) -> np.ndarray:
    """The whole blended output volume (see `iter_slabs`). Shape: image (C_in, *S) -> (C_out, *S) float32."""
    out: np.ndarray | None = None
    for z0, z1, block in iter_slabs(image, predict, tile, overlap=overlap, batch_size=batch_size, blend=blend,
                                    on_batch=on_batch):
        if out is None:
            out = np.empty((block.shape[0], *image.shape[1:]), dtype=np.float32)
        out[:, z0:z1] = block
    assert out is not None
    return out


def iter_slices(
    image: np.ndarray,
    predict: Predictor,
    tile: Sequence[int],
    *,
    axis: int = 0,
    overlap: float = 0.5,
    batch_size: int = 1,
    blend: str = "gaussian",
    on_batch: OnBatch | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Run a 2D `predict` over every plane of a 3D image along spatial `axis`; yield (index, blended plane).

    Each plane is tiled in 2D exactly as `sliding_window_probabilities` tiles a 2D image, but tiles
    are taken in plane order and batches run across plane boundaries, so small planes still fill
    `batch_size`. A plane is yielded as soon as its last tile is blended; at most the planes
    touched by one batch are open at a time.
    Shape: image (C_in, *S) with three spatial axes, tile (2 values) -> planes (C_out, *S without `axis`).
    """
    tile = _check(image, tile, 3, batch_size)
    if len(tile) != 2:
        raise UserError(f"slice-wise tiling needs a 2D tile, got {list(tile)}")
    if axis not in (0, 1, 2):
        raise UserError(f"slice axis must be 0, 1 or 2, got {axis}")
    num_planes = image.shape[axis + 1]
    plane_shape = tuple(s for i, s in enumerate(image.shape[1:]) if i != axis)
    pads = _padding(plane_shape, tile)
    padded = tuple(s + a + b for s, (a, b) in zip(plane_shape, pads))
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, plane_shape))
    weights = importance_map(tile, blend)
    positions = list(product(*(tile_starts(s, t, overlap) for s, t in zip(padded, tile))))
    total_batches = math.ceil(num_planes * len(positions) / batch_size)
    jobs = [(i, pos) for i in range(num_planes) for pos in positions]
    planes: dict[int, np.ndarray] = {}  # padded input planes of the current batch
    open_: dict[int, tuple[np.ndarray, np.ndarray, list[int]]] = {}  # plane -> (acc, wsum, [tiles left])

    def plane(i: int) -> np.ndarray:
        if i not in planes:
            planes[i] = np.pad(np.take(image, i, axis=axis + 1), [(0, 0), *pads])
        return planes[i]

    for done, first in enumerate(range(0, len(jobs), batch_size), start=1):
        group = jobs[first:first + batch_size]
        batch = np.stack([plane(i)[(slice(None), *(slice(p, p + t) for p, t in zip(pos, tile)))] for i, pos in group])
        for i in [k for k in planes if k < group[-1][0]]:
            del planes[i]
        out = _run(predict, batch, tile)
        for (i, pos), tile_out in zip(group, out):
            if i not in open_:
                open_[i] = (np.zeros((out.shape[1], *padded), np.float32), np.zeros(padded, np.float32),
                            [len(positions)])
            acc, wsum, left = open_[i]
            region = tuple(slice(p, p + t) for p, t in zip(pos, tile))
            _accumulate(acc[(slice(None), *region)], tile_out, weights)
            wsum[region] += weights
            left[0] -= 1
        if on_batch is not None:
            on_batch(done, total_batches)
        for i in sorted(k for k, v in open_.items() if v[2][0] == 0):
            acc, wsum, _ = open_.pop(i)
            acc /= wsum[None]
            yield i, np.ascontiguousarray(acc[(slice(None), *crop)])


def predict_slices(
    image: np.ndarray,
    predict: Predictor,
    tile: Sequence[int],
    *,
    axis: int = 0,
    overlap: float = 0.5,
    batch_size: int = 1,
    blend: str = "gaussian",
    on_batch: OnBatch | None = None,
) -> np.ndarray:
    """A 2D model's blended output over a 3D volume (see `iter_slices`). Shape: (C_in, *S) -> (C_out, *S) float32."""
    out: np.ndarray | None = None
    for i, probs in iter_slices(image, predict, tile, axis=axis, overlap=overlap, batch_size=batch_size, blend=blend,
                                on_batch=on_batch):
        if out is None:
            out = np.empty((probs.shape[0], *image.shape[1:]), dtype=np.float32)
        index: list[slice | int] = [slice(None)] * 4
        index[axis + 1] = i
        out[tuple(index)] = probs
    assert out is not None
    return out
