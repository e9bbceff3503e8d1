"""Training schemes from the config: the one place that reads `train.scheme`, `train.two_step`,
`train.inerrant`, `data.partial_labels`, `augment.mixup_alpha` and `augment.soft_dilation_factor` and turns
them into the sampler, loss, output activation and relabelling the training loop runs (`edgeseg train`;
`edgeseg quantize` can build the same, without relabelling).

- mixup (Zhang et al. 2018): `BatchSampler(mixup_alpha=...)`, see `edgeseg.data.augment.mixup`;
- soft-label dilation (ivadomed's DilateGT): `edgeseg.data.augment.SoftLabelDilation`;
- two-step training with class sampling (ivadomed): `edgeseg.train.two_step`;
- SoftSeg (Gros et al. 2021): `edgeseg.train.softseg`;
- partial labels and INERRANT (Petit et al. 2021): `edgeseg.train.inerrant`. Cases that
  `data.partial_labels` marks have their unannotated classes erased from their labels under every
  scheme (naive training reads them as background); under `inerrant` those classes are unknown instead;
- STIPPLE's 3D spatial prior (Petit et al. 2021): `edgeseg.train.stipple`; the sampler carries each patch's
  prior maps, the loop adds ln p to the logits, validation and evaluation place the prior by translation.
  Export writes a standard softmax network (`bundle_output_kind`: "logits") plus the run's prior, which the
  runtime places (`edgeseg.export.stipple_export`); `output_activation` refuses the scheme, which stops quantize.
- keypoint detection (Count-ception, Cohen et al. 2017; `train.keypoints`): `edgeseg.train.keypoints`; the
  sampler renders Gaussian heatmap targets after augmentation, validation scores detection F1
  (`validation_score`, which QAT validates and selects by too), bundles read the output as heatmaps
  (`bundle_output_kind`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
from torch import nn

from edgeseg.config import ExperimentConfig
from edgeseg.data.augment import build_augmentation
from edgeseg.data.cases import PreparedCase
from edgeseg.errors import UserError
from edgeseg.losses import build_loss
from edgeseg.train.inerrant import Relabeller, RelabelSchedule, apply_partial_labels, partial_targets
from edgeseg.train.inputs import model_extra_inputs
from edgeseg.train.keypoints import HEATMAP_ACTIVATION, OUTPUT_KIND, HeatmapTargets, KeypointValidation
from edgeseg.train.loop import FitParts, ValScore
from edgeseg.train.sampling import BatchSampler
from edgeseg.train.softseg import SoftSegLoss
from edgeseg.train.stipple import CasePriors, PriorDrivenLoss, RunPrior
from edgeseg.train.tcp import build_confidence

STIPPLE_REFUSAL = ("train.scheme stipple: quantization-aware training does not train STIPPLE's prior-driven loss "
                   "(it has no prior maps), so this run cannot be quantized; export the float run (its bundle "
                   "carries the prior)")


def network_activation(cfg: ExperimentConfig) -> str:
    """How the network's own output becomes per-class values (before any prior): "softmax",
    "normalized_relu" for SoftSeg, "sigmoid_multilabel" for INERRANT, or "heatmap" for keypoints (sigmoid
    heatmaps, `edgeseg.train.keypoints`); STIPPLE's network is a softmax one."""
    return {"softseg": "normalized_relu", "inerrant": "sigmoid_multilabel",
            "keypoints": HEATMAP_ACTIVATION}.get(cfg.train.scheme, "softmax")


def output_activation(cfg: ExperimentConfig) -> str:
    """The whole output rule of a run as quantization reads it: `network_activation`, except for STIPPLE, whose
    prior-driven loss QAT does not train (UserError: quantize reads this first; export reads `bundle_output_kind`);
    keypoint runs read "heatmap" (export reads `bundle_output_kind`)."""
    if cfg.train.scheme == "stipple":
        raise UserError(STIPPLE_REFUSAL)
    return network_activation(cfg)


def bundle_output_kind(cfg: ExperimentConfig) -> str:
    """The bundle output kind of a run (`edgeseg.runtime.bundle.OUTPUT_KINDS`): "heatmap" for keypoint runs,
    "normalized_relu" (SoftSeg), "sigmoid_multilabel" (INERRANT), else "logits" (STIPPLE too: its network is a
    softmax one, and the bundle carries the prior beside it)."""
    if cfg.train.scheme == "keypoints":
        return OUTPUT_KIND
    if cfg.train.scheme == "stipple":
        return "logits"
    activation = output_activation(cfg)
    return activation if activation in ("normalized_relu", "sigmoid_multilabel") else "logits"


def validation_score(cfg: ExperimentConfig) -> Callable[[FitParts], ValScore] | None:
    """A scheme's own validation score for the loop (keypoints: detection F1); None = mean foreground Dice."""
    return KeypointValidation(cfg.train.keypoints_settings) if cfg.train.scheme == "keypoints" else None


