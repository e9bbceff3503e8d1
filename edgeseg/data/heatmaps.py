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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

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


__all__ = [
    "Keypoint",
    "gaussian_heatmaps",
    "heatmaps_from_label_volume",
    "keypoints_from_heatmaps",
    "keypoints_from_label_volume",
    "label_volume_from_keypoints",
]
