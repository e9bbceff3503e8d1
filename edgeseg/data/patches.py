"""Patch sampling with foreground oversampling, and padding helpers (numpy only)."""

from __future__ import annotations

import numpy as np


def pad_to_shape(array: np.ndarray, shape: tuple[int, ...], value: float = 0.0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Pad the trailing len(shape) axes symmetrically up to at least `shape`; returns the pad widths.

    Shape: array (..., *S) -> (..., *max(S, shape)).
    """
    lead = array.ndim - len(shape)
    widths = [(0, 0)] * lead
    for size, want in zip(array.shape[lead:], shape):
        extra = max(want - size, 0)
        widths.append((extra // 2, extra - extra // 2))
    if all(w == (0, 0) for w in widths):
        return array, widths[lead:]
    return np.pad(array, widths, mode="constant", constant_values=value), widths[lead:]


def crop_padding(array: np.ndarray, widths: list[tuple[int, int]]) -> np.ndarray:
    """Undo `pad_to_shape` on the trailing axes."""
    n = len(widths)
    index = [slice(None)] * (array.ndim - n)
    for (lo, hi), size in zip(widths, array.shape[array.ndim - n:]):
        index.append(slice(lo, size - hi))
    return array[tuple(index)]


def round_up_shape(shape: tuple[int, ...], multiple: int, minimum: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Each size rounded up to a multiple of `multiple` (and at least `minimum`)."""
    out = []
    for i, s in enumerate(shape):
        s = max(s, minimum[i]) if minimum is not None else s
        out.append(int(np.ceil(s / multiple) * multiple))
    return tuple(out)


class PatchSampler:
    """Draws training patches from one case.

    With probability `foreground_oversample` the patch is centred (with jitter) on a random
    foreground voxel, otherwise placed uniformly — the nnU-Net scheme that keeps small
    structures in view. Volumes smaller than the patch are padded (image with 0, i.e. the mean
    after z-scoring; label with background).
    Shape: image (C, *S), label (*S) -> (C, *patch), (*patch).
    """

    def __init__(self, image: np.ndarray, label: np.ndarray, patch_size: tuple[int, ...]):
        self.patch_size = tuple(patch_size)
        self.image, _ = pad_to_shape(image, self.patch_size)
        self.label, _ = pad_to_shape(label, self.patch_size)
        self.foreground = np.argwhere(self.label > 0)  # (N, ndim) coordinates, computed once

    def sample(self, rng: np.random.Generator, foreground: bool) -> tuple[np.ndarray, np.ndarray]:
        shape = self.label.shape
        if foreground and len(self.foreground):
            centre = self.foreground[rng.integers(len(self.foreground))]
            starts = [int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, s - p))
                      for c, p, s in zip(centre, self.patch_size, shape)]
        else:
            starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(shape, self.patch_size)]
        index = tuple(slice(st, st + p) for st, p in zip(starts, self.patch_size))
        return self.image[(slice(None), *index)], self.label[index]
