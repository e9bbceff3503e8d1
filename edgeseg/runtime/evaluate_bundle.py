"""`edgeseg evaluate BUNDLE`: metrics of what the device delivers (torch-free).

Every case of the split goes through the same code as `edgeseg segment` (`pipeline.prepare`,
`segment_prepared`: the bundle's preprocessing, tiler, backend and form) and is scored on the
input's own grid against its label (label_map of the manifest applied) with `edgeseg.metrics`,
exactly as `edgeseg evaluate RUN` scores a run. The result has the same shape as that command's
({"cases": {name: {class: metrics}}, "summary": aggregate(...)}), plus how it was produced.

Bundles with extra model inputs are fed as the run was evaluated: FiLM metadata from each case's JSON
sidecar, or from the table the run used when it lay under the data root (recorded in the manifest;
`metadata_table` overrides), normalised with the bundle's recorded statistics; HeMIS cases may lack
modality files (MSD layout), and `modalities` keeps only those present (cases with none of them are
skipped and listed), as `edgeseg evaluate RUN --modalities` does.

STIPPLE bundles place their prior on each case as `edgeseg evaluate RUN` does (`pipeline.segment_prepared`);
the result lists each case's placement under "stipple", as that command's does.

Keypoint bundles (output_kind "heatmap") are scored as `edgeseg evaluate RUN` scores keypoint runs: each case's
mean heatmaps on the input's grid are decoded with the manifest's `keypoints` rule and matched in world mm to the
keypoints of its label volume within `keypoints.match_mm` (`edgeseg.runtime.keypoints.score_keypoints`, the same
function); the result has that command's layout ("cases", "summary", "detection", "score", "keypoints").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeseg.data.discovery import CaseRef, discover_cases, load_splits
from edgeseg.data.io import Volume, read_image, read_label
from edgeseg.data.metadata import read_metadata
from edgeseg.data.preprocess import PreprocessSpec, remap_labels
from edgeseg.errors import UserError, unknown_name
from edgeseg.metrics import aggregate, case_metrics
from edgeseg.metrics.keypoints import summarize_keypoints
from edgeseg.runtime.bundle import Manifest
from edgeseg.runtime.case_inputs import (
    assemble_modalities,
    check_input_options,
    modality_indices,
    model_inputs,
)
from edgeseg.runtime.pipeline import OnBatch, Prepared, check_options, prepare, segment_prepared

SPLIT_CHOICES = ("train", "val", "test", "all")


def is_bundle_path(path: Path | str) -> bool:
    """True for a bundle directory (holds manifest.json) or a bundle .zip; False for a run directory."""
    from edgeseg.runtime.bundle import MANIFEST, is_archive

    path = Path(path)
    return (path.is_dir() and (path / MANIFEST).is_file()) or (path.is_file() and is_archive(path))


def bundle_cases(manifest: Manifest, root: Path, layout: str = "auto",
                 label_suffixes: Sequence[str] | None = None) -> list[CaseRef]:
    """The dataset's cases as this bundle reads them: HeMIS bundles accept cases with modality files missing."""
    hetero = manifest.modalities is not None
    return discover_cases(root, layout, missing_channels=hetero, channels=manifest.in_channels if hetero else None,
                          label_suffixes=label_suffixes)


def cases_metadata(manifest: Manifest, refs: Sequence[CaseRef], root: Path,
                   metadata_table: Path | str | None = None) -> dict[str, Any] | None:
    """FiLM bundles: every case's raw metadata, from `metadata_table`, else the table the run used (relative to
    `root`), else each case's JSON sidecar; None for bundles without a metadata input."""
    if manifest.metadata is None:
        return None
    table = metadata_table if metadata_table is not None else manifest.metadata.table
    path = None if table is None else (Path(table) if Path(table).is_absolute() else root / table)
    return read_metadata(refs, manifest.metadata.fields, path, manifest.metadata.case_column)


