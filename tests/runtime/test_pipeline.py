"""Segmentation pipeline against independent oracles.

- probabilities of the tiled ONNX Runtime pipeline vs MONAI `sliding_window_inference` over the
  PyTorch model the bundle was exported from (the tile positions coincide for these shapes);
- flip TTA vs the mean of MONAI runs on flipped volumes; MC dropout vs the PyTorch model with the
  same masks in every window;
- the entropy map and structure figures vs hand-computed values for a scripted backend;
- a 2D model on a 3D volume slice by slice vs scipy's correlation of each plane;
- reorientation: an LPS copy of a real hippocampus volume gives the same world-space result.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from edgeseg.data.io import Volume
from edgeseg.errors import UserError
from edgeseg.runtime.backends import open_backend
from edgeseg.runtime.bundle import FileEntry, Manifest, ModelForm, load_bundle
from edgeseg.runtime.pipeline import make_sampling, segment_volume

PREPROCESS = {"reorient": True, "target_spacing": None, "normalization": "zscore", "clip_percentiles": [0.5, 99.5],
              "label_map": {}}
CLASSES = ["background", "left", "right"]
TILE = [16, 16, 16]
TOL = 1e-4  # ONNX Runtime vs PyTorch float32, probabilities


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    """depth 2 (sizes: multiples of 4), dropout 0.2 (three MC sites), head scaled so classes are well separated."""
    from edgeseg.config import ModelConfig
    from edgeseg.nets import build_from_config

    torch.manual_seed(seed)
    model = build_from_config(ModelConfig(depth=2, base_width=4, norm="batch", dropout=0.2, decoder="upsample"),
                              spatial_dims=3, in_channels=1, out_channels=len(CLASSES)).eval()
    with torch.no_grad():
        model.head.weight.mul_(40.0)
    return model


def export(model: torch.nn.Module, out, spatial_dims: int = 3, tile=TILE):
    from edgeseg.export.bundle_writer import write_bundle
    from edgeseg.export.run_export import BundleInfo, export_model

    info = BundleInfo(spatial_dims=spatial_dims, in_channels=1, class_names=list(CLASSES), tile_size=list(tile),
                      preprocess=dict(PREPROCESS))
    result = export_model(model, info)
    write_bundle(out, result.files, result.manifest)
    return load_bundle(out)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    model = tiny_unet()
    bundle = export(model, tmp_path_factory.mktemp("pipeline") / "bundle")
    assert set(bundle.manifest.forms) == {"float", "mc"}
    return model, bundle


def smooth_volume(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0).astype(np.float32) * 50 + 100


def ras_volume(array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Volume:
    return Volume(array[None].astype(np.float32), np.diag([*spacing, 1.0]), tuple(spacing))


def zscore(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return ((x - x.mean()) / x.std()).astype(np.float32)


def monai_probs(predict, image: np.ndarray, mode: str) -> np.ndarray:
    """MONAI sliding window over softmax(predict(tile)). Shape: (*S) -> (K, *S)."""
    from monai.inferers import sliding_window_inference

    def softmax_predict(x):
        return torch.softmax(predict(x), dim=1)

    with torch.no_grad():
        out = sliding_window_inference(torch.from_numpy(zscore(image))[None, None], TILE, 2, softmax_predict,
                                       overlap=0.5, mode=mode)
    return out[0].numpy()


@pytest.mark.parametrize("shape", [(40, 24, 32), (12, 40, 20)])  # the second is padded along its first axis
@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_probabilities_match_monai_sliding_window(kit, shape, blend):
    model, bundle = kit
    image = smooth_volume(shape)
    seg = segment_volume(ras_volume(image), bundle.manifest, open_backend(bundle, "onnxruntime"), probabilities=True,
                         blend=blend, batch_size=3)
    expected = monai_probs(model, image, blend)
    assert seg.probabilities.shape == expected.shape
    np.testing.assert_allclose(seg.probabilities, expected, atol=TOL)
    agree = (seg.labels == expected.argmax(0)).mean()
    assert agree > 0.999 and seg.labels.dtype == np.uint8
    assert len(np.unique(seg.labels)) > 1  # the oracle comparison is not between two constant maps


def test_tta_matches_the_mean_of_monai_on_flipped_volumes(kit):
    model, bundle = kit
    image = smooth_volume((40, 24, 32), seed=1)  # tile starts are symmetric, so flipping tiles = flipping the volume
    seg = segment_volume(ras_volume(image), bundle.manifest, open_backend(bundle, "onnxruntime"), tta_axes=[0, 1, 2],
                         probabilities=True, blend="constant")
    flips = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    expected = np.mean([np.flip(monai_probs(model, np.flip(image, f).copy(), "constant"), [a + 1 for a in f])
                        for f in flips], axis=0)
    np.testing.assert_allclose(seg.probabilities, expected, atol=TOL)
    plain = monai_probs(model, image, "constant")
    assert np.abs(expected - plain).max() > 1e-3  # TTA changes the result, so the check above has teeth


def test_mc_dropout_matches_the_model_with_the_same_masks(kit):
    from edgeseg.export.mc import with_mask_inputs

    model, bundle = kit
    manifest = bundle.manifest
    image = smooth_volume((40, 24, 32), seed=2)
    seg = segment_volume(ras_volume(image), manifest, open_backend(bundle, "onnxruntime", mc=True), mc_passes=3,
                         probabilities=True, uncertainty=True, blend="gaussian", seed=7)
    wrapper, sites = with_mask_inputs(model, torch.zeros(1, 1, *TILE))
    draws = make_sampling(manifest, tta_axes=None, mc_passes=3, rng=np.random.default_rng(7)).mc_masks
    samples = []
    for masks in draws:
        def predict(x, masks=masks):
            return wrapper(x, *[torch.from_numpy(masks[s.input]).expand(len(x), -1, -1, -1, -1) for s in sites])
        samples.append(monai_probs(predict, image, "gaussian"))
    mean = np.mean(samples, axis=0)
    np.testing.assert_allclose(seg.probabilities, mean, atol=TOL)
    p = np.clip(mean, 1e-12, 1)
    np.testing.assert_allclose(seg.uncertainty, -(p * np.log(p)).sum(0), atol=1e-3)
    assert np.abs(samples[0] - samples[1]).max() > 1e-2  # the passes really differ (dropout is not inert)
    assert seg.sampling.sources == {"tta_flips": 1, "mc_passes": 3}


# ------------------------------------------------------------------------------------- scripted backend


def scripted_manifest(shape) -> Manifest:
    entry = FileEntry(sha256="0" * 64, bytes=0)
    return Manifest(spatial_dims=3, in_channels=1, class_names=list(CLASSES), tile_size=list(shape),
                    min_input_multiple=1, preprocess=dict(PREPROCESS),
                    forms={"float": ModelForm(file="m.onnx", backend="any", precision="fp32")},
                    files={"m.onnx": entry})


def test_structure_figures_match_hand_computed_values(scripted_backend):
    shape = (20, 20, 20)
    spacing = (1.5, 1.0, 2.0)
    weak = np.log(np.array([0.4, 0.25, 0.35]))  # background wins weakly where nothing is predicted
    base = np.broadcast_to(weak[:, None, None, None], (3, *shape)).copy()
    a = np.zeros(shape, bool)
    a[6:14, 6:14, 6:14] = True  # class 1 in every sample (symmetric under flips)
    b = np.zeros(shape, bool)
    b[0:2, 9:11, 9:11] = b[18:20, 9:11, 9:11] = True  # class 2 in samples 0 and 1 only (two symmetric blobs)
    with_b, without_b = base.copy(), base.copy()
    for pattern in (with_b, without_b):
        pattern[:, a] = np.array([0.0, 10.0, 0.0])[:, None]
    with_b[:, b] = np.array([0.0, 0.0, 10.0])[:, None]
    # flips over axes (0, 1): four samples; the backend is called once per flip per tile batch
    backend = scripted_backend([with_b, with_b, without_b, without_b])
    manifest = scripted_manifest(shape)
    volume = ras_volume(smooth_volume(shape), spacing)
    seg = segment_volume(volume, manifest, backend, tta_axes=[0, 1], uncertainty=True, iou_threshold=0.5,
                         blend="constant")
    assert backend.calls == 4
    by_class = {(s["class"], s["structure"]): s for s in seg.structures}
    assert sorted(by_class) == [("left", 1), ("right", 1), ("right", 2)]
    voxel = 1.5 * 1.0 * 2.0
    left = by_class[("left", 1)]
    assert left["volume_mm3"] == pytest.approx(a.sum() * voxel)
    assert left["iou_across_samples"] == 1.0 and left["volume_cv"] == 0.0 and not left["removed"]
    for key in (("right", 1), ("right", 2)):
        right = by_class[key]
        assert right["volume_mm3"] == pytest.approx(8 * voxel)
        assert right["iou_across_samples"] == 0.0  # absent from two of four samples
        assert right["volume_cv"] == pytest.approx(1.0)  # volumes [v, v, 0, 0]: std / mean = 1
        assert right["removed"]
    # mean probability of a b-voxel by hand: two strong class-2 samples and two weak-background ones
    strong = np.exp([0.0, 0.0, 10.0]) / np.exp([0.0, 0.0, 10.0]).sum()
    mean_b = (2 * strong + 2 * np.array([0.4, 0.25, 0.35])) / 4
    assert by_class[("right", 1)]["mean_uncertainty"] == pytest.approx(-(mean_b * np.log(mean_b)).sum(), rel=1e-4)
    assert seg.removed == 2
    expected = np.where(a, 1, 0)
    np.testing.assert_array_equal(seg.labels, expected)  # the unstable blobs were removed, the stable one kept


def test_uncertainty_needs_several_samples(kit):
    _, bundle = kit
    volume = ras_volume(smooth_volume((16, 16, 16)))
    with pytest.raises(UserError, match="several samples"):
        segment_volume(volume, bundle.manifest, open_backend(bundle, "onnxruntime"), uncertainty=True)
    with pytest.raises(UserError, match="overlap"):
        segment_volume(volume, bundle.manifest, open_backend(bundle, "onnxruntime"), overlap=-0.1)


# ------------------------------------------------------------------------------------- 2D models, geometry


def test_2d_model_on_a_3d_volume_runs_plane_by_plane(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from edgeseg.export.third_party import make_bundle

    weight = np.random.default_rng(3).normal(size=(3, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["logits"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("image", T.FLOAT, ["N", 1, "H", "W"])],
                              [helper.make_tensor_value_info("logits", T.FLOAT, ["N", 3, "H", "W"])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    make_bundle(tmp_path / "m.onnx", tmp_path / "b", class_names=CLASSES, tile=[32, 32])
    bundle = load_bundle(tmp_path / "b")
    image = smooth_volume((20, 24, 6), seed=4)
    seg = segment_volume(ras_volume(image), bundle.manifest, open_backend(bundle, "onnxruntime"), probabilities=True)
    z = zscore(image)  # whole-volume normalisation, then planes along axis 2 (the default slice axis)
    logits = np.stack([np.stack([ndimage.correlate(z[:, :, k], weight[c, 0], mode="constant") for k in range(6)], -1)
                       for c in range(3)])
    e = np.exp(logits - logits.max(0))
    np.testing.assert_allclose(seg.probabilities, e / e.sum(0), atol=1e-5)


def test_reoriented_input_gives_the_same_world_space_result(kit, shared_data, tmp_path):
    import nibabel as nib

    from edgeseg.data.io import read_image

    _, bundle = kit
    path = shared_data / "msd_hippocampus" / "images" / "hippocampus_003.nii.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    ras = nib.load(str(path))
    lps = ras.as_reoriented(nib.orientations.axcodes2ornt(("P", "L", "S")))  # same world object, other voxel order
    nib.save(lps, str(tmp_path / "lps.nii.gz"))
    backend = open_backend(bundle, "onnxruntime")
    out_ras = segment_volume(read_image(path), bundle.manifest, backend)
    out_lps = segment_volume(read_image(tmp_path / "lps.nii.gz"), bundle.manifest, backend)
    assert out_lps.labels.shape == lps.shape and out_ras.labels.shape == ras.shape
    back = nib.Nifti1Image(out_lps.labels, lps.affine).as_reoriented(nib.orientations.io_orientation(lps.affine))
    np.testing.assert_allclose(back.affine, ras.affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), out_ras.labels)
    assert len(np.unique(out_ras.labels)) > 1
