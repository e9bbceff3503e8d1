import numpy as np
import pytest
from scipy import ndimage, stats

from edgeseg.config import AugmentConfig
from edgeseg.data.augment import (
    Compose,
    RandomAffine,
    RandomFlip,
    RandomGamma,
    RandomNoise,
    RandomRot90,
    SoftLabelDilation,
    build_augmentation,
    dilation_rings,
    mixup,
    mixup_lambda,
    one_hot,
    soft_dilate,
)

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


# ------------------------------------------------------------------ per-class labels, soft dilation, mixup


def test_one_hot_of_class_indices():
    label = np.array([[0, 2], [1, 0]], np.uint8)
    expected = np.array([[[1, 0], [0, 1]], [[0, 0], [1, 0]], [[0, 1], [0, 0]]], np.float32)
    np.testing.assert_array_equal(one_hot(label, 3), expected)
    with pytest.raises(ValueError, match="not a class index"):
        one_hot(label, 2)


@pytest.mark.parametrize("transform", [RandomFlip((0, 1, 2)), RandomRot90(), RandomAffine(prob=1.0, degrees=30)],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_per_class_labels_move_exactly_as_class_indices(transform, spatial_dims):
    """Oracle: the class-index path. With nearest resampling a one-hot map stays the one-hot of the moved label."""
    rng = np.random.default_rng(2)
    shape = (12,) * spatial_dims
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    label = rng.integers(0, 3, shape).astype(np.uint8)
    for seed in range(4):
        params = transform.sample(np.random.default_rng(seed), spatial_dims)
        _, moved = transform.apply(image, label, params)
        _, moved_map = transform.apply(image, one_hot(label, 3), params)
        np.testing.assert_array_equal(moved_map, one_hot(moved, 3))


def test_linear_label_interpolation_stays_soft_and_sums_to_one():
    rng = np.random.default_rng(0)
    label = np.zeros((20, 20), np.uint8)
    label[6:14, 5:12] = 1
    affine = RandomAffine(prob=1.0, degrees=25, scale_range=(0.8, 0.8), soft_label_order=1)
    params = affine.sample(rng, 2)
    _, soft = affine.apply(np.zeros((1, 20, 20), np.float32), one_hot(label, 2), params)
    np.testing.assert_allclose(soft.sum(axis=0), 1.0, atol=1e-6)  # also outside the input (background 1)
    inner = (soft[1] > 0.01) & (soft[1] < 0.99)
    assert inner.sum() > 10  # border voxels keep fractional values: nothing binarised them
    _, same = RandomAffine(soft_label_order=1).apply(np.zeros((1, 20, 20), np.float32), one_hot(label, 2),
                                                     {"matrix": np.eye(2).tolist()})
    np.testing.assert_allclose(same, one_hot(label, 2), atol=1e-6)


def test_soft_dilation_of_one_voxel_by_hand():
    """One voxel (1 voxel: n = round(2 * sqrt(1)) = 2): rings at city-block distance 1 and 2 get 2/3 and 1/3."""
    mask = np.zeros((7, 7), bool)
    mask[3, 3] = True
    a, b = 2 / 3, 1 / 3
    expected = np.array([
        [0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, b, 0, 0, 0],
        [0, 0, b, a, b, 0, 0],
        [0, b, a, 1, a, b, 0],
        [0, 0, b, a, b, 0, 0],
        [0, 0, 0, b, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ])
    np.testing.assert_allclose(dilation_rings(mask, 2.0), expected, atol=1e-7)
    label = one_hot(mask.astype(np.uint8), 2)
    _, soft = SoftLabelDilation(2.0).apply(np.zeros((1, 7, 7), np.float32), label, {})
    np.testing.assert_allclose(soft[1], expected, atol=1e-7)
    np.testing.assert_allclose(soft[0], 1 - expected, atol=1e-7)


def _dilate_gt_reference(mask: np.ndarray, factor: float) -> np.ndarray:
    """Independent oracle: ivadomed's DilateGT algorithm (iterated binary dilations per object, values
    nb_it/(nb_it+1), ..., 1/(nb_it+1) for the successive rings; objects summed and clipped)."""
    objects, count = ndimage.label(mask)
    total = np.zeros(mask.shape)
    for index in range(1, count + 1):
        binary = objects == index
        soft = binary.astype(float)
        n = round(factor * np.sqrt(binary.sum()))
        for value in [x / (n + 1) for x in range(n, 0, -1)]:
            grown = ndimage.binary_dilation(binary)
            soft += value * (grown & ~binary)
            binary = soft > 0
        total += soft
    return np.clip(total, 0, 1)


@pytest.mark.parametrize("shape", [(24, 20), (14, 12, 10)])
def test_soft_dilation_matches_dilate_gt(shape):
    rng = np.random.default_rng(len(shape))
    mask = ndimage.binary_opening(rng.random(shape) > 0.82) | (rng.random(shape) > 0.985)  # blobs and specks
    assert ndimage.label(mask)[1] >= 3
    for factor in (0.5, 1.0, 1.7):
        np.testing.assert_allclose(dilation_rings(mask, factor), _dilate_gt_reference(mask, factor), atol=1e-6)


def test_multiclass_soft_dilation_by_hand():
    """Classes 1 and 2 one voxel each, 3 apart; factor 3: n = 3, rings 3/4, 2/4, 1/4. Expert voxels keep their
    one-hot; where the rings meet above 1 they are rescaled to sum to 1; background takes the rest."""
    label = np.array([[0, 1, 0, 0, 2, 0, 0]], np.uint8)
    soft = soft_dilate(one_hot(label, 3), 3.0)
    expected = np.array([
        [1 / 4, 0, 0, 0, 0, 1 / 4, 1 / 2],      # background
        [3 / 4, 1, 3 / 5, 2 / 5, 0, 0, 0],      # class 1: d = 1, 0, 1, 2, -, 4 (out), 5 (out)
        [0, 0, 2 / 5, 3 / 5, 1, 3 / 4, 2 / 4],  # class 2
    ])[:, None, :]
    np.testing.assert_allclose(soft, expected, atol=1e-6)


def test_mixup_by_hand():
    x1, x2 = np.full((1, 2, 2), 2.0, np.float32), np.zeros((1, 2, 2), np.float32)
    y1, y2 = one_hot(np.ones((2, 2), np.uint8), 2), one_hot(np.zeros((2, 2), np.uint8), 2)
    x, y = mixup((x1, y1), (x2, y2), 0.25)
    np.testing.assert_allclose(x, 0.5)
    np.testing.assert_allclose(y[0], 0.75)
    np.testing.assert_allclose(y[1], 0.25)
    with pytest.raises(ValueError, match="per-class labels"):
        mixup((x1, np.ones((2, 2))), (x2, np.ones((2, 2))), 0.5)


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mixup_lambda_follows_beta_alpha_alpha(alpha):
    rng = np.random.default_rng(0)
    draws = [mixup_lambda(rng, alpha) for _ in range(2000)]
    assert stats.kstest(draws, "beta", args=(alpha, alpha)).pvalue > 1e-3
    with pytest.raises(ValueError):
        mixup_lambda(rng, 0.0)


def test_soft_dilation_runs_first_and_only_on_per_class_labels():
    cfg = AugmentConfig(soft_dilation_factor=1.0, gamma_prob=0.0, noise_prob=0.0)
    assert [t.name for t in build_augmentation(cfg, 3).transforms] == ["flip"]
    assert [t.name for t in build_augmentation(cfg, 3, per_class_labels=True).transforms] == ["soft_dilation", "flip"]
    soft = build_augmentation(AugmentConfig(affine_prob=1.0), 3, per_class_labels=True, soft_labels=True)
    assert next(t for t in soft.transforms if t.name == "affine").soft_label_order == 1
