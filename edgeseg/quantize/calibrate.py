"""Activation-scale calibration: statistics of the float network on training batches.

brevitas' `calibration_mode` runs the model with every quantizer disabled (a float forward) while
the activation quantizers record the 99.999th percentile of what they see; on exit each scale is
initialised from the average over all batches. Without it, the scales would be collected during
the first 300 QAT steps from an already-quantized (and at 2-4 bits badly distorted) network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from brevitas.graph.calibrate import calibration_mode


@torch.no_grad()
def calibrate(model: torch.nn.Module, batches: Iterable[torch.Tensor],
              on_batch: Callable[[int], None] | None = None) -> int:
    """Initialise the activation scales of `model` from `batches`; returns how many batches were seen.

    The model runs in eval mode (no dropout; instance norm has no running statistics to
    update), and is returned to its previous mode. Shape: each batch (B, C, *S) float32.
    """
    was_training = model.training
    model.eval()
    seen = 0
    last = None
    with calibration_mode(model):
        for batch in batches:
            model(batch)
            last = batch
            seen += 1
            if on_batch is not None:
                on_batch(seen)
    if last is None:
        raise ValueError("calibration needs at least one batch")
    # One quantized forward materialises the learned weight-scale parameters brevitas creates
    # lazily; without it a checkpoint saved right after calibration (quantize --epochs 0)
    # lacks them and cannot be loaded again.
    model(last)
    model.train(was_training)
    return seen
