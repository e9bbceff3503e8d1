"""Uncertainty from N samples (TTA flips and/or MC-dropout passes), computed on the device.

Definitions (shared/methods.md; ivadomed's measures without its bugs):
- voxel-wise entropy of the mean probability, -sum_c p_c ln p_c (nats; 0 = certain, ln C = uniform);
- structures are the connected components (full connectivity) of each foreground class in the
  mean segmentation (argmax of the mean probability);
- a structure's IoU across samples: with M_s the voxels of that class in sample s that lie in the
  structure's bounding neighbourhood (its dilation by one voxel, so a shifted sample still counts),
  IoU = |M_1 ∩ ... ∩ M_N| / |M_1 ∪ ... ∪ M_N| (1 when all samples agree exactly, 0 when any misses it);
- the coefficient of variation of its volume, std(|M_s|) / mean(|M_s|) over samples;
- its mean voxel uncertainty: the mean entropy over the structure's voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage


def entropy_map(mean_probs: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Shape: (C, *S) probabilities -> (*S) float32 entropy in nats."""
    p = np.clip(mean_probs.astype(np.float32), eps, 1.0)
    return (-(p * np.log(p)).sum(axis=0)).astype(np.float32)


def structure_uncertainty(
    mean_seg: np.ndarray,
    sample_segs: np.ndarray,
    voxel_uncertainty: np.ndarray,
    spacing: Sequence[float],
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One record per connected structure of each foreground class.

    Shape: mean_seg (*S) int; sample_segs (N, *S) int; voxel_uncertainty (*S).
    """
    voxel_mm3 = float(np.prod(spacing))
    structure = ndimage.generate_binary_structure(mean_seg.ndim, mean_seg.ndim)
    records = []
    for cls in np.unique(mean_seg):
        if cls == 0:
            continue
        components, n = ndimage.label(mean_seg == cls, structure=structure)
        for idx, box in enumerate(ndimage.find_objects(components), start=1):
            grown = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
            comp = components[grown] == idx
            near = ndimage.binary_dilation(comp, structure=structure)
            masks = (sample_segs[(slice(None), *grown)] == cls) & near[None]
            union = masks.any(0).sum()
            inter = masks.all(0).sum()
            volumes = masks.reshape(len(masks), -1).sum(1).astype(np.float64) * voxel_mm3
            mean_volume = volumes.mean()
            records.append({
                "class": int(cls) if class_names is None else class_names[int(cls)],
                "class_index": int(cls),
                "structure": idx,
                "volume_mm3": float(comp.sum() * voxel_mm3),
                "iou_across_samples": float(inter / union) if union else 0.0,
                "volume_cv": float(volumes.std() / mean_volume) if mean_volume > 0 else 0.0,
                "mean_uncertainty": float(voxel_uncertainty[grown][comp].mean()),
                "centroid_voxel": [float(c + b.start) for c, b in zip(ndimage.center_of_mass(comp), grown)],
            })
    return records


def remove_uncertain_structures(mean_seg: np.ndarray, structures: list[dict[str, Any]],
                                iou_threshold: float) -> np.ndarray:
    """Set to background every structure whose IoU across samples is below `iou_threshold`."""
    out = mean_seg.copy()
    structure = ndimage.generate_binary_structure(mean_seg.ndim, mean_seg.ndim)
    for cls in {s["class_index"] for s in structures if s["iou_across_samples"] < iou_threshold}:
        components, _ = ndimage.label(mean_seg == cls, structure=structure)
        for s in structures:
            if s["class_index"] == cls and s["iou_across_samples"] < iou_threshold:
                out[components == s["structure"]] = 0
    return out


def case_summary(structures: list[dict[str, Any]], num_samples: int, sources: dict[str, int],
                 removed: int = 0) -> dict[str, Any]:
    """JSON-ready per-case summary."""
    return {"num_samples": num_samples, "samples_from": sources, "structures": structures,
            "structures_removed": removed}
