"""The keypoint scheme: heatmap targets that follow augmentation, the config rules, phantoms, the MSE loss, and a
short train -> evaluate run through the command line.

Oracles: keypoint positions moved by hand (flip, quarter turn, affine) with Gaussians written out by hand; the
augmented image itself (its blob's peak must be where the target's peak is); hand-computed MSE; distances
recomputed from the evaluation's own decoded keypoints and the phantom's label file.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from edgeseg.cli.app import app
from edgeseg.config import load_experiment
from edgeseg.config.schema import LossConfig
from edgeseg.data.augment import Compose
from edgeseg.data.cases import PreparedCase
from edgeseg.data.io import Volume
from edgeseg.data.phantoms import make_keypoint_phantom
from edgeseg.errors import UserError
from edgeseg.losses import build_loss
from edgeseg.train.keypoints import HeatmapTargets, heatmap_activation
from edgeseg.train.schemes import build_sampler, bundle_output_kind, output_activation

KEYPOINTS = ["train.scheme=keypoints", "loss.name=adaptive_wing"]


def _case(image: np.ndarray, label: np.ndarray, spacing=(1.0, 1.0)) -> PreparedCase:
    vol = Volume(image, np.diag([*spacing, 1.0, 1.0]), tuple(spacing))
    return PreparedCase("c", image.astype(np.float32), label, tuple(spacing), vol, label)


def _gauss(shape, centre, spacing, sigma):
    """exp(-|v - c|^2 / (2 sigma^2)) written out, distances in mm."""
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    d2 = ((i - centre[0]) * spacing[0]) ** 2 + ((j - centre[1]) * spacing[1]) ** 2
    return np.exp(-d2 / (2 * sigma**2))


# (history of one augmentation, where keypoint (2, 6) of a 10x10 patch lands, the spacing afterwards), by hand.
# Patch centre c = (4.5, 4.5); the affine samples output o at input M o + c - M c, so p lands at M^-1 (p - c) + c.
QUARTER = [[0.0, -1.0], [1.0, 0.0]]
MOVES = [
    ([("flip", {"axes": [0]})], (7.0, 6.0), (1.0, 2.0)),                      # 9 - 2
    ([("rot90", {"k": 1})], (3.0, 2.0), (2.0, 1.0)),                          # (9 - 6, 2), spacing swapped
    ([("flip", {"axes": [1]}), ("rot90", {"k": 1})], (6.0, 2.0), (2.0, 1.0)),  # (2, 3) -> (9 - 3, 2)
    ([("rot90", {"k": 2})], (7.0, 3.0), (1.0, 2.0)),                          # twice: (3, 2) -> (9 - 2, 3)
    ([("affine", {"matrix": QUARTER})], (6.0, 7.0), (1.0, 2.0)),              # p - c = (-2.5, 1.5) -> (1.5, 2.5)
    ([("affine", {"matrix": [[0.8, 0.0], [0.0, 0.8]]})], (1.375, 6.375), (1.0, 2.0)),  # zoom 1.25 about c
    ([("gamma", {"gamma": 1.3}), ("noise", {"seed": 1, "std": 0.1})], (2.0, 6.0), (1.0, 2.0)),  # not spatial
]


@pytest.mark.parametrize("history, where, spacing", MOVES)
def test_target_heatmap_follows_the_moved_keypoint_by_hand(history, where, spacing):
    label = np.zeros((10, 10), np.uint8)
    label[2, 6] = 1
    targets = HeatmapTargets([_case(np.zeros((1, 10, 10)), label, (1.0, 2.0))], num_classes=3, patch_size=(10, 10),
                             sigma_mm=1.5)
    augmentation = Compose([])
    augmentation.history = history
    heat = targets(0, (0, 0), augmentation)
    assert heat.shape == (3, 10, 10) and heat.dtype == np.float32
    assert not heat[0].any() and not heat[2].any()  # background unused, class 2 absent
    # values beyond 4 sigma per axis are truncated to 0 (below exp(-8) = 3.4e-4)
    np.testing.assert_allclose(heat[1], _gauss((10, 10), where, spacing, 1.5), atol=3.5e-4)


def test_keypoints_outside_the_patch_lay_their_tail_inside():
    label = np.zeros((20, 20), np.uint8)
    label[3, 15] = 2
    targets = HeatmapTargets([_case(np.zeros((1, 20, 20)), label)], num_classes=3, patch_size=(8, 8), sigma_mm=2.0)
    heat = targets(0, (5, 5), Compose([]))  # the patch covers rows/cols 5..12: the keypoint is at (-2, 10)
    np.testing.assert_allclose(heat[2], _gauss((8, 8), (-2.0, 10.0), (1.0, 1.0), 2.0), atol=3.5e-4)


@pytest.mark.parametrize("patch, oversample", [((24, 24), 0.0), ((16, 16), 1.0)])
def test_sampled_targets_peak_where_the_augmented_image_peaks(patch, oversample):
    """A bright blob at the keypoint: after random flips, quarter turns and affines (rotation up to 30 degrees,
    scale 0.8-1.2) the image's peak and the target's peak coincide within a voxel."""
    shape = (24, 24)
    keypoint = (11, 13)
    i, j = np.meshgrid(np.arange(24), np.arange(24), indexing="ij")
    image = np.exp(-((i - keypoint[0]) ** 2 + (j - keypoint[1]) ** 2) / (2 * 2.0**2))[None]
    label = np.zeros(shape, np.uint8)
    label[keypoint] = 1
    cfg = load_experiment(None, KEYPOINTS + [
        "data.spatial_dims=2", f"data.patch_size=[{patch[0]}, {patch[1]}]", f"data.foreground_oversample={oversample}",
        "data.class_names=[background, point]", "augment.flip_axes=[0, 1]", "augment.rotate90=true",
        "augment.affine_prob=1.0", "augment.rotate_degrees=30", "augment.scale_range=[0.8, 1.2]",
        "augment.gamma_prob=0", "augment.noise_prob=0"])
    sampler = build_sampler(cfg, [_case(image, label)], patch, 2, seed=3)
    batch = sampler.next_batch(12)
    assert batch.labels.shape == (12, 2, *patch) and batch.labels.dtype == np.float32
    peaks = set()
    for x, y in zip(batch.images, batch.labels):
        peak_image = np.unravel_index(x[0].argmax(), patch)
        peak_target = np.unravel_index(y[1].argmax(), patch)
        assert math.dist(peak_image, peak_target) <= 1.0, (peak_image, peak_target)
        assert y[1].max() > 0.9  # a peak of 1 within a voxel's diagonal: exp(-0.5 / 8) = 0.94
        peaks.add(peak_target)
    assert len(peaks) >= 6  # the augmentation really moved the samples


def test_config_rules():
    cfg = load_experiment(None, KEYPOINTS + ["train.keypoints.sigma_mm=3"])
    assert cfg.train.keypoints_settings.sigma_mm == 3.0 and bundle_output_kind(cfg) == "heatmap"
    assert output_activation(cfg) == "heatmap"  # quantizable: tests/quantize/test_qat_keypoints.py
    assert load_experiment(None, ["train.scheme=keypoints", "loss.name=mse"]).loss.name == "mse"
    for bad, match in [(["train.scheme=keypoints"], "sigmoid heatmaps"),  # dice_ce
                       (["train.scheme=keypoints", "loss.name=adaptive_wing", "loss.heatmap_activation=none"],
                        "heatmap_activation sigmoid"),
                       (KEYPOINTS + ["augment.mixup_alpha=0.4"], "mixup"),
                       (KEYPOINTS + ["data.target_spacing=[1, 1, 1]"], "target_spacing"),
                       (["train.keypoints.sigma_mm=3"], "only applies to train.scheme keypoints"),
                       (KEYPOINTS + ["train.keypoints.threshold=0"], "threshold"),
                       (KEYPOINTS + ["train.keypoints.match_mm=-1"], "match_mm")]:
        with pytest.raises(UserError, match=match):
            load_experiment(None, bad)
    # SoftSeg may regress with MSE too
    assert load_experiment(None, ["train.scheme=softseg", "loss.name=mse", "loss.heatmap_activation=none"])


def test_mse_loss_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(1 / 3), 0.0]]])[:, :, None]  # (1, 2, 1, 2)
    target = torch.tensor([[[1.0, 0.5], [0.0, 0.25]]])[:, :, None]
    # sigmoid: [[0.5, 0.75], [0.25, 0.5]] -> squared errors .25, .0625, .0625, .0625
    assert build_loss(LossConfig(name="mse"))(logits, target).item() == pytest.approx(0.4375 / 4)
    plain = build_loss(LossConfig(name="mse", heatmap_activation="none"))
    assert plain(target, target).item() == 0.0


def test_heatmap_activation_zeroes_the_background_channel():
    scores = torch.tensor([[[5.0, -5.0]], [[0.0, math.log(3.0)]]])[None, :, 0]  # (1, 2, 2)
    heat = heatmap_activation(scores)
    torch.testing.assert_close(heat, torch.tensor([[[0.0, 0.0], [0.5, 0.75]]]))


def test_keypoint_phantoms_have_one_keypoint_per_class_at_their_blob():
    image, label = make_keypoint_phantom((32, 32), num_classes=4, seed=5, noise=0.0)
    assert image.shape == (1, 32, 32) and sorted(label[label > 0].tolist()) == [1, 2, 3]
    assert np.count_nonzero(label) == 3
    for k in (1, 2, 3):
        (point,) = np.argwhere(label == k)
        window = image[0, point[0] - 1:point[0] + 2, point[1] - 1:point[1] + 2]
        assert window.argmax() == 4  # the blob's brightest voxel is the keypoint (bias field is smooth)
    with pytest.raises(UserError, match="at least 16"):
        make_keypoint_phantom((8, 32))


def test_train_then_evaluate_through_the_command_line(tmp_path):
    """Three steps on tiny phantoms; the evaluation's errors are recomputed from its decoded keypoints and the
    label files (PNG: voxel = world coordinates)."""
    runner = CliRunner()
    run = tmp_path / "run"
    sets = ["data.synthetic_cases=6", "data.synthetic_shape=[20, 20]", "data.patch_size=[20, 20]",
            "data.class_names=[background, small, large]", "model.base_width=1", "train.epochs=1",
            "train.steps_per_epoch=3", "train.batch_size=2", "train.num_threads=1",
            "train.keypoints.threshold=0.001", "train.keypoints.max_per_class=1", "train.keypoints.match_mm=30"]
    args = ["train", "configs/countception_phantoms.yaml", "--out", str(run)]
    for s in sets:
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert "val_keypoint_f1" in log[-1] and 0.0 <= log[-1]["val_keypoint_f1"] <= 1.0
    out = tmp_path / "test.json"
    result = runner.invoke(app, ["evaluate", str(run), "--split", "test", "--json", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert set(metrics["summary"]) == {"small", "large", "mean"}
    data = run / "synthetic_data"
    for case, decoded in metrics["keypoints"].items():
        truth = np.asarray(Image.open(data / "labels" / case))
        assert len(decoded) == 2  # threshold ~0 and one per class: every class decoded
        for record in decoded:
            (point,) = np.argwhere(truth == record["label"])
            distance = math.dist(record["world_mm"], (*point.astype(float), 0.0))
            assert metrics["cases"][case][record["class"]]["nearest_mm"] == pytest.approx(distance)
            if distance <= 30:
                assert metrics["cases"][case][record["class"]]["error_mm"] == pytest.approx(distance)


def test_validation_score_is_f1_with_ties_broken_by_the_lower_error(monkeypatch):
    import types

    from edgeseg.config.schema import KeypointConfig
    from edgeseg.train import keypoints

    def result(f1, error):
        return {"score": f1, "detection": {"a": {"f1": f1}, "all": {"error_mm": error}}}

    parts = types.SimpleNamespace(model=None, val_cases=[], spec=None, class_names=["bg", "a"], tile_size=None,
                                  patch_size=(8, 8), device=None, spatial_dims=2, slice_axis=2, extra_inputs=())
    validation = keypoints.KeypointValidation(KeypointConfig(match_mm=5.0))
    scores = {}
    for f1, error in [(1.0, 0.5), (1.0, 0.2), (0.9, 0.0), (0.0, None)]:
        canned = result(f1, error)
        monkeypatch.setattr(keypoints, "evaluate_keypoints", lambda *a, canned=canned, **k: canned)
        scored = validation(parts)
        assert scored.fields["val_keypoint_f1"] == f1 and scored.fields["val_keypoint_error_mm"] == error
        scores[(f1, error)] = scored.value
    assert scores[(1.0, 0.2)] > scores[(1.0, 0.5)] > scores[(0.9, 0.0)] > scores[(0.0, None)] == 0.0
