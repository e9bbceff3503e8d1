"""Tiler: coverage, exact reconstruction, MONAI parity, bounded memory, slice-wise 2D tiling.

Oracles: MONAI (`compute_importance_map`, `sliding_window_inference`), nnU-Net's documented step
example, closed-form Gaussians, and a naive full-volume accumulator written here.
"""

import math
import tracemalloc
from itertools import pairwise, product

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeseg.errors import UserError
from edgeseg.runtime.tiling import (
    gaussian_importance,
    iter_slabs,
    iter_slices,
    predict_slices,
    sliding_window_probabilities,
    tile_starts,
)

# ------------------------------------------------------------------------------------- tile placement


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 400), tile=st.integers(1, 128), overlap=st.floats(0, 0.95))
def test_tile_starts_cover_edge_to_edge_with_even_steps(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0
    if size <= tile:
        assert starts == [0]
        return
    assert starts[-1] == size - tile
    steps = np.diff(starts)
    assert steps.min() >= 1 and steps.max() - steps.min() <= 1  # even within one voxel, no repeats
    assert steps.max() <= tile  # no gaps: consecutive tiles touch or overlap
    # the overlap asked for is honoured: steps never exceed the target step (rounded up)
    assert steps.max() <= math.ceil(max(tile * (1 - overlap), 1))


def test_tile_starts_match_nnunet_documented_example():
    # nnU-Net's compute_steps_for_sliding_window comment: size 110, patch 64, step 0.5 -> 0, 23, 46
    assert tile_starts(110, 64, 0.5) == [0, 23, 46]
    assert tile_starts(80, 32, 0.5) == [0, 16, 32, 48]
    assert tile_starts(64, 64, 0.5) == [0]
    assert tile_starts(65, 64, 0.0) == [0, 1]


@pytest.mark.parametrize("overlap", [-0.1, 1.0, 1.5])
def test_bad_overlap_is_a_user_error(overlap):
    with pytest.raises(UserError, match="overlap must be within"):
        tile_starts(10, 4, overlap)


def test_bad_arguments_are_user_errors():
    image = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(UserError, match="spatial axes"):
        sliding_window_probabilities(image, lambda b: b, (4, 4, 4))
    with pytest.raises(UserError, match="batch size"):
        sliding_window_probabilities(image, lambda b: b, (4, 4), batch_size=0)
    with pytest.raises(UserError, match="did you mean 'constant'"):
        sliding_window_probabilities(image, lambda b: b, (4, 4), blend="constnt")


# ------------------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("shape", [(37, 50, 29), (10, 12, 9), (16, 60, 5)])
@pytest.mark.parametrize("blend", ["gaussian", "constant", "gaussian-nnunet"])
def test_identity_predictor_reconstructs_the_input(shape, overlap, blend):
    image = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    out = sliding_window_probabilities(image, lambda b: b, (16, 24, 16), overlap=overlap, batch_size=3, blend=blend)
    assert out.shape == image.shape and out.dtype == np.float32
    # float32 accumulation (as MONAI's): at overlap 0.8 up to 5^3 tiles add into one voxel, so the
    # rounding error grows to a few 1e-6 relative; 1e-6 holds up to overlap 0.5.
    tol = 1e-6 if overlap <= 0.5 else 1e-5
    np.testing.assert_allclose(out, image, atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(70, 45), (20, 9), (32, 32)])
