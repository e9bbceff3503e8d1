"""Soft and generalized Dice against hand-computed values, with empty and missing labels.

Probabilities are given directly (no softmax) so the arithmetic fits in a comment; MONAI's
GeneralizedDiceLoss is an independent oracle where its conventions match ours.
"""

import pytest
import torch

from edgeseg.losses import DiceLoss, GeneralizedDiceLoss, generalized_dice_loss, soft_dice_loss

EPS = 1e-5


def _probs(*fg_rows: list[float]) -> torch.Tensor:
    """(B, 2, N) probabilities from one foreground row per sample (background = 1 - fg)."""
    fg = torch.tensor(fg_rows, dtype=torch.float64)[:, None]
    return torch.cat([1 - fg, fg], dim=1)


def _onehot(*label_rows: list[int]) -> torch.Tensor:
    labels = torch.tensor(label_rows)
    return torch.nn.functional.one_hot(labels, 2).movedim(-1, 1).to(torch.float64)


# --- soft Dice -----------------------------------------------------------------------------------

def test_soft_dice_hand_computed_batch_vs_sample():
    # two samples, 2 classes, 4 voxels; foreground channel only (include_background=False)
    probs = _probs([1.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0])
    target = _onehot([1, 1, 0, 0], [0, 0, 0, 0])
    # batch reduction: I = 2, P = 2.5, T = 2 -> dice = (4 + eps) / (4.5 + eps)
    got = soft_dice_loss(probs, target, reduction="batch", smooth=EPS)
    assert got.item() == pytest.approx(1 - (4 + EPS) / (4.5 + EPS), abs=1e-12)
    # per-sample: sample 1 perfect (1.0); sample 2 has an empty label: (0 + eps) / (0.5 + eps) ~ 0
    got = soft_dice_loss(probs, target, reduction="sample", smooth=EPS)
    assert got.item() == pytest.approx(1 - (1.0 + EPS / (0.5 + EPS)) / 2, abs=1e-12)


def test_soft_dice_empty_label_and_empty_prediction_is_perfect():
    probs, target = _probs([0.0, 0.0, 0.0]), _onehot([0, 0, 0])
    for reduction in ("batch", "sample"):
        assert soft_dice_loss(probs, target, reduction=reduction, smooth=EPS).item() == pytest.approx(0.0)


def test_soft_dice_missing_label_gives_no_gradient_per_sample_but_does_per_batch():
    # Tilborghs et al. 2022: sample 2's foreground is not annotated (a missing label) while the
    # network predicts p = 0.5 there. Per sample with tiny eps its Dice is eps / (P + eps), whose
    # gradient eps / (P + eps)^2 ~ 2.5e-6 is ~0; per batch it is pushed towards background.
    target = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    logits = torch.zeros(2, 2, 4, dtype=torch.float64)  # p = 0.5 everywhere
    grads = {}
    for reduction in ("sample", "batch"):
        x = logits.clone().requires_grad_(True)
        DiceLoss(reduction, EPS)(x, target).backward()
        grads[reduction] = x.grad[1].abs().max().item()
    assert grads["sample"] < 1e-5
    assert grads["batch"] > 1e-2


# --- generalized Dice ------------------------------------------------------------------------------

def test_generalized_dice_hand_computed_with_background():
    # r_bg = [0, 0, 0, 1] (area 1, w = 1), r_fg = [1, 1, 1, 0] (area 3, w = 1/9)
    # p_fg = [1, 1, .5, .5], p_bg = [0, 0, .5, .5]
    # I_bg = .5, I_fg = 2.5; sum(r + p): bg 1 + 1 = 2, fg 3 + 3 = 6
    # GDL = 1 - (2 (.5 + 2.5/9) + eps) / (2 + 6/9 + eps) = 1 - (14/9 + eps) / (24/9 + eps) ~ 5/12
    probs, target = _probs([1.0, 1.0, 0.5, 0.5]), _onehot([1, 1, 1, 0])
    got = generalized_dice_loss(probs, target, include_background=True, smooth=EPS)
    assert got.item() == pytest.approx(1 - (14 / 9 + EPS) / (24 / 9 + EPS), abs=1e-12)
    # one class only: the weight cancels and GDL is the soft Dice 1 - (5 + 9 eps) / (6 + 9 eps) ~ 1/6
    got = generalized_dice_loss(probs, target, include_background=False, smooth=EPS)
    assert got.item() == pytest.approx(1 - (5 / 9 + EPS) / (6 / 9 + EPS), abs=1e-12)


def _three_class_case() -> tuple[torch.Tensor, torch.Tensor]:
    # labels [1, 1, 0, 0]: class 1 area 2 (w = 1/4), class 2 absent (empty)
    # p1 = [1, .5, 0, 0], p2 = [0, .5, .5, 0], p0 = the rest
    p1 = torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    p2 = torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=torch.float64)
    probs = torch.stack([1 - p1 - p2, p1, p2])[None]
    target = torch.nn.functional.one_hot(torch.tensor([[1, 1, 0, 0]]), 3).movedim(-1, 1).to(torch.float64)
    return probs, target


