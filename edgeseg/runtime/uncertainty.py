"""Uncertainty from N samples (TTA flips and/or MC-dropout passes), computed on the device; numpy/scipy only.

Definitions (shared/methods.md "Uncertainty"; ivadomed's structure-wise measures, made precise):
- voxel uncertainty: entropy of the mean probability, -sum_c p_c ln p_c, in nats (0 = certain,
  ln C = uniform over C classes); `normalise=True` divides by ln C to give [0, 1];
- structures: the connected components (full connectivity: 8 in 2D, 26 in 3D) of each foreground
  class in the mean segmentation (argmax of the mean probability), numbered as `scipy.ndimage.label`
  numbers them, per class;
- a structure's mask in sample s, M_s: the union of the sample's connected components of the same
  class that overlap the structure (by at least one voxel); empty when none does. Whole components
  are taken, so a sample that leaks far beyond the structure counts in full;
- IoU across samples: |M_1 ∩ ... ∩ M_N| / |M_1 ∪ ... ∪ M_N| (1 when all samples agree exactly,
  0 when any sample misses the structure);
- volume CV: std(vol(M_s)) / mean(vol(M_s)) over the N samples (population std, as ivadomed);
  0 when no sample has the structure (its IoU of 0 flags it);
- mean voxel uncertainty: the mean of the voxel uncertainty over the structure's voxels.

Differences from ivadomed (`ivadomed/uncertainty.py`, `structurewise_uncertainty`), on purpose:
ivadomed keeps only the single sample component with the largest overlap (a structure a sample
splits in two then loses a part), uses 18-connectivity, skips 1-voxel structures and thresholds
each class's probability at 0.5 rather than taking the argmax. Its pipeline bugs (dropout left
on after MC passes; the combined segmentation overwritten by the last pass) have no counterpart
here: samples arrive as hard labels and the mean segmentation is passed in separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage


def entropy_map(mean_probs: np.ndarray, *, normalise: bool = False, eps: float = 1e-12) -> np.ndarray:
    """Entropy of the mean probability in nats (or / ln C with `normalise`). Shape: (C, *S) -> (*S) float32."""
    p = np.clip(mean_probs.astype(np.float32, copy=False), eps, 1.0)
    ent = -(p * np.log(p)).sum(axis=0, dtype=np.float32)
    if normalise and mean_probs.shape[0] > 1:
        ent /= np.float32(np.log(mean_probs.shape[0]))
    return np.maximum(ent, 0).astype(np.float32, copy=False)


def _connectivity(ndim: int) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, ndim)


def _merge(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def structure_uncertainty(
    mean_seg: np.ndarray,
    sample_segs: np.ndarray,
    voxel_uncertainty: np.ndarray,
    spacing: Sequence[float],
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One JSON-ready record per structure (connected component) of each foreground class (module docstring).

    Keys: class (name, or index without `class_names`), class_index, structure (its label within
    the class), volume_mm3 (in the mean segmentation), iou_across_samples, volume_cv,
    samples_with_structure, mean_uncertainty, centroid_voxel.
    Memory: one int32 label map at a time, plus a per-voxel sample count over each structure's
    region (the union of its bounding box and those of the sample components it meets).
    Shape: mean_seg (*S) int; sample_segs (N, *S) int; voxel_uncertainty (*S); spacing len(S).
    """
    if sample_segs.ndim != mean_seg.ndim + 1 or sample_segs.shape[1:] != mean_seg.shape or len(sample_segs) < 1:
        raise ValueError(f"sample_segs {sample_segs.shape} must be (N, *{mean_seg.shape})")
    if voxel_uncertainty.shape != mean_seg.shape or len(spacing) != mean_seg.ndim:
        raise ValueError(f"voxel_uncertainty {voxel_uncertainty.shape} / spacing {list(spacing)} do not match "
                         f"{mean_seg.shape}")
    num_samples = len(sample_segs)
    voxel_mm3 = float(np.prod(spacing))
    conn = _connectivity(mean_seg.ndim)
    records = []
    for cls in np.unique(mean_seg):
        if cls == 0:
            continue
        components, n = ndimage.label(mean_seg == cls, structure=conn)
        boxes = ndimage.find_objects(components)
        # Pass 1: which sample components meet each structure, and the region they span.
        hits: list[list[np.ndarray]] = [[] for _ in range(n)]
        regions = list(boxes)
        for seg in sample_segs:
            labels, _ = ndimage.label(seg == cls, structure=conn)
            objects = ndimage.find_objects(labels)
            for k, box in enumerate(boxes):
                ids = np.unique(labels[box][components[box] == k + 1])
                ids = ids[ids > 0]
                hits[k].append(ids)
                for i in ids:
                    regions[k] = _merge(regions[k], objects[i - 1])
        # Pass 2 (labels recomputed rather than N label maps kept): per-voxel sample counts.
        counts = [np.zeros(tuple(s.stop - s.start for s in r), np.uint16) for r in regions]
        volumes = np.zeros((n, num_samples), np.float64)
        for s, seg in enumerate(sample_segs):
            if not any(len(h[s]) for h in hits):
                continue
            labels, _ = ndimage.label(seg == cls, structure=conn)
            for k in range(n):
                if len(hits[k][s]):
                    member = np.isin(labels[regions[k]], hits[k][s])
                    counts[k] += member
                    volumes[k, s] = member.sum() * voxel_mm3
        for k, box in enumerate(boxes):
            comp = components[box] == k + 1
            union = int((counts[k] > 0).sum())
            inter = int((counts[k] == num_samples).sum())
            mean_volume = volumes[k].mean()
            records.append({
                "class": int(cls) if class_names is None else class_names[int(cls)],
                "class_index": int(cls),
                "structure": k + 1,
                "volume_mm3": float(comp.sum() * voxel_mm3),
                "iou_across_samples": inter / union if union else 0.0,
                "volume_cv": float(volumes[k].std() / mean_volume) if mean_volume > 0 else 0.0,
                "samples_with_structure": int((volumes[k] > 0).sum()),
                "mean_uncertainty": float(voxel_uncertainty[box][comp].mean(dtype=np.float64)),
                "centroid_voxel": [float(c + b.start) for c, b in zip(ndimage.center_of_mass(comp), box)],
            })
    return records


def remove_uncertain_structures(mean_seg: np.ndarray, structures: list[dict[str, Any]],
                                iou_threshold: float) -> np.ndarray:
    """Copy of `mean_seg` with every structure whose IoU across samples is below `iou_threshold` set to 0.

    `structures` must come from `structure_uncertainty` on this same `mean_seg` (structure numbers
    are its per-class component labels). Shape: (*S) -> (*S), same dtype.
    """
    out = mean_seg.copy()
    conn = _connectivity(mean_seg.ndim)
    doomed: dict[int, list[int]] = {}
    for s in structures:
        if s["iou_across_samples"] < iou_threshold:
            doomed.setdefault(int(s["class_index"]), []).append(int(s["structure"]))
    for cls, ids in doomed.items():
        components, _ = ndimage.label(mean_seg == cls, structure=conn)
        out[np.isin(components, ids)] = 0
    return out


def case_summary(structures: list[dict[str, Any]], num_samples: int, sources: dict[str, int],
                 removed: int = 0) -> dict[str, Any]:
    """JSON-ready per-case summary: sample counts by source, the structure records and how many were removed."""
    ious = [s["iou_across_samples"] for s in structures]
    return {"num_samples": num_samples, "samples_from": sources, "num_structures": len(structures),
            "min_iou_across_samples": min(ious) if ious else None, "structures": structures,
            "structures_removed": removed}
