"""Cross-entropy and its nnU-Net pairing with soft Dice."""

from __future__ import annotations

import torch
from torch import nn

from edgeseg.losses.dice import DiceLoss, Reduction
from edgeseg.losses.functional import cross_entropy


class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy against class indices (B, *S) or class probabilities (B, C, *S)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, target)


class DiceCELoss(nn.Module):
    """dice_weight * soft Dice + ce_weight * cross-entropy (the nnU-Net default pairing)."""

    def __init__(self, reduction: Reduction = "batch", smooth: float = 1e-5, include_background: bool = False,
                 dice_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        self.dice = DiceLoss(reduction, smooth, include_background)
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.ce_weight * cross_entropy(logits, target)
