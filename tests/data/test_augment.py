import numpy as np
import pytest

from edgeseg.config import AugmentConfig
from edgeseg.data.augment import Compose, RandomAffine, RandomFlip, RandomGamma, RandomNoise, RandomRot90, build_augmentation

TRANSFORMS = [RandomFlip((0, 1, 2)), RandomRot90(), RandomAffine(prob=1.0), RandomGamma(prob=1.0), RandomNoise(prob=1.0)]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: t.name)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_replaying_recorded_params_is_deterministic(transform, spatial_dims):
    rng = np.random.default_rng(1)
    shape = (12,) * spatial_dims
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    label = (rng.random(shape) > 0.5).astype(np.uint8)
    params = transform.sample(np.random.default_rng(7), spatial_dims)
    a_img, a_lbl = transform.apply(image.copy(), label.copy(), params)
    b_img, b_lbl = transform.apply(image.copy(), label.copy(), params)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lbl, b_lbl)
    assert a_img.shape == image.shape and a_lbl.shape == label.shape
    assert a_img.dtype == np.float32


def test_flip_is_its_own_inverse_and_moves_labels_with_images():
    image = np.arange(2 * 4 * 5 * 6, dtype=np.float32).reshape(2, 4, 5, 6)
    label = (image[0] > 60).astype(np.uint8)
    flip = RandomFlip((0, 1, 2))
    params = {"axes": [0, 2]}
    img, lbl = flip.apply(image, label, params)
    np.testing.assert_array_equal(img[0, ::-1, :, ::-1], image[0])
    np.testing.assert_array_equal(lbl, (img[0] > 60).astype(np.uint8))
    back, back_lbl = flip.apply(img, lbl, params)
    np.testing.assert_array_equal(back, image)
    np.testing.assert_array_equal(back_lbl, label)


def test_affine_identity_matrix_changes_nothing():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 9, 9, 9)).astype(np.float32)
    label = (rng.random((9, 9, 9)) > 0.5).astype(np.uint8)
    img, lbl = RandomAffine().apply(image, label, {"matrix": np.eye(3).tolist()})
    np.testing.assert_allclose(img, image, atol=1e-6)
    np.testing.assert_array_equal(lbl, label)


def test_affine_keeps_labels_integer_valued():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (16, 16)).astype(np.uint8)
    _, out = RandomAffine(prob=1.0, degrees=30).apply(np.zeros((1, 16, 16), np.float32), label,
                                                      RandomAffine(prob=1.0, degrees=30).sample(rng, 2))
    assert set(np.unique(out)) <= {0, 1, 2}


def test_compose_records_history_and_is_seeded():
    aug = build_augmentation(AugmentConfig(gamma_prob=1.0, noise_prob=1.0, affine_prob=1.0), spatial_dims=3)
    assert isinstance(aug, Compose)
    image = np.random.default_rng(0).normal(size=(1, 10, 10, 10)).astype(np.float32)
    label = np.zeros((10, 10, 10), np.uint8)
    a, _ = aug(image, label, np.random.default_rng(3))
    history = list(aug.history)
    b, _ = aug(image, label, np.random.default_rng(3))
    assert [h[0] for h in history] == ["flip", "affine", "gamma", "noise"]
    assert history == aug.history
    np.testing.assert_array_equal(a, b)


def test_gamma_keeps_intensity_range():
    image = np.linspace(-2, 3, 64, dtype=np.float32).reshape(1, 8, 8)
    out, _ = RandomGamma().apply(image, None, {"gamma": 2.0})
    assert out.min() == pytest.approx(-2) and out.max() == pytest.approx(3)
