"""STIPPLE's 3D spatial prior (O. Petit, PhD thesis on abdominal-organ segmentation, CNAM 2021; the method
as ../shared/methods.md defines it): built from training label volumes, stored, and painted into a volume.

Per organ k (a foreground class index of the label volumes):
1. Align: on every training volume where k is present, find the organ's centre: the centre of its bounding
   box, rounded down (`organ_centre`). The bounding-box centre (not the centre of mass) is used so that the
   box below always holds the whole organ.
2. Crop a W_p x H_p x dz box centred there (box start = centre - (size - 1) // 2, zero outside the volume);
   the box size is the largest bounding-box extent of k over the training set, per axis.
3. Average the masks into B axial bins (1 < B < dz): the dz slices are split into B contiguous groups
   (`numpy.array_split`, sizes differing by at most one); bin b is the mean of the masks over the volumes
   and over the slices of group b. The prior map p_k is the (W_p, H_p, dz) map whose slice z holds the bin
   of its group (`OrganPrior.volume`).

Volumes without organ k do not enter p_k. Axes: labels are (X, Y, Z) with the axial axis `axial_axis`
(default 2, edgeseg's canonical order); maps are stored with the axial axis last.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseg.atomic import write_json, write_with
from edgeseg.errors import UserError

FORMAT = "edgeseg-stipple-prior/1"
META_NAME = "prior.json"


@dataclass(frozen=True)
class OrganPrior:
    """p_k of one organ: `bins` (B, W_p, H_p) and the axial box length dz (= box[2])."""

    name: str
    label: int  # class index in the label volumes
    box: tuple[int, int, int]  # W_p, H_p, dz
    bins: np.ndarray  # (B, W_p, H_p) float32, values in [0, 1]

    def volume(self) -> np.ndarray:
        """The (W_p, H_p, dz) prior map: slice z holds the bin of its axial group."""
        groups = np.array_split(np.arange(self.box[2]), len(self.bins))
        index = np.concatenate([np.full(len(g), b) for b, g in enumerate(groups)])
        return np.moveaxis(self.bins[index], 0, -1)


@dataclass(frozen=True)
class SpatialPrior:
    """The STIPPLE prior of every foreground class of a task (class_names[0] is the background)."""

    class_names: tuple[str, ...]
    organs: tuple[OrganPrior, ...]  # one per foreground class, in class order
    num_bins: int


def organ_centre(mask: np.ndarray) -> tuple[int, ...] | None:
    """Integer centre of the bounding box of `mask` (rounded down): start + (extent - 1) // 2; None if empty."""
    coords = np.nonzero(mask)
    if not coords[0].size:
        return None
    return tuple(int(c.min() + (c.max() - c.min()) // 2) for c in coords)


def _extent(mask: np.ndarray) -> tuple[int, ...]:
    coords = np.nonzero(mask)
    return tuple(int(c.max() - c.min() + 1) for c in coords)


def crop_box(volume: np.ndarray, centre: Sequence[int], box: Sequence[int]) -> np.ndarray:
    """The `box`-sized window of `volume` whose start is centre - (box - 1) // 2; zero outside the volume."""
    out = np.zeros(tuple(box), dtype=volume.dtype)
    src, dst = [], []
    for c, b, n in zip(centre, box, volume.shape):
        start = int(c) - (int(b) - 1) // 2
        lo, hi = max(start, 0), min(start + int(b), n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def build_prior(labels: Sequence[np.ndarray], class_names: Sequence[str], num_bins: int,
                axial_axis: int = 2) -> SpatialPrior:
    """The STIPPLE prior of every foreground class from the 3D class-index label volumes `labels`.

    A class absent from every volume, or one whose largest axial extent dz does not allow 1 < B < dz,
    is a UserError naming it."""
    vols = [np.moveaxis(np.asarray(lab), axial_axis, -1) for lab in labels]
    if not vols or any(v.ndim != 3 for v in vols):
        raise UserError("STIPPLE needs at least one 3D training label volume")
    organs = []
    for label, name in enumerate(class_names[1:], start=1):
        masks = [v == label for v in vols]
        masks = [m for m in masks if m.any()]
        if not masks:
            raise UserError(f"STIPPLE: class '{name}' is in no training label volume, so it has no prior")
        box = tuple(int(max(e)) for e in zip(*(_extent(m) for m in masks)))
        if not 1 < num_bins < box[2]:
            raise UserError(f"STIPPLE: class '{name}' spans {box[2]} axial slices at most; the number of bins B "
                            f"({num_bins}) must satisfy 1 < B < {box[2]}")
        crops = np.stack([crop_box(m.astype(np.float64), organ_centre(m) or (), box) for m in masks])  # (N, W, H, dz)
        groups = np.array_split(np.arange(box[2]), num_bins)
        bins = np.stack([crops[..., g].mean(axis=(0, 3)) for g in groups]).astype(np.float32)
        organs.append(OrganPrior(name, label, box, bins))  # type: ignore[arg-type]
    return SpatialPrior(tuple(class_names), tuple(organs), num_bins)


def prior_maps(prior: SpatialPrior, centres: Mapping[int, Sequence[int]], shape: Sequence[int],
               eps: float = 1e-6) -> np.ndarray:
    """Per-class prior probabilities (K, *shape) of a volume (axial axis last) where organ k is centred at
    `centres[k]`: p_k is its map inside its box (clipped at the volume edges) and 0 outside; the background
    gets 1 - sum_k p_k (at least 0); every value is then raised to at least `eps` so that ln p is finite."""
    maps = np.zeros((len(prior.class_names), *shape), dtype=np.float32)
    for organ in prior.organs:
        if organ.label not in centres:
            raise ValueError(f"no centre given for class {organ.label} ({organ.name})")
        values = organ.volume()
        src: list[slice] = []
        dst: list[slice] = []
        for c, b, n in zip(centres[organ.label], organ.box, shape):
            start = int(c) - (b - 1) // 2
            lo, hi = max(start, 0), min(start + b, n)
            src.append(slice(lo - start, max(hi, lo) - start))
            dst.append(slice(lo, max(hi, lo)))
        maps[organ.label][tuple(dst)] = values[tuple(src)]
    maps[0] = np.clip(1.0 - maps[1:].sum(axis=0), 0.0, 1.0)
    return np.maximum(maps, np.float32(eps))


def save_prior(prior: SpatialPrior, folder: Path) -> None:
    """Write `prior` to `folder`: prior.json (metadata) and one float32 .npy per organ, each atomically."""
    folder = Path(folder)
    files = []
    for organ in prior.organs:
        name = f"prior_{organ.label}.npy"
        write_with(folder / name, functools.partial(save_npy, array=organ.bins))
        files.append({"name": organ.name, "label": organ.label, "box": list(organ.box), "file": name})
    write_json(folder / META_NAME, {"format": FORMAT, "class_names": list(prior.class_names),
                                    "num_bins": prior.num_bins, "organs": files})


def save_npy(path: Path, array: np.ndarray, dtype: type = np.float32) -> None:
    """`array` to `path` as a `dtype` .npy without pickle (the writer `edgeseg.atomic.write_with` calls)."""
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array, dtype=dtype), allow_pickle=False)


def load_prior(folder: Path) -> SpatialPrior:
    """Read a prior written by `save_prior`; a missing or malformed file is a UserError."""
    folder = Path(folder)
    return read_prior(lambda name: (folder / name).read_bytes(), str(folder))


def load_npy(data: bytes) -> np.ndarray:
    """An .npy file's array from its bytes, without pickle (ValueError when it is not a plain .npy)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_prior(read: Callable[[str], bytes], where: str) -> SpatialPrior:
    """A prior from the files `save_prior` wrote, each got as bytes by `read(file name)` (a run folder, or a
    bundle whose reader checks each file's SHA-256); a missing or malformed file is a UserError naming `where`."""
    try:
        meta = json.loads(read(META_NAME).decode("utf-8"))
        if meta.get("format") != FORMAT:
            raise UserError(f"{where}/{META_NAME}: not a STIPPLE prior (format {meta.get('format')!r})")
        organs = []
        for entry in meta["organs"]:
            bins = load_npy(read(entry["file"]))
            box = tuple(int(b) for b in entry["box"])
            if bins.shape != (meta["num_bins"], box[0], box[1]) or bins.dtype != np.float32:
                raise UserError(f"{where}/{entry['file']}: shape {bins.shape} ({bins.dtype}) does not match box "
                                f"{box} and {meta['num_bins']} bins (float32)")
            organs.append(OrganPrior(str(entry["name"]), int(entry["label"]), box, bins))  # type: ignore[arg-type]
        return SpatialPrior(tuple(meta["class_names"]), tuple(organs), int(meta["num_bins"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot read the STIPPLE prior in {where}: {exc}") from exc
