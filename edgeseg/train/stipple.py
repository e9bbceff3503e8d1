"""STIPPLE's 3D spatial prior in training and evaluation (O. Petit, PhD thesis, CNAM 2021; Petit et al. 2021, "3D
spatial priors for semi-supervised organ segmentation with deep convolutional neural networks", IJCARS;
../shared/methods.md), for `train.scheme: stipple`. The torch-free core is `edgeseg.priors`.

1. At the start of training the prior is built from the labels of the training cases, on the grid the
   preprocessing gives them (`build_run_prior`), with a reference training volume for placement, and stored in
   RUN/stipple/ (`save_run_prior`: .npy and JSON files written atomically, their sha256 recorded in run.json
   under extra.stipple), so a resumed run, validation and `edgeseg evaluate` reuse exactly that prior.
2. Training: the prior follows each patch. Every labelled case is aligned by its own organ centres
   (`edgeseg.priors.reference.centres_from_label`); the sampler paints the prior maps at the patch's place and
   moves them with the patch's spatial augmentation (`CasePriors`, `BatchSampler(prior_patch=...)`); the loss
   reads s + ln p (`prior_logits`), so its softmax is the prior-driven softmax
       y_k = exp(s_k + ln p_k) / sum_c exp(s_c + ln p_c).
   For a binary task this is the prior-driven sigmoid sigma(s - ln(1 - p) + ln p) of the two-channel network's
   logit s = s_1 - s_0, since the background prior is 1 - p.
   `PriorDrivenLoss` adds coarse_loss_weight * loss(s): the network's own probabilities softmax(s) place the
   prior at evaluation (step 3), but the prior-driven term alone leaves them untrained wherever the prior rules a
   class out (there p_k = eps, so s_k + ln p_k gets no gradient). Measured on MSD Hippocampus (10 labelled
   volumes, 160 steps of batch 4, weight 0): softmax(s) scored a Dice of 0.15 on the validation volumes and the
   KL placement put the prior 16-23 voxels off on all 29 of them (Dice 0.00), while the same network with the
   prior at each volume's true organ centres scored 0.82. With weight 1, same run: softmax(s) 0.73 (a plain
   U-Net trained alike: 0.72), placement within 6 voxels of the true centres (mean 2.4), Dice 0.79 with the
   placed prior, 0.81 with the prior at the true centres (one seed, a short run: a smoke check, not a result).
3. Validation and evaluation (`PriorPredictor`): labels are not used. The network's softmax probabilities q on
   the whole volume place the prior by the KL-minimising translation onto the reference's smoothed label
   (`centres_from_probabilities`; why smoothed: `edgeseg.priors.reference`), and the prediction is the argmax
   of q_k p_k / sum_c q_c p_c, which is the prior-driven softmax of the logits wherever q is a softmax (a volume
   within one tile; with overlapping tiles, of the stitched probabilities). The torch-free
   `edgeseg.priors.predict.PriorModel` does all of it, for this path and for the runtime alike.

Export: `edgeseg export` writes the network as for a standard run (softmax logits) and copies RUN/stipple/ into
BUNDLE/stipple/, each file checked against run.json's sha256 first (`edgeseg.export.stipple_export`); the
manifest's `stipple` section (schema version 3) holds the settings above. `edgeseg segment` and `edgeseg evaluate
BUNDLE` then place the prior on the stitched (TTA/MC mean) probabilities of each volume with the same
`PriorModel`, so they predict what `edgeseg evaluate RUN` predicts (docs/bundle.md). `edgeseg quantize` still
refuses the scheme (`edgeseg.train.schemes.output_activation`): quantization-aware training does not train the
prior-driven loss.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeseg.config.schema import StippleConfig
from edgeseg.data.cases import PreparedCase
from edgeseg.errors import UserError
from edgeseg.priors.predict import PriorModel
from edgeseg.priors.reference import (
    Reference,
    centres_from_label,
    choose_reference,
    load_reference,
    save_reference,
)
from edgeseg.priors.stipple import SpatialPrior, build_prior, load_prior, prior_maps, save_prior
from edgeseg.train.inference import predict_probabilities

FOLDER = "stipple"  # inside the run directory
RECORD_KEY = "stipple"  # RunInfo.extra key


@dataclass(frozen=True)
class RunPrior:
    """A run's prior, its reference volume and the scheme's settings."""

    prior: SpatialPrior
    reference: Reference
    settings: StippleConfig

    def maps(self, centres: Mapping[int, Sequence[int]], shape: Sequence[int]) -> np.ndarray:
        """Per-class prior maps (K, *shape) with each organ centred at `centres[k]` (floored at eps)."""
        return prior_maps(self.prior, centres, shape, self.settings.eps)

    def model(self) -> PriorModel:
        """The torch-free predictor with this prior and the run's placement settings (what a bundle carries)."""
        s = self.settings
        return PriorModel(self.prior, self.reference, s.max_shift, tuple(s.factors), s.eps, s.reference_smoothing)


