"""Finding the cases of a dataset folder, and splitting them into train / val / test.

Layouts (`discover_cases(root, layout)`):

- "pairs":   images/<name> + labels/<name> (NIfTI; e.g. msd_hippocampus). A label may also match by
             name without suffix (images/a.nii.gz <-> labels/a.nii). Images without a label are
             unlabelled cases; a label without an image is an error.
- "png":     the same with 2D PNG/TIF/TIFF files (e.g. isbi2012_em).
- "msd":     nnU-Net / Medical Segmentation Decathlon raw data: imagesTr/<id>_0000.nii.gz,
             <id>_0001.nii.gz ... (one file per channel), labelsTr/<id>.nii.gz, optional imagesTs/
             (unlabelled) and dataset.json (channel count checked; see `dataset_info`). MSD's original
             files without channel suffixes (imagesTr/<id>.nii.gz) are accepted too. With
             `missing_channels=True` (hetero-modal data, HeMIS) a case may lack some channel files: the
             channel count M comes from dataset.json (else `channels`, else the largest index + 1) and
             each case records the channels it lacks (`CaseRef.missing_channels`).
- "bids":    sub-*/[ses-*/]<modality>/<stem>.nii.gz with labels in
             derivatives/labels/sub-*/[ses-*/]<modality>/<stem>_seg-manual.nii.gz (e.g. msd_spleen_ct_crop).
- "sidecar": any folder tree with each label beside its image: X.nii.gz + X<suffix>.nii.gz, the first
             suffix of `label_suffixes` that exists wins (e.g. spinalcord_mri). Files ending in any
             of those suffixes are never images.
- "auto":    imagesTr/ -> msd; images/ + labels/ -> png when every image is a raster, else pairs;
             sub-*/ folders -> bids; otherwise NIfTI files anywhere -> sidecar.

Case names (the split keys) are the image's path relative to its image folder, with the channel
suffix removed: "hippocampus_001.nii.gz", "19.png", "sub-spleen2/ct/sub-spleen2_ct.nii.gz",
"sct_testing_data/t1/t1w.nii.gz". Each case also has a `group`: cases of one group are never split
apart by the seeded split (the subject for bids, the folder for sidecar, the case otherwise).
Hidden files (".x", macOS "._x") and non-image files are ignored.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeseg.data.io import RASTER_SUFFIXES, file_suffix, is_image_file, strip_suffix
from edgeseg.data.jsonfile import read_json_object
from edgeseg.errors import UserError, unknown_name

LAYOUTS = ("auto", "pairs", "msd", "bids", "png", "sidecar")
SIDECAR_LABEL_SUFFIXES = ("_seg-manual", "_gmseg_manual", "_gmseg_goldstandard", "_seg")
BIDS_LABEL_SUFFIX = "_seg-manual"
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
_CHANNEL = re.compile(r"^(?P<id>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class CaseRef:
    """One case on disk: one image path per channel and an optional label."""

    name: str  # the split key, e.g. "hippocampus_001.nii.gz", "19.png"
    images: tuple[Path, ...]
    label: Path | None
    group: str = field(default="", compare=False)  # cases of one group stay in one split; "" = own group
    missing_channels: tuple[int, ...] = ()  # channel indices without a file (`images` holds the others, in order)

    @property
    def group_key(self) -> str:
        return self.group or self.name

    @property
    def num_channels(self) -> int:
        """Channels of the case's image, missing ones included."""
        return len(self.images) + len(self.missing_channels)

    def present_channels(self) -> np.ndarray:
        """(num_channels,) bool: True where the channel has a file."""
        present = np.ones(self.num_channels, dtype=bool)
        present[list(self.missing_channels)] = False
        return present


@dataclass(frozen=True)
class DatasetInfo:
    """What an MSD / nnU-Net dataset.json says (either version's format)."""

    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]  # by label index; empty when not given


