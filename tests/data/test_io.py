"""Readers, validation and writers of edgeseg.data.io, checked against nibabel and PIL directly."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from edgeseg.data.io import Volume, read_image, read_label, write_label, write_map
from edgeseg.errors import UserError

LPS = np.array([[-0.8, 0, 0, 10.0], [0, -0.9, 0, -5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray = LPS, qcode: int = 1, scode: int = 2) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=qcode)
    img.header.set_sform(affine, code=scode)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def save_header_only(path: Path, shape: tuple[int, ...], data_bytes: bytes = b"") -> Path:
    """An uncompressed .nii whose header claims `shape` (uint8) followed by `data_bytes`."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape(shape)
    hdr.set_qform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    path.write_bytes(hdr.binaryblock + b"\x00" * 4 + data_bytes)
    return path


def rng_array(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(100.0, 20.0, size=shape).astype(dtype)


# -------------------------------------------------------------------------------------- images


def test_read_image_matches_nibabel(tmp_path):
    path = save_nifti(tmp_path / "a.nii.gz", rng_array((5, 6, 7)))
    vol = read_image([path])
    oracle = nib.load(str(path))
    assert vol.array.shape == (1, 5, 6, 7) and vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array[0], oracle.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(vol.affine, oracle.affine)
    np.testing.assert_allclose(vol.spacing, oracle.header.get_zooms()[:3], rtol=1e-6)
    assert vol.spatial_shape == (5, 6, 7)
    assert vol.header is not None


def test_integer_image_with_scaling_is_read_as_scaled_float(tmp_path):
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, str(tmp_path / "s.nii"))
    vol = read_image(tmp_path / "s.nii")
    np.testing.assert_allclose(vol.array[0], np.arange(24).reshape(2, 3, 4) * 0.5 + 10.0)


def test_channels_are_stacked_in_order(tmp_path):
    a, b = rng_array((4, 5, 6), 1), rng_array((4, 5, 6), 2)
    vol = read_image([save_nifti(tmp_path / "x_0000.nii.gz", a), save_nifti(tmp_path / "x_0001.nii.gz", b)])
    assert vol.array.shape == (2, 4, 5, 6)
    np.testing.assert_array_equal(vol.array[0], a)
    np.testing.assert_array_equal(vol.array[1], b)


def test_channel_shape_mismatch_names_the_file(tmp_path):
    p0 = save_nifti(tmp_path / "x_0000.nii.gz", rng_array((4, 5, 6)))
    p1 = save_nifti(tmp_path / "x_0001.nii.gz", rng_array((4, 5, 7)))
    with pytest.raises(UserError, match="x_0001.nii.gz.*shape"):
        read_image([p0, p1])


def test_channel_affine_mismatch_names_the_file(tmp_path):
    p0 = save_nifti(tmp_path / "x_0000.nii.gz", rng_array((4, 5, 6)))
    shifted = LPS.copy()
    shifted[0, 3] += 0.5
    p1 = save_nifti(tmp_path / "x_0001.nii.gz", rng_array((4, 5, 6)), shifted)
    with pytest.raises(UserError, match="x_0001.nii.gz.*affine"):
        read_image([p0, p1])


def test_trailing_singleton_4d_is_accepted(tmp_path):
    data = rng_array((4, 5, 6, 1))
    vol = read_image(save_nifti(tmp_path / "t.nii.gz", data))
    assert vol.array.shape == (1, 4, 5, 6)
    np.testing.assert_array_equal(vol.array[0], data[..., 0])


def test_real_4d_is_rejected(tmp_path):
    with pytest.raises(UserError, match=r"four.nii.gz: 4D data"):
        read_image(save_nifti(tmp_path / "four.nii.gz", rng_array((4, 5, 6, 3))))


def test_2d_nifti_is_read(tmp_path):
    vol = read_image(save_nifti(tmp_path / "flat.nii.gz", rng_array((6, 7))))
    assert vol.array.shape == (1, 6, 7) and len(vol.spacing) == 2


def test_nan_and_inf_are_counted(tmp_path):
    data = rng_array((4, 5, 6))
    data[0, 0, :2] = np.nan
    data[1, 1, 1] = np.inf
    with pytest.raises(UserError, match=r"bad.nii.gz: 3 voxel\(s\) are NaN or Inf"):
        read_image(save_nifti(tmp_path / "bad.nii.gz", data))


