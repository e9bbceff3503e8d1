"""Loss functions as plain functions of tensors (the modules in `edgeseg.losses` wrap these).

Shapes: logits and probabilities (B, C, *S); targets either (B, *S) integer class indices or
(B, C, *S) float class probabilities (one-hot, soft labels, heatmaps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, *S) int -> (B, C, *S) float one-hot."""
    oh = F.one_hot(target.long(), num_classes)  # (B, *S, C)
    return oh.movedim(-1, 1).to(torch.float32)


def target_probabilities(target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Targets as (B, C, *S) float32 per-class values, for predictions shaped like `like` (B, C, *S).

    Integer (B, *S) class indices are one-hot encoded; a (B, C, *S) tensor is taken as given
    (one-hot, soft labels or heatmaps).
    """
    if target.shape == like.shape:
        return target.to(torch.float32)
    if target.ndim == like.ndim - 1 and not target.is_floating_point():
        return one_hot(target, like.shape[1])
    raise ValueError(
        f"target shape {tuple(target.shape)} fits neither (B, *S) class indices nor the "
        f"(B, C, *S) prediction shape {tuple(like.shape)}"
    )


def _reduce_dims(x: torch.Tensor, reduction: str) -> tuple[int, ...]:
    """The Dice reduction set: batch and space ("batch"), or space only ("sample")."""
    if reduction not in ("batch", "sample"):
        raise ValueError(f"Dice reduction must be 'batch' or 'sample', got {reduction!r}")
    spatial = tuple(range(2, x.ndim))
    return (0, *spatial) if reduction == "batch" else spatial


def soft_dice_loss(
    probs: torch.Tensor,
    target_onehot: torch.Tensor,
    *,
    reduction: str = "batch",
    smooth: float = 1e-5,
    include_background: bool = False,
) -> torch.Tensor:
    """Soft Dice loss (Milletari et al. 2016, V-Net), 1 - mean over classes of the soft Dice.

    reduction "batch" sums intersections and volumes over the batch and space (Phi = B, S),
    which handles empty labels gracefully; "sample" computes one Dice per sample and class
    (Phi = S) and averages them, which with a tiny `smooth` lets missing labels contribute
    nothing (Tilborghs et al. 2022). Dice = (2 I + eps) / (P + T + eps).
    """
    if not include_background and probs.shape[1] > 1:
        probs, target_onehot = probs[:, 1:], target_onehot[:, 1:]
    dims = _reduce_dims(probs, reduction)
    intersection = (probs * target_onehot).sum(dims)
    volumes = probs.sum(dims) + target_onehot.sum(dims)
    dice = (2.0 * intersection + smooth) / (volumes + smooth)
    return 1.0 - dice.mean()


def generalized_dice_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "batch",
    smooth: float = 1e-5,
    include_background: bool = False,
    absent_class: str = "empty",
) -> torch.Tensor:
    """Generalized Dice loss (Sudre et al. 2017, "Generalised Dice overlap as a deep learning loss
    function for highly unbalanced segmentations", DLMIA).

        GDL = 1 - (2 sum_l w_l sum_n r_ln p_ln + eps) / (sum_l w_l sum_n (r_ln + p_ln) + eps),
        w_l = 1 / (sum_n r_ln)^2

    so that "the contribution of each label is corrected by the inverse of its volume" (Sudre);
    with `include_background` the background class is one more label with that same
    inverse-volume weight. n runs over the reduction set Phi: batch and space ("batch", one
    GDL), or space only ("sample", one GDL per sample, then averaged).

    A class absent from the target over Phi has w_l = 1/0; `absent_class` says what it means:
    - "empty": the structure is truly absent, so predicting it must cost. Its weight becomes
      the largest weight of the classes present (MONAI's rule), and its predicted volume
      enters the denominator. With no class present at all the weights fall back to 1, giving
      1 - eps / (sum P + eps): 0 for an empty prediction (Tilborghs et al. 2022).
    - "missing": the structure was not annotated (a missing label), so it contributes
      nothing: weight 0. With no class present the loss is 0 and gives no gradient.

    Shapes: probs and target (B, C, *S), target one-hot or soft.
    """
    if absent_class not in ("empty", "missing"):
        raise ValueError(f"absent_class must be 'empty' or 'missing', got {absent_class!r}")
    if not include_background and probs.shape[1] > 1:
        probs, target = probs[:, 1:], target[:, 1:]
    dims = _reduce_dims(probs, reduction)
    intersection = (probs * target).sum(dims)  # (C,) or (B, C)
    denominator = probs.sum(dims) + target.sum(dims)
    area = target.sum(dims)
    present = area > 0
    inverse_square = 1.0 / area.clamp_min(1e-10) ** 2  # the clamp keeps tiny soft-label areas finite
    weights = torch.where(present, inverse_square, torch.zeros_like(area))
    if absent_class == "empty":
        largest = weights.amax(dim=-1, keepdim=True)  # per sample (or for the batch)
        largest = torch.where(largest > 0, largest, torch.ones_like(largest))  # nothing present: 1
        weights = torch.where(present, weights, largest.expand_as(weights))
    numer = 2.0 * (weights * intersection).sum(-1) + smooth
    denom = (weights * denominator).sum(-1) + smooth
    return (1.0 - numer / denom).mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0,
               alpha: float | None = None) -> torch.Tensor:
    """Focal loss (Lin et al. 2017/2020, "Focal Loss for Dense Object Detection"), softmax form.

        FL = -alpha_t (1 - p_t)^gamma log p_t, averaged over voxels,

    summed over classes as -sum_c alpha_c y_c (1 - p_c)^gamma log p_c so that soft targets work
    too. gamma = 0 and alpha = None give cross-entropy. alpha balances classes as in the paper's
    binary form: 1 - alpha for the background (class 0), alpha for every other class.

    Shapes: logits (B, C, *S); target (B, C, *S) one-hot or soft.
    """
    log_p = torch.log_softmax(logits.float(), dim=1)
    # 1 - p clamped above 0: a saturated p = 1 with gamma < 1 would otherwise give an infinite gradient
    modulator = (1.0 - log_p.exp()).clamp_min(torch.finfo(log_p.dtype).tiny) ** gamma
    per_class = -modulator * log_p * target  # (B, C, *S)
    if alpha is not None:
        factors = torch.full((logits.shape[1],), alpha, dtype=per_class.dtype, device=per_class.device)
        factors[0] = 1.0 - alpha
        per_class = per_class * factors.view(1, -1, *([1] * (logits.ndim - 2)))
    return per_class.sum(1).mean()


def adaptive_wing_loss(pred: torch.Tensor, target: torch.Tensor, *, omega: float = 14.0, theta: float = 0.5,
                       epsilon: float = 1.0, alpha: float = 2.1) -> torch.Tensor:
    """Adaptive Wing loss (Wang, Bo & Fuxin 2019, "Adaptive Wing Loss for Robust Face Alignment via
    Heatmap Regression", ICCV), for heatmap regression; mean over all elements.

        AWing(y, yhat) = omega ln(1 + |(y - yhat) / epsilon|^(alpha - y))   if |y - yhat| < theta
                         A |y - yhat| - C                                   otherwise
        A = omega (1 / (1 + (theta/epsilon)^(alpha - y))) (alpha - y)
            (theta/epsilon)^(alpha - y - 1) / epsilon
        C = theta A - omega ln(1 + (theta/epsilon)^(alpha - y))

    The exponent alpha - y adapts to the target: near-Gaussian-peak pixels (y ~ 1) get a loss
    close to L1-like near zero error, background pixels (y ~ 0) a quadratic-like one.
    (The paper's separate Weighted Loss Map is not part of this function.)

    Shapes: pred and target (B, C, *S), target in [0, 1].
    """
    target = target.to(pred.dtype)
    diff = (target - pred).abs()
    power = alpha - target
    ratio = theta / epsilon
    a = omega * (1.0 / (1.0 + ratio ** power)) * power * ratio ** (power - 1.0) / epsilon
    c = theta * a - omega * torch.log1p(ratio ** power)
    small = diff < theta
    # keep the unused branch's input finite so its gradient is too
    near = omega * torch.log1p((torch.where(small, diff, torch.zeros_like(diff)) / epsilon) ** power)
    far = a * diff - c
    return torch.where(small, near, far).mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class indices (B, *S) or class probabilities (B, C, *S)."""
    if target.shape == logits.shape:
        return F.cross_entropy(logits.float(), target.float())
    return F.cross_entropy(logits.float(), target.long())


__all__ = ["adaptive_wing_loss", "cross_entropy", "focal_loss", "generalized_dice_loss", "one_hot",
           "soft_dice_loss", "target_probabilities"]
