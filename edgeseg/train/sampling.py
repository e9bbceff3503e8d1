"""Training batches: random case -> (foreground-biased) patch -> augmentation -> stacked arrays.

Each sample of a batch has its own random stream, seeded from the sampler's generator: the
generator advances by one draw per sample whoever builds the samples, so under torchrun each rank
builds only its share of the global batch (`shard`) while the checkpointed generator state is the
same on every rank and for every number of processes (a run can resume with another world size).
"""

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
    the batches the uninterrupted run would have drawn. After `shard(rank, world_size)`,
    `next_batch(B)` returns this rank's B / world_size samples of the global batch of B.
    Shape: images (B / world_size, C, *patch) float32, labels (B / world_size, *patch) int64.
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
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """From now on build only rank `rank`'s contiguous share of each global batch."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size = rank, world_size

    def next_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of the next global batch of `batch_size` samples."""
        if batch_size % self.world_size:
            raise UserError(f"train.batch_size {batch_size} (the global batch) must be divisible by the "
                            f"number of processes ({self.world_size})")
        keys = self.rng.integers(0, 2**63 - 1, size=batch_size, dtype=np.int64)  # every rank draws all keys
        share = batch_size // self.world_size
        images, labels = [], []
        for key in keys[self.rank * share:(self.rank + 1) * share]:
            rng = np.random.default_rng(int(key))
            want_fg = rng.random() < self.foreground_oversample and bool(self.with_foreground)
            pool = self.with_foreground if want_fg else range(len(self.samplers))
            idx = int(rng.choice(pool))
            image, label = self.samplers[idx].sample(rng, foreground=want_fg)
            image, label = self.augmentation(image, label, rng)
            images.append(image)
            labels.append(label)
        return np.stack(images).astype(np.float32), np.stack(labels).astype(np.int64)

    def get_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
