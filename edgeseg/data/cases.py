"""Loading a dataset split into memory, preprocessed and ready for sampling (numpy only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseg.data.discovery import CaseRef
from edgeseg.data.io import Volume, read_image, read_label
from edgeseg.data.preprocess import PreprocessSpec, preprocess_case, remap_labels
from edgeseg.errors import UserError


@dataclass
class PreparedCase:
    """One case on the preprocessed grid, plus what is needed to score it on the original grid.

    Shape: image (C, *S) float32; label (*S) uint8 (None when unlabelled).
    """

    name: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    original: Volume  # the image as read (for undoing preprocessing)
    original_label: np.ndarray | None  # the remapped label on the original grid


def prepare_case(ref: CaseRef, spec: PreprocessSpec, num_classes: int) -> PreparedCase:
    """Read and preprocess one case; label values must fall inside the class list."""
    image_vol = read_image(ref.images)
    label_vol = read_label(ref.label, image_vol) if ref.label is not None else None
    image, label, spacing = preprocess_case(image_vol, label_vol, spec)
    original_label = None
    if label is not None:
        label = _checked_labels(label, num_classes, ref.label)
        original_label = remap_labels(label_vol.array, dict(spec.label_map), num_classes)
    return PreparedCase(ref.name, image, label, tuple(spacing), image_vol, original_label)


def prepare_cases(
    refs: Sequence[CaseRef],
    spec: PreprocessSpec,
    num_classes: int,
    on_case: Callable[[str], None] | None = None,
) -> list[PreparedCase]:
    cases = []
    for ref in refs:
        cases.append(prepare_case(ref, spec, num_classes))
        if on_case is not None:
            on_case(ref.name)
    return cases


def _checked_labels(label: np.ndarray, num_classes: int, path: Path | None) -> np.ndarray:
    values = np.unique(label)
    bad = values[(values < 0) | (values >= num_classes)]
    if len(bad):
        raise UserError(
            f"{path}: label values {bad.tolist()[:5]} are outside the class list (0..{num_classes - 1}); "
            "fix data.class_names or add a data.label_map"
        )
    return label.astype(np.uint8)


def to_slices(case: PreparedCase, axis: int) -> list[PreparedCase]:
    """Split a 3D case into 2D cases along `axis` (for 2D models on 3D volumes)."""
    if case.image.ndim != 4:
        raise UserError(f"{case.name}: expected a 3D volume to slice, got shape {case.image.shape[1:]}")
    out = []
    for i in range(case.image.shape[axis + 1]):
        image = np.take(case.image, i, axis=axis + 1)
        label = None if case.label is None else np.take(case.label, i, axis=axis)
        spacing = tuple(s for j, s in enumerate(case.spacing) if j != axis)
        out.append(PreparedCase(f"{case.name}#{i}", image, label, spacing, case.original, None))
    return out
