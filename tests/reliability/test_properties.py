"""Property-based tests (hypothesis) of the three parsers that meet untrusted input.

- NIfTI reading (`edgeseg.data.io`): random small shapes, dtypes and affines round-trip exactly;
  random bytes and randomly damaged headers raise nothing but `UserError`.
- The bundle manifest (`edgeseg.runtime.bundle`): random mutations of a valid manifest are either
  accepted or refused with `UserError`, never another exception; random bytes likewise.
- The tiler (`edgeseg.runtime.tiling`): tile starts cover every axis edge to edge without gaps, and an
  identity model is reconstructed exactly by the blended sliding window (any shape, tile, overlap, blend).

Oracles are independent of the code under test: nibabel's own reading, numpy's array equality, the
definition of coverage, and the identity (a weighted mean of equal values is that value).
Examples are few (`max_examples` <= 40) and unsaved (`database=None`) so CI stays fast and clean.
"""

from __future__ import annotations

import copy
import gzip
import json

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeseg.data.io import read_image, read_label, write_label, write_map
from edgeseg.errors import UserError
from edgeseg.runtime.bundle import Manifest, _manifest_from, _Reader, load_bundle
from edgeseg.runtime.tiling import BLEND_MODES, sliding_window_probabilities, tile_starts

FAST = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ------------------------------------------------------------------------------------- NIfTI

DTYPES = [np.uint8, np.int16, np.int32, np.float32, np.float64]


@st.composite
def affines(draw, ndim: int) -> np.ndarray:
    """A non-degenerate voxel-to-world affine: axis permutation, flips, spacings, a small shear, an origin."""
    perm = draw(st.permutations(range(3)))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    spacing = draw(st.lists(st.floats(0.2, 4.0), min_size=3, max_size=3))
    matrix = np.zeros((3, 3))
    for column, row in enumerate(perm):
        matrix[row, column] = signs[column] * spacing[column]
    shear = draw(st.floats(-0.2, 0.2))
    matrix[perm[0], 1] += shear * spacing[1]
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = draw(st.lists(st.floats(-200, 200), min_size=3, max_size=3))
    return affine


@st.composite
def volumes(draw) -> tuple[np.ndarray, np.ndarray]:
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype.kind == "f":
        data = rng.normal(scale=draw(st.sampled_from([1e-3, 1.0, 1e4])), size=shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        data = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    return data, draw(affines(ndim))


@FAST
@given(volume=volumes(), compressed=st.booleans())
def test_nifti_images_round_trip(tmp_path_factory, volume, compressed):
    """What nibabel wrote, read_image gives back: voxels (as float32), affine, spacing; (C, *S) layout."""
    data, affine = volume
    path = tmp_path_factory.mktemp("nii") / ("x.nii.gz" if compressed else "x.nii")
    nib.Nifti1Image(data, affine, dtype=data.dtype).to_filename(str(path))
    vol = read_image(path)
    assert vol.array.shape == (1, *data.shape) and vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array[0], data.astype(np.float32))
    np.testing.assert_allclose(vol.affine, nib.load(str(path)).affine, rtol=0, atol=0)
    expected = [float(np.linalg.norm(affine[:3, i])) for i in range(data.ndim)]
    np.testing.assert_allclose(vol.spacing, expected, rtol=1e-6)


@FAST
@given(volume=volumes(), top=st.sampled_from([1, 7, 255, 300, 70000]), suffix=st.sampled_from([".nii.gz", ".nii"]))
def test_labels_and_maps_round_trip_through_the_writers(tmp_path_factory, volume, top, suffix):
    """write_label / write_map on an image's grid, read back: same values, same affine as the image."""
    data, affine = volume
    folder = tmp_path_factory.mktemp("labels")
    image_path = folder / f"image{suffix}"
    nib.Nifti1Image(data, affine, dtype=data.dtype).to_filename(str(image_path))
    like = read_image(image_path)
    labels = np.random.default_rng(top).integers(0, top, size=data.shape, endpoint=True)
    write_label(folder / f"mask{suffix}", labels, like)
    back = read_label(folder / f"mask{suffix}", like)
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_array_equal(back.affine, like.affine)
    probabilities = np.random.default_rng(1).random((2, *data.shape)).astype(np.float32)
    write_map(folder / "p.nii.gz", probabilities, like)
    stored = np.asarray(nib.load(str(folder / "p.nii.gz")).dataobj)
    np.testing.assert_array_equal(np.moveaxis(stored.reshape(*data.shape, 2), -1, 0), probabilities)
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"image{suffix}", f"mask{suffix}", "p.nii.gz"])


@FAST
@given(data=st.binary(max_size=600), suffix=st.sampled_from([".nii.gz", ".nii", ".png", ".tif"]),
       gzipped=st.booleans())
def test_random_bytes_raise_only_user_errors(tmp_path_factory, data, suffix, gzipped):
    path = tmp_path_factory.mktemp("garbage") / f"x{suffix}"
    path.write_bytes(gzip.compress(data) if gzipped else data)
    with pytest.raises(UserError):
        read_image(path)


@pytest.fixture(scope="module")
def nifti_bytes() -> bytes:
    """A valid uncompressed 6x5x4 float32 NIfTI-1 file (348-byte header, 4 bytes extension flag, data)."""
    data = np.arange(120, dtype=np.float32).reshape(6, 5, 4)
    return nib.Nifti1Image(data, np.diag([1.0, 2.0, 3.0, 1.0])).to_bytes()


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, 351), st.integers(0, 255)), min_size=1, max_size=8),
       as_label=st.booleans(), truncate=st.one_of(st.none(), st.integers(0, 831)))
