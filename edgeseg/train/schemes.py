"""Training schemes from the config: the one place that reads `train.scheme`, `train.two_step`,
`augment.mixup_alpha` and `augment.soft_dilation_factor` and turns them into the sampler, loss and
output activation the training loop runs (`edgeseg train`; `edgeseg quantize` can build the same).

- mixup (Zhang et al. 2018): `BatchSampler(mixup_alpha=...)`, see `edgeseg.data.augment.mixup`;
- soft-label dilation (ivadomed's DilateGT): `edgeseg.data.augment.SoftLabelDilation`;
- two-step training with class sampling (ivadomed): `edgeseg.train.two_step`;
- SoftSeg (Gros et al. 2021): `edgeseg.train.softseg`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from edgeseg.config import ExperimentConfig
from edgeseg.data.augment import build_augmentation
from edgeseg.data.cases import PreparedCase
from edgeseg.losses import build_loss
from edgeseg.train.sampling import BatchSampler
from edgeseg.train.softseg import SoftSegLoss


def output_activation(cfg: ExperimentConfig) -> str:
    """How the model's output becomes per-class values: "softmax", or "normalized_relu" for SoftSeg."""
    return "normalized_relu" if cfg.train.scheme == "softseg" else "softmax"


def per_class_labels(cfg: ExperimentConfig) -> bool:
    """True when training labels are (K, *S) float maps: soft-label augmentations and SoftSeg."""
    return cfg.augment.soft_labels or cfg.train.scheme == "softseg"


def balanced_epochs(cfg: ExperimentConfig) -> int | None:
    """Epochs of class-sampled step 1 (two-step training); None without two-step training."""
    return None if cfg.train.two_step is None else cfg.train.two_step.balanced_epochs


def build_training_loss(cfg: ExperimentConfig) -> nn.Module:
    """The loss `cfg.loss` names; under SoftSeg applied to the normalized-ReLU output."""
    loss = build_loss(cfg.loss)
    return SoftSegLoss(loss) if cfg.train.scheme == "softseg" else loss


def build_sampler(cfg: ExperimentConfig, cases: Sequence[PreparedCase], patch: tuple[int, ...], spatial_dims: int,
                  seed: int) -> BatchSampler:
    """The training batch sampler with the configured augmentation and label schemes."""
    soft = per_class_labels(cfg)
    augmentation = build_augmentation(cfg.augment, spatial_dims, per_class_labels=soft,
                                      soft_labels=cfg.train.scheme == "softseg")
    return BatchSampler(cases, patch, cfg.data.foreground_oversample, augmentation, seed=seed,
                        num_classes=cfg.data.num_classes if soft else None, mixup_alpha=cfg.augment.mixup_alpha)
