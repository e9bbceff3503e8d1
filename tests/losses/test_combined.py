"""The combined loss and its config: built from YAML, validated once at load."""

import math
from pathlib import Path

import pytest
import torch

from edgeseg.config import ExperimentConfig, from_dict, load_experiment, to_dict
from edgeseg.errors import UserError
from edgeseg.losses import CombinedLoss, DiceLoss, FocalLoss, build_loss

REPO = Path(__file__).resolve().parents[2]


def _loss(section: dict):
    return from_dict(ExperimentConfig, {"loss": section}).loss


def test_combined_is_the_weighted_sum_hand_computed():
    # logits [0, 0] and [ln 3, 0], targets 1 and 0 (see test_focal.py):
    #   soft Dice (fg, batch) = 1 - (1 + eps) / (1.75 + eps); focal (gamma 2) = (.25 ln 2 + .0625 ln 4/3) / 2
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    target = torch.tensor([[1, 0]])
    cfg = _loss({"name": "combined", "terms": [{"name": "dice", "weight": 1},
                                               {"name": "focal", "weight": 0.5, "gamma": 2}]})
    loss = build_loss(cfg)
    assert isinstance(loss, CombinedLoss) and loss.weights == (1.0, 0.5)
    assert isinstance(loss.losses[0], DiceLoss) and isinstance(loss.losses[1], FocalLoss)
    dice = 1 - (1 + 1e-5) / (1.75 + 1e-5)
    focal = (0.25 * math.log(2) + 0.0625 * math.log(4 / 3)) / 2
    assert loss(logits, target).item() == pytest.approx(dice + 0.5 * focal, rel=1e-6)


def test_shipped_gdice_focal_config_builds_the_combined_loss_and_round_trips():
    cfg = load_experiment(REPO / "configs" / "hippocampus_3d_gdice_focal.yaml")
    plain = load_experiment(REPO / "configs" / "hippocampus_3d.yaml")
    assert [(t.name, t.weight) for t in cfg.loss.terms] == [("generalized_dice", 1.0), ("focal", 0.5)]
    assert (cfg.data, cfg.model, cfg.train) == (plain.data, plain.model, plain.train)  # only the loss differs
    loss = build_loss(cfg.loss)
    logits, target = torch.randn(1, 3, 4, 4, 4, requires_grad=True), torch.randint(0, 3, (1, 4, 4, 4))
    loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all()
    # a run's saved config.yaml holds every field at its value: it must load back unchanged
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("section, message", [
    ({"name": "combined", "terms": [{"name": "dice"}, {"name": "fcal"}]},
     "config loss.terms[1]: unknown loss 'fcal' (did you mean 'focal'?)"),
    ({"name": "generalised_dice"}, "unknown loss 'generalised_dice' (did you mean 'generalized_dice'?)"),
    ({"name": "focal", "gama": 3}, "unknown config key 'loss.gama' (did you mean 'gamma'?)"),
    ({"name": "dice", "gamma": 3}, "loss 'dice' does not read option 'gamma'"),
    ({"name": "adaptive_wing", "alpha": 2.5}, "does not read option 'alpha' (did you mean 'wing_alpha'?)"),
    ({"name": "dice", "terms": [{"name": "focal"}]}, "loss 'dice' does not read option 'terms'"),
    ({"name": "combined"}, "loss 'combined' needs terms"),
    ({"name": "combined", "weight": 2}, "unknown config key 'loss.weight'"),
    ({"name": "combined", "terms": [{"name": "dice", "weight": -1}]}, "weight must be >= 0"),
    ({"name": "focal", "alpha": 1.5}, "loss.alpha must be within [0, 1]"),
    ({"name": "generalized_dice", "absent_class": "mising"}, "did you mean 'missing'"),
    ({"name": "generalized_dice", "smooth": 0}, "loss.smooth must be positive"),
    ({"name": "adaptive_wing", "wing_alpha": 1.5}, "wing_alpha must be > 2"),
])
def test_bad_loss_configs_fail_at_load_with_one_clear_line(section, message):
    with pytest.raises(UserError) as info:
        _loss(section)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_nested_combined_terms_and_term_options_reach_the_modules():
    cfg = _loss({"name": "combined", "terms": [
        {"name": "combined", "weight": 2, "terms": [{"name": "focal", "gamma": 0.0, "alpha": 0.25}]},
        {"name": "generalized_dice", "absent_class": "missing", "dice_reduction": "sample"},
    ]})
    loss = build_loss(cfg)
    inner = loss.losses[0].losses[0]
    assert loss.weights == (2.0, 1.0) and (inner.gamma, inner.alpha) == (0.0, 0.25)
    assert (loss.losses[1].absent_class, loss.losses[1].reduction) == ("missing", "sample")


def test_existing_dice_ce_configs_still_load():
    assert _loss({"name": "dice_ce", "dice_reduction": "sample", "dice_weight": 0.5}).dice_weight == 0.5