def test_damaged_headers_raise_only_user_errors(tmp_path_factory, nifti_bytes, edits, as_label, truncate):
    """Random bytes written over the header (dims, datatype, scaling, qform/sform ...) and cut files:
    either a clean read or a UserError, never another exception."""
    raw = bytearray(nifti_bytes)
    for offset, value in edits:
        raw[offset] = value
    if truncate is not None:
        raw = raw[:truncate]
    path = tmp_path_factory.mktemp("damaged") / "x.nii"
    path.write_bytes(bytes(raw))
    try:
        vol = read_image(path)
        if as_label:
            read_label(path, vol)
    except UserError:
        pass


# ------------------------------------------------------------------------------------- manifest

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def manifest_dict(kit) -> dict:
    return json.loads((kit.bundle / "manifest.json").read_text())


def _paths(node, prefix=()):
    """Every (path) into a JSON tree, the root included."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


def _mutate(tree, path, action, value):
    """Replace, delete or wrap the node at `path` (the root cannot be deleted); `value` is copied in."""
    value = copy.deepcopy(value)
    if not path:
        return value if action != "wrap" else [tree]
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "delete":
        del parent[key]
    elif action == "wrap":
        parent[key] = [parent[key]]
    else:
        parent[key] = value
    return tree


@FAST
@given(data=st.data(), value=JSON, action=st.sampled_from(["replace", "delete", "wrap"]),
       count=st.integers(1, 3))
def test_mutated_manifests_are_accepted_or_refused_with_a_user_error(manifest_dict, data, value, action, count):
    """The manifest parser plus the preprocess check `load_bundle` runs: UserError or a valid Manifest."""
    from edgeseg.data.preprocess import PreprocessSpec

    tree = copy.deepcopy(manifest_dict)
    for _ in range(count):
        paths = list(_paths(tree))
        path = data.draw(st.sampled_from(paths))
        tree = _mutate(tree, path, action, value)
    try:
        manifest = Manifest.from_dict(tree)
    except UserError:
        return
    assert isinstance(manifest, Manifest)
    try:
        PreprocessSpec.from_dict(manifest.preprocess)
    except UserError:
        pass


@FAST
@given(tree_edit=st.data(), value=JSON)
def test_mutated_manifests_in_a_bundle_only_raise_user_errors(tmp_path_factory, kit, tree_edit, value):
    """End to end: a copied bundle with one manifest field replaced; load_bundle refuses it with a UserError
    or loads a bundle whose every file still verifies."""
    import shutil

    bundle = tmp_path_factory.mktemp("mutated") / "bundle"
    shutil.copytree(kit.bundle, bundle)
    tree = json.loads((bundle / "manifest.json").read_text())
    path = tree_edit.draw(st.sampled_from([p for p in _paths(tree) if p]))
    (bundle / "manifest.json").write_text(json.dumps(_mutate(tree, path, "replace", value)))
    try:
        loaded = load_bundle(bundle)
    except UserError:
        return
    for form in loaded.manifest.forms:
        loaded.model_bytes(form)


@FAST
@given(raw=st.binary(max_size=300))
def test_random_manifest_bytes_raise_only_user_errors(tmp_path_factory, raw):
    bundle = tmp_path_factory.mktemp("raw")
    (bundle / "manifest.json").write_bytes(raw)
    with pytest.raises(UserError):
        _manifest_from(_Reader(bundle))


# ------------------------------------------------------------------------------------- tiler


@FAST
@given(size=st.integers(1, 300), tile=st.integers(1, 80), overlap=st.floats(0.0, 0.99))
def test_tile_starts_cover_the_axis_edge_to_edge(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0
    if size <= tile:
        assert starts == [0]  # one tile; the volume is padded up to it
        return
    assert starts[-1] + tile == size  # the last tile ends at the edge
    gaps = np.diff(starts)
    assert (gaps >= 1).all() and (gaps <= tile).all()  # increasing, and no voxel left between two tiles
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()


@FAST
@given(data=st.data(), ndim=st.sampled_from([2, 3]), overlap=st.floats(0.0, 0.9), blend=st.sampled_from(BLEND_MODES),
       batch=st.integers(1, 4), channels=st.integers(1, 2))
def test_an_identity_model_is_reconstructed_exactly(data, ndim, overlap, blend, batch, channels):
    """Blending equal values returns them (any shape: smaller than, equal to or larger than the tile)."""
    shape = data.draw(st.lists(st.integers(1, 23), min_size=ndim, max_size=ndim))
    tile = data.draw(st.lists(st.integers(1, 12), min_size=ndim, max_size=ndim))
    image = np.random.default_rng(len(shape)).normal(size=(channels, *shape)).astype(np.float32)
    calls = []

    def identity(batch_array: np.ndarray) -> np.ndarray:
        calls.append(batch_array.shape)
        return batch_array.copy()

    out = sliding_window_probabilities(image, identity, tile, overlap=overlap, batch_size=batch, blend=blend)
    assert out.shape == image.shape
    np.testing.assert_allclose(out, image, rtol=1e-5, atol=1e-6)
    assert all(s[0] <= batch and tuple(s[2:]) == tuple(tile) for s in calls)

