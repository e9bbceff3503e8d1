"""Training augmentations as random samplers plus deterministic operations.

Each transform splits into `sample(rng) -> params` (all randomness) and
`apply(image, label, params)` (pure, deterministic). A `Compose` records the parameters it
drew in a history, so an augmentation can be replayed or inverted (what makes spatial
test-time augmentation invertible; the torchio idea). Works on numpy arrays so the same
code serves 2D and 3D: image (C, *S) float32, label (*S) uint8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from scipy import ndimage

Params = dict[str, Any]


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
        for a in params["axes"]:
            image = np.flip(image, axis=a + 1)
            label = None if label is None else np.flip(label, axis=a)
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
        label = None if label is None else np.ascontiguousarray(np.rot90(label, k, axes=(0, 1)))
        return image, label


@dataclass
class RandomAffine:
    """Small rotation (about every axis) and isotropic scaling around the centre."""

    prob: float = 0.2
    degrees: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
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
        image = np.stack([ndimage.affine_transform(c, matrix, offset, order=1, mode="nearest") for c in image])
        if label is not None:
            label = ndimage.affine_transform(label, matrix, offset, order=0, mode="constant", cval=0)
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


def build_augmentation(cfg, spatial_dims: int) -> Compose:
    """The augmentation pipeline an AugmentConfig describes (the one place that reads it)."""
    transforms: list[Transform] = [RandomFlip(tuple(a for a in cfg.flip_axes if a < spatial_dims))]
    if cfg.rotate90:
        transforms.append(RandomRot90())
    if cfg.affine_prob > 0:
        transforms.append(RandomAffine(cfg.affine_prob, cfg.rotate_degrees, tuple(cfg.scale_range)))
    if cfg.gamma_prob > 0:
        transforms.append(RandomGamma(cfg.gamma_prob, tuple(cfg.gamma_range)))
    if cfg.noise_prob > 0:
        transforms.append(RandomNoise(cfg.noise_prob, cfg.noise_std))
    return Compose(transforms)
