"""Two-step training with class sampling (ivadomed; Gros et al. 2021, "ivadomed: A Medical Imaging Deep
Learning Toolbox", JOSS 6(58):2868): which patch placement each epoch uses.

Step 1 (epochs 1..balanced_epochs) trains on an equal share of positive and negative patches,
the negatives under-weighted and redrawn every epoch (`BatchSampler` mode "balanced"); step 2
(the remaining epochs) fine-tunes on uniformly placed patches, the data's real, imbalanced
distribution (mode "natural"). The model, optimizer and learning-rate schedule simply continue.
Without two-step training every epoch uses the "standard" (foreground-oversampled) placement.

The phase is a function of the epoch, so a run resumed at any step continues in the right one;
the trainer still records it in the checkpoint and log so that runs can be read.
"""

from __future__ import annotations

from edgeseg.train.sampling import SamplingMode


def phase(epoch: int, balanced_epochs: int | None) -> SamplingMode:
    """The sampling mode of 1-based `epoch`; balanced_epochs None = no two-step training."""
    if balanced_epochs is None:
        return "standard"
    return "balanced" if epoch <= balanced_epochs else "natural"
