"""Preprocessing shared by training and the device runtime (numpy, scipy, nibabel only).

Order, as in nnU-Net: reorient to the closest canonical (RAS+) orientation -> normalise
intensities per channel -> resample to the target spacing. `undo_spatial` maps predictions back
through the inverse resampling and inverse reorientation, onto exactly the input's grid.

Resampling convention (the same one as `scipy.ndimage.zoom(..., grid_mode=True)`): the field
of view is kept, i.e. the outer voxel *edges* of the old and new grids coincide. For an axis of
n voxels at spacing s resampled to spacing t, the new size is m = max(1, round(n * s / t)), the
actual new spacing is s * n / m (close to, not always exactly, t), and new voxel o samples old
voxel coordinate (o + 0.5) * n / m - 0.5. Outside the old centres values are extended from the
edge (mode "nearest"). Images use linear interpolation (order 1, MONAI's default: no overshoot),
labels nearest neighbour (order 0), probabilities linear.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from edgeseg.data.io import Volume
from edgeseg.errors import UserError, unknown_name

NORMALIZATIONS = ("zscore", "percentile", "none")
STD_FLOOR = 1e-8
IMAGE_ORDER = 1
LABEL_ORDER = 0
PROBABILITY_ORDER = 1


# ------------------------------------------------------------------------------------ orientation


@dataclass(frozen=True)
class Orientation:
    """How a volume was reoriented: enough to undo it exactly.

    ornt: (d, 2) nibabel orientation taking the original array axes to canonical ones
    (axis codes ranked to 0..d-1 so that 2D grids work too).
    """

    ornt: np.ndarray
    original_shape: tuple[int, ...]
    original_affine: np.ndarray


def canonical_orientation(affine: np.ndarray, spatial_ndim: int) -> np.ndarray:
    """(d, 2) orientation from array axes to the closest canonical (RAS+) axes, via io_orientation."""
    columns = list(range(spatial_ndim)) + [3]
    ornt = io_orientation(np.asarray(affine, dtype=np.float64)[:, columns])
    if np.isnan(ornt).any():
        raise UserError("cannot reorient: the voxel-to-world affine is degenerate")
    ornt = ornt.copy()
    # For 2D grids the world axes may be e.g. {x, z}; rank them so the result indexes the 2 array axes.
    ornt[:, 0] = np.argsort(np.argsort(ornt[:, 0]))
    return ornt


def _embed(transform: np.ndarray, spatial_ndim: int) -> np.ndarray:
    """A (d+1, d+1) voxel transform as a (4, 4) one acting on the first d voxel axes."""
    full = np.eye(4)
    idx = list(range(spatial_ndim)) + [3]
    full[np.ix_(idx, idx)] = transform
    return full


def _apply_ornt(array: np.ndarray, ornt: np.ndarray, channels_first: bool) -> np.ndarray:
    if channels_first:  # apply_orientation reorients the leading axes
        return np.moveaxis(apply_orientation(np.moveaxis(array, 0, -1), ornt), -1, 0)
    return apply_orientation(array, ornt)


def reorient_to_canonical(vol: Volume) -> tuple[Volume, Orientation]:
    """The volume in the closest canonical (RAS+) orientation, as `nib.as_closest_canonical` does.

    Works for images (C, *S) and labels (*S); the header is passed through untouched (it describes
    the file as read, for writing outputs on the original grid).
    """
    d = len(vol.spacing)
    shape = vol.spatial_shape
    ornt = canonical_orientation(vol.affine, d)
    array = np.ascontiguousarray(_apply_ornt(vol.array, ornt, vol.array.ndim == d + 1))
    affine = vol.affine @ _embed(inv_ornt_aff(ornt, shape), d)
    info = Orientation(ornt, shape, np.array(vol.affine, dtype=np.float64, copy=True))
    return Volume(array, affine, _spacing(affine, d), vol.header), info


def reorient_from_canonical(vol: Volume, info: Orientation) -> Volume:
    """Undo `reorient_to_canonical`: the original axis order and the original affine, exactly."""
    d = len(info.original_shape)
    array = np.ascontiguousarray(undo_orientation(vol.array, info.ornt, channels_first=vol.array.ndim == d + 1))
    affine = np.array(info.original_affine, copy=True)
    return Volume(array, affine, _spacing(affine, d), vol.header)


def undo_orientation(array: np.ndarray, ornt: np.ndarray, channels_first: bool) -> np.ndarray:
    """Map an array on the canonical grid back to the original axes (flips and transposes only)."""
    identity = np.column_stack([np.arange(len(ornt)), np.ones(len(ornt))])
    return _apply_ornt(array, ornt_transform(identity, ornt), channels_first)


def _spacing(affine: np.ndarray, ndim: int) -> tuple[float, ...]:
    return tuple(float(np.linalg.norm(affine[:3, i])) for i in range(ndim))


# ------------------------------------------------------------------------------------- resampling


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    """Grid size that keeps the field of view at (about) `target_spacing`: max(1, round(n * s / t))."""
    if len(target_spacing) != len(shape):
        raise UserError(f"target_spacing {list(target_spacing)} has {len(target_spacing)} values "
                        f"but the image has {len(shape)} spatial axes")
    if any(not (t > 0 and math.isfinite(t)) for t in target_spacing):
        raise UserError(f"target_spacing {list(target_spacing)} must be positive and finite")
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing))


def resample_array(array: np.ndarray, out_shape: Sequence[int], order: int) -> np.ndarray:
    """Resample (*S) or (C, *S) to spatial shape `out_shape` keeping the field of view (see module doc).

    This is `scipy.ndimage.zoom(grid_mode=True, mode="nearest")` with the output shape given
    explicitly (zoom derives it by rounding, which could be off by one). Shape: (*out) or (C, *out).
    """
    out_shape = tuple(int(n) for n in out_shape)
    d = len(out_shape)
    if array.ndim == d + 1:
        return np.stack([resample_array(channel, out_shape, order) for channel in array])
    if array.shape == out_shape:
        return array.copy()
    factors = np.array([n / m for n, m in zip(array.shape, out_shape)])
    return ndimage.affine_transform(
        array, factors, offset=0.5 * factors - 0.5, output_shape=out_shape, order=order, mode="nearest",
        prefilter=order > 1,
    )


def _scaling(in_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
    """(4, 4) voxel transform from the resampled grid to the old one (new index -> old index)."""
    d = len(in_shape)
    factors = np.array([n / m for n, m in zip(in_shape, out_shape)])
    transform = np.diag(np.append(factors, 1.0))
    transform[:d, d] = 0.5 * factors - 0.5
    return _embed(transform, d)


def resample(vol: Volume, target_spacing: Sequence[float], order: int) -> Volume:
    """`vol` on a grid of about `target_spacing` mm covering the same field of view.

    The returned spacing is the actual one (s * n / m per axis). Shape: like vol.array.
    """
    shape = vol.spatial_shape
    out_shape = resampled_shape(shape, vol.spacing, target_spacing)
    array = resample_array(vol.array, out_shape, order)
    affine = vol.affine @ _scaling(shape, out_shape)
    return Volume(array, affine, _spacing(affine, len(shape)), vol.header)


def resample_to_shape(vol: Volume, shape: Sequence[int], affine: np.ndarray, order: int) -> Volume:
    """Back from `resample`: onto the original grid (`shape`, `affine`) with the same convention."""
    array = resample_array(vol.array, shape, order)
    affine = np.array(affine, dtype=np.float64, copy=True)
    return Volume(array, affine, _spacing(affine, len(tuple(shape))), vol.header)


# ---------------------------------------------------------------------------------- intensities


def normalize(
    image: np.ndarray, method: str, clip_percentiles: tuple[float, float] = (0.5, 99.5)
) -> np.ndarray:
    """Per-channel, per-volume intensity normalisation. Shape: (C, *S) -> (C, *S) float32.

    "zscore": (x - mean) / max(std, 1e-8) over all voxels of the channel (population std).
    "percentile": clip to the channel's `clip_percentiles` (linear-interpolated numpy percentiles),
    then z-score as above; robust to CT air/metal and MRI spikes.
    "none": the values unchanged, as float32.
    """
    if method not in NORMALIZATIONS:
        raise unknown_name("normalization", method, NORMALIZATIONS)
    # Memory: one float32 output and chunk-sized float64 temporaries. A float64 copy per step
    # (astype, clip, subtract, divide) took a 512x512x300 CT to several GB.
    out = np.empty(image.shape, dtype=np.float32)
    for c, channel in enumerate(image):
        x = out[c]
        x[...] = channel
        if method == "none":
            continue
        if method == "percentile":
            lo, hi = np.percentile(x, clip_percentiles)
            np.clip(x, lo, hi, out=x)
        mean, std = _mean_std(x)
        x -= np.float32(mean)
        x /= np.float32(max(std, STD_FLOOR))
    return out


def _mean_std(x: np.ndarray, chunk: int = 1 << 22) -> tuple[float, float]:
    """Mean and population std of all of `x`, accumulated in float64 over chunks (two passes).

    Hand-written because np.std materialises a full-size float64 `x - mean` temporary.
    """
    flat = x.reshape(-1)
    n = flat.size
    total = sum(float(np.sum(flat[i:i + chunk], dtype=np.float64)) for i in range(0, n, chunk))
    mean = total / n
    squares = sum(float(np.sum(np.square(flat[i:i + chunk].astype(np.float64) - mean))) for i in range(0, n, chunk))
    return mean, (squares / n) ** 0.5


# ------------------------------------------------------------------------------------------ labels


def apply_label_map(label: np.ndarray, label_map: Mapping[int, int]) -> np.ndarray:
    """Replace values by `label_map` (all at once, not chained); others stay. Shape: (*S) -> (*S) int64."""
    values, inverse = np.unique(label, return_inverse=True)
    mapped = np.array([label_map.get(int(v), int(v)) for v in values], dtype=np.int64)
    return mapped[inverse].reshape(label.shape)


def remap_labels(label: np.ndarray, label_map: Mapping[int, int], num_classes: int) -> np.ndarray:
    """Apply `label_map`, then check every value is a class index 0..num_classes-1. Shape: (*S) uint8."""
    mapped = apply_label_map(label, label_map)
    values = np.unique(mapped)
    bad = values[(values < 0) | (values >= num_classes)]
    if len(bad):
        raise UserError(f"label values {[int(v) for v in bad[:10]]} are outside the class list "
                        f"0..{num_classes - 1} after label_map {dict(label_map)}; add them to data.label_map")
    return mapped.astype(np.uint8)


# -------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything preprocessing needs; stored in the model bundle so the runtime repeats it exactly."""

    reorient: bool = True
    target_spacing: tuple[float, ...] | None = None  # mm per axis (canonical order); None keeps native
    normalization: str = "zscore"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    label_map: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise unknown_name("normalization", self.normalization, NORMALIZATIONS)
        lo, hi = (float(p) for p in self.clip_percentiles)
        if not 0 <= lo < hi <= 100:
            raise UserError(f"clip_percentiles {[lo, hi]} must satisfy 0 <= low < high <= 100")
        object.__setattr__(self, "clip_percentiles", (lo, hi))
        if self.target_spacing is not None:
            spacing = tuple(float(s) for s in self.target_spacing)
            if not spacing or any(not (s > 0 and math.isfinite(s)) for s in spacing):
                raise UserError(f"target_spacing {list(spacing)} must be positive and finite")
            object.__setattr__(self, "target_spacing", spacing)
        try:
            label_map = {int(k): int(v) for k, v in dict(self.label_map).items()}
        except (TypeError, ValueError) as exc:
            raise UserError(f"label_map {self.label_map!r} must map integers to integers") from exc
        object.__setattr__(self, "label_map", label_map)
        object.__setattr__(self, "reorient", bool(self.reorient))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (label_map keys become strings)."""
        return {
            "reorient": self.reorient,
            "target_spacing": None if self.target_spacing is None else list(self.target_spacing),
            "normalization": self.normalization,
            "clip_percentiles": list(self.clip_percentiles),
            "label_map": {str(k): v for k, v in sorted(self.label_map.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        known = ("reorient", "target_spacing", "normalization", "clip_percentiles", "label_map")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(f"unknown preprocessing field(s) {unknown}; expected {list(known)}")
        kwargs = dict(data)
        if kwargs.get("target_spacing") is not None:
            kwargs["target_spacing"] = tuple(kwargs["target_spacing"])
        if "clip_percentiles" in kwargs:
            kwargs["clip_percentiles"] = tuple(kwargs["clip_percentiles"])
        return cls(**kwargs)


@dataclass(frozen=True)
class SpatialPlan:
    """The spatial steps for one input grid: orientation (or None) and the preprocessed grid."""

    ornt: np.ndarray | None
    canonical_shape: tuple[int, ...]
    canonical_spacing: tuple[float, ...]
    shape: tuple[int, ...]  # the preprocessed grid


def spatial_plan(original: Volume, spec: PreprocessSpec) -> SpatialPlan:
    """Where `preprocess_case` puts `original`'s grid (computed from geometry only)."""
    d = len(original.spacing)
    shape, spacing = original.spatial_shape, tuple(original.spacing)
    ornt = None
    if spec.reorient:
        ornt = canonical_orientation(original.affine, d)
        affine = original.affine @ _embed(inv_ornt_aff(ornt, shape), d)
        order = np.argsort(ornt[:, 0])  # canonical axis k comes from original axis order[k]
        shape, spacing = tuple(shape[i] for i in order), _spacing(affine, d)
    out = shape if spec.target_spacing is None else resampled_shape(shape, spacing, spec.target_spacing)
    return SpatialPlan(ornt, tuple(shape), tuple(spacing), tuple(out))


