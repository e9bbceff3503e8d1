"""Tiler: coverage, exact reconstruction, MONAI parity, bounded memory."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeseg.errors import UserError
from edgeseg.runtime import tiling
from edgeseg.runtime.tiling import gaussian_importance, iter_slabs, sliding_window_probabilities, tile_starts


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 400), tile=st.integers(1, 128), overlap=st.floats(0, 0.95))
def test_tile_starts_cover_edge_to_edge_with_even_steps(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0
    if size <= tile:
        assert starts == [0]
        return
    assert starts[-1] == size - tile
    steps = np.diff(starts)
    assert steps.min() >= 1 and steps.max() - steps.min() <= 1
    assert steps.max() <= max(tile * (1 - overlap), 1) + 1  # no gap larger than the target step (+ rounding)


def test_bad_overlap_is_a_user_error():
    with pytest.raises(UserError, match="overlap must be within"):
        tile_starts(10, 4, -0.1)
    with pytest.raises(UserError, match="overlap must be within"):
        tile_starts(10, 4, 1.0)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("shape", [(37, 50, 29), (10, 12, 9), (16, 60, 5)])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_identity_predictor_reconstructs_the_input(shape, overlap, blend):
    image = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    out = sliding_window_probabilities(image, lambda b: b, (16, 24, 16), overlap=overlap, batch_size=3, blend=blend)
    assert out.shape == image.shape
    np.testing.assert_allclose(out, image, atol=1e-5)


def test_2d_reconstruction():
    image = np.random.default_rng(1).normal(size=(1, 70, 45)).astype(np.float32)
    np.testing.assert_allclose(sliding_window_probabilities(image, lambda b: b, (32, 32)), image, atol=1e-5)


def test_gaussian_matches_monai_importance_map():
    monai_utils = pytest.importorskip("monai.data.utils")
    for shape in [(16, 24, 16), (32, 32), (7, 9, 11)]:
        ref = monai_utils.compute_importance_map(shape, mode="gaussian", sigma_scale=0.125).numpy()
        np.testing.assert_allclose(gaussian_importance(shape), ref, atol=1e-6)


def test_nnunet_gaussian_is_max_normalised_and_positive():
    g = gaussian_importance((16, 16, 16), mode="nnunet")
    assert g.max() == pytest.approx(1.0) and g.min() > 0


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_parity_with_monai_sliding_window_inference(mode):
    """80^3 volume, 32^3 tiles, overlap 0.5: both tilings place tiles at 0, 16, 32, 48 on every axis."""
    torch = pytest.importorskip("torch")
    inferers = pytest.importorskip("monai.inferers")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(4, 3, 3, padding=1)).eval()

    def torch_predict(x):
        with torch.no_grad():
            return torch.softmax(net(x), 1)

    volume = np.random.default_rng(1).normal(size=(1, 80, 80, 80)).astype(np.float32)
    ours = sliding_window_probabilities(volume, lambda b: torch_predict(torch.from_numpy(b)).numpy(), (32, 32, 32),
                                        overlap=0.5, batch_size=4, blend=mode)
    ref = inferers.sliding_window_inference(torch.from_numpy(volume)[None], (32, 32, 32), 4, torch_predict,
                                            overlap=0.5, mode=mode, sigma_scale=0.125)[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_slabs_partition_the_volume_and_accumulator_stays_one_tile_deep(monkeypatch):
    image = np.random.default_rng(2).normal(size=(1, 100, 20, 20)).astype(np.float32)
    allocated = []
    real_zeros = np.zeros

    def spy(shape, *args, **kwargs):
        allocated.append(tuple(shape) if isinstance(shape, (tuple, list)) else (shape,))
        return real_zeros(shape, *args, **kwargs)

    monkeypatch.setattr(tiling.np, "zeros", spy)
    slabs = list(iter_slabs(image, lambda b: b, (16, 20, 20), overlap=0.5))
    monkeypatch.undo()
    assert [s[0] for s in slabs][0] == 0 and slabs[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(slabs, slabs[1:]))
    assert len(slabs) > 5
    assert max(int(np.prod(a)) for a in allocated) <= 16 * 20 * 20  # never a full-volume accumulator
    np.testing.assert_allclose(np.concatenate([s[2] for s in slabs], axis=1), image, atol=1e-5)


def test_progress_callback_counts_every_batch():
    calls = []
    sliding_window_probabilities(np.zeros((1, 40, 40), np.float32), lambda b: b, (16, 16), batch_size=2,
                                 on_batch=lambda done, total: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1] == len(calls)