def discover_cases(
    root: Path, layout: str = "auto", *, label_suffixes: Sequence[str] | None = None,
    missing_channels: bool = False, channels: int | None = None,
) -> list[CaseRef]:
    """All cases under `root` in `layout` (see the module docstring), sorted naturally by name.

    missing_channels: allow MSD cases without some channel files (their indices go to
    `CaseRef.missing_channels`); `channels` is the expected channel count when dataset.json gives none.
    label_suffixes: the sidecar layout's label endings (data.label_suffixes); None = SIDECAR_LABEL_SUFFIXES.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")
    if layout not in LAYOUTS:
        raise unknown_name("layout", layout, LAYOUTS)
    if layout == "auto":
        layout = detect_layout(root)
    if layout in ("pairs", "png"):
        cases = _pairs(root, rasters_only=layout == "png")
    elif layout == "msd":
        cases = _msd(root, missing_channels, channels)
    elif layout == "bids":
        cases = _bids(root)
    else:
        cases = _sidecar(root, SIDECAR_LABEL_SUFFIXES if label_suffixes is None else tuple(label_suffixes))
    if not cases:
        raise UserError(f"no cases found in {root} (layout '{layout}'; supported image files: "
                        ".nii, .nii.gz, .png, .tif, .tiff)")
    duplicates = sorted(n for n, k in Counter(c.name for c in cases).items() if k > 1)
    if duplicates:
        raise UserError(f"{root}: case names appear twice: {duplicates[:5]}")
    return sorted(cases, key=lambda c: natural_key(c.name))


def detect_layout(root: Path) -> str:
    """The layout of `root` by its folders (see the module docstring)."""
    if (root / "imagesTr").is_dir():
        return "msd"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        images = [p for p in (root / "images").iterdir() if is_image_file(p)]
        rasters = images and all(file_suffix(p) in RASTER_SUFFIXES for p in images)
        return "png" if rasters else "pairs"
    if any(p.is_dir() and p.name.startswith("sub-") for p in root.iterdir()):
        return "bids"
    if any(is_image_file(p) for p in root.rglob("*.nii*")):
        return "sidecar"
    raise UserError(f"no cases found in {root}: expected images/ + labels/, imagesTr/ (MSD), "
                    "sub-*/ (BIDS) or NIfTI files with labels beside them")


def natural_key(name: str) -> list[object]:
    """Sort key with numbers compared as numbers ("2.png" before "10.png")."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------------------- layouts


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else []


def _pairs(root: Path, rasters_only: bool) -> list[CaseRef]:
    images_dir, labels_dir = root / "images", root / "labels"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise UserError(f"{root}: missing folder {folder.name}/ (pairs layout: images/ + labels/)")
    images = _image_files(images_dir)
    labels = _image_files(labels_dir)
    if rasters_only:
        images = [p for p in images if file_suffix(p) in RASTER_SUFFIXES]
        labels = [p for p in labels if file_suffix(p) in RASTER_SUFFIXES]
    by_name = {p.name: p for p in labels}
    by_stem: dict[str, list[Path]] = {}
    for p in labels:
        by_stem.setdefault(strip_suffix(p.name), []).append(p)
    cases, used = [], set()
    for image in images:
        label = by_name.get(image.name)
        if label is None:
            candidates = by_stem.get(strip_suffix(image.name), [])
            if len(candidates) > 1:
                raise UserError(f"{image}: several labels match: {[c.name for c in candidates]}")
            label = candidates[0] if candidates else None
        if label is not None:
            used.add(label)
        cases.append(CaseRef(image.name, (image,), label))
    _check_orphans(labels_dir, [p for p in labels if p not in used])
    return cases


def _check_orphans(folder: Path, orphans: list[Path]) -> None:
    if orphans:
        names = sorted(p.name for p in orphans)
        raise UserError(f"{folder}: {len(names)} label(s) without an image: {names[:5]}")


