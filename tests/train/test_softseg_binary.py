"""Binary SoftSeg (2 classes) as ivadomed's one-channel model: f = relu(s1 - s0) / max relu(s1 - s0) per sample,
soft maps (1 - f, f), the regression loss on f only; more classes keep the channel-sum form. Oracles: values
computed by hand, and the runtime's numpy copy against the torch one on random scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeseg.losses import adaptive_wing_loss
from edgeseg.losses.wing import AdaptiveWingLoss
from edgeseg.runtime.pipeline import normalized_relu as runtime_normalized_relu
from edgeseg.train.softseg import SoftSegLoss, binary_foreground, normalized_relu

# (B=2, K=2, S=3): sample 0: s1 - s0 = [2, -1, 1] -> f = [1, 0, .5]; sample 1: s1 - s0 <= 0 everywhere -> f = 0
SCORES = torch.tensor([[[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]],
                       [[1.0, 1.0, 1.0], [0.0, 1.0, 0.5]]])
FOREGROUND = torch.tensor([[[1.0, 0.0, 0.5]], [[0.0, 0.0, 0.0]]])


def test_binary_normalized_relu_by_hand():
    expected = torch.cat([1.0 - FOREGROUND, FOREGROUND], dim=1)
    torch.testing.assert_close(binary_foreground(SCORES), FOREGROUND)
    torch.testing.assert_close(normalized_relu(SCORES), expected)
    torch.testing.assert_close(normalized_relu(SCORES[..., None])[..., 0], expected)  # another spatial axis
    np.testing.assert_allclose(runtime_normalized_relu(SCORES.numpy()), expected.numpy(), atol=1e-7)
    # argmax is the threshold f > 0.5; positive scores in both channels are not foreground by themselves
    both_positive = torch.tensor([[[2.0, 1.0], [3.0, 5.0]]])  # s1 - s0 = [1, 4] -> f = [.25, 1]
    torch.testing.assert_close(normalized_relu(both_positive), torch.tensor([[[0.75, 0.0], [0.25, 1.0]]]))


def test_multiclass_normalized_relu_by_hand_is_the_channel_sum_form():
    three = torch.tensor([[[1.0, -1.0], [2.0, 4.0], [1.0, 0.0]]])  # relu / 4, then / voxel sum
    expected = torch.tensor([[[0.25, 0.0], [0.5, 1.0], [0.25, 0.0]]])
    torch.testing.assert_close(normalized_relu(three), expected)
    np.testing.assert_allclose(runtime_normalized_relu(three.numpy()), expected.numpy(), atol=1e-7)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_torch_and_runtime_activations_agree_on_random_scores(channels):
    scores = torch.randn(3, channels, 7, 5, generator=torch.Generator().manual_seed(channels)) * 3
    scores[1] = -scores[1].abs()  # a sample with nothing positive (K = 2: s1 - s0 may still be positive)
    np.testing.assert_allclose(runtime_normalized_relu(scores.numpy()), normalized_relu(scores).numpy(), atol=1e-6)
    assert torch.isfinite(normalized_relu(scores)).all()


def test_binary_loss_regresses_the_foreground_map_only():
    soft = torch.tensor([[[0.0, 1.0, 0.6], [1.0, 0.0, 0.4]],
                         [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])  # (B, 2, S) soft one-hot
    loss = SoftSegLoss(AdaptiveWingLoss(activation="none"))
    by_hand = adaptive_wing_loss(FOREGROUND, soft[:, 1:2])
    assert float(loss(SCORES, soft)) == pytest.approx(float(by_hand), abs=1e-6)
    both = adaptive_wing_loss(torch.cat([1 - FOREGROUND, FOREGROUND], 1), soft)  # the complement would change it
    assert abs(float(both) - float(by_hand)) > 1e-3
    # class indices give the same as their one-hot maps
    indices = torch.tensor([[1, 0, 1], [0, 0, 0]])
    one_hot = torch.stack([1 - indices, indices], dim=1).float()
    assert float(loss(SCORES, indices)) == pytest.approx(float(loss(SCORES, one_hot)), abs=1e-7)
    with pytest.raises(ValueError, match="2 channels"):
        loss(SCORES, torch.zeros(2, 3, 3))
    # the foreground score gets a gradient where s1 > s0, through both channels, with opposite signs
    scores = SCORES.clone().requires_grad_(True)
    loss(scores, soft).backward()
    assert torch.isfinite(scores.grad).all()
    torch.testing.assert_close(scores.grad[:, 0], -scores.grad[:, 1])
    assert scores.grad[0, 1, 2] != 0 and scores.grad[0, 1, 1] == 0


def test_multiclass_loss_is_unchanged():
    scores = torch.tensor([[[1.0, -1.0], [2.0, 4.0], [1.0, 0.0]]])
    target = torch.tensor([[[0.2, 0.0], [0.6, 1.0], [0.2, 0.0]]])
    by_hand = torch.tensor([[[0.25, 0.0], [0.5, 1.0], [0.25, 0.0]]])
    loss = SoftSegLoss(AdaptiveWingLoss(activation="none"))
    assert float(loss(scores, target)) == pytest.approx(float(adaptive_wing_loss(by_hand, target)), abs=1e-7)
