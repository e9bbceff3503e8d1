"""Loading a dataset split into memory, preprocessed and ready for sampling (numpy only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgeseg.data.discovery import CaseRef
from edgeseg.data.io import Volume, read_image, read_label
from edgeseg.data.preprocess import PreprocessSpec, preprocess_case, remap_labels
from edgeseg.errors import UserError


@dataclass
class PreparedCase:
    """One case on the preprocessed grid, plus what is needed to score it on the original grid.

    Besides the image, a case carries what conditioned models take as extra inputs: its normalised
    metadata vector (FiLM; set by the caller, see `edgeseg.data.metadata`) and which of its channels
    (modalities) were read from a file (HeMIS; a missing channel is all zeros).
    Shape: image (C, *S) float32; label (*S) uint8 (None when unlabelled); metadata (D,) float32;
    modality_mask (C,) bool.
    """

    name: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    original: Volume  # the image as read (for undoing preprocessing); missing channels zero-filled
    original_label: np.ndarray | None  # the remapped label on the original grid
    metadata: np.ndarray | None = None
    modality_mask: np.ndarray | None = None  # None: every channel present

    def present_modalities(self) -> np.ndarray:
        """(C,) bool: True where the channel holds an image (all True unless modalities are missing)."""
        if self.modality_mask is not None:
            return self.modality_mask
        return np.ones(self.image.shape[0], dtype=bool)

    def model_inputs(self, names: Sequence[str]) -> tuple[np.ndarray, ...]:
        """The model's extra inputs for this case, in `names` order ("metadata": (D,) float32,
        "modality_mask": (C,) float32 of 0/1)."""
        out = []
        for name in names:
            if name == "metadata":
                if self.metadata is None:
                    raise UserError(f"case '{self.name}' has no metadata (set data.metadata)")
                out.append(np.asarray(self.metadata, dtype=np.float32))
            elif name == "modality_mask":
                out.append(self.present_modalities().astype(np.float32))
            else:
                raise ValueError(f"unknown extra model input '{name}'")
        return tuple(out)


def prepare_case(ref: CaseRef, spec: PreprocessSpec, num_classes: int) -> PreparedCase:
    """Read and preprocess one case; label values must fall inside the class list."""
    image_vol = read_image(ref.images)
    mask = None
    if ref.missing_channels:
        mask = ref.present_channels()
        full = np.zeros((len(mask), *image_vol.spatial_shape), dtype=image_vol.array.dtype)
        full[mask] = image_vol.array
        image_vol = replace(image_vol, array=full)
    label_vol = read_label(ref.label, image_vol) if ref.label is not None else None
    image, label, spacing = preprocess_case(image_vol, label_vol, spec)
    if mask is not None:
        image[~mask] = 0.0  # stays exactly zero whatever the normalisation
    original_label = None
    if label is not None:
        label = _checked_labels(label, num_classes, ref.label)
        original_label = remap_labels(label_vol.array, dict(spec.label_map), num_classes)
    return PreparedCase(ref.name, image, label, tuple(spacing), image_vol, original_label, modality_mask=mask)


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
        out.append(PreparedCase(f"{case.name}#{i}", image, label, spacing, case.original, None,
                                metadata=case.metadata, modality_mask=case.modality_mask))
    return out
