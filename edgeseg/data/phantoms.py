"""Seeded synthetic phantoms for tests and the demo: a known ground truth, no data to download.

Each phantom has 1-3 large ellipsoids (class 1) and, for every further class k, 1-3 small
spheres or tubes (class k, drawn over what is there), each class with its own mean intensity
(jittered per case), a slight blur (partial volume), a smooth multiplicative bias field
exp(polynomial of degree 2) and additive Gaussian noise. Works for 2D and 3D shapes.

For the conditioned models two options change the images (both off by default, leaving the phantoms
above unchanged draw for draw):
- metadata (FiLM): `contrast` 1 reverses the foreground classes' intensities (class 1 brightest, like
  a T1w/T2w swap), so the same intensity means another class; `gain` scales the whole image (a
  nuisance: per-volume z-scoring removes it). `write_phantom_dataset(metadata=True)` draws both per case,
  writes them to a JSON sidecar beside the image (`<case>.json`, see `edgeseg.data.metadata`) and draws
  every foreground class with the same shapes (`same_shapes`: 1-2 ellipsoids each), so that only the
  intensity, which `contrast` swaps, tells the classes apart: without the metadata they are ambiguous.
- modalities (HeMIS): modality 0 is the phantom above; each further modality m has its own noise, bias
  and jitter, and (with 3 or more classes) hides class 1 + (m - 1) mod (K - 1) at background intensity,
  so the modalities complement each other (with 2 classes it shows class 1 at half contrast).
  `write_phantom_dataset(modalities=M, missing=p)` writes the MSD layout and leaves out each modality
  file with probability p (every case keeps at least one).

Keypoint phantoms (`make_keypoint_phantom`, `write_keypoint_phantom_dataset`; Count-ception's keypoint scheme):
one keypoint of every foreground class per image, the centre of a Gaussian blob whose size and brightness tell
the class (class 1 the smallest and brightest), on a smooth bias field with noise; the label is 0 except at each
keypoint's voxel, which holds its class (`edgeseg.data.heatmaps`).
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
    *,
    modalities: int = 1,
    contrast: int = 0,
    gain: float = 1.0,
    same_shapes: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom (see the module docstring for modalities, contrast and gain).

    Shape: image (modalities, *shape) float32, label (*shape) uint8 with every class present.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 8:
        raise UserError(f"phantom shape {list(shape)} must have 2 or 3 axes of at least 8 voxels")
    if not 2 <= num_classes <= 255:
        raise UserError(f"phantom num_classes {num_classes} must be within 2..255")
    if modalities < 1 or contrast not in (0, 1) or not gain > 0:
        raise UserError(f"phantom modalities {modalities} must be >= 1, contrast {contrast} 0 or 1, gain {gain} > 0")
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    size = np.array(shape, dtype=np.float64)
    for _ in range(_MAX_TRIES):
        label = (_draw_same_shapes if same_shapes else _draw_label)(rng, grid, size, num_classes)
        if len(np.unique(label)) == num_classes:
            break
    else:  # pragma: no cover - a tiny shape with many classes
        raise UserError(f"phantom shape {list(shape)} is too small for {num_classes} classes")
    base = np.linspace(0.1, 1.0, num_classes)
    if contrast:
        base[1:] = base[1:][::-1]
    channels = []
    for m in range(modalities):
        means = _modality_means(base, m) + rng.uniform(-0.03, 0.03, num_classes)
        image = ndimage.gaussian_filter(means[label], sigma=0.7)
        if bias_field:
            image *= _bias_field(rng, grid, size)
        image += rng.normal(0.0, noise, size=shape)
        channels.append(gain * image)
    return np.stack(channels).astype(np.float32), label


def _modality_means(base: np.ndarray, m: int) -> np.ndarray:
    """Class means of modality m: the base ones for m = 0; further modalities hide one foreground class."""
    means = base.copy()
    if m == 0:
        return means
    if len(means) == 2:
        means[1] = means[0] + 0.5 * (means[1] - means[0])
    else:
        means[1 + (m - 1) % (len(means) - 1)] = means[0]
    return means


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


def _draw_same_shapes(rng: np.random.Generator, grid: np.ndarray, size: np.ndarray, num_classes: int) -> np.ndarray:
    """Every foreground class as 1-2 ellipsoids of one size distribution (later classes drawn over earlier)."""
    label = np.zeros(grid.shape[:-1], dtype=np.uint8)
    for k in range(1, num_classes):
        for _ in range(rng.integers(1, 3)):
            centre = rng.uniform(0.25, 0.75, len(size)) * size
            radii = rng.uniform(0.1, 0.2, len(size)) * size
            label[(((grid - centre) / radii) ** 2).sum(-1) <= 1.0] = k
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
    root: Path, n_cases: int, shape: Sequence[int], seed: int, num_classes: int = 3, *,
    modalities: int = 1, missing: float = 0.0, metadata: bool = False,
) -> Path:
    """Write a dataset of phantoms with splits.json; returns `root`.

    One modality: the "pairs" layout (images/, labels/). Several: the MSD layout (imagesTr/<case>_0000 ...,
    labelsTr/, dataset.json naming channels mod0, mod1 ...), each modality file left out with probability
    `missing` (at least one kept per case). `metadata`: a JSON sidecar {"contrast": 0|1, "gain": g} beside
    each case's images, drawn per case and applied to its image (module docstring).
    3D shapes give NIfTI (1 mm spacing, identity affine, float32 images, uint8 labels); 2D shapes
    give PNG (images scaled to 8 bits over [-0.5, 1.5]). Case i uses seed (seed, i); its metadata and
    missing files come from their own streams (seed, i, 1) and (seed, i, 2). The split is
    `split_names(names, seed)` (70/15/15).
    """
    root = Path(root)
    if n_cases < 1:
        raise UserError(f"phantom dataset needs at least one case, got {n_cases}")
    if modalities < 1 or not 0.0 <= missing < 1.0 or (missing > 0 and modalities < 2):
        raise UserError(f"phantom modalities {modalities} must be >= 1 and missing {missing} within [0, 1) "
                        "(missing files need at least 2 modalities)")
    shape = tuple(int(s) for s in shape)
    suffix = ".png" if len(shape) == 2 else ".nii.gz"
    images_dir, labels_dir = (root / "images", root / "labels") if modalities == 1 else (root / "imagesTr",
                                                                                         root / "labelsTr")
    names = []
    for i in range(n_cases):
        case_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        meta = _draw_metadata(np.random.default_rng(np.random.SeedSequence([seed, i, 1]))) if metadata else {}
        image, label = make_phantom(shape, num_classes=num_classes, seed=case_seed, modalities=modalities,
                                    contrast=int(meta.get("contrast", 0)), gain=float(meta.get("gain", 1.0)),
                                    same_shapes=metadata)
        stem = f"phantom_{i:03d}"
        name = f"{stem}{suffix}"
        if modalities == 1:
            _save_image(images_dir / name, image[0])
        else:
            kept = _kept_modalities(np.random.default_rng(np.random.SeedSequence([seed, i, 2])), modalities, missing)
            for m in np.flatnonzero(kept):
                _save_image(images_dir / f"{stem}_{m:04d}{suffix}", image[m])
        _save_image(labels_dir / name, label, label=True)
        if metadata:
            write_json(images_dir / f"{stem}.json", meta)
        names.append(name)
    if modalities > 1:
        write_json(root / "dataset.json", {
            "name": "edgeseg phantoms", "channel_names": {str(m): f"mod{m}" for m in range(modalities)},
            "labels": {str(k): ("background" if k == 0 else f"class{k}") for k in range(num_classes)},
            "numTraining": n_cases, "file_ending": suffix})
    write_json(root / "splits.json", {"unit": "synthetic phantom case", **split_names(names, seed)})
    return root


def make_keypoint_phantom(shape: Sequence[int], num_classes: int = 3, seed: int = 0,
                          noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """One keypoint phantom (module docstring): classes 1..K-1 once each, at integer positions at least
    `margin` voxels inside the image and at least 4 blob widths apart; class k's blob has width
    sigma_k = 1.5 + (k - 1) voxels and peak 1.0 - 0.4 (k - 1) / max(K - 2, 1) above the background 0.1.
    Shape: image (1, *shape) float32, label (*shape) uint8 with exactly one voxel of each class.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 16:
        raise UserError(f"keypoint phantom shape {list(shape)} must have 2 or 3 axes of at least 16 voxels")
    if not 2 <= num_classes <= 8:
        raise UserError(f"keypoint phantom num_classes {num_classes} must be within 2..8")
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    size = np.array(shape, dtype=np.float64)
    widths = [1.5 + (k - 1) for k in range(1, num_classes)]
    peaks = [1.0 - 0.4 * (k - 1) / max(num_classes - 2, 1) for k in range(1, num_classes)]
    margin = 4
    for _ in range(200):
        centres = [rng.integers(margin, np.array(shape) - margin) for _ in widths]
        apart = all(np.linalg.norm(a - b) >= 4 * max(wa, wb) for i, (a, wa) in enumerate(zip(centres, widths))
                    for b, wb in zip(centres[i + 1:], widths[i + 1:]))
        if apart:
            break
    else:  # pragma: no cover - a tiny shape with many classes
        raise UserError(f"keypoint phantom shape {list(shape)} is too small for {num_classes - 1} keypoints")
    image = np.full(shape, 0.1)
    label = np.zeros(shape, dtype=np.uint8)
    for k, (centre, width, peak) in enumerate(zip(centres, widths, peaks), start=1):
        image += peak * np.exp(-((grid - centre) ** 2).sum(-1) / (2.0 * width**2))
        label[tuple(centre)] = k
    image *= _bias_field(rng, grid, size)
    image += rng.normal(0.0, noise, size=shape)
    return image[None].astype(np.float32), label


