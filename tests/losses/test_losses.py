"""Losses against hand-computed values, plus a registry contract."""

import math

import pytest
import torch

from edgeseg.config import LossConfig
from edgeseg.errors import UserError
from edgeseg.losses import available_losses, build_loss, soft_dice_loss


def test_soft_dice_hand_computed_batch_vs_sample():
    # two samples, 2 classes, 4 voxels; foreground channel only (include_background=False)
    probs = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]],
                          [[0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]])
    target = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]],
                           [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    eps = 1e-5
    # batch reduction: I = 2, P = 2.5, T = 2 -> dice = (4 + eps) / (4.5 + eps)
    got = soft_dice_loss(probs, target, reduction="batch", smooth=eps)
    assert got.item() == pytest.approx(1 - (4 + eps) / (4.5 + eps), abs=1e-7)
    # per-sample: sample 1 perfect (1.0); sample 2 has an empty label: (0 + eps) / (0.5 + eps) ~ 0
    got = soft_dice_loss(probs, target, reduction="sample", smooth=eps)
    assert got.item() == pytest.approx(1 - (1.0 + eps / (0.5 + eps)) / 2, abs=1e-7)


def test_empty_label_and_empty_prediction_is_perfect():
    probs = torch.zeros(1, 2, 3)
    probs[:, 0] = 1
    target = probs.clone()
    for reduction in ("batch", "sample"):
        assert soft_dice_loss(probs, target, reduction=reduction, smooth=1e-5).item() == pytest.approx(0.0)


def test_dice_ce_equals_sum_of_parts():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    target = torch.randint(0, 3, (2, 5, 5))
    dice = build_loss(LossConfig(name="dice"))(logits, target)
    ce = torch.nn.functional.cross_entropy(logits, target)
    both = build_loss(LossConfig(name="dice_ce", dice_weight=0.5, ce_weight=2.0))(logits, target)
    assert both.item() == pytest.approx(0.5 * dice.item() + 2.0 * ce.item(), rel=1e-6)
    # CE of uniform logits is ln(3)
    assert build_loss(LossConfig(name="ce"))(torch.zeros(1, 3, 2, 2), target[:1, :2, :2]).item() == pytest.approx(math.log(3))


@pytest.mark.parametrize("name", list(available_losses()))
def test_every_loss_is_differentiable_and_lower_for_better_predictions(name):
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[:, 1:3, 1:3] = 1
    good = torch.nn.functional.one_hot(target, 2).movedim(-1, 1).float() * 8 - 4
    bad = -good
    loss = build_loss(LossConfig(name=name))
    x = good.clone().requires_grad_(True)
    value = loss(x, target)
    value.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert value.item() < loss(bad, target).item()


def test_unknown_loss():
    with pytest.raises(UserError, match="did you mean 'dice_ce'"):
        build_loss(LossConfig(name="dice_cee"))
