"""Keypoints <-> Gaussian heatmaps, for keypoint detection with Count-ception (numpy and scipy only).

Keypoints are stored as ivadomed stores intervertebral-disc labels: a label volume that is 0
everywhere except one voxel per keypoint, whose value is the keypoint's class label (e.g. the disc
number). Training targets are one heatmap channel per class,

    H_k(v) = max over the keypoints p of class k of exp(-|v - p|^2 / (2 sigma^2)),

with |v - p| the physical distance (voxel offsets times the voxel spacing, in mm), so the peak is 1
and sigma is in mm whatever the spacing (Count-ception, Cohen et al. 2017, as trained on Gaussian
heatmaps in ivadomed; loss: Adaptive Wing, Wang et al. 2019). Values further than `truncate` sigma
along an axis are 0 (as in scipy.ndimage.gaussian_filter). Decoding takes the local maxima of each
channel (scipy.ndimage.maximum_filter over a ball of `radius_mm`) that reach a threshold, with
greedy non-maximum suppression within the same radius.

Positions are voxel indices (array axes, floats allowed for sub-voxel positions in coordinate lists).
Training renders its targets after spatial augmentation from the moved points (`move_keypoints` replays
an augmentation's recorded flips, 90-degree rotations and affine on them), so a flipped or rotated patch
gets the heatmap of its own keypoints at sub-voxel precision, never a resampled single-voxel label.
`KeypointDecoding` + `decode_keypoints` are the one decoding rule training, evaluation and the device
runtime share; `world_positions` maps voxel positions to scanner coordinates (mm) through an affine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from edgeseg.data.augment import SPATIAL_TRANSFORMS
from edgeseg.errors import UserError


@dataclass(frozen=True)
class Keypoint:
    """One keypoint: its class label, its position (voxel indices) and its heatmap score (1 for a label)."""

    label: int
    position: tuple[float, ...]
    score: float = 1.0


# ------------------------------------------------------------------------------------ validation


def _spacing(spacing: Sequence[float], ndim: int) -> np.ndarray:
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if values.size != ndim:
        raise UserError(f"spacing {tuple(spacing)} needs {ndim} values, one per spatial axis")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise UserError(f"spacing {tuple(spacing)} must be positive")
    return values


def _positive(value: float, name: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{name} must be a positive number of mm, got {value}")
    return float(value)


def _labels(labels: Iterable[int]) -> tuple[int, ...]:
    result = tuple(int(label) for label in labels)
    if any(label <= 0 for label in result) or len(set(result)) != len(result):
        raise UserError(f"keypoint labels must be distinct positive integers, got {result}")
    return result


# ------------------------------------------------------------------------------------ labels -> keypoints


def keypoints_from_label_volume(volume: np.ndarray, labels: Sequence[int] | None = None) -> list[Keypoint]:
    """Every non-zero voxel of an integer keypoint label volume as a Keypoint (label = its value).

    `labels` keeps only those classes (others are ignored); None keeps every non-zero value.
    Raises UserError for non-integer or negative values.
    """
    volume = np.asarray(volume)
    integral = np.issubdtype(volume.dtype, np.integer) or (
        np.all(np.isfinite(volume)) and np.all(volume == np.round(volume)))
    if not integral:
        raise UserError("a keypoint label volume must hold integer labels (0 = no keypoint)")
    if np.any(volume < 0):
        raise UserError("a keypoint label volume must not hold negative labels")
    indices = np.argwhere(volume != 0)
    wanted = None if labels is None else set(_labels(labels))
    points = []
    for index in indices:
        label = int(volume[tuple(index)])
        if wanted is None or label in wanted:
            points.append(Keypoint(label, tuple(float(i) for i in index)))
    return points


def label_volume_from_keypoints(keypoints: Iterable[Keypoint], shape: Sequence[int]) -> np.ndarray:
    """The ivadomed-style label volume: each keypoint's label at its nearest voxel (those outside are dropped)."""
    volume = np.zeros(tuple(shape), dtype=np.int32)
    for point in keypoints:
        index = tuple(int(np.floor(p + 0.5)) for p in point.position)  # round half up
        if len(index) != volume.ndim:
            raise UserError(f"keypoint {point.position} has {len(index)} coordinates, the volume {volume.ndim} axes")
        if all(0 <= i < n for i, n in zip(index, volume.shape)):
            volume[index] = point.label
    return volume


# ------------------------------------------------------------------------------------ keypoints -> heatmaps


