"""Where STIPPLE's prior goes on a volume (O. Petit, PhD thesis, CNAM 2021; ../shared/methods.md): the organ
centres `edgeseg.priors.stipple.prior_maps` paints the prior around.

- A labelled training volume uses its own alignment (`centres_from_label`): each organ's centre is the centre of
  its bounding box on the label (`organ_centre`), the point the prior was built around. An organ the label
  lacks is placed by the translation of the label (as one-hot probabilities) onto the reference's.
- A volume without labels (validation, evaluation) is placed by translation (`centres_from_probabilities`): the
  integer shift t minimising KL(P_t || Q) between the network's probabilities P on the volume and the
  reference's Q (`edgeseg.priors.placement.best_translation`); every organ's centre is the reference's plus t.

The reference is one labelled training volume (on the preprocessed grid) holding every class, and Q its label as
probabilities (a training volume's probabilities are its labels), smoothed: Q = (1 - a) one-hot + a / K. Without
smoothing (Q floored at eps only) every voxel where the network is not fully sure costs about p ln(p / eps), while
voxels shifted in from outside the volume are pure background and cost nothing, so the search drifts towards
shifts that push the volume out of the reference grid. Measured on MSD Hippocampus (reference from 10 training
volumes, the 29 validation volumes' one-hot labels standing in for the network, max_shift 16): with a = 0, 3 of 29
volumes were misplaced by 16-22 voxels, and 29 of 29 when 0.1 of each voxel's probability is spread over the
classes; with a = 0.1 every volume was placed within 5 voxels of its own organ centres (mean 2.3) in both cases.
The most typical volume is chosen (`choose_reference`): the medoid of the organ centres. Torch-free.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseg.atomic import write_json, write_with
from edgeseg.errors import UserError
from edgeseg.priors.placement import best_translation, placed_centres
from edgeseg.priors.stipple import load_npy, organ_centre, save_npy

FORMAT = "edgeseg-stipple-reference/1"
META_NAME = "reference.json"
LABEL_NAME = "reference_label.npy"

Centres = dict[int, tuple[int, ...]]


def one_hot(label: np.ndarray, num_classes: int) -> np.ndarray:
    """(*S) class indices -> (K, *S) float32 one-hot probabilities."""
    return (np.arange(num_classes).reshape(-1, *([1] * label.ndim)) == label[None]).astype(np.float32)


def label_centres(label: np.ndarray, num_classes: int) -> dict[int, tuple[int, ...] | None]:
    """Each foreground class's bounding-box centre on `label` (None where the class is absent)."""
    return {k: organ_centre(label == k) for k in range(1, num_classes)}


@dataclass(frozen=True)
class Reference:
    """The reference training volume: its name and its label (*S) uint8 on the preprocessed grid."""

    name: str
    label: np.ndarray
    num_classes: int

    def centres(self) -> Centres:
        found = label_centres(self.label, self.num_classes)
        return {k: c for k, c in found.items() if c is not None}

    def probabilities(self, smoothing: float = 0.0) -> np.ndarray:
        """Q: the label as probabilities, (1 - smoothing) one-hot + smoothing / K. Shape: (K, *S) float32."""
        return (one_hot(self.label, self.num_classes) * (1.0 - smoothing) + smoothing / self.num_classes
                ).astype(np.float32)


def choose_reference(names: Sequence[str], labels: Sequence[np.ndarray], num_classes: int) -> Reference:
    """The medoid of the volumes holding every foreground class: the one whose organ centres (all classes
    concatenated, voxels) have the smallest summed Euclidean distance to the others'; ties go to the first."""
    vectors, chosen = [], []
    for name, label in zip(names, labels):
        found = label_centres(label, num_classes)
        if all(c is not None for c in found.values()):
            vectors.append(np.concatenate([np.asarray(c, np.float64) for c in found.values()]))  # type: ignore[arg-type]
            chosen.append((name, label))
    if not chosen:
        raise UserError("STIPPLE needs a reference training volume that holds every class; none of the "
                        f"{len(labels)} labelled training volumes does")
    v = np.stack(vectors)
    cost = np.linalg.norm(v[:, None] - v[None], axis=-1).sum(axis=1)
    name, label = chosen[int(np.argmin(cost))]
    return Reference(name, np.asarray(label, dtype=np.uint8), num_classes)


def centres_from_probabilities(probabilities: np.ndarray, reference: Reference, max_shift: int,
                               factors: Sequence[int] = (4, 2, 1), eps: float = 1e-6,
                               smoothing: float = 0.1) -> tuple[Centres, tuple[int, ...]]:
    """Organ centres on a volume without labels, and the shift t found: reference centres + t, with t the
    KL-minimising translation of `probabilities` (K, *S) onto the reference's label smoothed by `smoothing`."""
    shift = best_translation(probabilities, reference.probabilities(smoothing), max_shift, factors, eps)
    return placed_centres(reference.centres(), shift), shift


def centres_from_label(label: np.ndarray, reference: Reference, max_shift: int,
                       factors: Sequence[int] = (4, 2, 1), smoothing: float = 0.1) -> Centres:
    """Organ centres on a labelled volume: its own organs' centres; an absent organ's from the translation of
    the label's one-hot map onto the reference's (searched only when some organ is absent)."""
    found = label_centres(label, reference.num_classes)
    missing = [k for k, c in found.items() if c is None]
    if not missing:
        return {k: c for k, c in found.items() if c is not None}
    placed, _ = centres_from_probabilities(one_hot(label, reference.num_classes), reference, max_shift, factors,
                                           smoothing=smoothing)
    return {k: (c if c is not None else placed[k]) for k, c in found.items()}


def save_reference(reference: Reference, folder: Path) -> None:
    """reference.json (name, shape) and the label as uint8 .npy, each written atomically, into `folder`."""
    folder = Path(folder)
    write_with(folder / LABEL_NAME, functools.partial(save_npy, array=reference.label, dtype=np.uint8))
    write_json(folder / META_NAME, {"format": FORMAT, "name": reference.name, "file": LABEL_NAME,
                                    "shape": list(reference.label.shape), "num_classes": reference.num_classes})


def load_reference(folder: Path) -> Reference:
    """Read what `save_reference` wrote; a missing or malformed file is a UserError."""
    folder = Path(folder)
    return read_reference(lambda name: (folder / name).read_bytes(), str(folder))


def read_reference(read: Callable[[str], bytes], where: str) -> Reference:
    """The reference from the files `save_reference` wrote, each got as bytes by `read(file name)` (see
    `edgeseg.priors.stipple.read_prior`); a missing or malformed file is a UserError naming `where`."""
    try:
        meta = json.loads(read(META_NAME).decode("utf-8"))
        if meta.get("format") != FORMAT:
            raise UserError(f"{where}/{META_NAME}: not a STIPPLE reference (format {meta.get('format')!r})")
        label = load_npy(read(meta["file"]))
        if list(label.shape) != list(meta["shape"]) or label.ndim != 3:
            raise UserError(f"{where}/{meta['file']}: shape {list(label.shape)} differs from {meta['shape']}")
        return Reference(str(meta["name"]), label.astype(np.uint8), int(meta["num_classes"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot read the STIPPLE reference in {where}: {exc}") from exc
