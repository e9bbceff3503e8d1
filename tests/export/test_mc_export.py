"""Monte Carlo dropout survives export: mask inputs reproduce torch's channel dropout, passes differ."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeseg.export.mc import MaskedDropout
from edgeseg.nets import set_mc_dropout
from edgeseg.runtime.bundle import load_bundle, make_mc_masks


def test_masked_dropout_is_torch_channel_dropout():
    """Oracle: F.dropout3d itself. Its output is x times a per-(sample, channel) mask in {0, 1/(1-p)}."""
    p = 0.3
    x = torch.rand(2, 6, 3, 4, 5) + 1.0  # no zeros, so the mask can be read off
    torch.manual_seed(3)
    expected = F.dropout3d(x, p, training=True)
    ratio = expected / x
    mask = ratio[..., :1, :1, :1]
    assert torch.allclose(ratio, mask.expand_as(ratio))  # constant over each channel
    assert torch.all(torch.isclose(mask, torch.tensor(0.0)) | torch.isclose(mask, torch.tensor(1 / (1 - p))))
    layer = MaskedDropout(p)
    layer.mask = mask
    assert torch.allclose(layer(x), expected, rtol=0, atol=1e-6)
    layer.mask = None
    assert torch.equal(layer(x), x)  # identity without a mask


class _InjectedDropout:
    """Replace F.dropout3d for McDropout layers in MC mode by `x * mask`, masks consumed in call order.

    For brevitas QuantTensors it keeps the scale and multiplies the value, as brevitas' own dropout
    handler (`quant_invariant_handler`) does.
    """

    def __init__(self, masks):
        self.masks = list(masks)

    def __call__(self, x, p, training=True, inplace=False):
        mask = torch.from_numpy(self.masks.pop(0))
        return x.set(value=x.value * mask) if hasattr(x, "set") else x * mask


def _reference(model, x, masks, monkeypatch, kit):
    """The ORIGINAL model (McDropout in MC mode) with the given masks injected into its dropout calls."""
    injected = _InjectedDropout(masks)
    monkeypatch.setattr(F, "dropout3d", injected)
    set_mc_dropout(model, True)
    try:
        return kit.torch_out(model, x)
    finally:
        set_mc_dropout(model, False)
        monkeypatch.undo()
        assert not injected.masks  # every site received its mask


@pytest.mark.parametrize("which", ["float", "quant"])
def test_mc_form_matches_the_model_with_the_same_masks(which, float_export, quant_export, float_model, quant_model,
                                                       monkeypatch, kit):
    export, model = (float_export, float_model) if which == "float" else (quant_export, quant_model)
    bundle = load_bundle(export.path)
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    masks = make_mc_masks(bundle.manifest, 2, np.random.default_rng(0))
    out = bundle.ort_session("mc").run(None, {"image": x.numpy(), **masks})[0]
    ref = _reference(model, x, [masks[s.input] for s in bundle.manifest.mc_sites], monkeypatch, kit)
    if which == "float":
        assert np.abs(out - ref).max() <= 1e-4
    else:
        step = kit.output_step(model, x).reshape(1, -1, 1, 1, 1)
        assert np.max(np.abs(out - ref) / step) <= 1.0


@pytest.mark.parametrize("which", ["float", "quant"])
def test_mc_passes_differ_and_a_seed_reproduces_them(which, float_export, quant_export):
    bundle = load_bundle((float_export if which == "float" else quant_export).path)
    session = bundle.ort_session("mc")
    x = np.random.default_rng(1).standard_normal((1, 1, 16, 16, 16)).astype(np.float32)

    def sample(seed):
        return session.run(None, {"image": x, **make_mc_masks(bundle.manifest, 1, np.random.default_rng(seed))})[0]

    assert not np.array_equal(sample(1), sample(2))
    assert np.array_equal(sample(1), sample(1))


def test_all_ones_masks_give_the_plain_prediction(float_export):
    bundle = load_bundle(float_export.path)
    x = np.random.default_rng(2).standard_normal((1, 1, 16, 16, 16)).astype(np.float32)
    ones = {name: np.ones(shape, np.float32) for name, shape in bundle.manifest.mc_mask_shapes(1).items()}
    plain = bundle.ort_session("float").run(None, {"image": x})[0]
    mc = bundle.ort_session("mc").run(None, {"image": x, **ones})[0]
    assert np.abs(plain - mc).max() <= 1e-6


def test_manifest_records_the_dropout_sites(float_export, quant_export):
    for export in (float_export, quant_export):
        m = load_bundle(export.path).manifest
        assert m.mc_available
        # depth-2, width-4 U-Net with dropout 0.2 in level-1 blocks and the bottleneck: 8, 16 and 8 channels
        assert [(s.input, s.channels, s.p) for s in m.mc_sites] == [
            ("mc_mask_0", 8, 0.2), ("mc_mask_1", 16, 0.2), ("mc_mask_2", 8, 0.2)]
        assert m.forms["mc"].mc and m.forms["mc"].inputs == ["image", "mc_mask_0", "mc_mask_1", "mc_mask_2"]
        assert m.mc_mask_shapes(2)["mc_mask_1"] == (2, 16, 1, 1, 1)
        assert m.parity["mc_vs_pytorch"]["two_pass_max_abs_difference"] > 0
