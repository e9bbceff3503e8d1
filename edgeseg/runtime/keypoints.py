"""Keypoint outputs of `edgeseg segment` for keypoint bundles (output_kind "heatmap"; torch-free).

Per case: the mean heatmaps on the input's grid as a float32 NIfTI (`<stem>_heatmaps.nii.gz`, one channel per
keypoint class, class_names[1:] in order; the unused background channel is not written) and the keypoints decoded
from them (`<stem>_keypoints.json`): per class the heatmap peaks the bundle's `keypoints` section keeps
(`edgeseg.data.heatmaps.decode_keypoints`, the rule `edgeseg evaluate` scores runs with), each with its class,
score (heatmap value at the peak), voxel position on the input's grid (array indices) and world position in mm
(the input's affine, `world_positions`).

Scoring (`score_keypoints`): the decoded keypoints matched per class to the reference keypoints of a label volume
(`edgeseg.metrics.keypoints`, world mm); the one scoring step of `edgeseg evaluate RUN` (keypoint runs,
`edgeseg.train.keypoints.score_keypoint_case`) and `edgeseg evaluate BUNDLE` (keypoint bundles).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeseg.data.heatmaps import (
    Keypoint,
    KeypointDecoding,
    decode_keypoints,
    keypoints_from_label_volume,
    world_positions,
)
from edgeseg.data.io import Volume, write_map
from edgeseg.metrics.keypoints import case_keypoint_metrics
from edgeseg.runtime.bundle import Manifest

if TYPE_CHECKING:
    from edgeseg.runtime.pipeline import CaseResult, InputCase, OutputPaths, Segmentation

DECODING_FIELDS = ("radius_mm", "threshold", "max_per_class")
DEFAULT_MATCH_MM = 5.0  # train.keypoints.match_mm's default (`KeypointConfig`), for bundles that record none


def keypoint_decoding(manifest: Manifest) -> KeypointDecoding:
    """The bundle's decoding rule (its `keypoints` section; KeypointDecoding's defaults without one)."""
    section = manifest.keypoints or {}
    return KeypointDecoding(**{k: section[k] for k in DECODING_FIELDS if k in section})


def keypoint_records(points: Sequence[Keypoint], affine: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """JSON records of keypoints: class name and index, score, voxel and world (mm) positions."""
    world = world_positions([p.position for p in points], affine)
    return [{"class": class_names[p.label], "label": p.label, "score": float(p.score),
             "voxel": [float(v) for v in p.position], "world_mm": [float(v) for v in w]}
            for p, w in zip(points, world)]


def decode_volume(heatmaps: np.ndarray, original: Volume, manifest: Manifest) -> list[dict]:
    """Keypoint records of a keypoint bundle's heatmaps (K, *S) on the input's grid (channel 0 unused)."""
    labels = range(1, len(manifest.class_names))
    points = decode_keypoints(heatmaps[1:], original.spacing, labels, keypoint_decoding(manifest))
    return keypoint_records(points, original.affine, manifest.class_names)


def match_distance(manifest: Manifest) -> float:
    """The matching radius (mm) a keypoint bundle is scored with: its `keypoints.match_mm` (the run's
    train.keypoints.match_mm), else DEFAULT_MATCH_MM."""
    return float((manifest.keypoints or {}).get("match_mm", DEFAULT_MATCH_MM))


def world_by_class(points: Sequence[Keypoint], affine: np.ndarray, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """World positions (N, 3) in mm per foreground class name (every class listed, maybe with none)."""
    world = world_positions([p.position for p in points], affine)
    return {name: world[[i for i, p in enumerate(points) if p.label == k]].reshape(-1, 3)
            for k, name in enumerate(class_names) if k > 0}


def score_keypoints(heatmaps: np.ndarray, reference: np.ndarray, original: Volume, class_names: Sequence[str],
                    decoding: KeypointDecoding, match_mm: float) -> tuple[dict[str, Any], list[dict]]:
    """One case's keypoint metrics (`case_keypoint_metrics`, per foreground class) and its decoded keypoint records.

    Heatmaps (K, *S) on the case's original grid (channel 0 unused) are decoded with `decoding`; the reference
    keypoints are the non-zero voxels of its (remapped) label volume (*S); both are matched in world mm through
    the original's affine, pairs at most `match_mm` apart."""
    labels = range(1, len(class_names))
    predicted = decode_keypoints(heatmaps[1:], original.spacing, labels, decoding)
    truth = keypoints_from_label_volume(reference, labels)
    affine = original.affine
    metrics = case_keypoint_metrics(world_by_class(predicted, affine, class_names),
                                    world_by_class(truth, affine, class_names), match_mm)
    return metrics, keypoint_records(predicted, affine, class_names)


def write_keypoint_outputs(case: InputCase, plan: OutputPaths, seg: Segmentation, original: Volume,
                           manifest: Manifest, *, bundle_path: Path | str, backend: str, started: float) -> CaseResult:
    """Write a case's heatmaps (plan.mask) and keypoints JSON (plan.keypoints), atomically."""
    from edgeseg.atomic import write_json
    from edgeseg.runtime.pipeline import CaseResult

    if seg.probabilities is None or plan.keypoints is None:
        raise ValueError("a keypoint bundle's case needs its heatmaps and a keypoints output path")
    records = decode_volume(seg.probabilities, original, manifest)
    write_map(plan.mask, seg.probabilities[1:], original)
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {
        "case": case.name,
        "inputs": [str(p) for p in case.paths],
        "heatmaps": str(plan.mask),
        "heatmap_classes": list(manifest.class_names[1:]),  # channel i of the heatmaps file
        "bundle": str(bundle_path),
        "backend": backend,
        "spacing_mm": [float(s) for s in original.spacing],
        "affine": np.asarray(original.affine, dtype=np.float64).tolist(),  # voxel -> world (mm)
        "decoding": keypoint_decoding(manifest).to_dict(),
        "keypoints": records,
        "seconds": round(seconds, 3),
    }
    write_json(plan.keypoints, summary)
    return CaseResult(case=case, outputs=plan, seconds=seconds, volumes_mm3={}, structures=None, removed=0)


__all__ = ["DEFAULT_MATCH_MM", "decode_volume", "keypoint_decoding", "keypoint_records", "match_distance",
           "score_keypoints", "world_by_class", "write_keypoint_outputs"]
