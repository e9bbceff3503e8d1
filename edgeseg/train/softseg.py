"""SoftSeg (Gros, Lemay & Cohen-Adad 2021, "SoftSeg: Advantages of soft versus binary training for image
segmentation", Medical Image Analysis 71:102038): the output activation and loss of the softseg scheme.

SoftSeg trains a regression instead of a classification: (i) labels are never binarised after
preprocessing and augmentation (the sampler feeds one-hot maps that spatial augmentation
interpolates linearly), (ii) a normalized ReLU replaces the sigmoid/softmax as final activation,
(iii) a regression loss (Adaptive Wing, as the paper) compares the soft output with the soft label.

The network itself is unchanged (K raw output channels, background included), so quantization
and export build the same graph; the activation is applied by the loss here, by validation
(`edgeseg.train.inference`) and by the runtime (bundle output_kind "normalized_relu").
"""

from __future__ import annotations

import torch
from torch import nn


def normalized_relu(scores: torch.Tensor) -> torch.Tensor:
    """SoftSeg's final activation as ivadomed implements it: ReLU, divide by the maximum, and, for a model
    with several output channels, divide by the sum over the channels at each voxel.

        y = relu(s) / max relu(s);  K > 1:  y_k <- y_k / sum_c y_c   (a voxel whose sum is 0 stays 0)

    Soft values in [0, 1]. The maximum runs over each sample's channels and voxels (ivadomed takes
    the maximum of the whole batch tensor; with K > 1 the two agree, as the channel sum cancels the
    maximum; with K = 1, per sample keeps a sample's output independent of its batch mates, of the
    tile grid and of the data-parallel split). Scores all <= 0 give 0 (ivadomed's guard against 0/0),
    which argmax reads as class 0 (background). edgeseg's models always have a background channel
    (K >= 2), so their soft maps sum to 1 at every voxel that has a positive score; without the
    channel sum (max only) training on the 3-class phantoms stalled at a validation Dice near 0,
    with it it reached that of softmax + Dice/CE. Computed in float32.
    Shape: (B, K, *S) -> (B, K, *S).
    """
    positive = torch.relu(scores.float())
    peak = positive.flatten(1).amax(dim=1).view(-1, *([1] * (scores.ndim - 1)))
    out = positive / torch.where(peak > 0, peak, torch.ones_like(peak))
    if scores.shape[1] > 1:
        total = out.sum(dim=1, keepdim=True)
        out = out / torch.where(total > 0, total, torch.ones_like(total))
    return out


class SoftSegLoss(nn.Module):
    """regression(normalized_relu(scores), soft target): the training loss of the softseg scheme.

    `regression` is a loss on activations in [0, 1] (e.g. `AdaptiveWingLoss(activation="none")`);
    targets are (B, K, *S) soft maps or (B, *S) class indices (one-hot encoded by the loss).
    """

    def __init__(self, regression: nn.Module):
        super().__init__()
        self.regression = regression

    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.regression(normalized_relu(scores), target)


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
