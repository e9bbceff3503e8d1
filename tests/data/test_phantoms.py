"""Synthetic phantoms: determinism by seed, class presence, intensity contrast, and the written dataset."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from edgeseg.data.discovery import detect_layout, discover_cases, load_splits
from edgeseg.data.phantoms import make_phantom, write_phantom_dataset
from edgeseg.errors import UserError


@pytest.mark.parametrize("shape", [(24, 20, 16), (40, 36)])
@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_shapes_types_and_every_class_present(shape, num_classes):
    image, label = make_phantom(shape, num_classes=num_classes, seed=7)
    assert image.shape == (1, *shape) and image.dtype == np.float32
    assert label.shape == shape and label.dtype == np.uint8
    np.testing.assert_array_equal(np.unique(label), np.arange(num_classes))
    assert np.isfinite(image).all()


def test_same_seed_same_phantom_other_seed_differs():
    a = make_phantom((20, 20, 20), seed=1)
    b = make_phantom((20, 20, 20), seed=1)
    c = make_phantom((20, 20, 20), seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_classes_have_increasing_intensity_and_noise_level():
    image, label = make_phantom((32, 32, 32), num_classes=3, seed=3, noise=0.05, bias_field=False)
    # interiors (away from the partial-volume blur) of each class
    means = [image[0][ndimage.binary_erosion(label == k)].mean() for k in range(3)]
    assert means[0] < means[1] < means[2]
    interior = ndimage.binary_erosion(label == 0, iterations=3)
    assert abs(image[0][interior].std() - 0.05) < 0.01  # the added noise, measured where the image is flat


def test_bias_field_is_smooth_and_multiplicative():
    flat, label = make_phantom((24, 24, 24), num_classes=2, seed=5, noise=0.0, bias_field=False)
    biased, label2 = make_phantom((24, 24, 24), num_classes=2, seed=5, noise=0.0, bias_field=True)
    np.testing.assert_array_equal(label, label2)
    ratio = biased[0] / flat[0]
    assert 0.5 < ratio.min() and ratio.max() < 2.0 and ratio.std() > 0.01
    assert np.abs(np.diff(ratio, axis=0)).max() < 0.05  # smooth: small change between neighbours


def test_bad_arguments():
    with pytest.raises(UserError, match="phantom shape"):
        make_phantom((4, 4, 4))
    with pytest.raises(UserError, match="num_classes"):
        make_phantom((16, 16), num_classes=1)


def test_written_3d_dataset(tmp_path):
    root = write_phantom_dataset(tmp_path / "ds", n_cases=5, shape=(16, 16, 12), seed=0, num_classes=3)
    assert detect_layout(root) == "pairs"
    cases = discover_cases(root)
    assert len(cases) == 5 and all(c.label is not None for c in cases)
    img = nib.load(str(cases[0].images[0]))  # oracle: nibabel directly
    np.testing.assert_array_equal(img.affine, np.eye(4))
    assert img.shape == (16, 16, 12) and img.header.get_zooms() == (1.0, 1.0, 1.0)
    lab = np.asanyarray(nib.load(str(cases[0].label)).dataobj)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1, 2}
    splits = json.loads((root / "splits.json").read_text())
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == [c.name for c in cases]
    assert {k: len(v) for k, v in load_splits(root, "splits.json", cases).items()} == {"train": 3, "val": 1, "test": 1}
    again = write_phantom_dataset(tmp_path / "ds2", n_cases=5, shape=(16, 16, 12), seed=0, num_classes=3)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(again / "labels" / cases[0].name)).dataobj), lab)


def test_written_2d_dataset_is_png(tmp_path):
    root = write_phantom_dataset(tmp_path, n_cases=3, shape=(24, 20), seed=1, num_classes=2)
    assert detect_layout(root) == "png"
    cases = discover_cases(root)
    assert [c.name for c in cases] == ["phantom_000.png", "phantom_001.png", "phantom_002.png"]
    label = np.array(Image.open(cases[0].label))
    assert label.shape == (24, 20) and set(np.unique(label)) == {0, 1}
    assert np.array(Image.open(cases[0].images[0])).dtype == np.uint8
