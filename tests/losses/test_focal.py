"""Focal and focal-Dice against hand-computed values; MONAI's FocalLoss as an oracle."""

import math

import pytest
import torch

from edgeseg.losses import FocalDiceLoss, FocalLoss, focal_loss

# two voxels, two classes:
#   voxel 1: logits [0, 0]     -> p = [.5, .5],  target 1 -> p_t = .5
#   voxel 2: logits [ln 3, 0]  -> p = [.75, .25], target 0 -> p_t = .75
LOGITS = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]], dtype=torch.float64)  # (B=1, C=2, N=2)
TARGET = torch.tensor([[1, 0]])


def test_focal_hand_computed():
    # gamma = 2: FL1 = -(1 - .5)^2 ln .5 = .25 ln 2; FL2 = -(1 - .75)^2 ln .75 = .0625 ln(4/3); mean
    expected = (0.25 * math.log(2) + 0.0625 * math.log(4 / 3)) / 2  # ~ 0.0956
    assert FocalLoss(gamma=2.0)(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)
    # alpha = .25: voxel 1 is foreground (x .25), voxel 2 background (x .75)
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * 0.0625 * math.log(4 / 3)) / 2
    assert FocalLoss(gamma=2.0, alpha=0.25)(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)
    # gamma = 0, no alpha: cross-entropy (ln 2 + ln(4/3)) / 2
    expected = (math.log(2) + math.log(4 / 3)) / 2
    assert FocalLoss(gamma=0.0)(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)


def test_focal_soft_target_is_the_per_class_sum():
    # voxel 1 labelled half/half: -(.5 (1 - .5)^2 ln .5 + .5 (1 - .5)^2 ln .5) = .25 ln 2 (unchanged);
    # voxel 2 one-hot as before
    soft = torch.tensor([[[0.5, 1.0], [0.5, 0.0]]], dtype=torch.float64)
    expected = (0.25 * math.log(2) + 0.0625 * math.log(4 / 3)) / 2
    assert focal_loss(LOGITS, soft, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_gradients_are_finite_even_when_saturated(gamma):
    logits = torch.tensor([[[40.0, -40.0], [-40.0, 40.0]]], requires_grad=True)  # p_t = 1 exactly in float32
    loss = FocalLoss(gamma=gamma)(logits, torch.tensor([[0, 1]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 3.5])
def test_focal_matches_monai(gamma, alpha):
    monai_losses = pytest.importorskip("monai.losses")
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 5, 3)
    target = torch.randint(0, 3, (2, 4, 5, 3))
    ours = FocalLoss(gamma=gamma, alpha=alpha)(logits, target)
    oracle = monai_losses.FocalLoss(include_background=True, to_onehot_y=True, gamma=gamma, alpha=alpha,
                                    use_softmax=True, reduction="mean")(logits, target[:, None])
    # MONAI's "mean" also averages over the C = 3 class channels; ours sums them (the paper's FL per voxel)
    assert ours.item() == pytest.approx(3 * oracle.item(), rel=1e-5)  # float32


def test_focal_dice_is_the_linear_combination_hand_computed():
    # Dice term (foreground only, batch): p_fg = [.5, .25], r_fg = [1, 0]: I = .5, P = .75, T = 1
    #   -> 1 - (1 + eps) / (1.75 + eps) ~ 3/7
    eps = 1e-5
    dice = 1 - (1 + eps) / (1.75 + eps)
    focal = (0.25 * math.log(2) + 0.0625 * math.log(4 / 3)) / 2
    got = FocalDiceLoss(smooth=eps, gamma=2.0, dice_weight=1.0, focal_weight=2.0)(LOGITS, TARGET)
    assert got.item() == pytest.approx(dice + 2 * focal, rel=1e-6)


@pytest.mark.parametrize("reduction", ["batch", "sample"])
def test_focal_dice_empty_label_predicted_empty_is_perfect(reduction):
    # no foreground in the target, background predicted with logits +-30: p_fg = e^-60 ~ 9e-27
    # Dice = (0 + eps) / (9e-27 + eps) ~ 1 and focal ~ e^-60 ln-terms ~ 0 -> loss ~ 0
    logits = torch.zeros(2, 2, 3)
    logits[:, 0], logits[:, 1] = 30.0, -30.0
    got = FocalDiceLoss(reduction, 1e-5)(logits, torch.zeros(2, 3, dtype=torch.long))
    assert got.item() == pytest.approx(0.0, abs=1e-6)


def test_focal_dice_missing_label_per_sample_leaves_only_the_focal_gradient():
    # sample 2's foreground is not annotated while p = .5 is predicted: per sample with tiny eps the
    # Dice term gives it ~no gradient (eps / (P + eps)^2 ~ 6e-6), so all of its gradient is focal's
    target = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    grads = {}
    for name, loss in {"focal_dice": FocalDiceLoss("sample", 1e-5), "focal": FocalLoss()}.items():
        x = torch.zeros(2, 2, 4, dtype=torch.float64, requires_grad=True)
        loss(x, target).backward()
        grads[name] = x.grad[1]
    assert torch.allclose(grads["focal_dice"], grads["focal"], atol=1e-5)
