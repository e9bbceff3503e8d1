"""HeMIS data: modality dropping, zero-filling, MSD cases with missing channel files, multi-modal and metadata
phantoms (checked against nibabel reads and measured intensities)."""

from __future__ import annotations

import itertools
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from edgeseg.data.cases import prepare_case, to_slices
from edgeseg.data.discovery import discover_cases
from edgeseg.data.modalities import drop_modalities, zero_absent
from edgeseg.data.phantoms import make_phantom, write_phantom_dataset
from edgeseg.data.preprocess import PreprocessSpec
from edgeseg.errors import UserError


def test_dropping_keeps_at_least_one_present_modality_and_is_uniform_over_subsets():
    rng = np.random.default_rng(0)
    present = np.array([True, False, True, True])
    counts: dict[tuple[bool, ...], int] = {}
    n = 7000
    for _ in range(n):
        kept = drop_modalities(present, 0.5, rng)
        assert kept.any() and not (kept & ~present).any()
        counts[tuple(kept)] = counts.get(tuple(kept), 0) + 1
    # oracle: every non-empty subset of the 3 present modalities has probability 1/7
    subsets = {s for s in itertools.product([False, True], repeat=3) if any(s)}
    assert {(k[0], k[2], k[3]) for k in counts} == subsets
    for c in counts.values():
        assert abs(c / n - 1 / 7) < 4 * np.sqrt((1 / 7) * (6 / 7) / n)
    state = rng.bit_generator.state
    np.testing.assert_array_equal(drop_modalities(present, 0.0, rng), present)  # nothing dropped
    np.testing.assert_array_equal(drop_modalities(np.array([False, True]), 0.9, rng), [False, True])  # the only one
    assert rng.bit_generator.state == state  # and no draw made either way
    with pytest.raises(ValueError, match="drop_prob"):
        drop_modalities(present, 1.0, rng)


def test_zero_absent_fills_exactly_the_absent_channels():
    image = np.arange(2 * 3 * 4, dtype=np.float32).reshape(3, 2, 4) + 1
    out = zero_absent(image, np.array([True, False, True]))
    assert (out[1] == 0).all()
    np.testing.assert_array_equal(out[[0, 2]], image[[0, 2]])
    assert (image[1] != 0).all()  # the input is untouched
    assert zero_absent(image, np.ones(3, bool)) is image


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def test_msd_cases_with_missing_channel_files(tmp_path):
    rng = np.random.default_rng(1)
    a0, a2, b1 = (rng.normal(5.0, 2.0, (8, 8, 8)).astype(np.float32) for _ in range(3))
    _save(tmp_path / "imagesTr" / "a_0000.nii.gz", a0)
    _save(tmp_path / "imagesTr" / "a_0002.nii.gz", a2)
    _save(tmp_path / "imagesTr" / "b_0001.nii.gz", b1)
    for case in "ab":
        _save(tmp_path / "labelsTr" / f"{case}.nii.gz", (np.arange(8 ** 3).reshape(8, 8, 8) % 2).astype(np.uint8))
    with pytest.raises(UserError, match=r"not numbered 0000, 0001, \.\.\. without gaps \(for missing modalities set "
                                        r"data.modalities\)"):
        discover_cases(tmp_path, "msd")
    a, b = discover_cases(tmp_path, "msd", missing_channels=True)
    assert (a.missing_channels, b.missing_channels) == ((1,), (0, 2))  # 3 channels: the largest index + 1
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {str(i): f"m{i}" for i in range(4)}}))
    a, b = discover_cases(tmp_path, "msd", missing_channels=True)
    assert (a.missing_channels, b.missing_channels) == ((1, 3), (0, 2, 3))  # dataset.json says 4
    with pytest.raises(UserError, match="lists 4 channel"):
        discover_cases(tmp_path, "msd", missing_channels=True, channels=3)
    case = prepare_case(a, PreprocessSpec(), num_classes=2)
    assert case.image.shape == (4, 8, 8, 8)
    np.testing.assert_array_equal(case.present_modalities(), [True, False, True, False])
    assert (case.image[[1, 3]] == 0).all()
    for channel, raw in ((0, a0), (2, a2)):  # oracle: numpy z-score of the file's voxels
        np.testing.assert_allclose(case.image[channel], (raw - raw.mean()) / raw.std(), atol=1e-5)
    np.testing.assert_array_equal(case.model_inputs(["modality_mask"])[0], [1, 0, 1, 0])
    assert all((s.modality_mask == case.modality_mask).all() for s in to_slices(case, 2))


def _interior_means(image, label, k_max):
    return [float(image[ndimage.binary_erosion(label == k)].mean()) for k in range(k_max)]


def test_phantom_metadata_changes_the_image():
    plain, label = make_phantom((32, 32, 32), 3, seed=4, noise=0.02, bias_field=False)
    swapped, label2 = make_phantom((32, 32, 32), 3, seed=4, noise=0.02, bias_field=False, contrast=1)
    doubled, _ = make_phantom((32, 32, 32), 3, seed=4, noise=0.02, bias_field=False, gain=2.0)
    np.testing.assert_array_equal(label, label2)
    m_plain, m_swapped = _interior_means(plain[0], label, 3), _interior_means(swapped[0], label, 3)
    assert m_plain[0] < m_plain[1] < m_plain[2]
    assert m_swapped[0] < m_swapped[2] < m_swapped[1]  # the foreground intensities swap
    np.testing.assert_allclose(doubled, 2 * plain, rtol=1e-6)
    np.testing.assert_array_equal(make_phantom((16, 16, 16), 3, seed=9)[0],
                                  make_phantom((16, 16, 16), 3, seed=9, modalities=3)[0][:1])  # modality 0 unchanged


def test_multimodal_phantoms_hide_one_class_per_extra_modality():
    image, label = make_phantom((32, 32, 32), 3, seed=2, noise=0.02, bias_field=False, modalities=3)
    assert image.shape == (3, 32, 32, 32)
    m1, m2 = _interior_means(image[1], label, 3), _interior_means(image[2], label, 3)
    assert abs(m1[1] - m1[0]) < 0.1 < m1[2] - m1[0]  # modality 1 hides class 1
    assert abs(m2[2] - m2[0]) < 0.1 < m2[1] - m2[0]  # modality 2 hides class 2


def test_written_multimodal_dataset_with_missing_files_and_sidecars(tmp_path):
    root = write_phantom_dataset(tmp_path / "ds", n_cases=8, shape=(12, 12, 12), seed=0, num_classes=3,
                                 modalities=3, missing=0.5, metadata=True)
    info = json.loads((root / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "mod0", "1": "mod1", "2": "mod2"}
    cases = discover_cases(root, missing_channels=True)
    assert len(cases) == 8 and all(len(c.images) >= 1 and c.num_channels == 3 for c in cases)
    assert any(c.missing_channels for c in cases)
    for case in cases:
        meta = json.loads((root / "imagesTr" / case.name.replace(".nii.gz", ".json")).read_text())
        assert set(meta) == {"contrast", "gain"} and meta["contrast"] in (0, 1) and 0.6 <= meta["gain"] <= 1.4
        stem = case.name.replace(".nii.gz", "")
        on_disk = sorted(p.name for p in (root / "imagesTr").glob(f"{stem}_*.nii.gz"))
        assert on_disk == [p.name for p in case.images]
    splits = json.loads((root / "splits.json").read_text())
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == sorted(c.name for c in cases)
    with pytest.raises(UserError, match="at least 2 modalities"):
        write_phantom_dataset(tmp_path / "bad", n_cases=2, shape=(12, 12, 12), seed=0, missing=0.5)
