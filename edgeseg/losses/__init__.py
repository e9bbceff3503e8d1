"""Loss registry. Every loss maps (output (B, C, *S), target) -> scalar.

Targets are (B, *S) integer class indices or (B, C, *S) float per-class values (one-hot, soft
labels, heatmaps). Functional cores live in `edgeseg.losses.functional`; the modules here are
thin wrappers; `build_loss` builds one from a `LossConfig`.
"""

from __future__ import annotations

from edgeseg.losses.combined import CombinedLoss
from edgeseg.losses.cross_entropy import CrossEntropyLoss, DiceCELoss
from edgeseg.losses.dice import DiceLoss, GeneralizedDiceLoss
from edgeseg.losses.focal import FocalDiceLoss, FocalLoss
from edgeseg.losses.functional import (
    adaptive_wing_loss,
    focal_loss,
    generalized_dice_loss,
    one_hot,
    soft_dice_loss,
    target_probabilities,
)
from edgeseg.losses.partial import PartialLabelBCELoss, partial_bce_loss
from edgeseg.losses.registry import available_losses, build_loss
from edgeseg.losses.wing import AdaptiveWingLoss

__all__ = [
    "AdaptiveWingLoss",
    "CombinedLoss",
    "CrossEntropyLoss",
    "DiceCELoss",
    "DiceLoss",
    "FocalDiceLoss",
    "FocalLoss",
    "GeneralizedDiceLoss",
    "PartialLabelBCELoss",
    "adaptive_wing_loss",
    "available_losses",
    "build_loss",
    "focal_loss",
    "generalized_dice_loss",
    "one_hot",
    "partial_bce_loss",
    "soft_dice_loss",
    "target_probabilities",
]
