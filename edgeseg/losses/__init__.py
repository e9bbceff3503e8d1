"""Loss registry. Every loss maps (logits (B, C, *S), target (B, *S) int) -> scalar."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgeseg.errors import unknown_name
from edgeseg.losses.functional import cross_entropy, one_hot, soft_dice_loss


class DiceLoss(nn.Module):
    """Soft Dice on softmax probabilities; see `soft_dice_loss` for the reduction semantics."""

    def __init__(self, reduction: str = "batch", smooth: float = 1e-5, include_background: bool = False):
        super().__init__()
        self.reduction, self.smooth, self.include_background = reduction, smooth, include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=1)
        return soft_dice_loss(probs, one_hot(target, logits.shape[1]), reduction=self.reduction,
                              smooth=self.smooth, include_background=self.include_background)


class CrossEntropyLoss(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, target)


class DiceCELoss(nn.Module):
    """dice_weight * soft Dice + ce_weight * cross-entropy (the nnU-Net default pairing)."""

    def __init__(self, reduction: str = "batch", smooth: float = 1e-5, include_background: bool = False,
                 dice_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        self.dice = DiceLoss(reduction, smooth, include_background)
        self.dice_weight, self.ce_weight = dice_weight, ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice_weight * self.dice(logits, target) + self.ce_weight * cross_entropy(logits, target)


_LOSSES: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "dice": (lambda cfg: DiceLoss(cfg.dice_reduction, cfg.smooth, cfg.include_background), "soft Dice (Milletari 2016)"),
    "ce": (lambda cfg: CrossEntropyLoss(), "cross-entropy"),
    "dice_ce": (
        lambda cfg: DiceCELoss(cfg.dice_reduction, cfg.smooth, cfg.include_background, cfg.dice_weight, cfg.ce_weight),
        "soft Dice + cross-entropy",
    ),
}


def available_losses() -> dict[str, str]:
    return {name: desc for name, (_, desc) in sorted(_LOSSES.items())}


def build_loss(cfg) -> nn.Module:
    """Build the loss a LossConfig names."""
    if cfg.name not in _LOSSES:
        raise unknown_name("loss", cfg.name, _LOSSES)
    return _LOSSES[cfg.name][0](cfg)


__all__ = ["CrossEntropyLoss", "DiceCELoss", "DiceLoss", "available_losses", "build_loss", "one_hot", "soft_dice_loss"]
