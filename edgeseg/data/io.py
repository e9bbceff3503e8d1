"""Reading and writing volumes, with the checks that turn bad files into one-line errors.

NIfTI goes through nibabel (the input's header is kept so outputs carry the same qform/sform);
PNG and TIFF go through PIL (tifffile, when installed, is a fallback for TIFFs PIL cannot read).
Everything a user can fix raises `UserError` naming the file: unreadable, corrupt or truncated
files, non-images, NaN/Inf intensities, empty or absurd sizes, 4D data where 3D is expected,
image/label shape or affine mismatches, and label values that are not non-negative integers.

Conventions:
- an image is (C, *S) float32, one channel per file (RGB rasters give 3 channels);
- a label is (*S) integer, uint8 when it fits;
- S is 2D (rasters, 2D NIfTI) or 3D; a NIfTI axis of size 1 beyond the third is dropped;
- rasters use array axes (row, column[, ...]) with an identity affine and 1 mm spacing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import SpatialImage

from edgeseg.atomic import atomic_path
from edgeseg.errors import UserError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
RASTER_SUFFIXES = (".png", ".tif", ".tiff")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + RASTER_SUFFIXES
MAX_AXIS = 2048  # voxels per axis; anything larger is treated as a broken header
MAX_VOXELS = 1_000_000_000
AFFINE_TOLERANCE_MM = 1e-3  # largest allowed difference between image and label affines


@dataclass
class Volume:
    """An image or label array with its voxel-to-world geometry.

    Shape: array (C, *S) float32 for images, (*S) integer for labels; len(spacing) == len(S).
    affine: (4, 4) voxel index -> world (RAS mm). header: the nibabel header as read (None for
    rasters), used to write outputs that keep the input's qform/sform.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    header: Any = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[self.array.ndim - len(self.spacing):])


def file_suffix(path: str | Path) -> str:
    """Lower-case suffix, treating `.nii.gz` as one suffix."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def strip_suffix(name: str) -> str:
    """`name` without its image suffix (`a/b.nii.gz` -> `a/b`); unchanged when it has none."""
    suffix = file_suffix(name)
    return name[: -len(suffix)] if suffix in IMAGE_SUFFIXES else name


def is_image_file(path: Path) -> bool:
    """A visible file with a supported image suffix (hidden files such as macOS `._x` are skipped)."""
    return path.is_file() and not path.name.startswith(".") and file_suffix(path) in IMAGE_SUFFIXES


# ----------------------------------------------------------------------------------------- reading


def read_image(paths: Sequence[Path] | Path) -> Volume:
    """Read one case's image, one file per channel, stacked in the given order.

    All channels must share shape and affine (within AFFINE_TOLERANCE_MM). Shape: array (C, *S) float32.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise ValueError("read_image needs at least one path")
    first: Volume | None = None
    arrays = []
    for path in paths:
        vol = _read_image_file(path)
        if first is None:
            first = vol
        else:
            if vol.spatial_shape != first.spatial_shape:
                raise UserError(f"{path}: shape {vol.spatial_shape} differs from {paths[0].name} "
                                f"{first.spatial_shape} (channels of one case must share a grid)")
            _check_affines(path, vol.affine, first.affine, f"the first channel {paths[0].name}")
        arrays.append(vol.array)
    assert first is not None
    array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    return Volume(array, first.affine, first.spacing, first.header)


def read_label(path: Path, reference: Volume) -> Volume:
    """Read a label map and check it against its image (`reference`): same grid, class indices >= 0.

    Shape: array (*S) integer with S == reference.spatial_shape.
    """
    path = Path(path)
    if file_suffix(path) in RASTER_SUFFIXES:
        array = _read_raster(path, label=True)
        affine, header = np.eye(4), None
    else:
        img, shape = _open_nifti(path)
        array = _nifti_data(path, img, shape, label=True)
        affine, header = np.asarray(img.affine, dtype=np.float64), img.header
    array = _checked_label_values(path, array)
    if array.shape != reference.spatial_shape:
        raise UserError(f"{path}: label shape {array.shape} does not match the image shape "
                        f"{reference.spatial_shape}")
    _check_affines(path, affine, reference.affine, "its image")
    return Volume(array, affine, _spacing(affine, array.ndim), header)


def _read_image_file(path: Path) -> Volume:
    if file_suffix(path) in RASTER_SUFFIXES:
        array = _read_raster(path, label=False).astype(np.float32, copy=False)
        affine, header = np.eye(4), None
    else:
        img, shape = _open_nifti(path)
        array = _nifti_data(path, img, shape, label=False)[None]
        affine, header = np.asarray(img.affine, dtype=np.float64), img.header
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        if file_suffix(path) in NIFTI_SUFFIXES and _overflows_float32(img):
            raise UserError(f"{path}: {bad} voxel(s) exceed the float32 range once scaled (stored as "
                            f"{img.get_data_dtype()}, scl_slope {img.dataobj.slope:g}, scl_inter {img.dataobj.inter:g}); "
                            "rescale the image")
        raise UserError(f"{path}: {bad} voxel(s) are NaN or Inf; fix or mask them before use")
    return Volume(array, affine, _spacing(affine, array.ndim - 1), header)