def write_keypoint_phantom_dataset(root: Path, n_cases: int, shape: Sequence[int], seed: int,
                                   num_classes: int = 3) -> Path:
    """Write keypoint phantoms (`make_keypoint_phantom`) in the "pairs" layout with splits.json; returns `root`.

    2D shapes give PNG (images scaled to 8 bits over [-0.5, 1.5]), 3D shapes NIfTI (1 mm, identity affine), as
    `write_phantom_dataset`; case i uses seed (seed, i); the split is `split_names(names, seed)` (70/15/15).
    """
    root = Path(root)
    if n_cases < 1:
        raise UserError(f"phantom dataset needs at least one case, got {n_cases}")
    suffix = ".png" if len(tuple(shape)) == 2 else ".nii.gz"
    names = []
    for i in range(n_cases):
        case_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        image, label = make_keypoint_phantom(shape, num_classes=num_classes, seed=case_seed)
        name = f"keypoints_{i:03d}{suffix}"
        _save_image(root / "images" / name, image[0])
        _save_image(root / "labels" / name, label, label=True)
        names.append(name)
    write_json(root / "splits.json", {"unit": "synthetic keypoint phantom case", **split_names(names, seed)})
    return root


def _draw_metadata(rng: np.random.Generator) -> dict[str, float | int]:
    """A case's metadata: contrast 0 or 1 (equally likely), gain uniform in [0.6, 1.4] (4 decimals; 2D PNGs clip above 1.5)."""
    return {"contrast": int(rng.random() < 0.5), "gain": round(float(rng.uniform(0.6, 1.4)), 4)}


def _kept_modalities(rng: np.random.Generator, modalities: int, missing: float) -> np.ndarray:
    """(M,) bool: which modality files a case has; each left out with probability `missing`, one always kept."""
    kept = rng.random(modalities) >= missing
    if not kept.any():
        kept[rng.integers(modalities)] = True
    return kept


def _save_image(path: Path, array: np.ndarray, label: bool = False) -> None:
    if array.ndim == 2:
        pixels = array if label else np.clip((array + 0.5) / 2.0 * 255.0, 0, 255).round().astype(np.uint8)
        _save_png(path, pixels)
    else:
        _save_nifti(path, array)


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