def test_generalized_dice_empty_class_costs_like_the_rarest_present_class():
    # I1 = 1.5, sum(r + p)_1 = 2 + 1.5 = 3.5; I2 = 0, sum(r + p)_2 = 0 + 1 = 1
    # "empty": w2 = max present weight = 1/4 -> 1 - (2 * 1.5/4 + eps) / ((3.5 + 1)/4 + eps) ~ 1/3
    probs, target = _three_class_case()
    got = generalized_dice_loss(probs, target, smooth=EPS, absent_class="empty")
    assert got.item() == pytest.approx(1 - (0.75 + EPS) / (1.125 + EPS), abs=1e-12)
    # "missing": w2 = 0 -> 1 - (0.75 + eps) / (3.5/4 + eps) ~ 1/7, class 2's predictions are free
    got = generalized_dice_loss(probs, target, smooth=EPS, absent_class="missing")
    assert got.item() == pytest.approx(1 - (0.75 + EPS) / (0.875 + EPS), abs=1e-12)


def test_generalized_dice_all_classes_empty():
    # no foreground anywhere (background excluded): "empty" falls back to w = 1
    target = _onehot([0, 0, 0, 0])
    # a predicted 0.5 -> 1 - eps / (0.5 + eps); nothing predicted -> 1 - eps / eps = 0
    got = generalized_dice_loss(_probs([0.5, 0.0, 0.0, 0.0]), target, smooth=EPS)
    assert got.item() == pytest.approx(1 - EPS / (0.5 + EPS), abs=1e-12)
    got = generalized_dice_loss(_probs([0.0] * 4), target, smooth=EPS)
    assert got.item() == pytest.approx(0.0, abs=1e-12)
    # "missing": nothing is known, so the loss is 0 whatever is predicted
    got = generalized_dice_loss(_probs([0.5, 0.9, 0.0, 0.0]), target, smooth=EPS, absent_class="missing")
    assert got.item() == 0.0


def test_generalized_dice_missing_label_per_sample_gives_exactly_no_gradient():
    # sample 2 lacks class 1's annotation; per sample with "missing" it contributes a constant 0
    # sample 1: r = [1, 0], p = [.5, .5] -> I = .5, sum(r + p) = 2, w = 1/1^2 = 1
    # -> mean (GDL_1 + 0) / 2 with GDL_1 = 1 - (2 * .5 + eps) / (2 + eps) ~ 1/2, so ~ 1/4, and
    # sample 2's logits get no gradient at all.
    target = torch.tensor([[1, 0], [0, 0]])
    x = torch.zeros(2, 2, 2, dtype=torch.float64, requires_grad=True)  # p = 0.5 everywhere
    loss = GeneralizedDiceLoss("sample", EPS, absent_class="missing")(x, target)
    w = 1.0  # 1 / area^2 with area 1
    expected = (1 - (2 * w * 0.5 + EPS) / (w * (1 + 1) + EPS)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-7)  # float32
    loss.backward()
    assert torch.all(x.grad[1] == 0) and x.grad[0].abs().max() > 1e-2
    # "empty" instead pushes sample 2 towards background, with a finite gradient
    x.grad = None
    GeneralizedDiceLoss("sample", EPS, absent_class="empty")(x, target).backward()
    assert torch.isfinite(x.grad).all() and x.grad[1].abs().max() > 0


@pytest.mark.parametrize("absent_class", ["empty", "missing"])
@pytest.mark.parametrize("reduction", ["batch", "sample"])
def test_generalized_dice_gradients_are_finite(reduction, absent_class):
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 4, 4))
    target[1] = 0  # one sample with no foreground at all
    logits = (torch.randn(2, 3, 4, 4) * 30).requires_grad_(True)  # saturated softmax too
    loss = GeneralizedDiceLoss(reduction, EPS, absent_class=absent_class)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("reduction", ["batch", "sample"])
def test_generalized_dice_matches_monai(reduction, include_background):
    monai_losses = pytest.importorskip("monai.losses")
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 5, 6, 4, dtype=torch.float64)
    target = torch.randint(0, 4, (3, 5, 6, 4))
    target[0][target[0] == 3] = 2  # class 3 absent from sample 0: MONAI's max-weight rule = "empty"
    ours = GeneralizedDiceLoss(reduction, EPS, include_background, "empty")(logits, target)
    oracle = monai_losses.GeneralizedDiceLoss(
        include_background=include_background, to_onehot_y=True, softmax=True, smooth_nr=EPS, smooth_dr=EPS,
        batch=reduction == "batch")(logits, target[:, None])
    assert ours.item() == pytest.approx(oracle.item(), rel=1e-6)  # our modules compute in float32
