"""Modality masks for hetero-modal training (HeMIS, Havaei et al. 2016): random dropping and zero-filling.

Numpy only. A case's mask is (M,) bool, True where the modality's channel holds an image. Missing
modalities (no file) and modalities dropped for a training sample are both zero-filled, which after
per-channel z-scoring is the channel's mean: an image-only model sees "no information" there, and
HeMIS's fusion ignores the channel through the mask.
"""

from __future__ import annotations

import numpy as np


def drop_modalities(present: np.ndarray, drop_prob: float, rng: np.random.Generator) -> np.ndarray:
    """A random subset of the present modalities, never empty: each is dropped with probability `drop_prob`,
    redrawn until one is kept (the conditional distribution; with 0.5 every non-empty subset is equally likely).

    No draw is made when nothing can be dropped (drop_prob 0, or at most one modality present).
    Shape: present (M,) bool -> (M,) bool, a subset of `present`.
    """
    present = np.asarray(present, dtype=bool)
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop_prob must be within [0, 1), got {drop_prob}")
    if not present.any():
        raise ValueError("no modality present to keep")
    if drop_prob == 0.0 or present.sum() == 1:
        return present.copy()
    while True:
        kept = present & (rng.random(present.shape[0]) >= drop_prob)
        if kept.any():
            return kept


def zero_absent(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`image` with the channels of absent modalities set to 0 (a copy when any is). Shape: (M, *S) -> (M, *S)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (image.shape[0],):
        raise ValueError(f"mask of shape {mask.shape} for an image of {image.shape[0]} channels")
    if mask.all():
        return image
    out = image.copy()
    out[~mask] = 0
    return out
