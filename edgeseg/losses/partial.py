"""The partial-label loss of INERRANT (Petit, Thome & Soler 2021, "Iterative confidence relabeling with deep
ConvNets for organ segmentation with partial labels", Computerized Medical Imaging and Graphics, 2021;
HAL hal-03243619).

Each training volume labels only some of the K foreground classes. The network gives K independent
sigmoids (one per class) and the loss is the per-class binary cross-entropy weighted by the ambiguity
map w:

    L = sum_k sum_i w_ik * BCE(sigmoid(s_ik), y_ik)

with w_ik = 1 where the label of class k at voxel i is known (class k annotated in the volume, or voxel i
labelled as another class: classes do not overlap, so it is a known negative) and 0 where it is
ambiguous (an unannotated class k on a voxel the partial label calls background).

Targets arrive as (B, C, *S) per-class maps (C = K + 1, channel 0 = background) in which an ambiguous
entry is NaN (`edgeseg.train.inerrant.partial_targets` builds them), or as plain class indices / one-hot
maps, which are fully annotated. The background channel of the scores and of the targets is not used:
edgeseg's models keep one output per class name (so QAT, export and bundles are unchanged) and INERRANT
trains only the K foreground channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgeseg.losses.functional import target_probabilities


def ambiguity_weights(target: torch.Tensor) -> torch.Tensor:
    """w = 1 where a per-class target is known, 0 where it is ambiguous (NaN). Shape: (B, C, *S) -> same, float32."""
    return torch.isfinite(target).to(torch.float32)


def partial_bce_loss(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum over (b, k, i) of w * BCE(sigmoid(s), y), divided by B * K * N (a constant: the sum of the paper up to
    scale, so a batch's loss is the mean of its samples' and ambiguous voxels lower the loss instead of being
    averaged away). Channel 0 (background) of both is ignored.

    Shape: scores (B, C, *S); target (B, *S) class indices or (B, C, *S) per-class values with NaN = ambiguous.
    """
    per_class = target_probabilities(target, scores)[:, 1:]  # (B, K, *S)
    logits = scores[:, 1:].float()
    weights = ambiguity_weights(per_class)
    known = torch.where(weights > 0, per_class, torch.zeros_like(per_class))  # no NaN enters the graph
    bce = F.binary_cross_entropy_with_logits(logits, known, reduction="none")
    return (weights * bce).sum() / max(bce.numel(), 1)


class PartialLabelBCELoss(nn.Module):
    """INERRANT's ambiguity-weighted per-class BCE on K sigmoids; see `partial_bce_loss`."""

    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return partial_bce_loss(scores, target)
