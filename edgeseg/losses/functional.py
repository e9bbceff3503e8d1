"""Loss functions as plain functions of tensors (the modules in `edgeseg.losses` wrap these).

Shapes: logits (B, C, *S); target (B, *S) integer class indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *S) int -> (B, C, *S) float one-hot."""
    oh = F.one_hot(target.long(), num_classes)  # (B, *S, C)
    return oh.movedim(-1, 1).to(torch.float32)


def soft_dice_loss(
    probs: torch.Tensor,
    target_onehot: torch.Tensor,
    *,
    reduction: str = "batch",
    smooth: float = 1e-5,
    include_background: bool = False,
) -> torch.Tensor:
    """Soft Dice loss (Milletari 2016), 1 - mean over classes of the soft Dice.

    reduction "batch" sums intersections and volumes over the batch and space (Phi = B, S),
    which handles empty labels gracefully; "sample" computes one Dice per sample and class
    (Phi = S) and averages them, which with a tiny `smooth` lets missing labels contribute
    nothing (Tilborghs et al. 2022). Dice = (2 I + eps) / (P + T + eps).
    """
    if not include_background and probs.shape[1] > 1:
        probs, target_onehot = probs[:, 1:], target_onehot[:, 1:]
    spatial = tuple(range(2, probs.ndim))
    dims = (0, *spatial) if reduction == "batch" else spatial
    intersection = (probs * target_onehot).sum(dims)
    volumes = probs.sum(dims) + target_onehot.sum(dims)
    dice = (2.0 * intersection + smooth) / (volumes + smooth)
    return 1.0 - dice.mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target.long())