def present_channels(ref: CaseRef) -> list[int]:
    """The channels (modalities) of a case that have an image file."""
    return [int(i) for i in ref.present_channels().nonzero()[0]]


def prepare_case(manifest: Manifest, ref: CaseRef, image: Volume, raw_metadata: Mapping[str, Any] | None,
                 selected: Sequence[int] | None = None) -> Prepared:
    """A case's image and extra model inputs, prepared as `edgeseg evaluate RUN` feeds the run: HeMIS cases get
    their present modalities (those in `selected`, when given) and the matching mask, FiLM cases their metadata."""
    present = None
    if manifest.modalities is not None:
        image, present = assemble_modalities(image, present_channels(ref), manifest.modalities, selected, ref.name)
    prepared = prepare(image, manifest, str(ref.images[0]), present)
    prepared.inputs = model_inputs(manifest, None if raw_metadata is None else raw_metadata[ref.name], present,
                                   ref.name)
    return prepared


def evaluate_bundle(
    bundle_path: Path | str,
    data: Path | str,
    split: str = "test",
    *,
    layout: str = "auto",
    splits_file: str | None = "splits.json",
    seed: int = 0,
    label_suffixes: Sequence[str] | None = None,
    include_background: bool = False,
    backend: str = "auto",
    tta: bool = False,
    tta_axes: Sequence[int] | None = None,
    mc_passes: int = 0,
    overlap: float = 0.5,
    batch_size: int | None = None,
    blend: str = "gaussian",
    tile: Sequence[int] | None = None,
    threads: int | None = None,
    modalities: Sequence[str] | None = None,
    metadata_table: Path | str | None = None,
    match_mm: float | None = None,
    on_start: Callable[[str, int], None] | None = None,
    on_batch: OnBatch | None = None,
    on_case: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per-case and summary metrics of a bundle on a split of a dataset folder.

    The split comes from `data/splits_file` (or the seeded 70/15/15 split `edgeseg train` uses when
    the file is absent); "all" scores every labelled case. Unlabelled cases are skipped. `label_suffixes`: the
    sidecar label files (the run's data.label_suffixes; None = discovery's default list).
    `modalities` (HeMIS bundles): score with only these modalities present; `metadata_table` (FiLM
    bundles): read the metadata from this CSV/TSV instead of the recorded table or the sidecars.
    Keypoint bundles: `match_mm` overrides the matching radius the manifest records (`match_distance`).
    """
    from edgeseg.runtime.backends import open_backend
    from edgeseg.runtime.bundle import load_bundle

    if split not in SPLIT_CHOICES:
        raise unknown_name("split", split, SPLIT_CHOICES)
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    prior = bundle.stipple_prior()  # STIPPLE bundles: placed on every case
    keypoints = manifest.output_kind == "heatmap"  # scored by keypoint matching, not by Dice of an argmax
    if keypoints and include_background:
        raise UserError(f"{bundle_path} is a keypoint (heatmap) bundle: its channel 0 is unused, so there is no "
                        "background to score (drop --include-background)")
    if not keypoints and match_mm is not None:
        raise UserError("match_mm applies to keypoint (heatmap) bundles only")
    batch = manifest.batch if batch_size is None else batch_size
    if tta_axes is None and tta:
        tta_axes = list(range(manifest.spatial_dims))
    tile = check_options(manifest, tta_axes=tta_axes, mc_passes=mc_passes, overlap=overlap, batch_size=batch,
                         blend=blend, tile=tile)
    check_input_options(manifest, None, metadata_table, modalities)
    selected = None if modalities is None or manifest.modalities is None else modality_indices(manifest.modalities,
                                                                                                modalities)
    root = Path(data)
    cases = bundle_cases(manifest, root, layout, label_suffixes)
    if split == "all":
        refs = [c for c in cases if c.label is not None]
    else:
        refs = [c for c in load_splits(root, splits_file, cases, seed=seed).get(split, []) if c.label is not None]
    if not refs:
        raise UserError(f"{root}: no labelled cases in the '{split}' split")
    raw_metadata = cases_metadata(manifest, refs, root, metadata_table)  # every case's, read before any work
    spec = PreprocessSpec.from_dict(manifest.preprocess)
    class_names = list(manifest.class_names)
    skipped: list[str] = []
    engine = open_backend(bundle, backend, mc=mc_passes > 0, threads=threads, batch_size=batch, tile=tile)
    if on_start is not None:
        on_start(engine.description, len(refs))
    if keypoints:
        from edgeseg.runtime.keypoints import keypoint_decoding, match_distance, score_keypoints

        decoding = keypoint_decoding(manifest)
        match = match_distance(manifest) if match_mm is None else float(match_mm)
    per_case: dict[str, Any] = {}
    decoded: dict[str, list[dict]] = {}  # keypoint bundles: each case's decoded keypoints
    seconds: list[float] = []  # wall time per volume: preprocessing + tiled inference + postprocessing
    shifts: dict[str, list[int]] = {}  # STIPPLE: each case's placement (voxels from the reference volume)
    try:
        for ref in refs:
            if selected is not None and not set(present_channels(ref)) & set(selected):
                skipped.append(ref.name)  # none of the chosen modalities on disk
                continue
            image = read_image(list(ref.images))
            label = read_label(ref.label, image)  # type: ignore[arg-type]  # refs are labelled
            reference = remap_labels(label.array, spec.label_map, len(class_names))
            del label
            started = time.perf_counter()
            prepared = prepare_case(manifest, ref, image, raw_metadata, selected)
            original = prepared.original
            del image
            seg = segment_prepared(prepared, manifest, engine, tta_axes=tta_axes, mc_passes=mc_passes,
                                   overlap=overlap, batch_size=batch, blend=blend, tile=tile, on_batch=on_batch,
                                   prior=prior, probabilities=keypoints)
            if seg.prior_shift is not None:
                shifts[ref.name] = list(seg.prior_shift)
            seconds.append(time.perf_counter() - started)
            if keypoints:
                assert seg.probabilities is not None  # the mean heatmaps on the input's grid
                per_case[ref.name], decoded[ref.name] = score_keypoints(seg.probabilities, reference, original,
                                                                        class_names, decoding, match)
            else:
                per_case[ref.name] = case_metrics(seg.labels, reference, original.spacing, class_names,
                                                  include_background=include_background)
            if on_case is not None:
                on_case(ref.name)
    finally:
        engine.close()
    if not per_case:
        raise UserError(f"no case of the '{split}' split has any of the modalities {list(modalities or [])}")
    extra: dict[str, Any] = {}
    if modalities is not None:
        extra = {"modalities": list(modalities), "skipped_cases": skipped}
    if manifest.stipple is not None:
        extra["stipple"] = {"reference_case": manifest.stipple.reference_case, "shifts": shifts}
    settings: dict[str, Any] = {}
    if keypoints:  # the layout of `edgeseg evaluate RUN` for keypoint runs: summary, detection, score, keypoints
        scores: dict[str, Any] = {**summarize_keypoints(list(per_case.values())), "keypoints": decoded}
        sigma = (manifest.keypoints or {}).get("sigma_mm")
        settings = {"match_mm": match, **({} if sigma is None else {"sigma_mm": sigma}), **decoding.to_dict()}
    else:
        scores = {"summary": aggregate(list(per_case.values()))}
    return {
        "cases": per_case,
        **scores,
        "bundle": str(bundle_path),
        "backend": engine.description,
        "split": split,
        "data": str(root),
        "seconds_per_case": seconds,
        "settings": {"tile": tile, "overlap": overlap, "blend": blend, "batch_size": batch,
                     "tta_axes": None if tta_axes is None else list(tta_axes), "mc_passes": mc_passes,
                     "include_background": include_background, **settings},
        **extra,
    }
