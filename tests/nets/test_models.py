"""The U-Net's own options (decoders, norms, MC dropout); every registered model's contract is in test_contracts.py."""

import pytest
import torch

from edgeseg.errors import UserError
from edgeseg.nets import create_model, set_mc_dropout

MODELS = ["unet"]


def _input(model, spatial_dims, in_ch=1, size=16):
    shape = (2, in_ch) + (size,) * spatial_dims
    return torch.randn(*shape)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("decoder", ["upsample", "transposed"])
def test_forward_backward_every_parameter_gets_gradient(name, spatial_dims, decoder):
    torch.manual_seed(0)
    model = create_model(name, spatial_dims=spatial_dims, in_channels=2, out_channels=3, depth=2, base_width=4,
                         dropout=0.1, decoder=decoder)
    cls = type(model)
    assert getattr(cls, f"supports_{spatial_dims}d")
    x = _input(model, spatial_dims, in_ch=2)
    out = model(x)
    assert out.shape == (2, 3) + x.shape[2:]
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing}"


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_norm_options_build(norm):
    model = create_model("unet", spatial_dims=3, in_channels=1, out_channels=2, depth=1, base_width=4, norm=norm)
    kinds = {type(m).__name__ for m in model.modules()}
    expected = {"batch": "BatchNorm3d", "instance": "InstanceNorm3d", "none": None}[norm]
    if expected:
        assert expected in kinds
    else:
        assert not any("Norm" in k for k in kinds)


def test_mc_dropout_varies_only_when_enabled():
    torch.manual_seed(0)
    model = create_model("unet", spatial_dims=2, in_channels=1, out_channels=2, depth=2, base_width=8, dropout=0.3)
    model.eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        assert set_mc_dropout(model, True) > 0
        assert not torch.equal(model(x), model(x))
        # batch norm must stay in eval mode while sampling (ivadomed pitfall)
        assert not any(m.training for m in model.modules())
        set_mc_dropout(model, False)
        assert torch.equal(model(x), model(x))


def test_unknown_model_suggests_nearest():
    with pytest.raises(UserError, match="unknown model 'unte' \\(did you mean 'unet'\\?\\)"):
        create_model("unte", spatial_dims=2, in_channels=1, out_channels=2)
