import numpy as np

from edgeseg.data.patches import PatchSampler, crop_padding, pad_to_shape, round_up_shape


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
