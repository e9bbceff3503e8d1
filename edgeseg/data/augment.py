"""Training augmentations as random samplers plus deterministic operations.

Each transform splits into `sample(rng) -> params` (all randomness) and
`apply(image, label, params)` (pure, deterministic). A `Compose` records the parameters it
drew in a history, so an augmentation can be replayed or inverted (what makes spatial
test-time augmentation invertible; the torchio idea). Works on numpy arrays so the same
code serves 2D and 3D: image (C, *S) float32; label either (*S) uint8 class indices or (K, *S)
float32 per-class values (one-hot or soft; what mixup, soft-label dilation and SoftSeg train on).

Besides the per-sample transforms, two label-softening schemes live here: `SoftLabelDilation`
(a transform on per-class labels) and `mixup` (a pair operation the batch sampler applies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

Params = dict[str, Any]


def per_class(label: np.ndarray | None, image: np.ndarray) -> bool:
    """True when `label` is a (K, *S) per-class map for `image` (C, *S), False for (*S) class indices."""
    return label is not None and label.ndim == image.ndim


def one_hot(label: np.ndarray, num_classes: int) -> np.ndarray:
    """(*S) class indices -> (K, *S) float32 one-hot."""
    if label.size and int(label.max()) >= num_classes:
        raise ValueError(f"label value {int(label.max())} is not a class index (0..{num_classes - 1})")
    return (np.arange(num_classes).reshape(-1, *([1] * label.ndim)) == label[None]).astype(np.float32)


class Transform(Protocol):
    name: str

    def sample(self, rng: np.random.Generator, spatial_dims: int) -> Params: ...
    def apply(self, image: np.ndarray, label: np.ndarray | None, params: Params) -> tuple[np.ndarray, np.ndarray | None]: ...


@dataclass
class RandomFlip:
    """Flip each allowed spatial axis with probability 1/2."""

    axes: tuple[int, ...] = (0, 1, 2)
    name: str = "flip"

    def sample(self, rng: np.random.Generator, spatial_dims: int) -> Params:
        return {"axes": [a for a in self.axes if a < spatial_dims and rng.random() < 0.5]}

    def apply(self, image, label, params):
        shift = 1 if per_class(label, image) else 0  # the label's channel axis, if it has one
        for a in params["axes"]:
            image = np.flip(image, axis=a + 1)
            label = None if label is None else np.flip(label, axis=a + shift)
        return np.ascontiguousarray(image), None if label is None else np.ascontiguousarray(label)


@dataclass
class RandomRot90:
    """Rotate by k*90 degrees in the plane of the first two spatial axes (square planes only)."""

    name: str = "rot90"

    def sample(self, rng: np.random.Generator, spatial_dims: int) -> Params:
        return {"k": int(rng.integers(0, 4))}

    def apply(self, image, label, params):
        k = params["k"]
        if k == 0 or image.shape[1] != image.shape[2]:
            return image, label
        image = np.ascontiguousarray(np.rot90(image, k, axes=(1, 2)))
        axes = (1, 2) if per_class(label, image) else (0, 1)
        label = None if label is None else np.ascontiguousarray(np.rot90(label, k, axes=axes))
        return image, label


@dataclass
class RandomAffine:
    """Small rotation (about every axis) and isotropic scaling around the centre.

    Class-index labels are resampled nearest-neighbour (outside: background). Per-class labels use
    `soft_label_order`: 0 (nearest, one-hot stays one-hot) or 1 (linear: border voxels get soft
    values and are never binarised again, as SoftSeg trains); outside, background is 1 and the
    other classes 0, so the values at each voxel still sum to 1.
    """

    prob: float = 0.2
    degrees: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    soft_label_order: int = 0
    name: str = "affine"

    def sample(self, rng: np.random.Generator, spatial_dims: int) -> Params:
        if rng.random() >= self.prob:
            return {"matrix": None}
        n_angles = 3 if spatial_dims == 3 else 1
        angles = np.deg2rad(rng.uniform(-self.degrees, self.degrees, n_angles))
        scale = rng.uniform(*self.scale_range)
        matrix = _rotation(angles, spatial_dims) / scale
        return {"matrix": matrix.tolist()}

    def apply(self, image, label, params):
        if params["matrix"] is None:
            return image, label
        matrix = np.asarray(params["matrix"])
        shape = np.array(image.shape[1:])
        centre = (shape - 1) / 2.0
        offset = centre - matrix @ centre
        if per_class(label, image):
            label = np.stack([ndimage.affine_transform(c, matrix, offset, order=self.soft_label_order,
                                                       mode="constant", cval=1.0 if k == 0 else 0.0)
                              for k, c in enumerate(label)]).astype(np.float32)
        elif label is not None:
            label = ndimage.affine_transform(label, matrix, offset, order=0, mode="constant", cval=0)
        image = np.stack([ndimage.affine_transform(c, matrix, offset, order=1, mode="nearest") for c in image])
        return image.astype(np.float32), label


def _rotation(angles: np.ndarray, spatial_dims: int) -> np.ndarray:
    if spatial_dims == 2:
        c, s = np.cos(angles[0]), np.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    return rot


@dataclass
class RandomGamma:
    """Gamma on the intensities rescaled to [0, 1], then mapped back to the original range."""

    prob: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    name: str = "gamma"

    def sample(self, rng: np.random.Generator, spatial_dims: int) -> Params:
        return {"gamma": float(rng.uniform(*self.gamma_range)) if rng.random() < self.prob else None}

    def apply(self, image, label, params):
        g = params["gamma"]
        if g is None:
            return image, label
        lo = image.min(axis=tuple(range(1, image.ndim)), keepdims=True)
        hi = image.max(axis=tuple(range(1, image.ndim)), keepdims=True)
        span = np.maximum(hi - lo, 1e-8)
        return (((image - lo) / span) ** g * span + lo).astype(np.float32), label


@dataclass
class RandomNoise:
    """Additive Gaussian noise; the noise itself is drawn from a recorded seed."""

    prob: float = 0.15
    std: float = 0.1
    name: str = "noise"

    def sample(self, rng: np.random.Generator, spatial_dims: int) -> Params:
        if rng.random() >= self.prob:
            return {"seed": None}
        return {"seed": int(rng.integers(0, 2**31 - 1)), "std": float(rng.uniform(0, self.std))}

    def apply(self, image, label, params):
        if params["seed"] is None:
            return image, label
        noise = np.random.default_rng(params["seed"]).normal(0.0, params["std"], image.shape)
        return (image + noise).astype(np.float32), label


SPATIAL_TRANSFORMS: tuple[str, ...] = ("flip", "rot90", "affine")  # transforms that move voxels


@dataclass
class Compose:
    """Apply transforms in order, recording (name, params) of each in `history`."""

    transforms: list[Transform]
    history: list[tuple[str, Params]] = field(default_factory=list)

    def __call__(self, image, label, rng: np.random.Generator):
        spatial_dims = image.ndim - 1
        self.history = []
        for t in self.transforms:
            params = t.sample(rng, spatial_dims)
            self.history.append((t.name, params))
            image, label = t.apply(image, label, params)
        return image, label

    def apply_spatial(self, maps: np.ndarray) -> np.ndarray:
        """Replay the last call's spatial transforms (flips, 90-degree rotations, affine) on per-class maps
        of the same spatial shape, such as STIPPLE's prior patch, so that they stay aligned with the image.
        The maps move as image channels do: the affine interpolates them linearly (edge values extended),
        which keeps a partition of unity one. Intensity transforms and label softening are not replayed.
        Shape: (K, *S) -> (K, *S) float32."""
        for t, (name, params) in zip(self.transforms, self.history):
            if name in SPATIAL_TRANSFORMS:
                maps, _ = t.apply(maps, None, params)
        return np.ascontiguousarray(maps, dtype=np.float32)


@dataclass
class SoftLabelDilation:
    """Soft-label augmentation by dilation (ivadomed's DilateGT, Gros et al.; methods.md).

    Each connected object (connectivity 1) of each foreground class is dilated n = round(factor *
    sqrt(object voxels)) times with the cross-shaped structuring element; the voxels added by the
    d-th dilation get (n + 1 - d) / (n + 1), so the value falls with the distance to the object and
    the expert voxels stay 1. The d-th dilation reaches exactly the voxels at city-block distance d,
    so the distance map of `ndimage.distance_transform_cdt(metric="taxicab")` gives the rings in one
    pass. Objects' maps are summed and clipped to [0, 1], as DilateGT does.

    Multi-class (DilateGT handles one mask; edgeseg's labels carry a background channel): the soft
    values land only on voxels the expert labelled background; where the rings of several classes
    meet they are rescaled to sum to 1, and background takes 1 - the sum. A binary label therefore
    gets exactly DilateGT's foreground map and its complement as background.

    Needs per-class labels (K, *S); a class-index label is left as it is.
    """

    factor: float
    name: str = "soft_dilation"

    def sample(self, rng: np.random.Generator, spatial_dims: int) -> Params:
        return {}

    def apply(self, image, label, params):
        if self.factor <= 0 or not per_class(label, image):
            return image, label
        return image, soft_dilate(label, self.factor)


def dilation_rings(mask: np.ndarray, factor: float) -> np.ndarray:
    """DilateGT's soft map of one binary mask: 1 inside, (n + 1 - d) / (n + 1) at city-block distance
    d <= n of each object (n per object, see `SoftLabelDilation`), summed over objects, clipped to [0, 1].

    Shape: (*S) bool -> (*S) float32.
    """
    objects, _ = ndimage.label(mask)
    out = np.zeros(mask.shape, np.float64)
    for index, box in enumerate(ndimage.find_objects(objects), start=1):
        if box is None:
            continue
        n = round(factor * math.sqrt(int((objects[box] == index).sum())))
        # every voxel within city-block distance n lies in the object's bounding box grown by n
        grown = tuple(slice(max(b.start - n, 0), min(b.stop + n, size)) for b, size in zip(box, mask.shape))
        distance = ndimage.distance_transform_cdt(objects[grown] != index, metric="taxicab")
        out[grown] += np.where(distance <= n, (n + 1 - distance) / (n + 1), 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def soft_dilate(label: np.ndarray, factor: float) -> np.ndarray:
    """Soft-label dilation of a per-class label (see `SoftLabelDilation`). Shape: (K, *S) -> (K, *S) float32."""
    hard = label > 0.5  # DilateGT binarises its input first
    expert_background = ~hard[1:].any(axis=0)
    soft = np.stack([dilation_rings(m, factor) for m in hard[1:]])  # (K - 1, *S)
    soft = np.where(expert_background, soft, hard[1:].astype(np.float32))
    total = soft.sum(axis=0)
    soft = np.where(total > 1.0, soft / np.maximum(total, 1e-12), soft)
    background = np.clip(1.0 - soft.sum(axis=0), 0.0, 1.0)
    return np.concatenate([background[None], soft]).astype(np.float32)


def mixup_lambda(rng: np.random.Generator, alpha: float) -> float:
    """lam ~ Beta(alpha, alpha) (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization", ICLR)."""
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    return float(rng.beta(alpha, alpha))


def mixup(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray],
          lam: float) -> tuple[np.ndarray, np.ndarray]:
    """mixup (Zhang et al. 2018): x = lam x1 + (1 - lam) x2, y = lam y1 + (1 - lam) y2.

    For segmentation the labels are mixed voxel by voxel as per-class maps (one-hot or soft).
    Shape: images (C, *S), labels (K, *S) float -> the same.
    """
    (x1, y1), (x2, y2) = first, second
    if y1.ndim != x1.ndim or y2.shape != y1.shape:
        raise ValueError("mixup needs per-class labels (K, *S) of the same shape")
    image = lam * x1 + (1.0 - lam) * x2
    label = lam * y1 + (1.0 - lam) * y2
    return image.astype(np.float32), label.astype(np.float32)


def build_augmentation(cfg, spatial_dims: int, *, per_class_labels: bool = False, soft_labels: bool = False) -> Compose:
    """The augmentation pipeline an AugmentConfig describes (the one place that reads it).

    per_class_labels: the sampler feeds (K, *S) label maps, so the label-softening dilation
    (`cfg.soft_dilation_factor`) can run, first, on the crisp labels; soft_labels: spatial
    transforms interpolate those maps linearly and never binarise them (SoftSeg). mixup is not
    a per-sample transform: the batch sampler applies it (`edgeseg.train.sampling`).
    """
    transforms: list[Transform] = []
    if per_class_labels and cfg.soft_dilation_factor > 0:
        transforms.append(SoftLabelDilation(cfg.soft_dilation_factor))
    transforms.append(RandomFlip(tuple(a for a in cfg.flip_axes if a < spatial_dims)))
    if cfg.rotate90:
        transforms.append(RandomRot90())
    if cfg.affine_prob > 0:
        transforms.append(RandomAffine(cfg.affine_prob, cfg.rotate_degrees, tuple(cfg.scale_range),
                                       soft_label_order=1 if soft_labels else 0))
    if cfg.gamma_prob > 0:
        transforms.append(RandomGamma(cfg.gamma_prob, tuple(cfg.gamma_range)))
    if cfg.noise_prob > 0:
        transforms.append(RandomNoise(cfg.noise_prob, cfg.noise_std))
    return Compose(transforms)