def test_absurd_dims_are_rejected_before_reading(tmp_path):
    with pytest.raises(UserError, match="huge.nii: implausible image size"):
        read_image(save_header_only(tmp_path / "huge.nii", (5000, 10, 10)))
    with pytest.raises(UserError, match="big.nii: implausible image size"):
        read_image(save_header_only(tmp_path / "big.nii", (2000, 2000, 300)))


def test_zero_sized_is_rejected(tmp_path):
    with pytest.raises(UserError, match="empty.nii: zero-sized"):
        read_image(save_header_only(tmp_path / "empty.nii", (0, 4, 4)))


def test_truncated_files_are_rejected(tmp_path):
    with pytest.raises(UserError, match="short.nii: corrupt or truncated"):
        read_image(save_header_only(tmp_path / "short.nii", (10, 10, 10), b"\x01" * 100))
    good = save_nifti(tmp_path / "good.nii.gz", rng_array((20, 20, 20)))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="cut.nii.gz"):
        read_image(cut)


def test_not_an_image(tmp_path):
    fake = tmp_path / "notes.nii.gz"
    fake.write_bytes(gzip.compress(b"this is not a nifti header" * 5))
    with pytest.raises(UserError, match="notes.nii.gz: not a readable NIfTI"):
        read_image(fake)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(UserError, match="notes.png: not a readable image"):
        read_image(text)
    with pytest.raises(UserError, match="missing.nii.gz: file not found"):
        read_image(tmp_path / "missing.nii.gz")


# -------------------------------------------------------------------------------------- rasters


