"""End-to-end training on synthetic phantoms: learning happens, resume is exact, errors are clear."""

import json
import os
import signal

import numpy as np
import pytest
import torch
from rich.console import Console

from edgeseg.config import load_experiment
from edgeseg.errors import UserError
from edgeseg.train.experiment import evaluate_run, train_experiment
from edgeseg.train.rundir import RunDir
from edgeseg.train.sampling import BatchSampler

QUIET = Console(quiet=True)

TINY = [
    "data.root=synthetic",
    "data.class_names=[background, sphere, blob]",
    "data.synthetic_cases=10",
    "data.synthetic_shape=[24, 24, 24]",
    "data.patch_size=[16, 16, 16]",
    "data.inference_tile=[32, 32, 32]",
    "model.depth=2",
    "model.base_width=4",
    "train.batch_size=2",
    "train.num_threads=1",
    "train.deterministic=true",
]


def test_validation_dice_rises_clearly(tmp_path):
    cfg = load_experiment(None, TINY + ["train.epochs=6", "train.steps_per_epoch=12", "train.lr=0.01",
                                        "model.base_width=8", "data.synthetic_shape=[32, 32, 32]"])
    result = train_experiment(cfg, tmp_path / "run", console=QUIET)
    dices = [r["val_dice"] for r in result.history]
    assert dices[-1] > dices[0] + 0.2, dices
    assert result.best_dice >= 0.5, dices
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 7))
    metrics = evaluate_run(tmp_path / "run", data=None, split="test", console=QUIET)
    assert set(metrics["summary"]) == {"sphere", "blob", "mean"}
    assert metrics["summary"]["mean"]["dice"]["mean"] > 0.4


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(RunDir(run_dir).last))


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, monkeypatch):
    cfg = load_experiment(None, TINY + ["train.epochs=3", "train.steps_per_epoch=4", "model.dropout=0.2"])
    train_experiment(cfg, tmp_path / "a", console=QUIET)

    calls = {"n": 0}
    original = BatchSampler.next_batch

    def interrupting(self, batch_size):
        calls["n"] += 1
        if calls["n"] == 6:  # in the middle of epoch 2: a real SIGINT, as Ctrl-C sends
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch_size)

    monkeypatch.setattr(BatchSampler, "next_batch", interrupting)
    first = train_experiment(cfg, tmp_path / "b", console=QUIET)
    assert first.interrupted and first.epochs_done == 1
    monkeypatch.setattr(BatchSampler, "next_batch", original)
    resumed = train_experiment(cfg, tmp_path / "b", resume=True, console=QUIET)
    assert not resumed.interrupted and resumed.epochs_done == 3
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    log_a = [json.loads(x)["train_loss"] for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x)["train_loss"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(log_a, log_b, rtol=0, atol=0)


def test_refuses_to_overwrite_and_to_resume_nothing(tmp_path):
    cfg = load_experiment(None, TINY + ["train.epochs=1", "train.steps_per_epoch=1"])
    with pytest.raises(UserError, match="nothing to resume"):
        train_experiment(cfg, tmp_path / "run", resume=True, console=QUIET)
    train_experiment(cfg, tmp_path / "run", console=QUIET)
    with pytest.raises(UserError, match="already holds a run"):
        train_experiment(cfg, tmp_path / "run", console=QUIET)


def test_patch_not_divisible_by_depth_is_a_user_error(tmp_path):
    cfg = load_experiment(None, TINY + ["data.patch_size=[18, 16, 16]", "train.epochs=1"])
    with pytest.raises(UserError, match="must be divisible by 4"):
        train_experiment(cfg, tmp_path / "run", console=QUIET)


def test_2d_model_trains_on_slices_of_3d_volumes(tmp_path):
    cfg = load_experiment(None, TINY + ["data.spatial_dims=2", "data.patch_size=[16, 16]", "data.inference_tile=[32, 32]", "train.epochs=1",
                                        "train.steps_per_epoch=2"])
    result = train_experiment(cfg, tmp_path / "run", console=QUIET)
    assert result.epochs_done == 1 and result.best_dice is not None


@pytest.mark.parametrize("model,needs", [("film_unet", "per-case metadata"), ("hemis_unet", "modality masks")])
def test_models_needing_extra_inputs_are_refused_without_their_data_config(tmp_path, model, needs):
    """FiLM / HeMIS train only with data.metadata / data.modalities (tests/train/test_extra_inputs.py)."""
    cfg = load_experiment(None, ["data.root=synthetic", f"model.name={model}"])
    with pytest.raises(UserError, match=f"needs {needs}"):
        train_experiment(cfg, tmp_path / "run", console=QUIET)
    assert not (tmp_path / "run").exists()  # refused before anything was written
