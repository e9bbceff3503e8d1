"""Flip TTA: flip sets, invertibility, TTA inside the tile pass vs whole-volume TTA, sample reduction."""

import numpy as np
import pytest
from scipy import ndimage

from edgeseg.errors import UserError
from edgeseg.runtime.tiling import sliding_window_probabilities, tile_starts
from edgeseg.runtime.tta import flip, flip_sets, reduce_samples, split_samples, tta_predictor, undo_flip


def test_flip_sets():
    assert flip_sets(3) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert flip_sets(2, [1]) == [(), (1,)]
    assert flip_sets(3, [2, 0]) == [(), (2,), (0,), (2, 0)]
    for bad in ([2], [0, 0], [-1]):
        with pytest.raises(UserError, match="TTA axes"):
            flip_sets(2, bad)


def test_undo_flip_inverts_flip_and_flips_only_spatial_axes():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 6))
    for axes in flip_sets(3):
        np.testing.assert_array_equal(undo_flip(flip(x, axes), axes), x)
    np.testing.assert_array_equal(flip(x, (0, 2)), x[:, :, ::-1, :, ::-1])  # oracle: plain slicing


def _conv_softmax(batch):
    """A non-equivariant predictor: an asymmetric 3D kernel per class (constant borders), then softmax."""
    kernels = np.random.default_rng(42).normal(size=(3, 3, 3, 3))
    logits = np.stack([np.stack([ndimage.correlate(b[0], k, mode="constant") for k in kernels]) for b in batch])
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def test_tta_inside_the_tile_pass_equals_whole_volume_tta():
    """Mirror-symmetric tile placement (steps of exactly 8) makes the two the same computation order aside."""
    shape, tile = (40, 48, 32), (16, 16, 16)
    for s, t in zip(shape, tile):  # the premise
        starts = tile_starts(s, t, 0.5)
        assert starts == [s - t - x for x in reversed(starts)]
    image = np.random.default_rng(1).normal(size=(1, *shape)).astype(np.float32)
    flips = flip_sets(3)
    ours = split_samples(sliding_window_probabilities(image, tta_predictor(_conv_softmax, flips), tile,
                                                      batch_size=4), len(flips))
    for sample, f in zip(ours, flips):
        whole = flip(sliding_window_probabilities(np.ascontiguousarray(flip(image[None], f))[0], _conv_softmax, tile,
                                                  batch_size=4)[None], f)[0]
        np.testing.assert_allclose(sample, whole, atol=1e-6)
    assert np.abs(ours[0] - ours[-1]).max() > 1e-2  # the predictor is not flip-equivariant: samples differ


def test_equivariant_predictor_gives_identical_samples():
    image = np.random.default_rng(1).normal(size=(1, 30, 26, 20)).astype(np.float32)
    square = lambda b: np.concatenate([b**2, -b], axis=1)  # pointwise, so flip-equivariant
    flips = flip_sets(3)
    samples = split_samples(sliding_window_probabilities(image, tta_predictor(square, flips), (16, 16, 16)), 8)
    plain = sliding_window_probabilities(image, square, (16, 16, 16))
    for s in samples:
        np.testing.assert_allclose(s, plain, atol=1e-6)


def test_samples_are_aligned_back_and_identity_comes_first():
    image = np.zeros((1, 1, 8, 8), np.float32)
    image[0, 0, 0, 0] = 1.0
    shifted = lambda b: np.concatenate([np.roll(b, 1, axis=2), b], axis=1)  # channel 0 is not equivariant
    out = split_samples(tta_predictor(shifted, flip_sets(2))(image)[0], 4)  # (S, C, H, W)
    for s in out:  # channel 1 (identity) is aligned back in every sample
        np.testing.assert_array_equal(s[1], image[0, 0])
    np.testing.assert_array_equal(out[0, 0], np.roll(image[0, 0], 1, axis=0))  # sample 0: no flip
    np.testing.assert_array_equal(out[1, 0], np.roll(image[0, 0], -1, axis=0))  # flipped axis 0: shift reversed