def test_png_grey_and_rgb(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, size=(6, 9), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    vol = read_image(tmp_path / "g.png")
    assert vol.array.shape == (1, 6, 9) and vol.spacing == (1.0, 1.0) and vol.header is None
    np.testing.assert_array_equal(vol.array[0], grey)
    np.testing.assert_array_equal(vol.affine, np.eye(4))
    rgb = np.random.default_rng(1).integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_array_equal(read_image(tmp_path / "c.png").array, np.moveaxis(rgb, -1, 0))


def test_png_16_bit_and_tiff(tmp_path):
    deep = np.random.default_rng(0).integers(0, 60000, size=(5, 7), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    np.testing.assert_array_equal(read_image(tmp_path / "d.png").array[0], deep)
    real = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
    Image.fromarray(real).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif").array[0], real)


def test_truncated_png(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="half.png"):
        read_image(tmp_path / "half.png")


def test_png_labels(tmp_path):
    lab = np.zeros((6, 8), np.uint8)
    lab[2:4, 3:6] = 255
    Image.fromarray(lab).save(tmp_path / "l.png")
    Image.fromarray(lab).save(tmp_path / "i.png")
    image = read_image(tmp_path / "i.png")
    np.testing.assert_array_equal(read_label(tmp_path / "l.png", image).array, lab)
    Image.fromarray(np.stack([lab] * 3, -1)).save(tmp_path / "grey_rgb.png")  # grey saved as RGB is fine
    np.testing.assert_array_equal(read_label(tmp_path / "grey_rgb.png", image).array, lab)
    colour = np.stack([lab, lab // 2, lab], -1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(UserError, match="colour.png: colour"):
        read_label(tmp_path / "colour.png", image)
    indices = (lab > 0).astype(np.uint8) * 2  # palette PNG (VOC style): the indices are the labels
    palette = Image.fromarray(indices).convert("P")
    palette.putdata(indices.ravel().tolist())
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_label(tmp_path / "p.png", image).array, indices)


# --------------------------------------------------------------------------------------- labels


def make_pair(tmp_path: Path, label: np.ndarray, affine: np.ndarray = LPS) -> tuple[Volume, Path]:
    image = read_image(save_nifti(tmp_path / "img.nii.gz", rng_array((4, 5, 6))))
    return image, save_nifti(tmp_path / "lab.nii.gz", label, affine)


def test_label_is_integer_and_matches(tmp_path):
    lab = np.random.default_rng(0).integers(0, 3, size=(4, 5, 6)).astype(np.float32)  # float on disk
    image, path = make_pair(tmp_path, lab)
    out = read_label(path, image)
    assert out.array.dtype == np.uint8 and out.spatial_shape == (4, 5, 6)
    np.testing.assert_array_equal(out.array, lab)


def test_large_label_values_keep_their_values(tmp_path):
    lab = np.full((4, 5, 6), 1000, np.int16)
    image, path = make_pair(tmp_path, lab)
    np.testing.assert_array_equal(read_label(path, image).array, 1000)


def test_label_shape_mismatch(tmp_path):
    image, path = make_pair(tmp_path, np.zeros((4, 5, 7), np.uint8))
    with pytest.raises(UserError, match=r"lab.nii.gz: label shape \(4, 5, 7\) does not match"):
        read_label(path, image)


def test_label_affine_tolerance(tmp_path):
    near = LPS.copy()
    near[1, 3] += 5e-4  # within 1e-3 mm
    image, path = make_pair(tmp_path, np.zeros((4, 5, 6), np.uint8), near)
    read_label(path, image)
    far = LPS.copy()
    far[1, 3] += 0.01
    image, path = make_pair(tmp_path, np.zeros((4, 5, 6), np.uint8), far)
    with pytest.raises(UserError, match="lab.nii.gz: affine differs from its image by up to 0.01 mm"):
        read_label(path, image)


@pytest.mark.parametrize(
    ("value", "message"),
    [(0.5, r"1 label voxel\(s\) are not integers"), (-1.0, r"negative label values \[-1\]"),
     (np.nan, r"1 label voxel\(s\) are NaN or Inf")],
)
def test_bad_label_values(tmp_path, value, message):
    lab = np.zeros((4, 5, 6), np.float32)
    lab[1, 2, 3] = value
    image, path = make_pair(tmp_path, lab)
    with pytest.raises(UserError, match="lab.nii.gz: " + message):
        read_label(path, image)


def test_negative_integer_labels(tmp_path):
    lab = np.zeros((4, 5, 6), np.int16)
    lab[0, 0, 0] = -3
    image, path = make_pair(tmp_path, lab)
    with pytest.raises(UserError, match=r"lab.nii.gz: negative label values \[-3\]"):
        read_label(path, image)


# -------------------------------------------------------------------------------------- writing


def test_write_label_keeps_header_geometry(tmp_path):
    src = save_nifti(tmp_path / "img.nii.gz", rng_array((4, 5, 6)), LPS, qcode=1, scode=2)
    like = read_image(src)
    labels = np.random.default_rng(0).integers(0, 4, size=(4, 5, 6)).astype(np.int64)
    write_label(tmp_path / "out" / "pred.nii.gz", labels, like)
    written, original = nib.load(str(tmp_path / "out" / "pred.nii.gz")), nib.load(str(src))
    for getter in ("get_qform", "get_sform"):
        got_aff, got_code = getattr(written.header, getter)(coded=True)
        want_aff, want_code = getattr(original.header, getter)(coded=True)
        assert int(got_code) == int(want_code)
        np.testing.assert_allclose(got_aff, want_aff, atol=1e-5)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["pred.nii.gz"]  # no temporary left behind


def test_write_label_keeps_uncoded_qform(tmp_path):
    src = save_nifti(tmp_path / "img.nii.gz", rng_array((4, 5, 6)), LPS, qcode=0, scode=2)
    write_label(tmp_path / "p.nii.gz", np.zeros((4, 5, 6), np.uint8), read_image(src))
    written = nib.load(str(tmp_path / "p.nii.gz"))
    assert int(written.header["qform_code"]) == 0 and int(written.header["sform_code"]) == 2


def test_write_label_png_round_trip(tmp_path):
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "i.png")
    like = read_image(tmp_path / "i.png")
    labels = np.random.default_rng(0).integers(0, 3, size=(6, 8))
    write_label(tmp_path / "o.png", labels, like)
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "o.png")), labels)
    with pytest.raises(ValueError):
        write_label(tmp_path / "o.png", labels[:5], like)
    with pytest.raises(UserError, match="unsupported output format"):
        write_label(tmp_path / "o.jpg", labels, like)


def test_write_map_4d_and_3d(tmp_path):
    like = read_image(save_nifti(tmp_path / "img.nii.gz", rng_array((4, 5, 6))))
    probs = np.random.default_rng(0).random((3, 4, 5, 6)).astype(np.float32)
    write_map(tmp_path / "probs.nii.gz", probs, like)
    written = nib.load(str(tmp_path / "probs.nii.gz"))
    assert written.shape == (4, 5, 6, 3) and written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.moveaxis(written.get_fdata(dtype=np.float32), -1, 0), probs)
    np.testing.assert_allclose(written.affine, like.affine, atol=1e-5)
    write_map(tmp_path / "unc.nii.gz", probs[:1], like)
    assert nib.load(str(tmp_path / "unc.nii.gz")).shape == (4, 5, 6)
