"""Training batches: random case -> (foreground-biased) patch -> augmentation -> stacked arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeseg.data.augment import Compose
from edgeseg.data.cases import PreparedCase
from edgeseg.data.patches import PatchSampler
from edgeseg.errors import UserError


class BatchSampler:
    """Draws augmented training batches from prepared cases; all randomness from one numpy Generator.

    The generator's state is part of the training checkpoint, so a resumed run draws exactly
    the batches the uninterrupted run would have drawn.
    Shape: images (B, C, *patch) float32, labels (B, *patch) int64.
    """

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        patch_size: tuple[int, ...],
        foreground_oversample: float,
        augmentation: Compose,
        seed: int,
    ):
        labelled = [c for c in cases if c.label is not None]
        if not labelled:
            raise UserError("no labelled training cases")
        self.samplers = [PatchSampler(c.image, c.label, patch_size) for c in labelled]
        self.with_foreground = [i for i, s in enumerate(self.samplers) if len(s.foreground)]
        self.foreground_oversample = foreground_oversample
        self.augmentation = augmentation
        self.rng = np.random.default_rng(seed)

    def next_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for _ in range(batch_size):
            want_fg = self.rng.random() < self.foreground_oversample and bool(self.with_foreground)
            pool = self.with_foreground if want_fg else range(len(self.samplers))
            idx = int(self.rng.choice(pool))
            image, label = self.samplers[idx].sample(self.rng, foreground=want_fg)
            image, label = self.augmentation(image, label, self.rng)
            images.append(image)
            labels.append(label)
        return np.stack(images).astype(np.float32), np.stack(labels).astype(np.int64)

    def get_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