def test_reduce_samples():
    rng = np.random.default_rng(3)
    samples = rng.dirichlet(np.ones(3), size=(4, 5, 6)).transpose(0, 3, 1, 2).astype(np.float32)  # (S=4, C=3, 5, 6)
    mean, labels = reduce_samples(samples.reshape(12, 5, 6), 4)
    np.testing.assert_allclose(mean, samples.mean(axis=0), atol=1e-7)
    assert labels.dtype == np.uint8 and labels.shape == (4, 5, 6)
    for s in range(4):
        np.testing.assert_array_equal(labels[s], np.argmax(samples[s], axis=0))
    with pytest.raises(ValueError, match="do not split"):
        split_samples(np.zeros((7, 2)), 2)


# ------------------------------------------------------------------------------------- packed, preallocated TTA


def _ramp_predict(batch):
    """Deterministic per tile and not flip-equivariant: each output mixes the input with a ramp along every
    spatial axis of the tile (so a flipped tile gives a different output), three channels."""
    spatial = batch.shape[2:]
    ramp = sum(np.arange(s, dtype=np.float32).reshape([-1 if i == a else 1 for i in range(len(spatial))]) * (a + 1)
               for a, s in enumerate(spatial))
    x = batch[:, 0]
    return np.stack([x + ramp, x * x - 0.1 * ramp, np.sin(x) * ramp], axis=1).astype(np.float32)


def _reference_tta(predict, batch, flips):
    """The plain definition: flip, predict each flip set on its own, flip back, stack samples on channels."""
    return np.concatenate([np.flip(predict(np.ascontiguousarray(np.flip(batch, [a + 2 for a in f]))),
                                   [a + 2 for a in f]) for f in flips], axis=1)


@pytest.mark.parametrize("max_batch", [None, 1, 3, 4, 100])
def test_tta_predictor_equals_the_plain_definition(max_batch):
    batch = np.random.default_rng(5).normal(size=(3, 1, 6, 5, 4)).astype(np.float32)
    flips = flip_sets(3)
    calls = []

    def predict(x):
        calls.append(len(x))
        return _ramp_predict(x)

    expected = _reference_tta(_ramp_predict, batch, flips)  # (3, 8 * 3, 6, 5, 4)
    got = tta_predictor(predict, flips, max_batch)(batch)
    np.testing.assert_array_equal(got, expected)  # same float ops per tile: bit-identical
    chunk = max_batch or len(batch)
    assert calls == [min(chunk, 24 - i) for i in range(0, 24, chunk)]  # 24 flipped tiles, packed into full calls
    mean = tta_predictor(_ramp_predict, flips, max_batch, mean=True)(batch)
    assert mean.shape == (3, 3, 6, 5, 4)
    np.testing.assert_allclose(mean, expected.reshape(3, 8, 3, 6, 5, 4).mean(axis=1, dtype=np.float64),
                               rtol=1e-6, atol=1e-5)  # float32 sums of 8 values up to ~40 vs float64: < 1e-5
    assert np.abs(expected[:, :3] - expected[:, 3:6]).max() > 1  # the samples differ, so alignment is tested


def test_tta_predictor_holds_one_result_not_copies_per_flip():
    """Peak traced allocation while predicting one batch: the result plus a few calls' worth of input, output and
    predictor temporaries (measured 1.14 MB and 0.45 MB). The former implementation (all flipped tiles stacked,
    every call's output kept, then concatenated again) peaked at 1.84 MB, 2.3x the result, over this budget."""
    import tracemalloc

    batch = np.random.default_rng(6).normal(size=(2, 1, 16, 16, 16)).astype(np.float32)
    flips = flip_sets(3)
    result_bytes = 2 * 8 * 3 * 16**3 * 4
    call_bytes = 2 * 4 * 16**3 * 4  # a call of 2 tiles: input (1 channel) + output (3 channels)
    for mean, budget in ((False, result_bytes + 4 * call_bytes), (True, result_bytes // 8 + 4 * call_bytes)):
        run = tta_predictor(_ramp_predict, flips, 2, mean=mean)
        tracemalloc.start()
        out = run(batch)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert out.nbytes == (result_bytes // 8 if mean else result_bytes)
        assert peak < budget, f"mean={mean}: peak {peak} B, budget {budget} B"


def test_tta_predictor_rejects_a_wrong_batch():
    with pytest.raises(ValueError, match="predictor returned"):
        tta_predictor(lambda x: x[:1], flip_sets(2), 2)(np.zeros((2, 1, 4, 4), np.float32))
