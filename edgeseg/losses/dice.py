"""Dice losses on softmax probabilities: soft Dice (Milletari 2016) and generalized Dice (Sudre 2017)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from edgeseg.losses.functional import generalized_dice_loss, soft_dice_loss, target_probabilities

Reduction = Literal["batch", "sample"]


class DiceLoss(nn.Module):
    """Soft Dice on softmax probabilities; see `soft_dice_loss` for the reduction semantics."""

    def __init__(self, reduction: Reduction = "batch", smooth: float = 1e-5,
                 include_background: bool = False):
        super().__init__()
        self.reduction, self.smooth, self.include_background = reduction, smooth, include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=1)
        return soft_dice_loss(probs, target_probabilities(target, probs), reduction=self.reduction,
                              smooth=self.smooth, include_background=self.include_background)


class GeneralizedDiceLoss(nn.Module):
    """Generalized Dice (Sudre et al. 2017) on softmax probabilities, class weights 1/area^2.

    See `generalized_dice_loss` for the reduction set and for `absent_class` ("empty": a class
    absent from the target is truly absent and predicting it costs; "missing": it was not
    annotated and contributes nothing).
    """

    def __init__(self, reduction: Reduction = "batch", smooth: float = 1e-5, include_background: bool = False,
                 absent_class: Literal["empty", "missing"] = "empty"):
        super().__init__()
        self.reduction, self.smooth, self.include_background = reduction, smooth, include_background
        self.absent_class = absent_class

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=1)
        return generalized_dice_loss(probs, target_probabilities(target, probs), reduction=self.reduction,
                                     smooth=self.smooth, include_background=self.include_background,
                                     absent_class=self.absent_class)
