"""Pareto front of (model size, accuracy) points: a smaller size and a higher accuracy are both better.

The accuracy is the report's metric (mean Dice for segmentation, mean keypoint F1 for keypoint bundles).

Hand-written (a few lines) because the usual libraries (pymoo, paretoset) would be a heavy dependency
for one sort-and-scan.
"""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """True when point a = (size, accuracy) is at least as good as b on both axes and better on one."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def pareto_front(points: Sequence[tuple[float, float] | None]) -> list[int]:
    """Indices of the non-dominated points, ordered by increasing size.

    A None entry (a failed setting) is never on the front and dominates nothing. Identical points
    do not dominate each other, so duplicates on the front are all kept.
    """
    valid = [(i, p) for i, p in enumerate(points) if p is not None]
    # Sort by size, then by accuracy descending: a scan keeping the best accuracy so far finds the front in O(n log n).
    order = sorted(valid, key=lambda item: (item[1][0], -item[1][1]))
    front: list[int] = []
    best: tuple[float, float] | None = None
    for i, p in order:
        if best is None or p[1] > best[1] or (p == best):
            front.append(i)
            if best is None or p[1] > best[1]:
                best = p
    return front
