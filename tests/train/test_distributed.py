"""Data-parallel training: 2 gloo processes on the CPU follow the single-process run with the same global batch.

The 2-process runs go through torchrun (`python -m torch.distributed.run --standalone`), which runs
this file as its worker script (`worker_main` below), so they exercise the real launcher, the
process group init from torchrun's environment variables, DDP, the sharded sampler, the gathered
validation and the rank-0-only writes. Every optimizer step's parameters are recorded on every rank
(a global optimizer step hook) and compared:

- rank 0 and rank 1 after each step: bit-identical (DDP gives every rank the same averaged gradient);
- 2 processes x 2 samples vs 1 process x 4 samples, after each step: within 1e-6 absolute (float32
  gradients summed in another order; measured differences here are ~3e-8). The model has no
  normalization layers and the loss is a mean over samples (Dice with dice_reduction=sample + CE),
  so the two runs compute the same gradient in exact arithmetic; mixed precision is off.
- a single-process run interrupted mid-epoch and resumed with 2 processes ends within 1e-6 of the
  uninterrupted single-process run (the checkpoint is independent of the number of processes).
- the same holds with every training scheme on at once (two-step class sampling, mixup, soft-label
  dilation, SoftSeg's normalized ReLU + Adaptive Wing): each rank builds its share of the global
  batch and each loss is a mean over samples.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

TOLERANCE = 1e-6  # absolute, on parameters after each step (AdamW, lr 1e-3)
EPOCHS, STEPS = 2, 3
CONFIG = [
    "data.root=synthetic",
    "data.class_names=[background, sphere, blob]",
    "data.synthetic_cases=10",
    "data.synthetic_shape=[24, 24, 24]",
    "data.patch_size=[16, 16, 16]",
    "data.inference_tile=[32, 32, 32]",
    "model.depth=2",
    "model.base_width=4",
    "model.norm=none",
    "loss.dice_reduction=sample",
    "train.batch_size=4",
    f"train.epochs={EPOCHS}",
    f"train.steps_per_epoch={STEPS}",
    "train.amp=false",
    "train.num_threads=1",
    "train.deterministic=true",
]


def _flat_parameters(optimizer: torch.optim.Optimizer) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for g in optimizer.param_groups for p in g["params"]]).cpu().numpy().copy()


SCHEMES = [  # every training scheme at once; 8^3 patches leave room for negative (foreground-free) windows
    "data.patch_size=[8, 8, 8]",
    "model.depth=1",
    "train.two_step.balanced_epochs=1",
    "augment.mixup_alpha=0.4",
    "augment.soft_dilation_factor=1.0",
    "train.scheme=softseg",
    "loss.name=adaptive_wing",
    "loss.heatmap_activation=none",
    "loss.dice_reduction=batch",
]


def train_recording(out: Path, resume: bool = False, overrides: list[str] | None = None) -> np.ndarray:
    """Train (or resume) the tiny experiment in `out`; the parameters after every optimizer step, (steps, P)."""
    from rich.console import Console

    from edgeseg.config import load_experiment
    from edgeseg.train.experiment import train_experiment

    steps: list[np.ndarray] = []
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: steps.append(_flat_parameters(opt)))
    try:
        train_experiment(load_experiment(None, CONFIG + list(overrides or [])), out, resume=resume,
                         console=Console(quiet=True))
    finally:
        handle.remove()
    return np.stack(steps)


def worker_main(jobs_file: str) -> None:
    """One torchrun worker: run each job ({"out", "resume", "record"[, "overrides"]}) and save its per-step parameters."""
    rank = int(os.environ["RANK"])
    for job in json.loads(Path(jobs_file).read_text()):
        record = train_recording(Path(job["out"]), resume=job["resume"], overrides=job.get("overrides"))
        np.save(f"{job['record']}_rank{rank}.npy", record)


def run_torchrun(jobs: list[dict], tmp: Path) -> None:
    jobs_file = tmp / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               str(jobs_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_and_resume_across_world_sizes(tmp_path, monkeypatch):
    from edgeseg.train.rundir import RunDir
    from edgeseg.train.sampling import BatchSampler

    single = train_recording(tmp_path / "single")
    assert single.shape[0] == EPOCHS * STEPS

    # a single-process run stopped by Ctrl-C in the middle of epoch 2 (state saved after step 5)
    calls = {"n": 0}
    original = BatchSampler.next_batch

    def interrupting(self, batch_size):
        calls["n"] += 1
        if calls["n"] == STEPS + 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch_size)

    monkeypatch.setattr(BatchSampler, "next_batch", interrupting)
    interrupted = train_recording(tmp_path / "resumed")
    monkeypatch.setattr(BatchSampler, "next_batch", original)
    assert len(interrupted) == STEPS + 2

    run_torchrun([{"out": str(tmp_path / "ddp"), "resume": False, "record": str(tmp_path / "ddp")},
                  {"out": str(tmp_path / "resumed"), "resume": True, "record": str(tmp_path / "resumed")}], tmp_path)

    ddp = [np.load(tmp_path / f"ddp_rank{r}.npy") for r in (0, 1)]
    assert ddp[0].shape == single.shape
    for step in range(len(single)):
        np.testing.assert_array_equal(ddp[0][step], ddp[1][step], err_msg=f"ranks differ after step {step + 1}")
        np.testing.assert_allclose(ddp[0][step], single[step], rtol=0, atol=TOLERANCE,
                                   err_msg=f"2 processes differ from 1 after step {step + 1}")
    assert np.abs(ddp[0][-1] - single[0]).max() > 100 * TOLERANCE  # training moved the weights: the check has teeth

    resumed = [np.load(tmp_path / f"resumed_rank{r}.npy") for r in (0, 1)]
    assert len(resumed[0]) == len(single) - len(interrupted)
    np.testing.assert_array_equal(resumed[0], resumed[1])
    np.testing.assert_allclose(resumed[0], single[len(interrupted):], rtol=0, atol=TOLERANCE)

    # rank 0 alone wrote the log (one line per epoch) and an unwrapped checkpoint; validation was gathered
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    single_log = [json.loads(line) for line in (tmp_path / "single" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, EPOCHS + 1))
    assert all(r["processes"] == 2 for r in log)
    for a, b in zip(log, single_log):
        assert a["val_dice"] == pytest.approx(b["val_dice"], abs=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
    from safetensors.torch import load_file

    keys = load_file(str(RunDir(tmp_path / "ddp").last)).keys()
    assert not any(k.startswith("model/module.") for k in keys)



@pytest.mark.slow
def test_training_schemes_under_two_processes_match_one_process(tmp_path):
    single = train_recording(tmp_path / "single", overrides=SCHEMES)
    run_torchrun([{"out": str(tmp_path / "ddp"), "resume": False, "record": str(tmp_path / "ddp"),
                   "overrides": SCHEMES}], tmp_path)
    ddp = [np.load(tmp_path / f"ddp_rank{r}.npy") for r in (0, 1)]
    assert ddp[0].shape == single.shape == (EPOCHS * STEPS, single.shape[1])
    for step in range(len(single)):
        np.testing.assert_array_equal(ddp[0][step], ddp[1][step], err_msg=f"ranks differ after step {step + 1}")
        np.testing.assert_allclose(ddp[0][step], single[step], rtol=0, atol=TOLERANCE,
                                   err_msg=f"2 processes differ from 1 after step {step + 1}")
    assert np.abs(ddp[0][-1] - single[0]).max() > 100 * TOLERANCE
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["balanced", "natural"]


if __name__ == "__main__":  # a torchrun worker (see run_torchrun)
    worker_main(sys.argv[1])