def preprocess_case(
    image: Volume, label: Volume | None, spec: PreprocessSpec
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]:
    """Reorient, normalise and resample one case; apply label_map to the label (no class check here).

    Returns (image (C, *P) float32, label (*P) int64 or None, spacing of P in mm). The label follows
    the image's geometry (read_label has checked that both share a grid).
    """
    vol = image
    labels = None if label is None else apply_label_map(label.array, spec.label_map)
    if spec.reorient:
        vol, info = reorient_to_canonical(image)
        if labels is not None:
            labels = np.ascontiguousarray(_apply_ornt(labels, info.ornt, channels_first=False))
    array = normalize(vol.array, spec.normalization, spec.clip_percentiles)
    spacing = tuple(vol.spacing)
    if spec.target_spacing is not None:
        resampled = resample(Volume(array, vol.affine, vol.spacing), spec.target_spacing, IMAGE_ORDER)
        if labels is not None:
            labels = resample_array(labels, resampled.spatial_shape, LABEL_ORDER)
        array, spacing = resampled.array.astype(np.float32, copy=False), resampled.spacing
    return np.ascontiguousarray(array), labels, spacing


def undo_spatial(prediction: np.ndarray, spec: PreprocessSpec, original: Volume) -> np.ndarray:
    """Map a prediction on the preprocessed grid back onto `original`'s grid, exactly its shape.

    Shape: labels (*P) integer -> (*S), resampled nearest-neighbour; probabilities (C, *P) float ->
    (C, *S), resampled linearly. `original` is the image Volume as read (C, *S).
    """
    plan = spatial_plan(original, spec)
    d = len(original.spacing)
    channels_first = prediction.ndim == d + 1
    if prediction.ndim not in (d, d + 1) or tuple(prediction.shape[prediction.ndim - d:]) != plan.shape:
        raise ValueError(f"prediction of shape {prediction.shape} is not on the preprocessed grid {plan.shape}")
    out = prediction
    if plan.shape != plan.canonical_shape:
        out = resample_array(out, plan.canonical_shape, PROBABILITY_ORDER if channels_first else LABEL_ORDER)
    if plan.ornt is not None:
        out = undo_orientation(out, plan.ornt, channels_first)
    return np.ascontiguousarray(out)
