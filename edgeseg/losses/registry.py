"""The loss registry: one name -> (builder from LossConfig, description) map behind `build_loss`.

The options each name reads are declared, torch-free, in `edgeseg.config.schema.LOSS_OPTIONS`
so a config is validated at load; a test checks that both list the same names.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from edgeseg.config.schema import LossConfig
from edgeseg.errors import UserError, unknown_name
from edgeseg.losses.combined import CombinedLoss
from edgeseg.losses.cross_entropy import CrossEntropyLoss, DiceCELoss
from edgeseg.losses.dice import DiceLoss, GeneralizedDiceLoss
from edgeseg.losses.focal import FocalDiceLoss, FocalLoss
from edgeseg.losses.mse import MSELoss
from edgeseg.losses.partial import PartialLabelBCELoss
from edgeseg.losses.wing import AdaptiveWingLoss


def _combined(cfg: LossConfig) -> nn.Module:
    if not cfg.terms:
        raise UserError("loss 'combined' needs terms, e.g. terms: [{name: dice}, {name: focal, weight: 0.5}]")
    return CombinedLoss([(term.weight, build_loss(term)) for term in cfg.terms])


_LOSSES: dict[str, tuple[Callable[[LossConfig], nn.Module], str]] = {
    "dice": (
        lambda c: DiceLoss(c.dice_reduction, c.smooth, c.include_background),
        "soft Dice (Milletari 2016)",
    ),
    "ce": (lambda c: CrossEntropyLoss(), "cross-entropy"),
    "dice_ce": (
        lambda c: DiceCELoss(c.dice_reduction, c.smooth, c.include_background, c.dice_weight, c.ce_weight),
        "soft Dice + cross-entropy",
    ),
    "generalized_dice": (
        lambda c: GeneralizedDiceLoss(c.dice_reduction, c.smooth, c.include_background, c.absent_class),
        "generalized Dice, class weights 1/area^2 (Sudre 2017)",
    ),
    "focal": (lambda c: FocalLoss(c.gamma, c.alpha), "focal loss, softmax form (Lin 2017)"),
    "focal_dice": (
        lambda c: FocalDiceLoss(c.dice_reduction, c.smooth, c.include_background, c.gamma, c.alpha,
                                c.dice_weight, c.focal_weight),
        "dice_weight * soft Dice + focal_weight * focal",
    ),
    "adaptive_wing": (
        lambda c: AdaptiveWingLoss(c.wing_omega, c.wing_theta, c.wing_epsilon, c.wing_alpha,
                                   c.heatmap_activation),
        "adaptive wing for heatmap regression (Wang 2019)",
    ),
    "mse": (lambda c: MSELoss(c.heatmap_activation),
            "mean squared error of heatmaps or soft maps (keypoints, SoftSeg)"),
    "combined": (_combined, "weighted sum of the losses in loss.terms"),
    "partial_bce": (
        lambda c: PartialLabelBCELoss(),
        "K sigmoids, per-class BCE weighted by the partial-label ambiguity map (INERRANT, Petit 2021)",
    ),
}


def available_losses() -> dict[str, str]:
    """Registered loss names and one-line descriptions, sorted by name."""
    return {name: desc for name, (_, desc) in sorted(_LOSSES.items())}


def build_loss(cfg: LossConfig) -> nn.Module:
    """Build the loss a LossConfig names (its options were validated when the config loaded)."""
    if cfg.name not in _LOSSES:
        raise unknown_name("loss", cfg.name, _LOSSES)
    return _LOSSES[cfg.name][0](cfg)
