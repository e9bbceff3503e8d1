"""A weighted sum of any losses: the `combined` loss built from `loss.terms` in the config."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class CombinedLoss(nn.Module):
    """sum_k weight_k * loss_k(output, target) over (weight, loss module) pairs."""

    def __init__(self, terms: Sequence[tuple[float, nn.Module]]):
        super().__init__()
        if not terms:
            raise ValueError("CombinedLoss needs at least one term")
        self.weights = tuple(float(w) for w, _ in terms)
        self.losses = nn.ModuleList(loss for _, loss in terms)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = self.weights[0] * self.losses[0](output, target)
        for weight, loss in zip(self.weights[1:], self.losses[1:]):
            total = total + weight * loss(output, target)
        return total

    def extra_repr(self) -> str:
        return f"weights={list(self.weights)}"