def dataset_info(root: Path) -> DatasetInfo | None:
    """Channel and class names from `root/dataset.json` (MSD or nnU-Net v2 format), None if absent."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return None
    data = read_json_object(path, "dataset description")
    channels = data.get("channel_names", data.get("modality", {})) or {}
    labels = data.get("labels", {}) or {}
    try:
        channel_names = tuple(str(v) for _, v in sorted(channels.items(), key=lambda kv: int(kv[0])))
        if labels and all(str(k).isdigit() for k in labels):  # MSD: {"0": "background", ...}
            pairs = sorted((int(k), str(v)) for k, v in labels.items())
        else:  # nnU-Net v2: {"background": 0, ...}; region lists are not class indices
            pairs = sorted((int(v), str(k)) for k, v in labels.items() if isinstance(v, int))
    except (AttributeError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: cannot read channel_names/modality or labels ({exc})") from exc
    return DatasetInfo(channel_names, tuple(name for _, name in pairs))


def _msd(root: Path, missing_channels: bool = False, channels: int | None = None) -> list[CaseRef]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise UserError(f"{root}: missing folder imagesTr/ (MSD / nnU-Net layout)")
    labels = {p.name: p for p in _image_files(labels_dir)}
    train = _image_files(images_dir)
    info = dataset_info(root)
    expected = len(info.channel_names) if info is not None and info.channel_names else None
    if expected is not None and channels is not None and channels != expected:
        raise UserError(f"{root / 'dataset.json'} lists {expected} channel(s) but {channels} modalities are "
                        "configured (data.modalities.names)")
    # MSD's original files carry no channel suffix: every training image has a same-named label.
    suffixed = not (train and all(p.name in labels for p in train))
    folders = {folder: _group_channels(_image_files(folder), suffixed, missing_channels)
               for folder in (images_dir, root / "imagesTs")}
    count = expected or channels
    if missing_channels and count is None:
        count = max((max(by_index) + 1 for grouped in folders.values() for by_index in grouped.values()), default=1)
    cases, used = [], set()
    for folder, grouped in folders.items():
        for name, by_index in grouped.items():
            if missing_channels:
                assert count is not None
                beyond = sorted(i for i in by_index if i >= count)
                if beyond:
                    raise UserError(f"{folder / name}: channel file(s) {beyond} beyond the {count} channel(s) "
                                    "of the dataset")
            elif expected is not None and len(by_index) != expected:
                raise UserError(f"{folder / name}: {len(by_index)} channel file(s) but dataset.json lists "
                                f"{expected} channel(s)")
            files = tuple(by_index[i] for i in sorted(by_index))
            missing = tuple(i for i in range(count or 0) if i not in by_index) if missing_channels else ()
            label = labels.get(name) if folder == images_dir else None
            if label is not None:
                used.add(name)
            cases.append(CaseRef(name, files, label, missing_channels=missing))
    counts = {c.num_channels for c in cases}
    if len(counts) > 1:
        raise UserError(f"{root}: cases have different channel counts {sorted(counts)}")
    _check_orphans(labels_dir, [p for n, p in labels.items() if n not in used])
    return cases


def _group_channels(files: list[Path], suffixed: bool, allow_gaps: bool = False) -> dict[str, dict[int, Path]]:
    """Case name -> {channel index: file}; without `allow_gaps` the indices must run 0, 1, 2 ..."""
    if not suffixed:
        return {p.name: {0: p} for p in files}
    channels: dict[str, dict[int, Path]] = {}
    for p in files:
        suffix = file_suffix(p)
        match = _CHANNEL.match(p.name[: -len(suffix)])
        if match is None:
            raise UserError(f"{p}: no channel suffix (expected <case>_0000{suffix}, <case>_0001{suffix} ...)")
        channels.setdefault(match["id"] + suffix, {})[int(match["channel"])] = p
    if not allow_gaps:
        for name, by_index in channels.items():
            if sorted(by_index) != list(range(len(by_index))):
                raise UserError(f"{name}: channel files {sorted(by_index)} are not numbered 0000, 0001, ... "
                                "without gaps (for missing modalities set data.modalities)")
    return channels


def _bids(root: Path) -> list[CaseRef]:
    labels_root = root / "derivatives" / "labels"
    cases = []
    for subject in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-")):
        for image in sorted(p for p in subject.rglob("*") if is_image_file(p)):
            relative = image.relative_to(root)
            stem = strip_suffix(image.name)
            candidates = [labels_root / relative.parent / f"{stem}{BIDS_LABEL_SUFFIX}{s}" for s in (".nii.gz", ".nii")]
            label = next((c for c in candidates if c.is_file()), None)
            cases.append(CaseRef(relative.as_posix(), (image,), label, group=subject.name))
    return cases


def _sidecar(root: Path, label_suffixes: tuple[str, ...]) -> list[CaseRef]:
    files = sorted(p for p in root.rglob("*") if is_image_file(p) and "derivatives" not in p.relative_to(root).parts)
    cases = []
    for image in files:
        stem = strip_suffix(image.name)
        if any(stem.endswith(s) for s in label_suffixes):
            continue
        label = None
        for s in label_suffixes:
            candidate = image.with_name(f"{stem}{s}{file_suffix(image)}")
            if candidate.is_file():
                label = candidate
                break
        relative = image.relative_to(root)
        cases.append(CaseRef(relative.as_posix(), (image,), label, group=relative.parent.as_posix()))
    return cases


# ----------------------------------------------------------------------------------------- splits


def load_splits(
    root: Path, splits_file: str | None, cases: list[CaseRef], seed: int = 0
) -> dict[str, list[CaseRef]]:
    """The train / val / test cases, from `root/splits_file` or a seeded split.

    The file is {"train": [...], "val": [...], "test": [...]} (other keys are ignored). An entry is a
    case name, a case name without its suffix ("hippocampus_001"), or a folder prefix selecting every
    case under it ("sct_testing_data/t1"). Unknown entries and cases listed twice are errors. An
    unlabelled case named in "train" is an error; one reached through a folder prefix is left out.

    Without a file (splits_file None or missing), labelled cases are split 70/15/15 by group with
    `split_names(groups, seed)`; unlabelled cases are left out of all splits.
    """
    if not cases:
        raise UserError(f"no cases found in {root}")
    path = None if splits_file is None else Path(root) / splits_file
    if path is None or not path.is_file():
        labelled = [c for c in cases if c.label is not None]
        if not labelled:
            raise UserError(f"{root}: no labelled cases to split")
        groups = sorted({c.group_key for c in labelled}, key=natural_key)
        assignment = {g: split for split, members in split_names(groups, seed).items() for g in members}
        return {split: [c for c in labelled if assignment[c.group_key] == split] for split in SPLITS}
    return _read_splits(path, cases)


def split_names(names: Sequence[str], seed: int, fractions: Sequence[float] = SPLIT_FRACTIONS) -> dict[str, list[str]]:
    """Seeded split of `names` into train / val / test (default 70/15/15).

    The names are permuted with numpy `default_rng(seed)`; val and test get round(n * fraction)
    each, at least one each when n >= 3 (val gets the one when n == 2); train gets the rest.
    """
    n = len(names)
    n_val = max(1, round(n * fractions[1])) if n >= 3 else int(n == 2)
    n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [names[i] for i in order]
    n_train = n - n_val - n_test
    return {"train": shuffled[:n_train], "val": shuffled[n_train:n_train + n_val], "test": shuffled[n_train + n_val:]}


def _read_splits(path: Path, cases: list[CaseRef]) -> dict[str, list[CaseRef]]:
    data = read_json_object(path, "splits file", '{"train": [...], "val": [...], "test": [...]}')
    by_name = {c.name: c for c in cases}
    by_stem = {strip_suffix(c.name): c for c in cases}
    out: dict[str, list[CaseRef]] = {}
    unknown: list[str] = []
    seen: dict[str, str] = {}
    for split in SPLITS:
        entries = data.get(split, [])
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise UserError(f"{path}: \"{split}\" must be a list of case names")
        selected: list[CaseRef] = []
        for entry in entries:
            matched = _match_entry(entry, by_name, by_stem, cases)
            if matched is None:
                unknown.append(entry)
                continue
            explicit = len(matched) == 1 and entry.rstrip("/") in (matched[0].name, strip_suffix(matched[0].name))
            for case in matched:
                if split == "train" and case.label is None:
                    if explicit:
                        raise UserError(f"{path}: training case '{case.name}' has no label")
                    continue
                if case.name in seen:
                    raise UserError(f"{path}: case '{case.name}' is in both '{seen[case.name]}' and '{split}'")
                seen[case.name] = split
                selected.append(case)
        out[split] = selected
    if unknown:
        hint = f" e.g. {cases[0].name!r}" if cases else ""
        raise UserError(f"{path}: {len(unknown)} unknown case name(s) {unknown[:5]}; case names look like{hint}")
    return out


def _match_entry(
    entry: str, by_name: dict[str, CaseRef], by_stem: dict[str, CaseRef], cases: list[CaseRef]
) -> list[CaseRef] | None:
    entry = entry.strip().replace("\\", "/").rstrip("/")
    if entry in by_name:
        return [by_name[entry]]
    if entry in by_stem:
        return [by_stem[entry]]
    prefix = entry + "/"
    under = [c for c in cases if c.name.startswith(prefix)]
    return under or None
