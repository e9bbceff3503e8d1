"""Patch sampling (foreground oversampling, or positive/negative windows for class sampling), and padding
helpers (numpy only)."""

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


def window_foreground_counts(mask: np.ndarray, window: tuple[int, ...]) -> np.ndarray:
    """Foreground voxels inside every window position: out[s] = mask[s : s + window].sum().

    A running sum along each axis in turn (cumulative sums), O(voxels x axes) whatever the window.
    Shape: mask (*S) bool, S >= window -> (*(S - window + 1)) int64.
    """
    counts = mask.astype(np.int64)
    for axis, w in enumerate(window):
        if counts.shape[axis] < w:
            raise ValueError(f"window {window} larger than the array {mask.shape}")
        cum = np.cumsum(counts, axis=axis)
        zero = np.zeros_like(cum.take([0], axis=axis))
        cum = np.concatenate([zero, cum], axis=axis)
        n = cum.shape[axis]
        counts = cum.take(range(w, n), axis=axis) - cum.take(range(n - w), axis=axis)
    return counts


class PatchSampler:
    """Draws training patches from one case.

    With probability `foreground_oversample` the patch is centred (with jitter) on a random
    foreground voxel, otherwise placed uniformly — the nnU-Net scheme that keeps small
    structures in view. Volumes smaller than the patch are padded (image with 0, i.e. the mean
    after z-scoring; label with background).

    For class sampling (two-step training) `sample_window` draws a window position uniformly among
    the positive ones (holding some foreground) or the negative ones (holding none); the two
    position lists are computed on first use.

    Each `sample*` method is `crop(draw*(...))`: `draw` / `draw_window` give the patch's start on the padded
    grid, and `origin(start)` its first voxel on the case's own grid (negative inside the padding), which is
    what a map of the case (STIPPLE's prior) needs to be cut at the same place.
    Shape: image (C, *S), label (*S) -> (C, *patch), (*patch).
    """

    def __init__(self, image: np.ndarray, label: np.ndarray, patch_size: tuple[int, ...]):
        self.patch_size = tuple(patch_size)
        self.image, widths = pad_to_shape(image, self.patch_size)
        self.label, _ = pad_to_shape(label, self.patch_size)
        self.offset = tuple(lo for lo, _ in widths)  # voxels of padding before the case on each axis
        self.foreground = np.argwhere(self.label > 0)  # (N, ndim) coordinates, computed once
        self._windows: dict[bool, np.ndarray] | None = None

    def draw(self, rng: np.random.Generator, foreground: bool) -> tuple[int, ...]:
        """The start (padded grid) of a patch centred near a foreground voxel, or placed uniformly."""
        shape = self.label.shape
        if foreground and len(self.foreground):
            centre = self.foreground[rng.integers(len(self.foreground))]
            return tuple(int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, s - p))
                         for c, p, s in zip(centre, self.patch_size, shape))
        return tuple(int(rng.integers(0, s - p + 1)) for s, p in zip(shape, self.patch_size))

    def crop(self, start: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The image and label patch whose first voxel is `start` on the padded grid."""
        index = tuple(slice(int(st), int(st) + p) for st, p in zip(start, self.patch_size))
        return self.image[(slice(None), *index)], self.label[index]

    def origin(self, start: tuple[int, ...]) -> tuple[int, ...]:
        """The patch's first voxel on the case's own (unpadded) grid."""
        return tuple(int(st) - lo for st, lo in zip(start, self.offset))

    def sample(self, rng: np.random.Generator, foreground: bool) -> tuple[np.ndarray, np.ndarray]:
        return self.crop(self.draw(rng, foreground))

    def windows(self, positive: bool) -> np.ndarray:
        """Flat indices (into the grid of window starts) of the positive or negative windows."""
        if self._windows is None:
            counts = window_foreground_counts(self.label > 0, self.patch_size)
            self._start_grid = counts.shape
            self._windows = {True: np.flatnonzero(counts > 0), False: np.flatnonzero(counts == 0)}
        return self._windows[positive]

    def draw_window(self, rng: np.random.Generator, positive: bool) -> tuple[int, ...]:
        """The start of a window drawn uniformly among the positive (or negative) ones."""
        choices = self.windows(positive)
        if not len(choices):
            raise ValueError(f"this case has no {'positive' if positive else 'negative'} patch windows")
        starts = np.unravel_index(int(choices[rng.integers(len(choices))]), self._start_grid)
        return tuple(int(st) for st in starts)

    def sample_window(self, rng: np.random.Generator, positive: bool) -> tuple[np.ndarray, np.ndarray]:
        """A patch at a window position drawn uniformly among the positive (or negative) ones."""
        return self.crop(self.draw_window(rng, positive))
