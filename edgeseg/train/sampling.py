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

Extra model inputs (conditioned models): each sample carries its case's metadata vector (FiLM) and its
modality mask (HeMIS); with `modality_drop` > 0 present modalities are dropped at random (at least one
kept, `edgeseg.data.modalities.drop_modalities`) after augmentation, and absent channels, missing or
dropped, are zero-filled. The drop is the last draw of the sample's own stream, so it changes no other
draw, and the generator state in checkpoints makes the drops resume exactly.

STIPPLE's spatial prior (`prior_patch`): each sample also carries the prior maps of its case cut at the
patch's own place (the patch's origin on the case's grid, padding included) and moved by the same spatial
augmentation as the image (`Compose.apply_spatial`); building it draws nothing, so the stream is unchanged.

Keypoint heatmaps (`heatmap_targets`, train.scheme keypoints): the image is augmented alone and each sample's
target is rendered afterwards from its case's keypoints, moved by the augmentation the image went through
(`edgeseg.train.keypoints.HeatmapTargets`): no single-voxel label is ever resampled. The same draws are made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from edgeseg.data.augment import Compose, mixup, mixup_lambda, one_hot
from edgeseg.data.cases import PreparedCase
from edgeseg.data.modalities import drop_modalities, zero_absent
from edgeseg.data.patches import PatchSampler, pad_to_shape
from edgeseg.errors import UserError

SamplingMode = Literal["standard", "balanced", "natural"]
SAMPLING_MODES: tuple[str, ...] = ("standard", "balanced", "natural")
EXTRA_INPUTS: tuple[str, ...] = ("metadata", "modality_mask")


