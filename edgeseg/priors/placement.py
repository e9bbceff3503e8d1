"""Placing STIPPLE's prior on a volume without labels (O. Petit, PhD thesis, CNAM 2021; ../shared/methods.md):
the integer translation that minimises the KL divergence between the network's coarse probabilities on the
new volume and those of a reference training volume, whose organ centres are known from its labels.

`best_translation(moving, reference)` returns t such that moving(v + t) best matches reference(v):

    t* = argmin_t  sum_v sum_k P_t(v)_k ln(P_t(v)_k / Q(v)_k),   P_t(v) = P(v + t)

over the reference grid, with P the moving probabilities (class 0 = background) and P_t(v) = pure background
where v + t falls outside the moving volume, so every shift is scored on the same voxels. Q is floored at
`eps` (ln 0), 0 ln 0 = 0 (`scipy.special.rel_entr`). The search runs coarse to fine: at each factor f of
`factors` both maps are average-pooled by f (padding with background); the first level tries every shift
within +-max_shift, each later level the window of +-(previous f / f) around the previous best. The organ
centres on the new volume are then the reference's plus t (`placed_centres`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.special import rel_entr


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-6) -> float:
    """sum over all entries of p ln(p / q), with q floored at `eps` and 0 ln 0 = 0 (channel axis first)."""
    return float(rel_entr(p.astype(np.float64), np.maximum(q.astype(np.float64), eps)).sum())


def shifted(moving: np.ndarray, shift: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """P_t on a grid of spatial `shape`: out[:, v] = moving[:, v + shift] inside the moving volume, pure
    background (channel 0 = 1) outside. Shape: (K, *S_moving) -> (K, *shape)."""
    out = np.zeros((moving.shape[0], *shape), dtype=moving.dtype)
    out[0] = 1
    src, dst = [slice(None)], [slice(None)]
    for t, n_out, n_in in zip(shift, shape, moving.shape[1:]):
        lo, hi = max(0, -t), min(n_out, n_in - t)
        if hi <= lo:
            return out
        dst.append(slice(lo, hi))
        src.append(slice(lo + t, hi + t))
    out[tuple(dst)] = moving[tuple(src)]
    return out


def pool(probabilities: np.ndarray, factor: int) -> np.ndarray:
    """Average-pool the spatial axes by `factor`, padding with background to a multiple of it (still sums to 1).
    Shape: (K, *S) -> (K, *ceil(S / factor))."""
    if factor == 1:
        return probabilities
    spatial = probabilities.shape[1:]
    padded_shape = tuple(-(-n // factor) * factor for n in spatial)
    padded = shifted(probabilities, (0,) * len(spatial), padded_shape)
    split = [probabilities.shape[0]]
    for n in padded_shape:
        split += [n // factor, factor]
    return padded.reshape(split).mean(axis=tuple(range(2, 2 + 2 * len(spatial), 2)))


def best_translation(moving: np.ndarray, reference: np.ndarray, max_shift: int | Sequence[int],
                     factors: Sequence[int] = (4, 2, 1), eps: float = 1e-6) -> tuple[int, ...]:
    """The integer shift t (voxels, per spatial axis) minimising KL(P_t || Q) (module docstring), searched coarse
    to fine over `factors` (decreasing, ending with 1) within +-max_shift. Ties go to the first shift in
    lexicographic order. moving (K, *S1) and reference (K, *S2) are class probabilities."""
    ndim = reference.ndim - 1
    limit = np.broadcast_to(np.asarray(max_shift, dtype=int), (ndim,))
    if list(factors) != sorted(set(factors), reverse=True) or factors[-1] != 1:
        raise ValueError(f"factors must decrease strictly and end with 1, got {tuple(factors)}")
    best: np.ndarray | None = None
    previous = 1
    for f in factors:
        p, q = pool(moving, f), pool(reference, f)
        if best is None:
            hi = -(-limit // f)
            ranges = [range(-h, h + 1) for h in hi]
        else:
            centre, r = best * previous // f, previous // f
            ranges = [range(c - r, c + r + 1) for c in centre]
        candidates = [np.array(t) for t in itertools.product(*ranges) if np.all(np.abs(np.array(t) * f) <= limit)]
        if not candidates:
            candidates = [np.zeros(ndim, dtype=int)]
        scores = [kl_divergence(shifted(p, t.tolist(), q.shape[1:]), q, eps) for t in candidates]
        best, previous = candidates[int(np.argmin(scores))], f
    return tuple(int(t) for t in best)  # type: ignore[union-attr]


def placed_centres(reference_centres: Mapping[int, Sequence[int]], shift: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """Organ centres on the new volume: the reference volume's centres plus the shift of `best_translation`."""
    return {k: tuple(int(c) + int(t) for c, t in zip(centre, shift)) for k, centre in reference_centres.items()}
