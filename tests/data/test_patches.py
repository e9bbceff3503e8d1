import itertools

import numpy as np
import pytest

from edgeseg.data.patches import (
    PatchSampler,
    crop_padding,
    pad_to_shape,
    round_up_shape,
    window_foreground_counts,
)


def test_pad_and_crop_round_trip():
    a = np.random.default_rng(0).normal(size=(2, 5, 7, 3))
    padded, widths = pad_to_shape(a, (8, 7, 6))
    assert padded.shape == (2, 8, 7, 6)
    assert widths == [(1, 2), (0, 0), (1, 2)]
    np.testing.assert_array_equal(crop_padding(padded, widths), a)


def test_round_up_shape():
    assert round_up_shape((31, 40, 47), 8) == (32, 40, 48)
    assert round_up_shape((10, 10), 8, minimum=(32, 8)) == (32, 16)


def test_foreground_patches_contain_foreground_and_fit():
    label = np.zeros((40, 40, 40), np.uint8)
    label[30:33, 2:5, 20:22] = 2
    image = np.random.default_rng(0).normal(size=(1, 40, 40, 40)).astype(np.float32)
    sampler = PatchSampler(image, label, (16, 16, 16))
    rng = np.random.default_rng(0)
    for _ in range(20):
        img, lbl = sampler.sample(rng, foreground=True)
        assert img.shape == (1, 16, 16, 16) and lbl.shape == (16, 16, 16)
        assert (lbl > 0).any()
    hits = sum((sampler.sample(rng, foreground=False)[1] > 0).any() for _ in range(100))
    assert hits < 60  # uniform patches see the small structure much less often


def test_small_volume_is_padded_to_patch():
    image = np.ones((1, 5, 6), np.float32)
    label = np.ones((5, 6), np.uint8)
    img, lbl = PatchSampler(image, label, (8, 8)).sample(np.random.default_rng(0), foreground=True)
    assert img.shape == (1, 8, 8) and img.sum() == 30 and lbl.sum() == 30


def _brute_force_counts(mask: np.ndarray, window) -> np.ndarray:
    grid = [s - w + 1 for s, w in zip(mask.shape, window)]
    out = np.zeros(grid, np.int64)
    for start in itertools.product(*map(range, grid)):
        out[start] = mask[tuple(slice(s, s + w) for s, w in zip(start, window))].sum()
    return out


@pytest.mark.parametrize(("shape", "window"), [((9, 7, 8), (3, 4, 2)), ((11, 6), (5, 6)), ((5, 5, 5), (5, 5, 5))])
def test_window_foreground_counts_match_brute_force(shape, window):
    mask = np.random.default_rng(0).random(shape) > 0.9
    np.testing.assert_array_equal(window_foreground_counts(mask, window), _brute_force_counts(mask, window))


def test_windows_split_into_positive_and_negative_and_are_drawn_uniformly():
    label = np.zeros((10, 9), np.uint8)
    label[1, 1] = 1
    label[7, 6] = 2
    image = np.arange(90, dtype=np.float32).reshape(1, 10, 9)
    sampler = PatchSampler(image, label, (4, 4))
    counts = _brute_force_counts(label > 0, (4, 4))  # (7, 6) window starts
    negative_starts = {tuple(int(v) for v in s) for s in np.argwhere(counts == 0)}
    assert len(sampler.windows(False)) == len(negative_starts) and len(sampler.windows(True)) == 42 - len(negative_starts)
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(400):
        img, lbl = sampler.sample_window(rng, positive=False)
        assert not lbl.any() and img.shape == (1, 4, 4)
        seen.append((int(img[0, 0, 0]) // 9, int(img[0, 0, 0]) % 9))  # the image value encodes the start
    assert set(seen) == negative_starts  # every negative window is reachable, nothing else
    frequencies = np.bincount([sorted(negative_starts).index(s) for s in seen])
    assert frequencies.min() > 400 / len(negative_starts) / 3  # roughly uniform
    for _ in range(50):
        assert sampler.sample_window(rng, positive=True)[1].any()
    full = PatchSampler(image, np.ones((10, 9), np.uint8), (4, 4))
    with pytest.raises(ValueError, match="no negative patch windows"):
        full.sample_window(rng, positive=False)