@dataclass(frozen=True)
class Batch:
    """One rank's share of a training batch: images, labels and the model's extra inputs in forward order.

    Reads as the pair (images, labels) (unpacking, indexing, len) for callers that train image-only models.
    Shape: images (B, C, *patch) float32; labels as `BatchSampler` says; inputs name -> (B, ...) float32
    ("metadata" (B, D), "modality_mask" (B, C)); prior (B, K, *patch) float32.
    """

    images: np.ndarray
    labels: np.ndarray
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    prior: np.ndarray | None = None  # STIPPLE's prior maps of each patch (B, K, *patch) float32; None without

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.images, self.labels))

    def __getitem__(self, index: int) -> np.ndarray:
        return (self.images, self.labels)[index]

    def __len__(self) -> int:
        return 2


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
    extra_inputs: names of the model's extra inputs ("metadata", "modality_mask") each batch carries, in
    forward order; modality_drop: probability of dropping each present modality of a sample (see the
    module docstring; missing modalities are zero-filled whatever it is).
    heatmap_targets(case index, origin, augmentation) gives the (K, *patch) float32 target of the patch whose
    first voxel is `origin` on the case's own grid, once `augmentation` (its `history`) has moved the image.
    prior_patch(case index, origin) gives the (K, *patch) prior maps of the patch whose first voxel is
    `origin` on the case's own grid (STIPPLE, `edgeseg.train.stipple`); each batch then carries them.
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
        extra_inputs: Sequence[str] = (),
        modality_drop: float = 0.0,
        prior_patch: Callable[[int, tuple[int, ...]], np.ndarray] | None = None,
        heatmap_targets: Callable[[int, tuple[int, ...], Compose], np.ndarray] | None = None,
    ):
        labelled = [c for c in cases if c.label is not None]
        if not labelled:
            raise UserError("no labelled training cases")
        if mixup_alpha > 0 and num_classes is None:
            raise ValueError("mixup mixes per-class labels: give num_classes")
        unknown = [n for n in extra_inputs if n not in EXTRA_INPUTS]
        if unknown:
            raise ValueError(f"unknown extra inputs {unknown}; known: {EXTRA_INPUTS}")
        if mixup_alpha > 0 and (extra_inputs or modality_drop > 0):
            raise ValueError("mixup of samples with extra inputs or modality masks is not supported")
        if label_transform is not None and num_classes is not None:
            raise ValueError("label_transform reads class-index labels: leave num_classes None")
        if prior_patch is not None and mixup_alpha > 0:
            raise ValueError("mixup of samples with spatial priors is not supported")
        self.prior_patch = prior_patch
        if heatmap_targets is not None and (num_classes is not None or label_transform is not None or mixup_alpha > 0
                                            or prior_patch is not None):
            raise ValueError("heatmap targets replace the labels: no num_classes, label_transform, mixup or prior")
        self.heatmap_targets = heatmap_targets
        self.samplers = [PatchSampler(c.image, c.label, patch_size) for c in labelled]
        self.extra_inputs = tuple(extra_inputs)
        self.modality_drop = float(modality_drop)
        self.present = [c.present_modalities() for c in labelled]
        self.metadata = [c.metadata for c in labelled]
        if "metadata" in self.extra_inputs:
            without = [c.name for c in labelled if c.metadata is None]
            if without:
                raise ValueError(f"cases without metadata: {without[:3]}")
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

    def _start(self, rng: np.random.Generator) -> tuple[int, tuple[int, ...]]:
        """The case index and patch start (padded grid) the current mode draws."""
        if self.mode == "balanced":
            positive = bool(rng.random() < 0.5)
            weights = self._case_weights["positive" if positive else "negative"]
            idx = int(rng.choice(len(weights), p=weights))
            return idx, self.samplers[idx].draw_window(rng, positive)
        if self.mode == "natural":
            weights = self._case_weights["all"]
            idx = int(rng.choice(len(weights), p=weights))
            return idx, self.samplers[idx].draw(rng, foreground=False)
        want_fg = rng.random() < self.foreground_oversample and bool(self.with_foreground)
        pool = self.with_foreground if want_fg else range(len(self.samplers))
        idx = int(rng.choice(pool))
        return idx, self.samplers[idx].draw(rng, foreground=want_fg)

    def _augmented(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
        """One augmented patch, its case index and (with `prior_patch`) its prior maps moved alike."""
        idx, start = self._start(rng)
        image, label = self.samplers[idx].crop(start)
        if self.heatmap_targets is not None:  # keypoints: the target follows the image's own augmentation
            image, _ = self.augmentation(image, None, rng)
            label = self.heatmap_targets(idx, self.samplers[idx].origin(start), self.augmentation)
            return image, label, idx, None
        if self.num_classes is not None:
            label = one_hot(label, self.num_classes)
        image, label = self.augmentation(image, label, rng)
        prior = None
        if self.prior_patch is not None:
            prior = self.augmentation.apply_spatial(self.prior_patch(idx, self.samplers[idx].origin(start)))
        if self.label_transform is not None:
            label = self.label_transform(label, idx)
        return image, label, idx, prior

    def _draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
        """One training sample from its own random stream: image, label, extra inputs, prior maps (or None)."""
        if self.mixup_alpha > 0:
            lam = mixup_lambda(rng, self.mixup_alpha)
            first, second = self._augmented(rng), self._augmented(rng)
            return (*mixup(first[:2], second[:2], lam), {}, None)
        image, label, idx, prior = self._augmented(rng)
        mask = drop_modalities(self.present[idx], self.modality_drop, rng)
        image = zero_absent(image, mask)  # missing and dropped channels, after intensity augmentation
        inputs: dict[str, np.ndarray] = {}
        for name in self.extra_inputs:
            inputs[name] = (mask.astype(np.float32) if name == "modality_mask"
                            else np.asarray(self.metadata[idx], dtype=np.float32))
        return image, label, inputs, prior

    def sample_with_inputs(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """One training sample from its own random stream, with its extra inputs (name -> per-sample array)."""
        image, label, inputs, _ = self._draw(rng)
        return image, label, inputs

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One training sample (image, label) from its own random stream."""
        image, label, _ = self.sample_with_inputs(rng)
        return image, label

    def next_batch(self, batch_size: int) -> Batch:
        """This rank's share of the next global batch of `batch_size` samples (unpacks as images, labels)."""
        if batch_size % self.world_size:
            raise UserError(f"train.batch_size {batch_size} (the global batch) must be divisible by the "
                            f"number of processes ({self.world_size})")
        keys = self.rng.integers(0, 2**63 - 1, size=batch_size, dtype=np.int64)  # every rank draws all keys
        share = batch_size // self.world_size
        images, labels = [], []
        priors: list[np.ndarray] = []
        inputs: dict[str, list[np.ndarray]] = {name: [] for name in self.extra_inputs}
        for key in keys[self.rank * share:(self.rank + 1) * share]:
            image, label, extra, prior = self._draw(np.random.default_rng(int(key)))
            images.append(image)
            labels.append(label)
            if prior is not None:
                priors.append(prior)
            for name in self.extra_inputs:
                inputs[name].append(extra[name])
        label_dtype = (np.int64 if self.num_classes is None and self.label_transform is None
                       and self.heatmap_targets is None else np.float32)
        return Batch(np.stack(images).astype(np.float32), np.stack(labels).astype(label_dtype),
                     {name: np.stack(values).astype(np.float32) for name, values in inputs.items()},
                     np.stack(priors).astype(np.float32) if priors else None)

    def get_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state