def per_class_labels(cfg: ExperimentConfig) -> bool:
    """True when training labels are (K, *S) float maps: soft-label augmentations and SoftSeg."""
    return cfg.augment.soft_labels or cfg.train.scheme == "softseg"


def balanced_epochs(cfg: ExperimentConfig) -> int | None:
    """Epochs of class-sampled step 1 (two-step training); None without two-step training."""
    return None if cfg.train.two_step is None else cfg.train.two_step.balanced_epochs


def build_training_loss(cfg: ExperimentConfig) -> nn.Module:
    """The loss `cfg.loss` names; under SoftSeg applied to the normalized-ReLU output, under STIPPLE to the
    prior-driven logits (its forward then takes the patches' prior maps too)."""
    loss = build_loss(cfg.loss)
    if cfg.train.scheme == "stipple":
        settings = cfg.train.stipple_settings
        return PriorDrivenLoss(loss, settings.coarse_loss_weight, settings.eps)
    return SoftSegLoss(loss) if cfg.train.scheme == "softseg" else loss


def build_sampler(cfg: ExperimentConfig, cases: Sequence[PreparedCase], patch: tuple[int, ...], spatial_dims: int,
                  seed: int, prior: RunPrior | None = None) -> BatchSampler:
    """The training batch sampler with the configured augmentation and label schemes (`data.partial_labels` must
    be the resolved mapping, see `edgeseg.train.inerrant.resolve_partial_labels`), the model's extra inputs,
    data.modalities' random modality dropping and, for STIPPLE, the run's `prior` following every patch."""
    if (cfg.train.scheme == "stipple") != (prior is not None):
        raise ValueError("give the run's STIPPLE prior exactly when train.scheme is stipple")
    if cfg.train.scheme == "keypoints":  # heatmaps rendered from the moved keypoints (edgeseg.train.keypoints)
        targets = HeatmapTargets(cases, cfg.data.num_classes, patch, cfg.train.keypoints_settings.sigma_mm)
        return BatchSampler(cases, patch, cfg.data.foreground_oversample,
                            build_augmentation(cfg.augment, spatial_dims), seed=seed,
                            extra_inputs=model_extra_inputs(cfg), heatmap_targets=targets,
                            modality_drop=0.0 if cfg.data.modalities is None else cfg.data.modalities.drop_prob)
    soft = per_class_labels(cfg)
    augmentation = build_augmentation(cfg.augment, spatial_dims, per_class_labels=soft,
                                      soft_labels=cfg.train.scheme == "softseg")
    transform = None
    if cfg.data.partial_labels is not None or cfg.train.scheme == "inerrant":
        cases, annotated = apply_partial_labels(cases, cfg.data.partial_labels, cfg.data.class_names)
        if cfg.train.scheme == "inerrant":
            if not cfg.train.inerrant_settings.ambiguity_map:  # the naive baseline: erased classes are background
                annotated = [np.ones_like(flags) for flags in annotated]
            transform = functools.partial(_case_targets, annotated)
    return BatchSampler(cases, patch, cfg.data.foreground_oversample, augmentation, seed=seed,
                        num_classes=cfg.data.num_classes if soft else None, mixup_alpha=cfg.augment.mixup_alpha,
                        label_transform=transform, extra_inputs=model_extra_inputs(cfg),
                        modality_drop=0.0 if cfg.data.modalities is None else cfg.data.modalities.drop_prob,
                        prior_patch=None if prior is None else CasePriors(prior, cases, patch))


def _case_targets(annotated: Sequence[np.ndarray], label: np.ndarray, index: int) -> np.ndarray:
    """INERRANT's per-class targets of sampler case `index` (NaN where ambiguous)."""
    return partial_targets(label, annotated[index])


def build_relabeller(cfg: ExperimentConfig, cases: Sequence[PreparedCase], sampler: BatchSampler,
                     tile: tuple[int, ...]) -> Relabeller | None:
    """INERRANT's iterative relabelling of `sampler`'s cases (the `cases` it was built from), predicting with
    inference tile `tile`; None for other schemes or with train.inerrant.relabel_steps 0."""
    settings = cfg.train.inerrant_settings
    if cfg.train.scheme != "inerrant" or not settings.relabel_steps:
        return None
    partial, annotated = apply_partial_labels(cases, cfg.data.partial_labels, cfg.data.class_names)
    schedule = RelabelSchedule(cfg.train.epochs, settings.first_epochs(cfg.train.epochs), settings.relabel_steps,
                               settings.gamma_max)
    return Relabeller(partial, annotated, sampler, schedule, tile,
                      confidence=build_confidence(settings, cfg.train.batch_size, cfg.train.seed))