def _overflows_float32(img: Any) -> bool:
    """Whether non-finite float32 voxels come from values too large for float32 (not stored NaN/Inf).

    Integer voxels cannot be NaN or Inf, so any non-finite value is an overflow of the scaling; float64
    voxels are read again in float64 (only on this error path) to tell the two apart.
    """
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind in "iub":
        return True
    if dtype.itemsize > 4 and dtype.kind == "f":
        try:
            return bool(np.isfinite(img.get_fdata(dtype=np.float64)).all())
        except Exception:  # noqa: BLE001 - only refines the message of an error already being raised
            return False
    return False


def _open_nifti(path: Path) -> tuple[Any, tuple[int, ...]]:
    """nib.load with the header checks done before any voxel data is read."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad headers; all mean "not readable"
        raise UserError(f"{path}: not a readable NIfTI image ({_reason(exc)})") from exc
    if not isinstance(img, SpatialImage):
        raise UserError(f"{path}: not a spatial image")
    shape = _checked_shape(path, tuple(int(s) for s in img.shape))
    _check_affine(path, np.asarray(img.affine, dtype=np.float64), len(shape))
    return img, shape


def _nifti_data(path: Path, img: Any, shape: tuple[int, ...], label: bool) -> np.ndarray:
    """Voxel data (scaled by scl_slope/inter); float32 for images, the stored values for labels."""
    try:
        data = np.asanyarray(img.dataobj) if label else img.get_fdata(dtype=np.float32)
    except Exception as exc:  # gzip/zlib/mmap errors from a damaged file
        raise UserError(f"{path}: corrupt or truncated image data ({_reason(exc)})") from exc
    return np.asarray(data).reshape(shape)


def _read_raster(path: Path, label: bool) -> np.ndarray:
    """PNG/TIFF pixels. Shape: image (C, *S), label (*S); multi-page TIFFs stack pages first."""
    from PIL import Image

    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            _checked_shape(path, ((frames,) if frames > 1 else ()) + (im.size[1], im.size[0]))
            pages = []
            for i in range(frames):
                im.seek(i)
                pages.append(_pil_pixels(path, im, label))
    except UserError:
        raise
    except Exception as exc:  # PIL: UnidentifiedImageError, truncated data, decompression bomb
        if file_suffix(path) in (".tif", ".tiff"):
            return _read_tiff_fallback(path, label, exc)
        raise UserError(f"{path}: not a readable image ({_reason(exc)})") from exc
    if len(pages) == 1:
        return pages[0]
    return np.stack(pages, axis=-3)  # (C, Z, H, W) or (Z, H, W)


def _pil_pixels(path: Path, im: Any, label: bool) -> np.ndarray:
    """One PIL frame as (C, H, W) for images or (H, W) for labels."""
    mode = im.mode
    if mode in ("L", "I", "F") or mode.startswith("I;16") or (mode == "P" and label):
        pixels = np.array(im)
    elif mode == "1":
        pixels = np.array(im).astype(np.uint8)
    elif mode in ("LA", "PA", "P"):
        pixels = np.array(im.convert("L"))
    else:  # colour
        rgb = np.moveaxis(np.array(im.convert("RGB")), -1, 0)
        if not label:
            return rgb
        if not (np.array_equal(rgb[0], rgb[1]) and np.array_equal(rgb[0], rgb[2])):
            raise UserError(f"{path}: colour ({mode}) label image; save labels as single-channel class indices")
        pixels = rgb[0]
    return pixels if label else pixels[None]


def _read_tiff_fallback(path: Path, label: bool, pil_error: Exception) -> np.ndarray:
    try:
        import tifffile  # optional: reads TIFF flavours PIL does not
    except ImportError:
        raise UserError(f"{path}: not a readable image ({_reason(pil_error)}); "
                        "installing tifffile may help") from pil_error
    try:
        data = np.asarray(tifffile.imread(path))
    except Exception as exc:
        raise UserError(f"{path}: not a readable image ({_reason(exc)})") from exc
    _checked_shape(path, data.shape)
    return data if label else data[None]


# ---------------------------------------------------------------------------------------- checks


def _checked_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The spatial shape after dropping trailing size-1 axes beyond the third; 2D or 3D only."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise UserError(f"{path}: {len(shape)}D data of shape {shape} where a 3D volume was expected "
                        "(store one channel per file, e.g. case_0000.nii.gz, case_0001.nii.gz)")
    if len(shape) < 2:
        raise UserError(f"{path}: {len(shape)}D data of shape {shape}; expected a 2D or 3D image")
    if min(shape) < 1:
        raise UserError(f"{path}: zero-sized image of shape {shape}")
    if max(shape) > MAX_AXIS or float(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
        raise UserError(f"{path}: implausible image size {shape} (limits: {MAX_AXIS} per axis, "
                        f"{MAX_VOXELS:.0e} voxels); is the header damaged?")
    return shape


def _check_affine(path: Path, affine: np.ndarray, ndim: int) -> None:
    block = affine[:3, :ndim]
    if not np.all(np.isfinite(affine)) or np.linalg.matrix_rank(block) < ndim:
        raise UserError(f"{path}: degenerate voxel-to-world affine (zero or non-finite voxel sizes)")


def _check_affines(path: Path, affine: np.ndarray, reference: np.ndarray, what: str) -> None:
    diff = float(np.max(np.abs(np.asarray(affine) - np.asarray(reference))))
    if diff > AFFINE_TOLERANCE_MM:
        raise UserError(f"{path}: affine differs from {what} by up to {diff:.4g} mm "
                        f"(tolerance {AFFINE_TOLERANCE_MM} mm); resample it onto the same grid")


def _checked_label_values(path: Path, array: np.ndarray) -> np.ndarray:
    """Class indices as the smallest fitting integer type; rejects fractions, NaN and negatives."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        finite = np.isfinite(array)
        if not finite.all():
            raise UserError(f"{path}: {int(array.size - finite.sum())} label voxel(s) are NaN or Inf")
        fractional = np.floor(array) != array
        if fractional.any():
            example = float(array[fractional].flat[0])
            raise UserError(f"{path}: {int(fractional.sum())} label voxel(s) are not integers (e.g. {example:g}); "
                            "labels must be class indices")
    if array.size and array.min() < 0:
        values = np.unique(array[array < 0])[:5]
        raise UserError(f"{path}: negative label values {[int(v) for v in values]}; labels must be >= 0")
    top = int(array.max()) if array.size else 0
    if top >= 2**31:  # also keeps uint64 values from wrapping to negative numbers below
        raise UserError(f"{path}: label value {top} is too large to be a class index (stored as {array.dtype})")
    dtype = np.uint8 if top <= 255 else np.int32
    return array.astype(dtype, copy=False)


