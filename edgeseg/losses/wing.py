"""Adaptive Wing loss (Wang et al. 2019) for heatmap regression, e.g. Countception keypoints."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from edgeseg.losses.functional import adaptive_wing_loss, target_probabilities


class AdaptiveWingLoss(nn.Module):
    """Adaptive Wing loss between a predicted heatmap and a target heatmap; see `adaptive_wing_loss`.

    The model's output becomes a heatmap through `activation` ("sigmoid", or "none" when it
    already is one). Targets are float heatmaps (B, C, *S) in [0, 1], or class indices (B, *S),
    one-hot encoded.
    """

    def __init__(self, omega: float = 14.0, theta: float = 0.5, epsilon: float = 1.0, alpha: float = 2.1,
                 activation: Literal["sigmoid", "none"] = "sigmoid"):
        super().__init__()
        if activation not in ("sigmoid", "none"):
            raise ValueError(f"activation must be 'sigmoid' or 'none', got {activation!r}")
        self.omega, self.theta, self.epsilon, self.alpha = omega, theta, epsilon, alpha
        self.activation = activation

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = output.float()
        if self.activation == "sigmoid":
            pred = torch.sigmoid(pred)
        return adaptive_wing_loss(pred, target_probabilities(target, pred), omega=self.omega,
                                  theta=self.theta, epsilon=self.epsilon, alpha=self.alpha)
