"""Training schemes: SoftSeg's activation and loss, class sampling and two-step training, mixup and soft
labels through the batch sampler, and whole runs with every scheme (resume exact, phases recorded).

Oracles: hand-computed activations and losses, brute-force window counts, the shard/batch identity
(the union of the ranks' shares is the single-process batch), and the uninterrupted run for resume.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from rich.console import Console
from tiny_runs import TINY_PHANTOM_RUN, phantom_cases

from edgeseg.config import load_experiment
from edgeseg.config.loader import from_dict, to_dict
from edgeseg.config.schema import ExperimentConfig
from edgeseg.data.augment import Compose, one_hot
from edgeseg.errors import UserError
from edgeseg.losses import AdaptiveWingLoss, adaptive_wing_loss
from edgeseg.runtime.pipeline import normalized_relu as runtime_normalized_relu
from edgeseg.train.rundir import RunDir
from edgeseg.train.sampling import BatchSampler
from edgeseg.train.schemes import build_sampler, build_training_loss, output_activation
from edgeseg.train.softseg import SoftSegLoss, normalized_relu
from edgeseg.train.two_step import phase

QUIET = Console(quiet=True)
SOFTSEG = ["train.scheme=softseg", "loss.name=adaptive_wing", "loss.heatmap_activation=none"]


# ------------------------------------------------------------------------------------- SoftSeg


def test_normalized_relu_by_hand():
    # K = 1: relu, then divide by the sample's maximum
    one = torch.tensor([[[2.0, -1.0, 1.0]], [[0.5, 0.0, 0.25]], [[-1.0, -2.0, 0.0]]])  # (B=3, K=1, S=3)
    torch.testing.assert_close(normalized_relu(one), torch.tensor([[[1.0, 0.0, 0.5]], [[1.0, 0.0, 0.5]],
                                                                   [[0.0, 0.0, 0.0]]]))
    # K = 3: then divide by the channel sum at each voxel (ivadomed's multi-channel SoftSeg)
    three = torch.tensor([[[-1.0, 2.0], [4.0, 0.0], [2.0, 2.0]],     # relu / 4: [[0, .5], [1, 0], [.5, .5]]
                          [[-1.0, -2.0], [0.0, -0.5], [-3.0, 0.0]]])  # nothing positive -> zeros
    expected3 = torch.tensor([[[0.0, 0.5], [2 / 3, 0.0], [1 / 3, 0.5]],  # voxel sums 1.5 and 1
                              [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(normalized_relu(three[..., None])[..., 0], expected3)  # also with another axis
    np.testing.assert_allclose(runtime_normalized_relu(three.numpy()), expected3.numpy(), atol=1e-7)
    # K = 2 (ivadomed's one-channel binary model): f = relu(s1 - s0) / max, served as (1 - f, f)
    two = torch.tensor([[[-1.0, 2.0, 0.0], [1.0, 0.0, 0.5]],   # s1 - s0 = [2, -2, .5] -> f = [1, 0, .25]
                        [[0.0, 1.0, 3.0], [0.0, 0.0, 1.0]]])   # s1 - s0 <= 0 everywhere -> f = 0
    expected = torch.tensor([[[0.0, 1.0, 0.75], [1.0, 0.0, 0.25]],
                             [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    torch.testing.assert_close(normalized_relu(two), expected)
    np.testing.assert_allclose(runtime_normalized_relu(two.numpy()), expected.numpy(), atol=1e-7)  # the runtime's copy
    np.testing.assert_allclose(runtime_normalized_relu(one.numpy()), normalized_relu(one).numpy(), atol=1e-7)
    two.requires_grad_(True)
    normalized_relu(two).square().sum().backward()
    assert torch.isfinite(two.grad).all()


def test_softseg_loss_is_adaptive_wing_on_hand_normalized_outputs_and_per_sample():
    scores = torch.tensor([[[2.0, -1.0, 1.0]], [[3.0, 0.0, 6.0]]])  # (B=2, K=1, S=3)
    target = torch.tensor([[[1.0, 0.0, 0.5]], [[0.5, 0.0, 1.0]]])
    by_hand = torch.tensor([[[1.0, 0.0, 0.5]], [[0.5, 0.0, 1.0]]])  # relu / per-sample max: equal to the target
    loss = SoftSegLoss(AdaptiveWingLoss(activation="none"))
    assert float(loss(scores, target)) == pytest.approx(float(adaptive_wing_loss(by_hand, target)), abs=1e-7)
    assert float(loss(scores, target)) == pytest.approx(0.0, abs=1e-7)
    shifted = torch.tensor([[[2.0, -1.0, 2.0]], [[3.0, 0.0, 6.0]]])  # sample 0 now predicts [1, 0, 1]
    assert float(loss(shifted, target)) > 0.01
    # a mean over samples: the loss of a batch is the mean of its halves' (what data-parallel ranks average)
    torch.manual_seed(0)
    big, soft = torch.randn(4, 3, 5, 5), torch.rand(4, 3, 5, 5)
    halves = (loss(big[:2], soft[:2]) + loss(big[2:], soft[2:])) / 2
    assert float(loss(big, soft)) == pytest.approx(float(halves), rel=1e-6)


def test_softseg_config_requires_a_regression_loss_and_builds_its_parts():
    with pytest.raises(UserError, match="softseg.*adaptive_wing, heatmap_activation: none"):
        load_experiment(None, ["train.scheme=softseg"])
    with pytest.raises(UserError, match="softseg"):
        load_experiment(None, ["train.scheme=softseg", "loss.name=adaptive_wing"])  # its sigmoid would double up
    cfg = load_experiment(None, SOFTSEG)
    assert output_activation(cfg) == "normalized_relu" and output_activation(load_experiment(None)) == "softmax"
    assert isinstance(build_training_loss(cfg), SoftSegLoss)
    with pytest.raises(UserError, match="'softsegg' is not one of"):
        load_experiment(None, ["train.scheme=softsegg"])


def test_scheme_options_are_validated_and_round_trip():
    with pytest.raises(UserError, match="mixup_alpha must be >= 0"):
        load_experiment(None, ["augment.mixup_alpha=-1"])
    with pytest.raises(UserError, match="soft_dilation_factor must be >= 0"):
        load_experiment(None, ["augment.soft_dilation_factor=-0.5"])
    with pytest.raises(UserError, match=r"balanced_epochs \(5\) must be less than train.epochs \(5\)"):
        load_experiment(None, ["train.epochs=5", "train.two_step.balanced_epochs=5"])
    with pytest.raises(UserError, match="balanced_epochs must be >= 1"):
        load_experiment(None, ["train.two_step.balanced_epochs=0"])
    with pytest.raises(UserError, match="unknown config key 'train.two_step.balanced_epoch'"):
        load_experiment(None, ["train.two_step.balanced_epoch=2"])
    cfg = load_experiment(None, ["train.two_step.balanced_epochs=3", "augment.mixup_alpha=0.4"])
    assert cfg.train.two_step.balanced_epochs == 3
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg


def test_two_step_phases():
    assert [phase(e, 2) for e in range(1, 5)] == ["balanced", "balanced", "natural", "natural"]
    assert phase(1, None) == "standard"


# ------------------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("mode", ["standard", "balanced", "natural"])
@pytest.mark.parametrize("overrides", [[], ["augment.mixup_alpha=0.4", "augment.soft_dilation_factor=1.0"], SOFTSEG],
                         ids=["indices", "mixup+dilation", "softseg"])
def test_rank_shares_make_up_the_single_process_batch(mode, overrides):
    cfg = load_experiment(None, ["data.class_names=[bg, a, b]", "augment.affine_prob=0.5", *overrides])
    cases = phantom_cases(4, (24, 24, 24))

    def sampler(rank: int, world: int) -> BatchSampler:
        s = build_sampler(cfg, cases, (8, 8, 8), 3, seed=5)
        s.shard(rank, world)
        s.set_mode(mode)
        return s

    single, ranks = sampler(0, 1), [sampler(r, 2) for r in (0, 1)]
    for _ in range(2):
        images, labels = single.next_batch(4)
        shares = [r.next_batch(4) for r in ranks]
        np.testing.assert_array_equal(images, np.concatenate([s[0] for s in shares]))
        np.testing.assert_array_equal(labels, np.concatenate([s[1] for s in shares]))
    if overrides:
        assert labels.shape == (4, 3, 8, 8, 8) and labels.dtype == np.float32
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)  # soft maps stay a partition of unity
    else:
        assert labels.shape == (4, 8, 8, 8) and labels.dtype == np.int64


def test_mixup_and_dilation_make_soft_labels():
    cases = phantom_cases(2, (24, 24, 24))
    three = "data.class_names=[bg, a, b]"
    plain = build_sampler(load_experiment(None, [three, "augment.mixup_alpha=0.4"]), cases, (8, 8, 8), 3, seed=0)
    assert plain.mixup_alpha == 0.4 and plain.num_classes == 3
    _, labels = plain.next_batch(16)
    fractional = (labels > 0.01) & (labels < 0.99)
    assert fractional.any(axis=(1, 2, 3, 4)).mean() > 0.5  # most samples mix two patches with different labels
    dilated = build_sampler(load_experiment(None, [three, "augment.soft_dilation_factor=1.0", "augment.flip_axes=[]",
                                                   "augment.gamma_prob=0", "augment.noise_prob=0"]),
                            cases, (8, 8, 8), 3, seed=0)
    _, labels = dilated.next_batch(8)
    values = np.unique(np.round(labels[:, 1:], 6))
    assert set(values) - {0.0, 1.0}  # ring values between 0 and 1 next to the foreground


def test_balanced_mode_draws_half_positive_half_negative_and_natural_mode_the_real_share():
    cases = phantom_cases(3, (24, 24, 24))
    patch = (8, 8, 8)
    sampler = BatchSampler(cases, patch, 0.33, Compose([]), seed=0)
    sampler.set_mode("balanced")
    _, labels = sampler.next_batch(400)
    positive = (labels > 0).any(axis=(1, 2, 3))
    assert 0.42 < positive.mean() < 0.58  # p = 1/2; 400 draws: sd 0.025
    # natural: the share of positive windows in the training set (brute-force count, then 400 draws)
    from edgeseg.data.patches import window_foreground_counts

    counts = [window_foreground_counts(c.label > 0, patch) for c in cases]
    real = sum((c > 0).sum() for c in counts) / sum(c.size for c in counts)
    assert real > 0.8  # the imbalance the balanced step corrects
    sampler.set_mode("natural")
    _, labels = sampler.next_batch(400)
    assert abs((labels > 0).any(axis=(1, 2, 3)).mean() - real) < 0.06
    with pytest.raises(UserError, match=r"no \[16, 16, 16\] training patch is free of foreground"):
        BatchSampler(cases, (16, 16, 16), 0.33, Compose([]), seed=0).set_mode("balanced")


def test_one_hot_of_the_sampler_matches_class_indices():
    cases = phantom_cases(2, (24, 24, 24))
    indices = BatchSampler(cases, (8, 8, 8), 0.5, Compose([]), seed=3)
    maps = BatchSampler(cases, (8, 8, 8), 0.5, Compose([]), seed=3, num_classes=3)
    (_, a), (_, b) = indices.next_batch(4), maps.next_batch(4)
    np.testing.assert_array_equal(b, np.stack([one_hot(x, 3) for x in a]))


# ------------------------------------------------------------------------------------- whole runs


TINY = [
    *TINY_PHANTOM_RUN,
    "train.epochs=3",
    "train.steps_per_epoch=3",
]


def _train(out, overrides, *, resume=False):
    from edgeseg.train.experiment import train_experiment

    return train_experiment(load_experiment(None, TINY + overrides), out, resume=resume, console=QUIET)


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(RunDir(run_dir).last))


@pytest.mark.parametrize("overrides", [
    ["train.two_step.balanced_epochs=1", "augment.mixup_alpha=0.4", "augment.soft_dilation_factor=1.0"],
    [*SOFTSEG, "train.two_step.balanced_epochs=2"],
], ids=["two_step+mixup+dilation", "softseg+two_step"])
def test_scheme_runs_record_phases_and_resume_exactly(tmp_path, monkeypatch, overrides):
    from safetensors import safe_open

    full = _train(tmp_path / "a", overrides)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    balanced = int(overrides[-1].split("=")[1]) if "two_step" in overrides[-1] else int(overrides[0].split("=")[1])
    assert [r["phase"] for r in log] == ["balanced"] * balanced + ["natural"] * (3 - balanced)
    assert all(np.isfinite(r["train_loss"]) and 0.0 <= r["val_dice"] <= 1.0 for r in log)
    assert full.epochs_done == 3

    calls = {"n": 0}
    original = BatchSampler.next_batch

    def interrupting(self, batch_size):
        calls["n"] += 1
        if calls["n"] == 5:  # inside epoch 2 (step 2 of 3)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch_size)

    monkeypatch.setattr(BatchSampler, "next_batch", interrupting)
    first = _train(tmp_path / "b", overrides)
    monkeypatch.setattr(BatchSampler, "next_batch", original)
    assert first.interrupted and first.epochs_done == 1
    with safe_open(str(RunDir(tmp_path / "b").last), framework="pt") as fh:
        trainer = json.loads(fh.metadata()["trainer"])
    assert trainer["epoch"] == 1 and trainer["step"] == 2  # stopped after the second step of epoch 2
    assert trainer["phase"] == phase(2, balanced)  # the checkpoint says which phase the epoch was in
    resumed = _train(tmp_path / "b", overrides, resume=True)
    assert resumed.epochs_done == 3
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_softseg_run_validates_and_evaluates_with_normalized_relu(tmp_path, monkeypatch):
    from edgeseg.train import inference

    seen = []
    original = inference.predict_probabilities

    def recording(*args, **kwargs):
        seen.append(kwargs.get("activation", "softmax"))
        return original(*args, **kwargs)

    monkeypatch.setattr(inference, "predict_probabilities", recording)
    _train(tmp_path / "run", [*SOFTSEG, "train.epochs=1"])
    from edgeseg.train.experiment import evaluate_run

    metrics = evaluate_run(tmp_path / "run", data=None, split="test", console=QUIET)
    assert set(metrics["summary"]) == {"sphere", "blob", "mean"}
    assert seen and set(seen) == {"normalized_relu"}


def test_softseg_learns_the_phantoms(tmp_path):
    """SoftSeg end to end (soft labels, normalized ReLU, Adaptive Wing) reaches a clear validation Dice, like the
    softmax + Dice/CE run of test_training (measured: 0.19 after epoch 1, 0.85 after epoch 6)."""
    from edgeseg.train.experiment import train_experiment

    cfg = load_experiment(None, [*SOFTSEG, "data.root=synthetic", "data.class_names=[background, sphere, blob]",
                                 "data.synthetic_cases=10", "data.synthetic_shape=[32, 32, 32]",
                                 "data.patch_size=[16, 16, 16]", "data.inference_tile=[32, 32, 32]", "model.depth=2",
                                 "model.base_width=8", "train.batch_size=2", "train.num_threads=1",
                                 "train.deterministic=true", "train.epochs=6", "train.steps_per_epoch=12",
                                 "train.lr=0.003"])
    dices = [r["val_dice"] for r in train_experiment(cfg, tmp_path / "run", console=QUIET).history]
    assert dices[-1] > dices[0] + 0.3 and max(dices) > 0.7, dices


def test_a_kill_between_checkpoint_and_log_line_loses_no_log_line(tmp_path, monkeypatch):
    """The epoch's checkpoint is written before its log line; a kill in between is repaired on resume from the
    record the checkpoint carries (the log then matches the uninterrupted run's)."""
    overrides = ["train.two_step.balanced_epochs=1"]
    _train(tmp_path / "a", overrides)
    original = RunDir.append_log

    def killed_at_epoch_2(self, record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt  # as a SIGKILL: nothing after this point runs
        original(self, record)

    monkeypatch.setattr(RunDir, "append_log", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", overrides)
    monkeypatch.setattr(RunDir, "append_log", original)
    assert RunDir(tmp_path / "b").last_logged_epoch() == 1
    _train(tmp_path / "b", overrides, resume=True)
    logs = [[json.loads(x) for x in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("a", "b")]
    assert [(r["epoch"], r["train_loss"], r["phase"]) for r in logs[1]] == \
        [(r["epoch"], r["train_loss"], r["phase"]) for r in logs[0]]


def test_softseg_carries_through_qat_and_export(tmp_path):
    """A SoftSeg run's QAT trains with its loss and activation, and its bundles say normalized_relu, so the
    runtime reads soft maps rather than a softmax of what was never logits."""
    from edgeseg.export.run_export import export_run
    from edgeseg.quantize.qat import quantize_run

    _train(tmp_path / "run", SOFTSEG + ["train.epochs=1"])
    metrics = quantize_run(tmp_path / "run", "8/8", tmp_path / "q", epochs=1, console=QUIET)
    assert metrics["splits"]["test"]["dice_quant"] >= 0.0
    float_bundle = export_run(tmp_path / "run", tmp_path / "b_float")
    quant_bundle = export_run(tmp_path / "q", tmp_path / "b_q")
    assert float_bundle.manifest.output_kind == quant_bundle.manifest.output_kind == "normalized_relu"
    assert export_run(tmp_path / "run", tmp_path / "plain", overwrite=True).manifest.output_kind == "normalized_relu"
    _train(tmp_path / "softmax_run", ["train.epochs=1"])
    assert export_run(tmp_path / "softmax_run", tmp_path / "b_softmax").manifest.output_kind == "logits"
