"""Segmentation metrics on numpy arrays (torch-free: numpy and scipy only, safe for the device runtime).

overlap: Dice, IoU, precision, recall, specificity, volume similarity, absolute volume error.
surface: HD95 and ASSD in mm with anisotropic spacing (MONAI's definitions).
lesions: lesion-wise detection counts and rates.
summary: per-case metrics of label maps and their mean / std / n / n_inf over cases.
"""

from edgeseg.metrics.lesions import lesion_detection
from edgeseg.metrics.overlap import (
    absolute_volume_error_mm3,
    dice,
    iou,
    precision,
    recall,
    specificity,
    volume_similarity,
)
from edgeseg.metrics.summary import METRICS, aggregate, binary_metrics, case_metrics
from edgeseg.metrics.surface import (
    assd,
    assd_from_distances,
    hd95,
    hd95_from_distances,
    surface,
    surface_distances,
)

__all__ = [
    "METRICS",
    "absolute_volume_error_mm3",
    "aggregate",
    "assd",
    "assd_from_distances",
    "binary_metrics",
    "case_metrics",
    "dice",
    "hd95",
    "hd95_from_distances",
    "iou",
    "lesion_detection",
    "precision",
    "recall",
    "specificity",
    "surface",
    "surface_distances",
    "volume_similarity",
]
