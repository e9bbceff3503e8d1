"""INERRANT's learned True-Class-Probability confidence (`train.inerrant.confidence: tcp`, edgeseg.train.tcp).

Oracles: TCP targets and the L2 loss computed by hand; the network's own final conv applied to the tapped
features (it must give the network's output back); gradients and parameter snapshots for "the head learns, the
network does not"; hand-made confidence maps whose ranking is read off by hand; and, for whole runs, the
uninterrupted run for resume.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from tiny_runs import TINY_INERRANT_RUN, phantom_cases

from edgeseg.config import load_experiment
from edgeseg.errors import UserError
from edgeseg.nets import UNet
from edgeseg.runtime.bundle import MULTILABEL_BACKGROUND
from edgeseg.train.inerrant import Relabeller, partial_targets, select_pseudo_labels
from edgeseg.train.rundir import RunDir
from edgeseg.train.sampling import Batch
from edgeseg.train.schemes import build_relabeller, build_sampler
from edgeseg.train.tcp import TcpConfidence, TcpHead, head_loss, tap_features, tcp_loss, tcp_targets

QUIET = Console(quiet=True)
INERRANT = ["train.scheme=inerrant", "loss.name=partial_bce"]
NAN = float("nan")
F, T = False, True
LN3 = math.log(3.0)

# ------------------------------------------------------------------------------------- target and loss


def test_tcp_target_and_loss_by_hand():
    # 4 voxels; sphere annotated, blob missing; voxels 0 and 3 are spheres, 1 and 2 unlabelled
    targets = torch.tensor([[[0.0, NAN, NAN, 0.0],      # background: ambiguous on unlabelled voxels
                             [1.0, 0.0, 0.0, 1.0],      # sphere: known everywhere
                             [0.0, NAN, NAN, 0.0]]])    # blob: known negatives on the spheres only
    scores = torch.tensor([[[9.0, 9.0, 9.0, 9.0],       # background channel: not a sigmoid output, dropped
                            [0.0, LN3, -LN3, LN3],      # sphere p = 1/2, 3/4, 1/4, 3/4
                            [LN3, 0.0, -LN3, -LN3]]])   # blob p = 3/4, 1/2, 1/4, 1/4
    tcp = tcp_targets(scores, targets)
    by_hand = torch.tensor([[[1 / 2, 1 / 4, 3 / 4, 3 / 4],   # sphere: p on positives, 1 - p on negatives
                             [1 / 4, NAN, NAN, 3 / 4]]])     # blob: 1 - p on the known negatives, excluded elsewhere
    torch.testing.assert_close(tcp, by_hand, equal_nan=True)
    # the same targets as the sampler builds them from the partial label
    sampled = torch.from_numpy(partial_targets(np.array([1, 0, 0, 1]), np.array([F, T, F])))[None]
    torch.testing.assert_close(tcp_targets(scores, sampled), by_hand, equal_nan=True)

    # L2 with the head at sigmoid(0) = 1/2: errors 0, 1/4, 1/4, 1/4 (sphere) and 1/4, 1/4 (blob) on 6 known entries
    logits = torch.zeros(1, 2, 4, requires_grad=True)
    loss = tcp_loss(logits, tcp)
    assert loss.item() == pytest.approx(5 / 16 / 6, rel=1e-6)
    loss.backward()
    # d/dz (sigmoid(z) - t)^2 / 6 = 2 (1/2 - t) (1/4) / 6 = +-1/48; nothing flows from the excluded voxels
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.0, 1, -1, -1], [1, 0, 0, -1]]]) / 48)
    changed = torch.zeros(1, 2, 4)
    changed[0, 1, 1:3] = torch.tensor([30.0, -30.0])
    assert tcp_loss(changed, tcp).item() == pytest.approx(5 / 16 / 6, rel=1e-6)
    assert tcp_loss(logits, torch.full_like(tcp, NAN)).item() == 0.0


def _net(spatial_dims: int = 3) -> UNet:
    torch.manual_seed(0)
    return UNet(spatial_dims, 1, 3, depth=1, base_width=4, norm="batch")


def test_the_head_learns_and_the_network_does_not():
    model = _net()
    x = torch.randn(2, 1, 8, 8, 8)
    labels = torch.randint(0, 3, (2, 8, 8, 8)).numpy()
    y = torch.from_numpy(np.stack([partial_targets(lab, np.array([F, T, F])) for lab in labels]))
    with torch.no_grad(), tap_features(model) as captured:
        out = model(x)
    assert captured[0].shape == (2, 4, 8, 8, 8)
    torch.testing.assert_close(model.head(captured[0]), out)  # the features are what the final 1x1 conv reads

    head = TcpHead(3, 4, 2)
    model.train()
    loss = head_loss(model, head, x, y)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert all(p.grad is None for p in model.parameters())  # the network is not differentiated

    class FixedBatches:
        def next_batch(self, batch_size):
            return Batch(x.numpy(), y.numpy())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    confidence = TcpConfidence(steps=40, lr=1e-2, batch_size=2, seed=0)
    first = TcpConfidence(steps=1, lr=1e-2, batch_size=2, seed=0).fit(model, FixedBatches(), torch.device("cpu"))
    last = confidence.fit(model, FixedBatches(), torch.device("cpu"))
    assert last < 0.5 * first  # the head fits the TCP of this batch
    for key, value in model.state_dict().items():  # weights and batch-norm statistics untouched
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    # the seed alone fixes the head's start, and building it leaves the global RNG where it was
    state = torch.get_rng_state()
    a, b = TcpConfidence(1, 1e-3, 2, seed=3), TcpConfidence(1, 1e-3, 2, seed=3)
    a._head(model, torch.device("cpu")), b._head(model, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)
    for key, value in a.tensors().items():
        torch.testing.assert_close(value, b.tensors()[key], rtol=0, atol=0)


def test_a_network_without_a_final_1x1_conv_is_refused():
    class NoHead(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(UserError, match="final 1x1 conv"):
        TcpConfidence(1, 1e-3, 2, 0).check(NoHead())


# ------------------------------------------------------------------------------------- ranking


def test_ranking_by_a_given_confidence_by_hand():
    # 6 voxels; voxel 0 a labelled sphere; blob missing. Rule: voxels 1-3 -> blob, 4 -> background, 5 -> sphere
    p_sphere = [0.9, 0.1, 0.1, 0.1, 0.1, 0.75]
    p_blob = [0.95, 0.8, 0.6, 0.95, 0.3, 0.7]
    probs = np.array([[MULTILABEL_BACKGROUND] * 6, p_sphere, p_blob], np.float32)
    label, flags = np.array([1, 0, 0, 0, 0, 0]), np.array([F, T, F])
    # blob confidence: voxel 2 > voxel 3 > voxel 1 (max probability would say 3 > 1 > 2); voxels 0 and 4 are
    # more confident still but are not candidates (labelled; predicted background)
    confidence = np.array([[0.0] * 6, [0.99] * 6, [0.99, 0.2, 0.9, 0.5, 0.99, 0.1]], np.float32)
    for gamma, expected in ((0.3, []), (0.4, [2]), (0.7, [2, 3]), (1.0, [2, 3, 1])):
        index, classes = select_pseudo_labels(probs, label, flags, gamma, confidence)
        assert index.tolist() == expected and classes.tolist() == [2] * len(expected), gamma
    assert select_pseudo_labels(probs, label, flags, 1.0)[0].tolist() == [3, 1, 2]  # max probability
    tie = confidence.copy()
    tie[2, 1:4] = 0.5
    assert select_pseudo_labels(probs, label, flags, 1.0, tie)[0].tolist() == [1, 2, 3]  # ties: lower index first
    # in 3D, with the confidence on the case's grid
    index, _ = select_pseudo_labels(probs.reshape(3, 1, 2, 3), label.reshape(1, 2, 3), flags, 0.7,
                                    confidence.reshape(3, 1, 2, 3))
    assert index.tolist() == [2, 3]


def test_relabelling_ranks_by_the_head_fitted_on_annotations_only():
    cfg = load_experiment(None, [*INERRANT, "data.class_names=[background, sphere, blob]", "train.epochs=3",
                                 "train.inerrant.initial_epochs=1", "train.inerrant.relabel_steps=2",
                                 "train.inerrant.gamma_max=1.0", "train.inerrant.confidence=tcp",
                                 "data.partial_labels={c0: [sphere]}"])
    cases = phantom_cases(2, (16, 16, 16))
    sampler = build_sampler(cfg, cases, (16, 16, 16), 3, seed=0)
    relabeller = build_relabeller(cfg, cases, sampler, (16, 16, 16))
    assert isinstance(relabeller.confidence, TcpConfidence) and relabeller.confidence.steps == 200
    erased = np.where(cases[0].label == 2, 0, cases[0].label)
    seen_at_fit = []

    class Stub(TcpConfidence):
        """Every voxel predicted blob; confidence rising with the flat index, so the last voxels rank first."""

        def fit(self, model, sampler, device):
            seen_at_fit.append(sampler.samplers[0].label.copy())
            self.last_loss = 0.25
            return 0.25

        def predict(self, model, image, tile, device):
            probs = np.zeros((3, *image.shape[1:]), np.float32)
            probs[0], probs[2] = MULTILABEL_BACKGROUND, 0.9
            return probs, np.broadcast_to(np.arange(probs[0].size, dtype=np.float32).reshape(probs.shape[1:]),
                                          probs.shape).copy()

    relabeller.confidence = Stub(1, 1e-3, 2, 0)
    relabeller.confidence.check = lambda model: None
    unlabelled = np.flatnonzero(erased.ravel() == 0)
    for epoch, gamma in ((2, 0.5), (3, 1.0)):
        relabeller.begin_epoch(epoch, model=None, device=torch.device("cpu"), console=QUIET)
        np.testing.assert_array_equal(seen_at_fit[-1], erased)  # the head never sees last step's pseudo-labels
        take = math.floor(gamma * len(unlabelled))
        assert relabeller.pseudo[0][0].tolist() == unlabelled[::-1][:take].tolist()  # highest confidence first
    assert relabeller.log_fields()["tcp_loss"] == 0.25
    # a checkpoint without the head cannot resume a tcp run past step 0
    state, tensors = relabeller.state(), {Relabeller.TENSOR: relabeller.tensors()[Relabeller.TENSOR]}
    fresh = build_relabeller(cfg, cases, build_sampler(cfg, cases, (16, 16, 16), 3, seed=0), (16, 16, 16))
    with pytest.raises(UserError, match="no TCP head"):
        fresh.restore(state, tensors)


def test_tcp_settings_are_checked():
    assert load_experiment(None, [*INERRANT, "train.inerrant.confidence=tcp"]).train.inerrant.confidence == "tcp"
    with pytest.raises(UserError, match="tcp_steps must be >= 1"):
        load_experiment(None, [*INERRANT, "train.inerrant.tcp_steps=0"])
    with pytest.raises(UserError, match="tcp_lr must be positive"):
        load_experiment(None, [*INERRANT, "train.inerrant.tcp_lr=0"])


# ------------------------------------------------------------------------------------- whole runs


TINY = [
    *TINY_INERRANT_RUN,
    "train.inerrant.confidence=tcp",
    "train.inerrant.tcp_steps=4",
]


def _train(out, *, resume=False):
    from edgeseg.train.experiment import train_experiment

    return train_experiment(load_experiment(None, TINY), out, resume=resume, console=QUIET)


def _last(run_dir):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(RunDir(run_dir).last), framework="pt") as fh:
        trainer = json.loads(fh.metadata()["trainer"])
    return trainer, load_file(str(RunDir(run_dir).last))


def test_a_tcp_run_relabels_resumes_exactly_and_deploys_without_the_head(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from edgeseg.quantize.qat import quantize_run
    from edgeseg.train.experiment import load_run_model

    _train(tmp_path / "a")
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["relabel_step"] for r in log] == [0, 0, 1, 2]
    assert [r["tcp_loss"] is None for r in log] == [True, True, False, False]
    assert all(0.0 <= r["tcp_loss"] <= 1.0 for r in log[2:]) and 0 < log[2]["pseudo_voxels"] < log[3]["pseudo_voxels"]
    _, a = _last(tmp_path / "a")
    head_keys = {k for k in a if k.startswith("extra/" + TcpConfidence.PREFIX)}
    assert a["extra/inerrant/tcp/layers.0.weight"].shape == (4, 4, 3, 3, 3) and len(head_keys) == 6
    assert not any("tcp" in k for k in load_file(str(RunDir(tmp_path / "a").best)))  # the deployed model
    load_run_model(tmp_path / "a")  # strict load: the weights are exactly the network's

    original = Relabeller.begin_epoch

    def interrupting(self, epoch, model, device, console):
        original(self, epoch, model, device, console)
        if epoch == 3:  # right after relabelling step 1 (the head fitted once)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Relabeller, "begin_epoch", interrupting)
    assert _train(tmp_path / "b").interrupted
    monkeypatch.setattr(Relabeller, "begin_epoch", original)
    trainer, saved = _last(tmp_path / "b")
    assert trainer["epoch"] == 2 and trainer["relabel"]["step"] == 1 and "extra/inerrant/tcp/layers.0.weight" in saved
    assert _train(tmp_path / "b", resume=True).epochs_done == 4  # step 2's head starts from the restored one
    _, b = _last(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    metrics = quantize_run(tmp_path / "a", "8/8", tmp_path / "q", epochs=1, console=QUIET,
                           overrides=["quant.steps_per_epoch=1", "quant.calibration_batches=1"])
    assert 0.0 <= metrics["splits"]["test"]["dice_quant"] <= 1.0


DDP = [*TINY, "model.norm=none", "train.amp=false", "data.synthetic_cases=6", "data.synthetic_shape=[16, 16, 16]",
       "data.inference_tile=[16, 16, 16]", "train.epochs=2", "train.inerrant.initial_epochs=1",
       "train.inerrant.relabel_steps=1", "train.inerrant.gamma_max=0.5", "train.batch_size=4",
       "data.partial_labels={phantom_000: [sphere], phantom_002: [sphere], phantom_004: [sphere]}"]


def support_path() -> str:
    """PYTHONPATH for this file run as a script by torchrun: tests/support (pytest's `pythonpath`) first."""
    support = str(Path(__file__).resolve().parents[1] / "support")
    return os.pathsep.join(p for p in (support, os.environ.get("PYTHONPATH", "")) if p)


@pytest.mark.slow
def test_two_processes_fit_the_same_head_as_one(tmp_path):
    """Under torchrun each rank fits the head on its share of the global batch, the gradients summed: the head,
    the pseudo-labels and the network match the single-process run (test_distributed's tolerance, 1e-6)."""
    from edgeseg.train.experiment import train_experiment

    train_experiment(load_experiment(None, DDP), tmp_path / "single", resume=False, console=QUIET)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               str(tmp_path / "ddp")]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": support_path()})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    logs = [[json.loads(line) for line in (tmp_path / r / "log.jsonl").read_text().splitlines()]
            for r in ("single", "ddp")]
    assert logs[1][-1]["processes"] == 2 and logs[0][-1]["pseudo_voxels"] > 0
    assert [r["pseudo_voxels"] for r in logs[1]] == [r["pseudo_voxels"] for r in logs[0]]
    assert logs[1][-1]["tcp_loss"] == pytest.approx(logs[0][-1]["tcp_loss"], abs=1e-6)
    (_, single), (_, ddp) = _last(tmp_path / "single"), _last(tmp_path / "ddp")
    assert single.keys() == ddp.keys()
    for key in single:
        if key.startswith(("model/", "extra/inerrant/tcp/")):
            torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-6, msg=key)
    # the same pseudo-labels (listed in confidence order, so near-ties may swap places: compared as sets)
    pseudo = [{tuple(row) for row in run["extra/inerrant/pseudo"].T.tolist()} for run in (single, ddp)]
    assert pseudo[0] == pseudo[1]


if __name__ == "__main__":  # a torchrun worker of test_two_processes_fit_the_same_head_as_one
    from edgeseg.train.experiment import train_experiment

    train_experiment(load_experiment(None, DDP), Path(sys.argv[1]), resume=False, console=QUIET)