def gaussian_heatmaps(keypoints: Iterable[Keypoint], labels: Sequence[int], shape: Sequence[int],
                      spacing: Sequence[float], sigma_mm: float, truncate: float = 4.0) -> np.ndarray:
    """Heatmap targets (len(labels), *shape), float32: channel k is the max of the Gaussians of class labels[k].

    Keypoints of classes not in `labels` are ignored; a class without keypoints gets a zero channel
    (e.g. a disc outside the field of view).
    """
    shape = tuple(int(n) for n in shape)
    labels = _labels(labels)
    step = _spacing(spacing, len(shape))
    sigma = _positive(sigma_mm, "sigma_mm")
    reach = truncate * sigma / step  # half-width of the box, in voxels per axis
    channel = {label: k for k, label in enumerate(labels)}
    heatmaps = np.zeros((len(labels), *shape), dtype=np.float32)
    for point in keypoints:
        if point.label not in channel:
            continue
        if len(point.position) != len(shape):
            raise UserError(f"keypoint {point.position} has {len(point.position)} coordinates, the image "
                            f"{len(shape)} axes")
        box: list[slice] = []
        factors: list[np.ndarray] = []
        for axis, centre in enumerate(point.position):
            lo = max(0, math.ceil(centre - reach[axis]))
            hi = min(shape[axis] - 1, math.floor(centre + reach[axis]))
            if lo > hi:
                break  # this keypoint's Gaussian does not reach the image
            offsets_mm = (np.arange(lo, hi + 1) - centre) * step[axis]
            box.append(slice(lo, hi + 1))
            factors.append(np.exp(-offsets_mm**2 / (2.0 * sigma**2)))
        else:
            # exp(-sum a_i^2) is the outer product of the per-axis factors
            gaussian = factors[0]
            for factor in factors[1:]:
                gaussian = np.multiply.outer(gaussian, factor)
            index: tuple[int | slice, ...] = (channel[point.label], *box)
            target = heatmaps[index]
            np.maximum(target, gaussian.astype(np.float32), out=target)
    return heatmaps


def heatmaps_from_label_volume(volume: np.ndarray, spacing: Sequence[float], sigma_mm: float,
                               labels: Sequence[int] | None = None,
                               truncate: float = 4.0) -> tuple[np.ndarray, tuple[int, ...]]:
    """Heatmap targets (C, *volume.shape) from a keypoint label volume, and the label of each channel.

    `labels` fixes the channels (the same for every case of a dataset, so channel k always means one
    class); None uses the sorted non-zero values of this volume.
    """
    points = keypoints_from_label_volume(volume, labels)
    channels = _labels(labels) if labels is not None else tuple(sorted({p.label for p in points}))
    return gaussian_heatmaps(points, channels, np.shape(volume), spacing, sigma_mm, truncate), channels


# ------------------------------------------------------------------------------------ heatmaps -> keypoints


def _ball(spacing: np.ndarray, radius_mm: float) -> np.ndarray:
    """Boolean footprint of the voxel offsets within radius_mm (physical distance)."""
    half = np.floor(radius_mm / spacing).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing)], indexing="ij")
    return sum(g**2 for g in grids) <= radius_mm**2


def keypoints_from_heatmaps(heatmaps: np.ndarray, spacing: Sequence[float], *, radius_mm: float,
                            threshold: float = 0.5, labels: Sequence[int] | None = None,
                            max_per_class: int | None = None) -> list[Keypoint]:
    """Keypoints of heatmaps (C, *S): per channel, the local maxima >= threshold, at least radius_mm apart.

    A voxel is a candidate when it equals the maximum of its channel over the ball of radius_mm
    around it (scipy.ndimage.maximum_filter); candidates are then kept greedily from the highest
    score, dropping any within radius_mm of one already kept (ties such as a flat top give one
    keypoint, the first in index order). `labels[k]` is channel k's label (default k + 1);
    `max_per_class` keeps only the best ones (1 when each class occurs once, as discs do).
    Returned in channel order, then by decreasing score.
    """
    heatmaps = np.asarray(heatmaps)
    if heatmaps.ndim < 2:
        raise UserError(f"heatmaps must be (C, *S), got shape {heatmaps.shape}")
    step = _spacing(spacing, heatmaps.ndim - 1)
    radius = _positive(radius_mm, "radius_mm")
    labels = _labels(labels) if labels is not None else tuple(range(1, heatmaps.shape[0] + 1))
    if len(labels) != heatmaps.shape[0]:
        raise UserError(f"{len(labels)} labels for {heatmaps.shape[0]} heatmap channels")
    footprint = _ball(step, radius)
    found: list[Keypoint] = []
    for label, heatmap in zip(labels, heatmaps.astype(np.float64)):
        peaks = (heatmap == ndimage.maximum_filter(heatmap, footprint=footprint, mode="constant", cval=-np.inf))
        candidates = np.argwhere(peaks & (heatmap >= threshold))
        scores = heatmap[tuple(candidates.T)]
        order = np.argsort(-scores, kind="stable")  # argwhere is in index order: ties keep it
        kept: list[np.ndarray] = []
        for i in order:
            if max_per_class is not None and len(kept) >= max_per_class:
                break
            position = candidates[i]
            if all(np.sum(((position - other) * step) ** 2) > radius**2 for other in kept):
                kept.append(position)
                found.append(Keypoint(label, tuple(float(p) for p in position), float(scores[i])))
    return found


# ------------------------------------------------------------------------------------ augmentation of points