def test_2d_reconstruction(shape):
    image = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
    np.testing.assert_allclose(sliding_window_probabilities(image, lambda b: b, (32, 32)), image, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------- importance maps


def test_gaussian_matches_monai_importance_map():
    monai_utils = pytest.importorskip("monai.data.utils")
    for shape in [(16, 24, 16), (32, 32), (7, 9, 11), (1, 5)]:
        ref = monai_utils.compute_importance_map(shape, mode="gaussian", sigma_scale=0.125).numpy()
        ours = gaussian_importance(shape)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_nnunet_gaussian_closed_form():
    # gaussian_filter's kernel is normalised per axis, so max-normalising the filtered delta gives
    # exactly prod_a exp(-(i_a - s_a // 2)^2 / (2 sigma_a^2)) wherever the kernel reaches.
    shape = (16, 12, 8)
    idx = np.indices(shape, dtype=np.float64)
    expected = np.ones(shape)
    for a, s in enumerate(shape):
        expected *= np.exp(-((idx[a] - s // 2) ** 2) / (2 * (s / 8) ** 2))
    np.testing.assert_allclose(gaussian_importance(shape, mode="nnunet"), expected, rtol=1e-5, atol=1e-7)


def test_nnunet_gaussian_replaces_zeros_by_the_smallest_positive_value():
    # sigma 2 on 40 voxels: the kernel (radius 4 sigma = 8) leaves most of the tile at 0
    g = gaussian_importance((40,), sigma_scale=0.05, mode="nnunet")
    inside = np.exp(-((np.arange(12, 29) - 20) ** 2) / 8.0)
    np.testing.assert_allclose(g[12:29], inside, rtol=1e-5)
    assert (g[:12] == g[12]).all() and (g[29:] == g[12]).all() and g.min() > 0


# ------------------------------------------------------------------------------------- MONAI parity


@pytest.fixture(scope="module")
def torch_net():
    torch = pytest.importorskip("torch")
    pytest.importorskip("monai.inferers")
    torch.manual_seed(0)
    net3 = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, 3, 3, padding=1)).eval()
    net2 = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 3, 3, padding=1)).eval()

    def torch_predict(x):
        with torch.no_grad():
            return torch.softmax((net3 if x.ndim == 5 else net2)(x), 1)

    return torch, torch_predict


