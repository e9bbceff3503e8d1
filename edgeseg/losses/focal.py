"""Focal loss (Lin et al.) and focal-Dice, its linear combination with soft Dice."""

from __future__ import annotations

import torch
from torch import nn

from edgeseg.losses.dice import DiceLoss, Reduction
from edgeseg.losses.functional import focal_loss, target_probabilities


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017):
    -alpha_t (1 - p_t)^gamma log p_t per voxel, averaged; see `focal_loss`."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None):
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, target_probabilities(target, logits), gamma=self.gamma, alpha=self.alpha)


class FocalDiceLoss(nn.Module):
    """Focal-Dice as a linear combination: dice_weight * soft Dice + focal_weight * focal.

    (ivadomed's FocalDiceLoss instead uses log(focal) - beta * log(Dice); edgeseg follows the
    linear definition of its methods set.) The Dice term follows `soft_dice_loss`, so its
    reduction and smoothing decide how empty and missing labels count; the focal term, like
    cross-entropy, always treats unlabelled voxels as background.
    """

    def __init__(self, reduction: Reduction = "batch", smooth: float = 1e-5, include_background: bool = False,
                 gamma: float = 2.0, alpha: float | None = None, dice_weight: float = 1.0,
                 focal_weight: float = 1.0):
        super().__init__()
        self.dice = DiceLoss(reduction, smooth, include_background)
        self.focal = FocalLoss(gamma, alpha)
        self.dice_weight, self.focal_weight = dice_weight, focal_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.focal_weight * self.focal(logits, target)