def build_run_prior(cases: Sequence[PreparedCase], class_names: Sequence[str], settings: StippleConfig) -> RunPrior:
    """The prior of the labelled `cases` (preprocessed training cases) and their medoid reference volume."""
    labelled = [c for c in cases if c.label is not None]
    labels = [np.asarray(c.label) for c in labelled]
    if any(lab.ndim != 3 for lab in labels):
        raise UserError("train.scheme stipple needs 3D training volumes (its prior is 3D)")
    prior = build_prior(labels, class_names, settings.num_bins)
    reference = choose_reference([c.name for c in labelled], labels, len(class_names))
    return RunPrior(prior, reference, settings)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def save_run_prior(run_prior: RunPrior, run_dir: Path) -> dict[str, Any]:
    """Write the prior and reference into RUN/stipple/ (each file atomically); returns the run.json record."""
    folder = Path(run_dir) / FOLDER
    save_prior(run_prior.prior, folder)
    save_reference(run_prior.reference, folder)
    return {"folder": FOLDER, "num_bins": run_prior.prior.num_bins, "reference_case": run_prior.reference.name,
            "boxes": {o.name: list(o.box) for o in run_prior.prior.organs}, "sha256": _digests(folder)}


def load_run_prior(run_dir: Path, record: Mapping[str, Any] | None, settings: StippleConfig) -> RunPrior:
    """The prior a run stored (UserError when run.json has no record or a file changed since training)."""
    if not record:
        raise UserError(f"{run_dir}/run.json records no STIPPLE prior (extra.stipple); was it trained with "
                        "train.scheme stipple?")
    folder = Path(run_dir) / str(record.get("folder", FOLDER))
    if not folder.is_dir():
        raise UserError(f"the STIPPLE prior of {run_dir} is missing ({folder})")
    found = _digests(folder)
    for name, digest in dict(record.get("sha256", {})).items():
        if found.get(name) != digest:
            raise UserError(f"{folder / name} is missing or changed since training (sha256 differs from run.json)")
    return RunPrior(load_prior(folder), load_reference(folder), settings)


class CasePriors:
    """The `prior_patch` of `BatchSampler`: each labelled case's prior placed by its own alignment, painted
    straight into the patch (the same values as cutting the whole-volume maps at the patch's origin)."""

    def __init__(self, run_prior: RunPrior, cases: Sequence[PreparedCase], patch: Sequence[int]):
        s = run_prior.settings
        self.run_prior, self.patch = run_prior, tuple(int(p) for p in patch)
        self.centres = [centres_from_label(np.asarray(c.label), run_prior.reference, s.max_shift, s.factors,
                                           s.reference_smoothing)
                        for c in cases if c.label is not None]  # in the sampler's case order

    def __call__(self, index: int, origin: Sequence[int]) -> np.ndarray:
        """Prior maps (K, *patch) of the patch of case `index` whose first voxel is `origin` on the case's grid."""
        local = {k: tuple(int(c) - int(o) for c, o in zip(centre, origin)) for k, centre in self.centres[index].items()}
        return self.run_prior.maps(local, self.patch)


def prior_logits(scores: torch.Tensor, prior: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """s + ln p in float32: the logits whose softmax is STIPPLE's prior-driven softmax (what the loss reads).
    Shape: scores, prior (B, K, *S) -> (B, K, *S)."""
    return scores.float() + torch.log(prior.float().clamp_min(eps))


class PriorDrivenLoss(nn.Module):
    """STIPPLE's training loss: base(s + ln p, target) + coarse_weight * base(s, target), with `base` any
    registered loss on logits (module docstring, step 2). Shape: scores, prior (B, K, *S); target as `base`."""

    def __init__(self, base: nn.Module, coarse_weight: float = 1.0, eps: float = 1e-6):
        super().__init__()
        self.base, self.coarse_weight, self.eps = base, float(coarse_weight), float(eps)

    def forward(self, scores: torch.Tensor, target: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        loss = self.base(prior_logits(scores, prior, self.eps), target)
        if self.coarse_weight:
            loss = loss + self.coarse_weight * self.base(scores.float(), target)
        return loss


@dataclass
class PriorPredictor:
    """Whole-volume prediction with the prior, for validation and `edgeseg evaluate`: the network's softmax,
    the prior placed by translation (labels unused), their prior-driven combination, argmax.
    `shifts` records each case's translation (voxels, relative to the reference volume)."""

    run_prior: RunPrior
    tile: tuple[int, ...]
    extra_inputs: tuple[str, ...] = ()
    shifts: dict[str, list[int]] = field(default_factory=dict)

    def probabilities(self, model: torch.nn.Module, case: PreparedCase, device: torch.device) -> np.ndarray:
        """Prior-driven class probabilities of a case. Shape: (K, *S) float32."""
        q = predict_probabilities(model, case.image, self.tile, device, activation="softmax",
                                  inputs=case.model_inputs(self.extra_inputs))
        placed = self.run_prior.model().place(q)
        self.shifts[case.name] = list(placed.shift)
        return placed.probabilities

    def __call__(self, model: torch.nn.Module, case: PreparedCase, device: torch.device) -> np.ndarray:
        """Labels (*S) uint8 of a case."""
        return self.probabilities(model, case, device).argmax(0).astype(np.uint8)
