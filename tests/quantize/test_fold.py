"""Batch-norm folding: the folded conv equals conv -> BN (eval) computed by PyTorch itself."""

import pytest
import torch
from torch import nn

from edgeseg.errors import UserError
from edgeseg.nets import create_model
from edgeseg.quantize.fold import fold_batch_norms


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so folding has something to do."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize(("conv", "bn", "shape"), [
    (nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), (2, 3, 8, 8)),
    (nn.Conv3d(2, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), (2, 2, 6, 6, 6)),
    (nn.ConvTranspose3d(3, 4, 2, stride=2), nn.BatchNorm3d(4), (1, 3, 4, 4, 4)),
])
def test_folded_conv_matches_conv_then_bn(conv, bn, shape):
    torch.manual_seed(0)
    model = nn.Sequential(conv, bn, nn.ReLU())
    _randomise_bn(model)
    model.eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = model(x).clone()
    folded = fold_batch_norms(model)
    assert folded == ["1"]
    assert isinstance(model[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_unet_batch_norms_all_folded_and_output_unchanged():
    torch.manual_seed(0)
    model = create_model("unet", spatial_dims=3, in_channels=1, out_channels=3, depth=2, base_width=4, norm="batch")
    _randomise_bn(model)
    model.eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        expected = model(x).clone()
    names = fold_batch_norms(model)
    assert len(names) == 10  # 5 conv blocks x 2 convs (2 encoders, bottleneck, 2 decoders)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_batch_norm_not_after_a_conv_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2))
    with pytest.raises(UserError, match="'2'"):
        fold_batch_norms(model)
