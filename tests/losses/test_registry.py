"""The loss registry: every registered loss gets the same battery; names agree with the config schema."""

import pytest
import torch
from typer.testing import CliRunner

from edgeseg.config import LossConfig
from edgeseg.config.schema import LOSS_OPTIONS, LossTermConfig
from edgeseg.errors import UserError
from edgeseg.losses import available_losses, build_loss

# a loss config for each registered name ("combined" needs terms)
EXAMPLES = {name: LossConfig(name=name) for name in available_losses()}
EXAMPLES["combined"] = LossConfig(name="combined", terms=(LossTermConfig(name="generalized_dice"),
                                                          LossTermConfig(name="focal", weight=0.5)))


def test_registry_and_schema_name_the_same_losses():
    assert set(available_losses()) == set(LOSS_OPTIONS)


@pytest.mark.parametrize("name", list(available_losses()))
def test_every_loss_is_differentiable_and_lower_for_better_predictions(name):
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[:, 1:3, 1:3] = 1
    target[1] = 0  # one sample without foreground (an empty label)
    good = torch.nn.functional.one_hot(target, 2).movedim(-1, 1).float() * 8 - 4
    bad = -good
    loss = build_loss(EXAMPLES[name])
    x = good.clone().requires_grad_(True)
    value = loss(x, target)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert value.item() < loss(bad, target).item()


@pytest.mark.parametrize("name", list(available_losses()))
def test_every_loss_accepts_one_hot_float_targets_like_class_indices(name):
    # soft-label schemes (mixup, SoftSeg, dilation) hand (B, C, *S) float targets to the same losses
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    onehot = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float()
    loss = build_loss(EXAMPLES[name])
    assert loss(logits, onehot).item() == pytest.approx(loss(logits, labels).item(), rel=1e-6)


def test_unknown_loss():
    with pytest.raises(UserError, match="did you mean 'dice_ce'"):
        build_loss(LossConfig(name="dice_cee"))


def test_list_losses_shows_every_registered_loss():
    from edgeseg.cli.app import app

    result = CliRunner().invoke(app, ["list", "losses"])
    assert result.exit_code == 0, result.output
    for name in available_losses():
        assert name in result.output
