"""Models with extra inputs: FiLM (hand-set generator) and HeMIS fusion (torch's mean/var on the subset present)."""

from __future__ import annotations

import pytest
import torch

from edgeseg.errors import UserError
from edgeseg.nets import create_model, model_options
from edgeseg.nets.film import FiLM
from edgeseg.nets.hemis import fuse_modalities


def test_film_applies_gamma_and_beta_per_channel():
    film = FiLM(metadata_dim=2, channels=3, hidden=4)
    with torch.no_grad():
        last = film.generator[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.5, -1.0, 0.0, 1.0, 2.0, 3.0]))  # Δγ = (0.5, -1, 0), β = (1, 2, 3)
    f = torch.randn(2, 3, 4, 4)
    out = film(f, torch.randn(2, 2))
    torch.testing.assert_close(out[:, 0], 1.5 * f[:, 0] + 1.0)
    torch.testing.assert_close(out[:, 1], torch.full_like(f[:, 1], 2.0))  # γ = 0: the channel is replaced by β
    torch.testing.assert_close(out[:, 2], f[:, 2] + 3.0)


def test_film_unet_is_conditioned_on_metadata():
    torch.manual_seed(0)
    model = create_model("film_unet", spatial_dims=2, in_channels=1, out_channels=2, depth=2, base_width=4,
                         metadata_dim=3).eval()
    x, meta = torch.randn(2, 1, 16, 16), torch.randn(2, 3)
    with torch.no_grad():
        assert torch.equal(model(x, meta), model(x, meta))
        assert not torch.allclose(model(x, meta), model(x, meta + 1.0))
    with pytest.raises(UserError, match="needs its metadata input"):
        model(x)
    with pytest.raises(UserError, match=r"metadata of shape \(batch, 3\)"):
        model(x, torch.randn(2, 4))
    with pytest.raises(UserError, match="metadata_dim is required"):
        model_options("film_unet", {})


def test_hemis_fusion_is_mean_and_unbiased_variance_over_present_modalities():
    torch.manual_seed(0)
    features = [torch.randn(3, 2, 4, 4) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 0]])
    fused = fuse_modalities(features, mask)
    assert fused.shape == (3, 4, 4, 4)
    stacked = torch.stack(features)  # (M, B, C, *S)
    for case, present in enumerate([[0, 1, 2], [0, 2], [1]]):
        subset = stacked[present, case]
        torch.testing.assert_close(fused[case, :2], subset.mean(0))
        expected_var = subset.var(0, unbiased=True) if len(present) > 1 else torch.zeros_like(subset[0])
        torch.testing.assert_close(fused[case, 2:], expected_var)


def test_hemis_unet_ignores_missing_modalities():
    torch.manual_seed(0)
    model = create_model("hemis_unet", spatial_dims=3, in_channels=3, out_channels=2, depth=2, base_width=4).eval()
    x = torch.randn(2, 3, 16, 16, 16)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    changed = x.clone()
    changed[0, 1] = 100 * torch.randn(16, 16, 16)  # modality 1 is missing in case 0
    changed[1, 0] = -7.0  # modality 0 is missing in case 1
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), model(changed, mask))
        assert not torch.allclose(model(x, mask), model(x, torch.ones(2, 3)))  # present modalities do count
    with pytest.raises(UserError, match="at least one modality"):
        model(x, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(UserError, match=r"modality mask of shape \(2, 3\)"):
        model(x, torch.ones(2, 2))
    with pytest.raises(UserError, match="needs its modality-mask input"):
        model(x)
