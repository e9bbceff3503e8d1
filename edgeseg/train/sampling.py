"""Training batches: random case -> patch -> augmentation (-> mixup) -> stacked arrays.

Each sample of a batch has its own random stream, seeded from the sampler's generator: the
generator advances by one draw per sample whoever builds the samples, so under torchrun each rank
builds only its share of the global batch (`shard`) while the checkpointed generator state is the
same on every rank and for every number of processes (a run can resume with another world size).
Every scheme below draws only from the sample's own stream (mixup's second sample included), so
the shards of a global batch are the batch one process would build, for every scheme.

Patch placement (`set_mode`, chosen by the training loop each epoch):
- "standard": a uniform case, then with probability foreground_oversample a patch centred on a
  foreground voxel, else a uniformly placed one (nnU-Net);
- "balanced": class sampling (ivadomed's BalancedSampler, step 1 of two-step training): a positive
  window (holding foreground) or a negative one (holding none) with probability 1/2 each, uniform
  among all windows of that kind in the training set; negatives, the many, are each under-weighted,
  and a new set is drawn every epoch;
- "natural": uniform among all windows of the training set (the real, imbalanced distribution;
  step 2 of two-step training).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from edgeseg.data.augment import Compose, mixup, mixup_lambda, one_hot
from edgeseg.data.cases import PreparedCase
from edgeseg.data.patches import PatchSampler, pad_to_shape
from edgeseg.errors import UserError

SamplingMode = Literal["standard", "balanced", "natural"]
SAMPLING_MODES: tuple[str, ...] = ("standard", "balanced", "natural")


class BatchSampler:
    """Draws augmented training batches from prepared cases; all randomness from one numpy Generator.

    The generator's state is part of the training checkpoint, so a resumed run draws exactly
    the batches the uninterrupted run would have drawn. After `shard(rank, world_size)`,
    `next_batch(B)` returns this rank's B / world_size samples of the global batch of B.

    num_classes: None gives class-index labels; a number K gives (K, *patch) one-hot maps, which the
    augmentation may soften (soft-label dilation, linear interpolation for SoftSeg); mixup_alpha > 0
    (needs num_classes) makes every sample the mixup of two independently drawn ones.
    label_transform(label, case index) turns each augmented class-index label into the float target
    the loss reads (INERRANT's partial-label targets, `edgeseg.train.inerrant.partial_targets`);
    `set_label` replaces a case's label (INERRANT's pseudo-labels). Cases are indexed in the order
    given, unlabelled ones left out.
    Shape: images (B / world_size, C, *patch) float32; labels (B / world_size, *patch) int64, or
    (B / world_size, K, *patch) float32 with num_classes or a label_transform.
    """

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        patch_size: tuple[int, ...],
        foreground_oversample: float,
        augmentation: Compose,
        seed: int,
        *,
        num_classes: int | None = None,
        mixup_alpha: float = 0.0,
        label_transform: Callable[[np.ndarray, int], np.ndarray] | None = None,
    ):
        labelled = [c for c in cases if c.label is not None]
        if not labelled:
            raise UserError("no labelled training cases")
        if mixup_alpha > 0 and num_classes is None:
            raise ValueError("mixup mixes per-class labels: give num_classes")
        if label_transform is not None and num_classes is not None:
            raise ValueError("label_transform reads class-index labels: leave num_classes None")
        self.samplers = [PatchSampler(c.image, c.label, patch_size) for c in labelled]
        self.with_foreground = [i for i, s in enumerate(self.samplers) if len(s.foreground)]
        self.foreground_oversample = foreground_oversample
        self.augmentation = augmentation
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.label_transform = label_transform
        self.rng = np.random.default_rng(seed)
        self.rank, self.world_size = 0, 1
        self.mode: SamplingMode = "standard"
        self._case_weights: dict[str, np.ndarray] = {}

    def shard(self, rank: int, world_size: int) -> None:
        """From now on build only rank `rank`'s contiguous share of each global batch."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size = rank, world_size

    def set_mode(self, mode: SamplingMode) -> None:
        """Switch patch placement (see the module docstring); balanced needs positive and negative windows."""
        if mode not in SAMPLING_MODES:
            raise ValueError(f"unknown sampling mode {mode!r}; choose from {', '.join(SAMPLING_MODES)}")
        if mode == "balanced" and "positive" not in self._case_weights:
            patch = list(self.samplers[0].patch_size)
            for kind, positive in (("positive", True), ("negative", False)):
                counts = np.array([len(s.windows(positive)) for s in self.samplers], np.float64)
                if not counts.sum():
                    what = "holds foreground" if positive else "is free of foreground"
                    raise UserError(f"class sampling (train.two_step): no {patch} training patch {what}, so there "
                                    f"are no {kind} samples to balance" + ("" if positive else
                                    " (a smaller data.patch_size leaves room for negative patches)"))
                self._case_weights[kind] = counts / counts.sum()
        if mode == "natural" and "all" not in self._case_weights:
            counts = np.array([np.prod([s - p + 1 for s, p in zip(sp.label.shape, sp.patch_size)])
                               for sp in self.samplers], np.float64)
            self._case_weights["all"] = counts / counts.sum()
        self.mode = mode

    def set_label(self, index: int, label: np.ndarray) -> None:
        """Replace case `index`'s label (same shape); foreground lists and class-sampling weights follow."""
        old = self.samplers[index]
        padded, _ = pad_to_shape(label, old.patch_size)  # as PatchSampler padded the case's image and label
        if padded.shape != old.label.shape:
            raise ValueError(f"label shape {label.shape} does not fit case {index}")
        self.samplers[index] = PatchSampler(old.image, padded, old.patch_size)
        self.with_foreground = [i for i, s in enumerate(self.samplers) if len(s.foreground)]
        self._case_weights = {}
        if self.mode != "standard":
            self.set_mode(self.mode)

    def _patch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """One patch placed as the current mode says, and the index of its case."""
        if self.mode == "balanced":
            positive = bool(rng.random() < 0.5)
            weights = self._case_weights["positive" if positive else "negative"]
            idx = int(rng.choice(len(weights), p=weights))
            return (*self.samplers[idx].sample_window(rng, positive), idx)
        if self.mode == "natural":
            weights = self._case_weights["all"]
            idx = int(rng.choice(len(weights), p=weights))
            return (*self.samplers[idx].sample(rng, foreground=False), idx)
        want_fg = rng.random() < self.foreground_oversample and bool(self.with_foreground)
        pool = self.with_foreground if want_fg else range(len(self.samplers))
        idx = int(rng.choice(pool))
        return (*self.samplers[idx].sample(rng, foreground=want_fg), idx)

    def _augmented(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, label, idx = self._patch(rng)
        if self.num_classes is not None:
            label = one_hot(label, self.num_classes)
        image, label = self.augmentation(image, label, rng)
        if self.label_transform is not None:
            label = self.label_transform(label, idx)
        return image, label

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One training sample from its own random stream."""
        if self.mixup_alpha > 0:
            lam = mixup_lambda(rng, self.mixup_alpha)
            return mixup(self._augmented(rng), self._augmented(rng), lam)
        return self._augmented(rng)

    def next_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of the next global batch of `batch_size` samples."""
        if batch_size % self.world_size:
            raise UserError(f"train.batch_size {batch_size} (the global batch) must be divisible by the "
                            f"number of processes ({self.world_size})")
        keys = self.rng.integers(0, 2**63 - 1, size=batch_size, dtype=np.int64)  # every rank draws all keys
        share = batch_size // self.world_size
        images, labels = [], []
        for key in keys[self.rank * share:(self.rank + 1) * share]:
            image, label = self.sample(np.random.default_rng(int(key)))
            images.append(image)
            labels.append(label)
        label_dtype = np.int64 if self.num_classes is None and self.label_transform is None else np.float32
        return np.stack(images).astype(np.float32), np.stack(labels).astype(label_dtype)

    def get_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