def _spacing(affine: np.ndarray, ndim: int) -> tuple[float, ...]:
    """Voxel size per array axis: the length of each affine column (mm)."""
    return tuple(float(np.linalg.norm(affine[:3, i])) for i in range(ndim))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------- writing


def write_label(path: Path, labels: np.ndarray, like: Volume) -> None:
    """Write a label map on `like`'s grid, atomically.

    `.nii`/`.nii.gz`: like's affine and header (qform/sform and codes kept), integer dtype, label
    intent. `.png`/`.tif`: 2D only, 8-bit (16-bit when values exceed 255).
    Shape: labels (*S) non-negative integers with S == like.spatial_shape.
    """
    path = Path(path)
    labels = np.asarray(labels)
    if labels.shape != like.spatial_shape:
        raise ValueError(f"labels of shape {labels.shape} do not match the reference grid {like.spatial_shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0")
    top = int(labels.max()) if labels.size else 0
    dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32
    suffix = file_suffix(path)
    if suffix in RASTER_SUFFIXES:
        if labels.ndim != 2 or dtype == np.int32:
            raise UserError(f"{path}: {suffix} output needs 2D labels below 65536; use .nii.gz")
        _write_raster(path, labels.astype(dtype))
    elif suffix in NIFTI_SUFFIXES:
        _write_nifti(path, labels.astype(dtype), like, intent="label")
    else:
        raise UserError(f"{path}: unsupported output format '{suffix}'; use .nii.gz, .nii or .png")


def write_map(path: Path, array: np.ndarray, like: Volume) -> None:
    """Write a float32 map (probabilities, uncertainty) as NIfTI on `like`'s grid, atomically.

    Shape: array (*S) or (C, *S); C > 1 is stored as 4D (*S, C) (2D S as (H, W, 1, C)).
    """
    path = Path(path)
    if file_suffix(path) not in NIFTI_SUFFIXES:
        raise UserError(f"{path}: maps are written as NIfTI; use a .nii.gz or .nii name")
    array = np.asarray(array, dtype=np.float32)
    shape = like.spatial_shape
    if array.shape == shape:
        data = array
    elif array.ndim == len(shape) + 1 and array.shape[1:] == shape:
        data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
        if data.ndim == 3 and len(shape) == 2:
            data = data[:, :, None, :]
    else:
        raise ValueError(f"map of shape {array.shape} does not match the reference grid {shape}")
    _write_nifti(path, data, like, intent="none")


def _write_nifti(path: Path, data: np.ndarray, like: Volume, intent: str) -> None:
    header = like.header.copy() if isinstance(like.header, nib.Nifti1Header) else nib.Nifti1Header()
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    header.set_data_dtype(data.dtype)
    header.set_slope_inter(None, None)  # the array writer picks scaling (none for these dtypes)
    header["cal_min"], header["cal_max"] = 0, 0  # the input's display range means nothing here
    header.set_intent(intent)
    # nibabel keeps the header's qform/sform (and their codes) when the affine matches them.
    image = image_class(data, like.affine, header=header)
    with atomic_path(path, suffix=file_suffix(path)) as tmp:
        nib.save(image, str(tmp))


def _write_raster(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path, suffix=file_suffix(path)) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp)
