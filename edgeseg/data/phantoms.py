"""Seeded synthetic phantoms for tests and the demo: a known ground truth, no data to download.

Each phantom has 1-3 large ellipsoids (class 1) and, for every further class k, 1-3 small
spheres or tubes (class k, drawn over what is there), each class with its own mean intensity
(jittered per case), a slight blur (partial volume), a smooth multiplicative bias field
exp(polynomial of degree 2) and additive Gaussian noise. Works for 2D and 3D shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from edgeseg.atomic import atomic_path, write_json
from edgeseg.data.discovery import split_names
from edgeseg.errors import UserError

_MAX_TRIES = 20  # redraws until every class keeps at least one voxel


def make_phantom(
    shape: Sequence[int],
    num_classes: int = 3,
    seed: int = 0,
    noise: float = 0.1,
    bias_field: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom. Shape: image (1, *shape) float32, label (*shape) uint8 with every class present."""
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 8:
        raise UserError(f"phantom shape {list(shape)} must have 2 or 3 axes of at least 8 voxels")
    if not 2 <= num_classes <= 255:
        raise UserError(f"phantom num_classes {num_classes} must be within 2..255")
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    size = np.array(shape, dtype=np.float64)
    for _ in range(_MAX_TRIES):
        label = _draw_label(rng, grid, size, num_classes)
        if len(np.unique(label)) == num_classes:
            break
    else:  # pragma: no cover - a tiny shape with many classes
        raise UserError(f"phantom shape {list(shape)} is too small for {num_classes} classes")
    means = np.linspace(0.1, 1.0, num_classes) + rng.uniform(-0.03, 0.03, num_classes)
    image = ndimage.gaussian_filter(means[label], sigma=0.7)
    if bias_field:
        image *= _bias_field(rng, grid, size)
    image += rng.normal(0.0, noise, size=shape)
    return image[None].astype(np.float32), label


def _draw_label(rng: np.random.Generator, grid: np.ndarray, size: np.ndarray, num_classes: int) -> np.ndarray:
    label = np.zeros(grid.shape[:-1], dtype=np.uint8)
    for _ in range(rng.integers(1, 4)):  # class 1: large ellipsoids
        centre = rng.uniform(0.3, 0.7, len(size)) * size
        radii = rng.uniform(0.12, 0.25, len(size)) * size
        label[(((grid - centre) / radii) ** 2).sum(-1) <= 1.0] = 1
    for k in range(2, num_classes):  # further classes: small spheres or tubes
        for _ in range(rng.integers(1, 4)):
            radius = rng.uniform(0.07, 0.12) * size.min()
            start = rng.uniform(0.2, 0.8, len(size)) * size
            end = start if rng.random() < 0.5 else rng.uniform(0.2, 0.8, len(size)) * size
            label[_segment_distance(grid, start, end) <= radius] = k
    return label


def _segment_distance(grid: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance of every grid point to the segment start-end (a point when they coincide)."""
    direction = end - start
    length2 = float(direction @ direction)
    t = np.zeros(grid.shape[:-1]) if length2 == 0 else np.clip((grid - start) @ direction / length2, 0.0, 1.0)
    return np.linalg.norm(grid - (start + t[..., None] * direction), axis=-1)


def _bias_field(rng: np.random.Generator, grid: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Smooth multiplicative field exp(sum a_i u_i + b_i u_i^2), u in [-1, 1]; about 0.6 to 1.6."""
    u = 2.0 * grid / np.maximum(size - 1, 1) - 1.0
    a = rng.uniform(-0.2, 0.2, len(size))
    b = rng.uniform(-0.15, 0.15, len(size))
    return np.exp(u @ a + (u**2) @ b)


def write_phantom_dataset(
    root: Path, n_cases: int, shape: Sequence[int], seed: int, num_classes: int = 3
) -> Path:
    """Write a "pairs" dataset of phantoms: images/, labels/ and splits.json; returns `root`.

    3D shapes give NIfTI (1 mm spacing, identity affine, float32 images, uint8 labels); 2D shapes
    give PNG (images scaled to 8 bits over [-0.5, 1.5]). Case i uses seed (seed, i). The split is
    `split_names(names, seed)` (70/15/15).
    """
    root = Path(root)
    if n_cases < 1:
        raise UserError(f"phantom dataset needs at least one case, got {n_cases}")
    shape = tuple(int(s) for s in shape)
    suffix = ".png" if len(shape) == 2 else ".nii.gz"
    names = []
    for i in range(n_cases):
        case_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        image, label = make_phantom(shape, num_classes=num_classes, seed=case_seed)
        name = f"phantom_{i:03d}{suffix}"
        if len(shape) == 2:
            pixels = np.clip((image[0] + 0.5) / 2.0 * 255.0, 0, 255).round().astype(np.uint8)
            _save_png(root / "images" / name, pixels)
            _save_png(root / "labels" / name, label)
        else:
            _save_nifti(root / "images" / name, image[0])
            _save_nifti(root / "labels" / name, label)
        names.append(name)
    write_json(root / "splits.json", {"unit": "synthetic phantom case", **split_names(names, seed)})
    return root


def _save_nifti(path: Path, array: np.ndarray) -> None:
    image = nib.Nifti1Image(array, np.eye(4))
    image.header.set_xyzt_units("mm")
    image.header.set_qform(np.eye(4), code=1)
    image.header.set_sform(np.eye(4), code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(image, str(tmp))


def _save_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(pixels).save(tmp)
