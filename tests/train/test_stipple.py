"""STIPPLE in training and evaluation (edgeseg.train.stipple): the prior follows each patch through padding, cropping
and spatial augmentation; the loss reads s + ln p; prediction places the prior by translation; whole runs store the
prior, resume exactly on it and evaluate with it; quantize refuses the scheme (export carries the prior:
tests/runtime/test_stipple_runtime.py).

Oracles: an image that carries the prior's own pattern as a marker, loss values worked out by hand, a network whose
output is known, the uninterrupted run for resume.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal

import nibabel as nib
import numpy as np
import pytest
import torch
from rich.console import Console
from tiny_runs import TINY_PHANTOM_RUN
from torch import nn

from edgeseg.config import load_experiment
from edgeseg.config.schema import LossConfig, StippleConfig
from edgeseg.data.augment import Compose, RandomAffine, RandomFlip, RandomRot90
from edgeseg.data.cases import PreparedCase
from edgeseg.errors import UserError
from edgeseg.losses import build_loss
from edgeseg.priors.activation import prior_sigmoid
from edgeseg.priors.reference import Reference
from edgeseg.priors.stipple import OrganPrior, SpatialPrior, build_prior
from edgeseg.train.rundir import RunDir
from edgeseg.train.sampling import BatchSampler
from edgeseg.train.stipple import CasePriors, PriorDrivenLoss, PriorPredictor, RunPrior, prior_logits

QUIET = Console(quiet=True)
BINS = np.array([[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]],
                 [[0.95, 0.15, 0.25], [0.35, 0.45, 0.55], [0.65, 0.75, 0.85]]], np.float32)  # (B=2, W=3, H=3)


def _case(name: str, image: np.ndarray, label: np.ndarray) -> PreparedCase:
    return PreparedCase(name=name, image=image, label=label, spacing=(1.0, 1.0, 1.0), original=None,  # type: ignore[arg-type]
                        original_label=None)


# ------------------------------------------------------------------------------------- the prior follows the patch


def _marked_case(centre, shape) -> PreparedCase:
    """An image whose channel 0 is the hand-built prior's organ map painted at `centre`, and a label whose organ
    fills that box (so the case's own alignment puts the prior's centre there)."""
    # box (3, 3, 4): start = centre - (size - 1) // 2 = centre - 1; the 4 slices are split [0, 1], [2, 3] -> bins 0 0 1 1
    volume = np.moveaxis(BINS[[0, 0, 1, 1]], 0, -1)  # (3, 3, 4)
    box = tuple(slice(c - 1, c - 1 + n) for c, n in zip(centre, (3, 3, 4)))
    image = np.zeros((1, *shape), np.float32)
    image[(0, *box)] = volume
    label = np.zeros(shape, np.uint8)
    label[box] = 1
    return _case("marked", image, label)


@pytest.mark.parametrize("augment", ["none", "flips+rot90+affine"])
def test_prior_patch_lands_on_the_image_marker_after_padding_crop_and_augmentation(augment):
    prior = SpatialPrior(("background", "organ"), (OrganPrior("organ", 1, (3, 3, 4), BINS),), 2)
    case = _marked_case((6, 8, 2), (14, 13, 6))  # z (6) is padded to the patch (8): offset 1
    run_prior = RunPrior(prior, Reference("marked", case.label, 2), StippleConfig())
    transforms = [] if augment == "none" else [RandomFlip((0, 1, 2)), RandomRot90(), RandomAffine(prob=0.5)]
    patch = (8, 8, 8)
    sampler = BatchSampler([case], patch, 0.7, Compose(transforms), seed=0,
                           prior_patch=CasePriors(run_prior, [case], patch))
    seen, moved = 0, set()
    for _ in range(40):
        batch = sampler.next_batch(1)
        assert batch.prior is not None and batch.prior.shape == (1, 2, *patch)
        # the organ channel equals the marker (eps = 1e-6 where the marker is 0), the background its complement
        np.testing.assert_allclose(batch.prior[0, 1], batch.images[0, 0], atol=2e-6)
        np.testing.assert_allclose(batch.prior[0, 0], 1.0 - batch.images[0, 0], atol=2e-6)
        seen += bool((batch.images[0, 0] > 0.05).any())
        for name, params in sampler.augmentation.history:
            if (name == "flip" and params["axes"]) or (name == "rot90" and params["k"]) or \
                    (name == "affine" and params["matrix"] is not None):
                moved.add(name)
    assert seen >= 20  # most patches hold part of the organ
    assert moved == (set() if augment == "none" else {"flip", "rot90", "affine"})


def test_prior_patch_outside_the_organ_is_background():
    prior = SpatialPrior(("background", "organ"), (OrganPrior("organ", 1, (3, 3, 4), BINS),), 2)
    case = _marked_case((6, 8, 2), (14, 13, 6))
    maps = CasePriors(RunPrior(prior, Reference("m", case.label, 2), StippleConfig()), [case], (4, 4, 4))(0, (10, 0, 0))
    np.testing.assert_allclose(maps[1], 1e-6)  # x 10..13: beyond the box (x 5..7)
    np.testing.assert_allclose(maps[0], 1.0)


# ------------------------------------------------------------------------------------- the loss


def test_loss_on_logits_plus_log_prior_by_hand():
    scores = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], requires_grad=True)  # (B=1, K=2, 2 voxels)
    prior = torch.tensor([[[0.25, 0.5], [0.75, 0.5]]])
    target = torch.tensor([[0, 1]])
    loss = build_loss(LossConfig(name="ce"))(prior_logits(scores, prior), target)
    # voxel 0: y_0 = e 0.25 / (e 0.25 + 0.75) = e / (e + 3); voxel 1 (uniform prior): y_1 = e^2 / (1 + e^2)
    by_hand = (math.log((math.e + 3) / math.e) + math.log((1 + math.e**2) / math.e**2)) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    loss.backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0
    # binary task: the two-channel prior-driven softmax is the prior-driven sigmoid of s_1 - s_0
    y = torch.softmax(prior_logits(scores.detach(), prior), dim=1)[0, 1]
    np.testing.assert_allclose(y.numpy(), [3 / (3 + math.e), 1 / (1 + math.exp(-2))], rtol=1e-6)
    np.testing.assert_allclose(y.numpy(), prior_sigmoid(np.array([-1.0, 2.0]), np.array([0.75, 0.5])), rtol=1e-6)
    assert torch.isfinite(prior_logits(scores.detach(), torch.zeros_like(prior))).all()  # p = 0 floored at eps


def test_training_loss_adds_the_coarse_term_by_hand():
    scores = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # as above
    prior = torch.tensor([[[0.25, 0.5], [0.75, 0.5]]])
    target = torch.tensor([[0, 1]])
    ce = build_loss(LossConfig(name="ce"))
    prior_term = (math.log((math.e + 3) / math.e) + math.log((1 + math.e**2) / math.e**2)) / 2
    # the network's own softmax: voxel 0 y_0 = e / (e + 1), voxel 1 y_1 = e^2 / (1 + e^2)
    coarse_term = (math.log((math.e + 1) / math.e) + math.log((1 + math.e**2) / math.e**2)) / 2
    assert PriorDrivenLoss(ce, 0.0)(scores, target, prior).item() == pytest.approx(prior_term, rel=1e-6)
    assert PriorDrivenLoss(ce, 0.5)(scores, target, prior).item() == pytest.approx(prior_term + 0.5 * coarse_term,
                                                                                  rel=1e-6)


# ------------------------------------------------------------------------------------- prediction


class _EvidenceNet(nn.Module):
    """Logits (-5e, 5e) from the evidence e in image channel 0: +1 organ, -1 background, 0 undecided."""

    min_input_multiple = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-5.0 * x[:, :1], 5.0 * x[:, :1]], dim=1)


def test_prediction_places_the_prior_by_translation_and_lets_it_decide_undecided_voxels():
    ref_label = np.zeros((16, 16, 16), np.uint8)
    ref_label[3:6, 4:7, 5:9] = 1  # centre (4, 5, 6)
    run_prior = RunPrior(build_prior([ref_label], ["background", "organ"], num_bins=2),
                         Reference("ref", ref_label, 2), StippleConfig(max_shift=6, factors=(2, 1)))
    evidence = -np.ones((18, 16, 16), np.float32)
    evidence[8:11, 2:5, 8:12] = 1.0  # the organ, moved by (5, -2, 3)
    evidence[9, 3, 9:11] = 0.0  # two undecided voxels inside it: the prior (p = 1 there) makes them organ
    evidence[15, 14, 1] = 0.0  # one far from it: the prior (p = eps there) makes it background
    case = _case("new", evidence[None], None)  # type: ignore[arg-type]
    predictor = PriorPredictor(run_prior, (24, 16, 16))
    labels = predictor(_EvidenceNet(), case, torch.device("cpu"))
    assert predictor.shifts == {"new": [5, -2, 3]}
    expected = np.zeros((18, 16, 16), np.uint8)
    expected[8:11, 2:5, 8:12] = 1
    np.testing.assert_array_equal(labels, expected)


# ------------------------------------------------------------------------------------- whole runs

TINY = [
    *TINY_PHANTOM_RUN,
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.scheme=stipple",
    "data.labelled_train_cases=3",
]


def _train(out, *, resume=False, console=QUIET):
    from edgeseg.train.experiment import train_experiment

    return train_experiment(load_experiment(None, TINY), out, resume=resume, console=console)


def _boxes_by_hand(run_dir, n):
    """Largest bounding-box extent per class over the first n training labels, read from the files."""
    root = RunDir(run_dir).read_config().data.root
    names = json.loads((RunDir(run_dir).path / "synthetic_data" / "splits.json").read_text())["train"][:n]
    boxes = {}
    for k, cls in ((1, "sphere"), (2, "blob")):
        extents = []
        for name in names:
            coords = np.nonzero(np.asarray(nib.load(f"{root}/labels/{name}").dataobj) == k)
            extents.append([int(c.max() - c.min() + 1) for c in coords])
        boxes[cls] = [max(e) for e in zip(*extents)]
    return boxes


def test_stipple_run_stores_its_prior_resumes_on_it_exactly_and_evaluates_with_it(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from edgeseg.priors import predict
    from edgeseg.train import stipple
    from edgeseg.train.experiment import evaluate_run

    priors_seen, placements = [], {"n": 0}
    original_logits, original_place = stipple.prior_logits, predict.centres_from_probabilities

    def recording_logits(scores, prior, eps):
        priors_seen.append(tuple(prior.shape))
        return original_logits(scores, prior, eps)

    def counting_place(*args, **kwargs):
        placements["n"] += 1
        return original_place(*args, **kwargs)

    monkeypatch.setattr(stipple, "prior_logits", recording_logits)
    monkeypatch.setattr(predict, "centres_from_probabilities", counting_place)
    out = io.StringIO()
    full = _train(tmp_path / "a", console=Console(file=out, width=200))
    assert "on 3 cases" in out.getvalue()  # data.labelled_train_cases
    assert priors_seen == [(2, 3, 8, 8, 8)] * 2  # every step's loss read the patches' priors
    assert placements["n"] == 1 and full.history[0]["val_dice"] is not None  # validation placed the prior (1 case)

    run = RunDir(tmp_path / "a")
    record = run.read_info().extra["stipple"]
    assert record["boxes"] == _boxes_by_hand(tmp_path / "a", 3)  # built from exactly the 3 labelled cases
    assert set(record["sha256"]) == {"prior.json", "prior_1.npy", "prior_2.npy", "reference.json",
                                     "reference_label.npy"}
    assert all((run.path / "stipple" / name).is_file() for name in record["sha256"])

    monkeypatch.setattr(stipple, "prior_logits", original_logits)
    original_next = BatchSampler.next_batch

    def interrupting(self, batch_size):
        os.kill(os.getpid(), signal.SIGINT)  # stops after this step
        return original_next(self, batch_size)

    monkeypatch.setattr(BatchSampler, "next_batch", interrupting)
    first = _train(tmp_path / "b")
    monkeypatch.setattr(BatchSampler, "next_batch", original_next)
    assert first.interrupted and first.epochs_done == 0
    stored = (tmp_path / "b" / "stipple" / "prior_1.npy").read_bytes()
    (tmp_path / "b" / "stipple" / "prior_1.npy").write_bytes(stored[:-1] + bytes([stored[-1] ^ 0x40]))
    with pytest.raises(UserError, match="changed since training"):
        _train(tmp_path / "b", resume=True)
    (tmp_path / "b" / "stipple" / "prior_1.npy").write_bytes(stored)
    assert _train(tmp_path / "b", resume=True).epochs_done == 1
    a, b = load_file(str(RunDir(tmp_path / "a").last)), load_file(str(RunDir(tmp_path / "b").last))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    placements["n"] = 0
    metrics = evaluate_run(tmp_path / "a", data=None, split="test", console=QUIET)
    tests = json.loads((tmp_path / "a" / "synthetic_data" / "splits.json").read_text())["test"]
    assert set(metrics["stipple"]["shifts"]) == set(metrics["cases"]) == set(tests)
    assert placements["n"] == len(tests)
    assert set(metrics["summary"]) == {"sphere", "blob", "mean"}


def test_quantize_refuses_a_stipple_run_before_writing(tmp_path):
    from edgeseg.quantize.qat import quantize_run

    _train(tmp_path / "run")
    with pytest.raises(UserError, match="quantization-aware training does not train STIPPLE's prior-driven loss"):
        quantize_run(tmp_path / "run", "8/8", tmp_path / "q", epochs=1, console=QUIET)
    assert not (tmp_path / "q").exists()


# ------------------------------------------------------------------------------------- configuration


def test_stipple_and_labelled_case_options_are_validated():
    from edgeseg.train.setup import labelled_train_refs

    with pytest.raises(UserError, match="needs data.spatial_dims 3"):
        load_experiment(None, ["train.scheme=stipple", "data.spatial_dims=2", "data.patch_size=[16, 16]"])
    with pytest.raises(UserError, match="mixup_alpha to 0"):
        load_experiment(None, ["train.scheme=stipple", "augment.mixup_alpha=0.2"])
    with pytest.raises(UserError, match="train.stipple only applies to train.scheme stipple"):
        load_experiment(None, ["train.stipple.num_bins=4"])
    with pytest.raises(UserError, match="num_bins must be >= 2"):
        load_experiment(None, ["train.scheme=stipple", "train.stipple.num_bins=1"])
    with pytest.raises(UserError, match="labelled_train_cases must be >= 1"):
        load_experiment(None, ["data.labelled_train_cases=0"])
    cfg = load_experiment(None, ["data.labelled_train_cases=2"])
    assert labelled_train_refs(cfg, ["a", "b", "c"]) == ["a", "b"]  # type: ignore[list-item]
    with pytest.raises(UserError, match="labelled_train_cases is 2 but the training split has only 1"):
        labelled_train_refs(cfg, ["a"])  # type: ignore[list-item]


def test_shipped_stipple_config_loads():
    from pathlib import Path

    cfg = load_experiment(Path(__file__).resolve().parents[2] / "configs" / "hippocampus_3d_stipple.yaml")
    assert cfg.train.scheme == "stipple" and cfg.data.labelled_train_cases is not None
