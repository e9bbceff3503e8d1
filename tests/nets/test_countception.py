"""Count-ception specifics (the registry contract tests cover forward/backward, MC dropout, export, QAT).

Output size and receptive field as the architecture defines them, the quantized export against an
exact reference, and a few Adaptive Wing steps on one synthetic keypoint.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from edgeseg.data.heatmaps import Keypoint, gaussian_heatmaps, keypoints_from_heatmaps
from edgeseg.errors import UserError
from edgeseg.losses.wing import AdaptiveWingLoss
from edgeseg.nets import FloatLayers, create_model

# By hand from ivadomed's layers (all stride 1): the 3x3 first conv adds 2, each of the six Inception
# blocks adds 8 through its 9x9 branch, then the 14x14, 20x20, 10x10, 9x9 and 20x20 convs add 13, 19, 9, 8, 19.
RECEPTIVE_FIELD = 1 + 2 + 6 * 8 + 13 + 19 + 9 + 8 + 19  # = 119


def build(**kwargs):
    settings = {"in_channels": 1, "out_channels": 2, "base_width": 1, **kwargs}
    return create_model("countception", spatial_dims=2, **settings)


@pytest.mark.parametrize("size", [(16, 16), (17, 23), (5, 40)])
def test_output_has_the_input_size_for_any_size(size):
    model = build().eval()
    assert model.min_input_multiple == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, *size)).shape == (1, 2, *size)


class LinearLayers(FloatLayers):
    """Float layers without activations: the network becomes one linear map, so gradient support = receptive field."""

    def act(self, name: str) -> nn.Module:
        return nn.Identity()


def test_receptive_field_is_the_119_pixel_window_centred_on_each_output_pixel():
    model = build(out_channels=1, layers=LinearLayers(2, norm="none"))
    assert model.receptive_field == RECEPTIVE_FIELD == 119
    x = torch.randn(1, 1, 121, 121, requires_grad=True)
    model(x)[0, 0, 60, 60].backward()
    support = (x.grad[0, 0] != 0).numpy()
    half = (RECEPTIVE_FIELD - 1) // 2
    expected = np.zeros_like(support)
    expected[60 - half:60 + half + 1, 60 - half:60 + half + 1] = True  # rows/cols 1..119: centred, a peak is not shifted
    np.testing.assert_array_equal(support, expected)


def test_is_2d_only():
    with pytest.raises(UserError, match="2D only"):
        create_model("countception", spatial_dims=3, in_channels=1, out_channels=1)


def test_quantized_export_is_bit_exact_with_power_of_two_scales():
    """The QCDQ graph in ONNX Runtime reproduces brevitas bit for bit when float32 arithmetic is exact.

    With power-of-two scales every product and partial sum is an integer multiple of one power of two,
    below 2^24 here, so neither side rounds. (With float scales both float32 evaluations round a few
    6-bit activations of the 20x20 convs' long sums to the neighbouring level; see
    QUANT_EXPORT_GATE_XFAIL in test_contracts.py.)
    """
    from edgeseg.export.parity import difference, ort_run, output_step
    from edgeseg.export.torch_export import INPUT_NAME, export_qcdq
    from edgeseg.quantize.bits import parse_bits
    from edgeseg.quantize.calibrate import calibrate
    from edgeseg.quantize.layers import QuantLayers

    torch.manual_seed(0)
    layers = QuantLayers(2, parse_bits("4/6"), norm="none", power_of_two=True)
    twin = build(in_channels=2, out_channels=3, base_width=2, layers=layers)
    calibrate(twin, [torch.randn(2, 2, 12, 12) for _ in range(2)])
    twin.eval()
    x = 2.0 * torch.randn(2, 2, 12, 12)
    qcdq = export_qcdq(twin, (x[:1],), 2)
    out = ort_run(qcdq, {INPUT_NAME: x.numpy()}, optimize=False)
    with torch.no_grad():
        reference = twin(x)
    reference = (reference.value if hasattr(reference, "value") else reference).numpy()
    assert output_step(qcdq) is not None  # the head's int32 bias: the logits are exact multiples of its step
    d = difference(out, reference)
    assert d.max_abs == 0.0 and d.logit_range > 0.0, d


def test_adaptive_wing_steps_move_the_peak_onto_the_keypoint():
    """One 16x16 image with a blob at keypoint (4, 11); Gaussian heatmap target (sigma 2 mm); Adam, 12 steps."""
    torch.manual_seed(0)
    keypoint = (4.0, 11.0)
    rows, cols = np.mgrid[:16, :16]
    blob = np.exp(-((rows - keypoint[0]) ** 2 + (cols - keypoint[1]) ** 2) / 8.0)
    image = blob + 0.1 * np.random.default_rng(0).standard_normal((16, 16))
    x = torch.tensor(image, dtype=torch.float32)[None, None]
    target = torch.from_numpy(gaussian_heatmaps([Keypoint(1, keypoint)], [1], (16, 16), (1.0, 1.0), sigma_mm=2.0))[None]
    model = build(out_channels=1, base_width=2)  # batch norm, in training mode throughout (batch statistics)
    loss_fn = AdaptiveWingLoss()  # sigmoid(logits) -> heatmap

    def peak_distance() -> float:
        with torch.no_grad():
            heatmap = torch.sigmoid(model(x))[0].numpy()
        (best,) = keypoints_from_heatmaps(heatmap, (1.0, 1.0), radius_mm=3.0, threshold=0.0, max_per_class=1)
        return math.dist(best.position, keypoint)

    before = peak_distance()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert before > 2.0  # the untrained peak is elsewhere
    assert losses[-1] < 0.5 * losses[0], losses
    assert peak_distance() <= 2.0
