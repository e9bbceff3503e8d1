"""Adaptive Wing (Wang et al. 2019) against hand-computed values of the paper's formula."""

import math

import pytest
import torch

from edgeseg.losses import AdaptiveWingLoss, adaptive_wing_loss

# paper defaults: omega = 14, theta = .5, epsilon = 1, alpha = 2.1


def _awing(y: float, yhat: float) -> float:
    """The paper's piecewise formula in plain floats, for one pixel."""
    w, th, e, a = 14.0, 0.5, 1.0, 2.1
    d = abs(y - yhat)
    if d < th:
        return w * math.log(1 + (d / e) ** (a - y))
    big_a = w * (1 / (1 + (th / e) ** (a - y))) * (a - y) * (th / e) ** (a - y - 1) / e
    c = th * big_a - w * math.log(1 + (th / e) ** (a - y))
    return big_a * d - c


def test_adaptive_wing_hand_computed():
    # (y = 0, yhat = .25): 14 ln(1 + .25^2.1) = 14 ln(1.05441) ~ 0.74173
    # (y = 1, yhat = 0): |d| = 1 >= theta; .5^1.1 ~ .46652,
    #   A = 14 / 1.46652 * 1.1 * .5^.1 ~ 9.79785, C = .5 A - 14 ln 1.46652 ~ -.46153, A - C ~ 10.25938
    # (y = .5, yhat = 1.2): |d| = .7, exponent 1.6: A ~ 11.11267, C ~ 1.56513, .7 A - C ~ 6.21374
    pred = torch.tensor([[[0.25, 0.0, 1.2]]], dtype=torch.float64)
    target = torch.tensor([[[0.0, 1.0, 0.5]]], dtype=torch.float64)
    expected = (0.7417313 + 10.2593828 + 6.2137449) / 3
    assert adaptive_wing_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx((_awing(0, 0.25) + _awing(1, 0) + _awing(0.5, 1.2)) / 3, rel=1e-6)


@pytest.mark.parametrize("y", [0.0, 0.3, 1.0])
def test_adaptive_wing_is_continuous_and_smooth_at_theta(y):
    # A and C are chosen so both pieces meet, with the same slope, at |d| = theta
    pred = torch.tensor([y + 0.5 - 1e-6, y + 0.5 + 1e-6], dtype=torch.float64, requires_grad=True)
    target = torch.full_like(pred, y)
    per_pixel = [adaptive_wing_loss(pred[i:i + 1], target[i:i + 1]) for i in range(2)]
    assert per_pixel[0].item() == pytest.approx(per_pixel[1].item(), abs=1e-4)
    slopes = [torch.autograd.grad(v, pred, retain_graph=True)[0][i].item() for i, v in enumerate(per_pixel)]
    assert slopes[0] == pytest.approx(slopes[1], rel=1e-4)


def test_adaptive_wing_on_float_heatmaps_with_and_without_sigmoid():
    # a Gaussian heatmap target (B=1, C=1, 5x5): a perfect heatmap output scores 0 with activation
    # "none"; the same values as logits go through a sigmoid first and score > 0
    yy, xx = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
    heatmap = torch.exp(-((yy - 2) ** 2 + (xx - 2) ** 2) / 2.0)[None, None]
    assert AdaptiveWingLoss(activation="none")(heatmap, heatmap).item() == 0.0
    assert AdaptiveWingLoss(activation="sigmoid")(heatmap, heatmap).item() > 0.1
    # and class-index targets are one-hot encoded: logits +-20 for the right classes score ~0
    labels = torch.tensor([[0, 1, 1]])
    logits = torch.nn.functional.one_hot(labels, 2).movedim(-1, 1).float() * 40 - 20
    assert AdaptiveWingLoss()(logits, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_wing_gradients_finite_at_zero_error_and_far_away():
    target = torch.tensor([[[0.0, 1.0, 0.4, 0.0]]])
    pred = torch.tensor([[[0.0, 1.0, 3.0, -2.0]]], requires_grad=True)  # exact hits and both pieces
    loss = AdaptiveWingLoss(activation="none")(pred, target)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[0, 0, 0] == 0 and pred.grad[0, 0, 1] == 0  # flat at zero error (alpha - y > 1)