def _both(torch_net, volume, tile, overlap, mode, batch=4):
    torch, torch_predict = torch_net
    from monai.inferers import sliding_window_inference

    ours = sliding_window_probabilities(volume, lambda b: torch_predict(torch.from_numpy(b)).numpy(), tile,
                                        overlap=overlap, batch_size=batch, blend=mode)
    ref = sliding_window_inference(torch.from_numpy(volume)[None], tile, batch, torch_predict, overlap=overlap,
                                   mode=mode, sigma_scale=0.125)[0].numpy()
    return ours, ref


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("shape, tile", [
    ((80, 80, 80), (32, 32, 32)),  # both place tiles at 0, 16, 32, 48 on every axis
    ((20, 48, 24), (32, 32, 32)),  # padded up to the tile on axes 0 and 2 (odd voxel after), 0/16 on axis 1
    ((64, 96), (32, 32)),  # 2D
])
def test_parity_with_monai_sliding_window_inference(torch_net, shape, tile, mode):
    for s, t in zip(shape, tile):  # the premise: MONAI's placement (steps of t // 2, last one clamped) is ours
        monai = [min(i * (t // 2), max(s - t, 0)) for i in range(max(math.ceil((s - t) / (t // 2)), 0) + 1)]
        assert tile_starts(s, t, 0.5) == monai
    volume = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
    ours, ref = _both(torch_net, volume, tile, 0.5, mode)
    assert ours.shape == ref.shape == (3, *shape)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_difference_from_monai_where_tilings_differ(torch_net, capsys):
    """70 x 45 x 53 with 32^3 tiles: MONAI steps 16 and clamps the last tile; we step evenly. Reported only."""
    volume = np.random.default_rng(2).normal(size=(1, 70, 45, 53)).astype(np.float32)
    ours, ref = _both(torch_net, volume, (32, 32, 32), 0.5, "gaussian")
    diff = float(np.abs(ours - ref).max())
    with capsys.disabled():
        print(f"\n[tiling] max |ours - MONAI| where tile placements differ (70x45x53, 32^3, overlap 0.5): {diff:.2e}; "
              f"argmax agreement {float((ours.argmax(0) == ref.argmax(0)).mean()):.5f}")
    assert np.isfinite(diff)


# ------------------------------------------------------------------------------------- bounded memory


def _nonlocal_predict(batch):
    """A predictor whose output depends on the whole tile (its mean), so overlapping tiles disagree."""
    spatial = tuple(range(2, batch.ndim))
    mean = batch.mean(axis=spatial, keepdims=True)
    logits = np.concatenate([batch, batch * mean, np.broadcast_to(mean, batch.shape)], axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _naive(image, predict, tile, overlap, weights):
    """Full-volume accumulation over every tile position: the textbook sliding window."""
    starts = [tile_starts(s, t, overlap) for s, t in zip(image.shape[1:], tile)]
    acc, wsum = None, np.zeros(image.shape[1:], np.float64)
    for pos in product(*starts):
        region = tuple(slice(p, p + t) for p, t in zip(pos, tile))
        out = predict(image[(slice(None), *region)][None])[0]
        acc = np.zeros((out.shape[0], *image.shape[1:])) if acc is None else acc
        acc[(slice(None), *region)] += out * weights
        wsum[region] += weights
    return acc / wsum


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_slab_accumulation_equals_naive_full_volume_accumulation(overlap):
    image = np.random.default_rng(3).normal(size=(1, 61, 23, 19)).astype(np.float32)
    tile = (12, 16, 16)
    weights = gaussian_importance(tile)
    slabs = list(iter_slabs(image, _nonlocal_predict, tile, overlap=overlap, batch_size=2))
    assert len(slabs) > 4 and slabs[0][0] == 0 and slabs[-1][1] == 61
    assert all(a[1] == b[0] for a, b in pairwise(slabs))  # a partition of axis 0, in order
    ours = np.concatenate([s[2] for s in slabs], axis=1)
    np.testing.assert_allclose(ours, _naive(image, _nonlocal_predict, tile, overlap, weights), atol=1e-6)


def test_accumulator_memory_stays_one_slab_deep():
    """Consuming slabs one at a time, the tiler's peak allocation is about one tile-deep accumulator.

    12 output channels over 192 x 24 x 24: a full-volume float32 accumulator would be 5.3 MB; one
    slab of 16 rows is 0.44 MB (+ its weight sum, one batch of tiles and outputs).
    """
    image = np.random.default_rng(4).normal(size=(1, 192, 24, 24)).astype(np.float32)
    predict = lambda b: np.repeat(b, 12, axis=1)
    tile = (16, 24, 24)
    full = 12 * image[0].size * 4
    slab = 12 * 16 * 24 * 24 * 4
    out = np.zeros((12, *image.shape[1:]), np.float32)  # allocated before tracing: not counted
    rows = 0
    tracemalloc.start()
    try:
        for z0, z1, block in iter_slabs(image, predict, tile, overlap=0.5):
            out[:, z0:z1] = block
            rows += z1 - z0
            del block
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"peak {peak / 1e6:.2f} MB; slab {slab / 1e6:.2f} MB; full {full / 1e6:.2f} MB")
    np.testing.assert_allclose(out, np.repeat(image, 12, axis=0), atol=1e-6)
    assert rows == 192
    assert peak < 5 * slab < full, f"peak {peak / 1e6:.2f} MB; slab {slab / 1e6:.2f} MB; full {full / 1e6:.2f} MB"


def test_progress_callback_counts_every_batch():
    calls, seen = [], []
    predict = lambda b: seen.append(len(b)) or b
    sliding_window_probabilities(np.zeros((1, 40, 40), np.float32), predict, (16, 16), batch_size=2,
                                 on_batch=lambda done, total: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1] == len(calls) == len(seen)
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1))
    assert max(seen) == 2  # tile_starts(40, 16, .5) has 4 starts: 4 rows x 2 batches of 2


# ------------------------------------------------------------------------------------- 2D model on 3D volumes


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slicewise_tiling_equals_a_2d_tiler_per_plane(axis):
    image = np.random.default_rng(5).normal(size=(1, 9, 30, 21)).astype(np.float32)
    calls = []
    predict = lambda b: calls.append(len(b)) or _nonlocal_predict(b)
    ours = predict_slices(image, predict, (16, 16), axis=axis, overlap=0.5, batch_size=5, blend="gaussian")
    ref = np.stack([sliding_window_probabilities(np.take(image, i, axis=axis + 1), _nonlocal_predict, (16, 16))
                    for i in range(image.shape[axis + 1])], axis=axis + 1)
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    plane = [s for i, s in enumerate(image.shape[1:]) if i != axis]
    tiles = math.prod(len(tile_starts(s, 16, 0.5)) for s in plane) * image.shape[axis + 1]
    assert calls[:-1] == [5] * (len(calls) - 1) and sum(calls) == tiles  # batches cross plane boundaries


def test_slices_arrive_in_order_with_few_planes_open():
    image = np.random.default_rng(6).normal(size=(1, 12, 16, 16)).astype(np.float32)
    order = [i for i, _ in iter_slices(image, lambda b: b, (16, 16), batch_size=3)]
    assert order == list(range(12))
    with pytest.raises(UserError, match="2D tile"):
        list(iter_slices(image, lambda b: b, (16, 16, 16)))
