"""SoftSeg (Gros, Lemay & Cohen-Adad 2021, "SoftSeg: Advantages of soft versus binary training for image
segmentation", Medical Image Analysis 71:102038): the output activation and loss of the softseg scheme.

SoftSeg trains a regression instead of a classification: (i) labels are never binarised after
preprocessing and augmentation (the sampler feeds one-hot maps that spatial augmentation
interpolates linearly), (ii) a normalized ReLU replaces the sigmoid/softmax as final activation,
(iii) a regression loss (Adaptive Wing, as the paper) compares the soft output with the soft label.

The network itself is unchanged (K raw output channels, background included), so quantization
and export build the same graph; the activation is applied by the loss here, by validation
(`edgeseg.train.inference`) and by the runtime (bundle output_kind "normalized_relu").

Binary tasks (K = 2) follow ivadomed's binary SoftSeg, which has ONE output channel and no background: the
foreground score is the difference of the two channel scores (the 1x1 head is linear, so s1 - s0 is exactly
a one-channel head), the background map is its complement, and the loss regresses the foreground map only.
The earlier multi-class form y_fg = r1 / (r0 + r1) on K = 2 killed the grey-matter channel in 3/3 seeds
(/work/notes/softseg_results.md).
"""

from __future__ import annotations

import torch
from torch import nn


def _peak_normalized(positive: torch.Tensor) -> torch.Tensor:
    """positive / its per-sample maximum (over every axis but the first); a sample with no positive value gives 0."""
    peak = positive.flatten(1).amax(dim=1).view(-1, *([1] * (positive.ndim - 1)))
    return positive / torch.where(peak > 0, peak, torch.ones_like(peak))


def binary_foreground(scores: torch.Tensor) -> torch.Tensor:
    """ivadomed's binary SoftSeg output, f = relu(s) / max relu(s), with the one-channel score s = s1 - s0.

    The maximum runs over each sample's voxels (ivadomed takes that of the whole batch; per sample keeps a
    sample's output independent of its batch mates, of the tile grid and of the data-parallel split); a sample
    with s <= 0 everywhere gives f = 0. Computed in float32. Shape: (B, 2, *S) -> (B, 1, *S).
    """
    s = scores.float()
    return _peak_normalized(torch.relu(s[:, 1:2] - s[:, 0:1]))


def normalized_relu(scores: torch.Tensor) -> torch.Tensor:
    """SoftSeg's final activation as ivadomed implements it: ReLU, then divide by the maximum.

        K = 1:  y = relu(s) / max relu(s)
        K = 2:  f = relu(s1 - s0) / max relu(s1 - s0),  y = (1 - f, f)      (ivadomed's binary model)
        K > 2:  y = relu(s) / max relu(s), then y_k <- y_k / sum_c y_c      (ivadomed's multi-class model)

    Soft values in [0, 1]; the maximum runs over each sample's channels and voxels (see `binary_foreground`).
    K = 2: argmax is f > 0.5, and a voxel with s1 <= s0 is background (y = (1, 0)). K > 2: a voxel whose channel
    sum is 0 stays 0, which argmax reads as class 0 (background); without the channel sum (max only) training
    on the 3-class phantoms stalled at a validation Dice near 0, with it it reached that of softmax + Dice/CE.
    Computed in float32. Shape: (B, K, *S) -> (B, K, *S).
    """
    if scores.shape[1] == 2:
        foreground = binary_foreground(scores)
        return torch.cat([1.0 - foreground, foreground], dim=1)
    out = _peak_normalized(torch.relu(scores.float()))
    if scores.shape[1] > 1:
        total = out.sum(dim=1, keepdim=True)
        out = out / torch.where(total > 0, total, torch.ones_like(total))
    return out


class SoftSegLoss(nn.Module):
    """regression(normalized_relu(scores), soft target): the training loss of the softseg scheme.

    `regression` is a loss on activations in [0, 1] (e.g. `AdaptiveWingLoss(activation="none")`);
    targets are (B, K, *S) soft maps or (B, *S) class indices (one-hot encoded by the loss). For K = 2 it
    sees the foreground map only, (B, 1, *S) against the foreground target, as ivadomed's one-channel binary
    model: Adaptive Wing is not symmetric in its target, so adding the complement (1 - f against 1 - t) would
    be another loss (measured: with it the grey-matter score died in 3/3 screening seeds, without it in 1/3).
    """

    def __init__(self, regression: nn.Module):
        super().__init__()
        self.regression = regression

    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if scores.shape[1] != 2:
            return self.regression(normalized_relu(scores), target)
        if target.ndim == scores.ndim:
            if target.shape[1] != 2:
                raise ValueError(f"a binary SoftSeg target has 2 channels, got shape {tuple(target.shape)}")
            foreground = target[:, 1:2].float()
        else:  # (B, *S) class indices
            foreground = (target == 1).unsqueeze(1).float()
        return self.regression(binary_foreground(scores), foreground)


def activate(scores: torch.Tensor, activation: str) -> torch.Tensor:
    """Model output -> per-class values: "softmax" (probabilities), "normalized_relu" (SoftSeg soft maps) or
    "sigmoid_multilabel" (INERRANT's K sigmoids, `edgeseg.train.inerrant.sigmoid_multilabel`)."""
    if activation == "softmax":
        return torch.softmax(scores.float(), dim=1)
    if activation == "normalized_relu":
        return normalized_relu(scores)
    if activation == "sigmoid_multilabel":
        # imported here: edgeseg.train.inerrant imports this module's users
        from edgeseg.train.inerrant import sigmoid_multilabel

        return sigmoid_multilabel(scores)
    raise ValueError(f"unknown output activation {activation!r}; choose softmax, normalized_relu or sigmoid_multilabel")