def move_keypoints(keypoints: Iterable[Keypoint], history: Sequence[tuple[str, dict]], shape: Sequence[int],
                   spacing: Sequence[float]) -> tuple[list[Keypoint], tuple[int, ...], tuple[float, ...]]:
    """Keypoints of a patch moved as `edgeseg.data.augment.Compose` moved the patch (its `history`).

    Replays, in order, the spatial transforms the augmentation recorded, on points (sub-voxel exact):
    - "flip" {"axes"}: p_a -> n_a - 1 - p_a;
    - "rot90" {"k"}: numpy's rot90 in the plane of spatial axes 0 and 1 (only when that plane is square,
      as `RandomRot90` does): each quarter turn takes (p0, p1) to (n1 - 1 - p1, p0) and swaps the spacing of
      the two axes;
    - "affine" {"matrix" M}: `ndimage.affine_transform` samples output voxel o at input M o + offset, with
      offset = c - M c (c the patch centre), so input point p lands at o = M^-1 (p - c) + c (voxel space,
      the spacing unchanged).
    Intensity transforms leave points alone. Points may leave the patch: their Gaussian tails still reach it.
    Returns the moved keypoints, the patch shape and the voxel spacing after the transforms.
    """
    shape = tuple(int(n) for n in shape)
    step = tuple(float(s) for s in _spacing(spacing, len(shape)))
    keypoints = list(keypoints)
    points = [np.asarray(p.position, dtype=np.float64) for p in keypoints]
    labels = [(p.label, p.score) for p in keypoints]
    for name, params in history:
        if name not in SPATIAL_TRANSFORMS:
            continue
        if name == "flip":
            for axis in params["axes"]:
                for p in points:
                    p[axis] = shape[axis] - 1 - p[axis]
        elif name == "rot90":
            if len(shape) < 2 or shape[0] != shape[1]:
                continue  # RandomRot90 leaves non-square planes as they are
            for _ in range(int(params["k"]) % 4):
                for p in points:
                    p[0], p[1] = shape[1] - 1 - p[1], p[0]
                step = (step[1], step[0], *step[2:])
        elif name == "affine":
            if params["matrix"] is None:
                continue
            inverse = np.linalg.inv(np.asarray(params["matrix"], dtype=np.float64))
            centre = (np.asarray(shape, dtype=np.float64) - 1) / 2.0
            points = [inverse @ (p - centre) + centre for p in points]
        else:  # a new spatial transform: points must learn it first
            raise NotImplementedError(f"keypoints cannot follow the spatial transform '{name}' yet")
    moved = [Keypoint(label, tuple(float(v) for v in p), score) for (label, score), p in zip(labels, points)]
    return moved, shape, step


# ------------------------------------------------------------------------------------ decoding, world coordinates


@dataclass(frozen=True)
class KeypointDecoding:
    """How heatmaps become keypoints (`keypoints_from_heatmaps`): peaks >= threshold, radius_mm apart, at most
    max_per_class per class (None: all). Recorded in bundles so the device runtime decodes as evaluation does."""

    radius_mm: float = 4.0
    threshold: float = 0.5
    max_per_class: int | None = None

    def __post_init__(self) -> None:
        _positive(self.radius_mm, "radius_mm")
        if not (math.isfinite(self.threshold) and 0.0 < self.threshold <= 1.0):
            raise UserError(f"keypoint threshold must be within (0, 1], got {self.threshold}")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise UserError(f"max_per_class must be >= 1 (or null for all), got {self.max_per_class}")

    def to_dict(self) -> dict[str, float | int | None]:
        return {"radius_mm": float(self.radius_mm), "threshold": float(self.threshold),
                "max_per_class": self.max_per_class}


def decode_keypoints(heatmaps: np.ndarray, spacing: Sequence[float], labels: Sequence[int],
                     decoding: KeypointDecoding) -> list[Keypoint]:
    """`keypoints_from_heatmaps` with a KeypointDecoding; channel k of heatmaps (C, *S) is class labels[k]."""
    return keypoints_from_heatmaps(heatmaps, spacing, radius_mm=decoding.radius_mm, threshold=decoding.threshold,
                                   labels=labels, max_per_class=decoding.max_per_class)


def world_positions(positions: np.ndarray | Sequence[Sequence[float]], affine: np.ndarray) -> np.ndarray:
    """Voxel positions (N, d) on a grid whose voxel-to-world affine is (4, 4) -> world coordinates (N, 3) in mm.

    A 2D grid uses the affine's first two columns (its third voxel index is 0).
    """
    affine = np.asarray(affine, dtype=np.float64)
    points = np.asarray(positions, dtype=np.float64)
    if points.size == 0:
        return np.zeros((0, 3))
    points = points.reshape(len(points), -1)
    d = points.shape[1]
    if affine.shape != (4, 4) or not 1 <= d <= 3:
        raise UserError(f"world_positions needs a (4, 4) affine and 1..3 voxel coordinates, got {affine.shape}, {d}")
    return points @ affine[:3, :d].T + affine[:3, 3]


__all__ = [
    "Keypoint",
    "KeypointDecoding",
    "decode_keypoints",
    "gaussian_heatmaps",
    "heatmaps_from_label_volume",
    "keypoints_from_heatmaps",
    "keypoints_from_label_volume",
    "label_volume_from_keypoints",
    "move_keypoints",
    "world_positions",
]
