"""Mean squared error between a predicted map and a target map: heatmap regression (keypoints) and SoftSeg."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from edgeseg.losses.functional import target_probabilities


class MSELoss(nn.Module):
    """mean over all elements of (activation(output) - target)^2.

    The model's output becomes a map through `activation` ("sigmoid", or "none" when it already is one,
    e.g. SoftSeg's normalized ReLU). Targets are float maps (B, C, *S) in [0, 1] (Gaussian heatmaps, soft
    labels), or class indices (B, *S), one-hot encoded. Computed in float32.
    """

    def __init__(self, activation: Literal["sigmoid", "none"] = "sigmoid"):
        super().__init__()
        if activation not in ("sigmoid", "none"):
            raise ValueError(f"activation must be 'sigmoid' or 'none', got {activation!r}")
        self.activation = activation

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = output.float()
        if self.activation == "sigmoid":
            pred = torch.sigmoid(pred)
        return torch.mean((pred - target_probabilities(target, pred)) ** 2)
