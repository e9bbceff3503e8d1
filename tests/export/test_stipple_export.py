"""`edgeseg export` of a STIPPLE run copies only the prior the run recorded: a prior file changed or missing since
training, or a run without the record, stops the export before anything is written (the bundle itself, its
manifest and the runtime's use of it: tests/runtime/test_stipple_runtime.py)."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from edgeseg.config import load_experiment
from edgeseg.errors import UserError

TINY = ["data.root=synthetic", "data.class_names=[background, sphere, blob]", "data.synthetic_cases=6",
        "data.synthetic_shape=[24, 24, 24]", "data.patch_size=[8, 8, 8]", "data.inference_tile=[24, 24, 24]",
        "model.depth=1", "model.base_width=4", "train.batch_size=2", "train.num_threads=1", "train.epochs=1",
        "train.steps_per_epoch=1", "train.scheme=stipple"]


def test_export_refuses_a_prior_changed_or_missing_since_training(tmp_path):
    from edgeseg.export.run_export import export_run
    from edgeseg.train.experiment import train_experiment

    run = tmp_path / "run"
    train_experiment(load_experiment(None, TINY), run, console=Console(quiet=True))
    stored = (run / "stipple" / "reference_label.npy").read_bytes()
    (run / "stipple" / "reference_label.npy").write_bytes(stored[:-1] + bytes([stored[-1] ^ 1]))
    with pytest.raises(UserError, match="reference_label.npy changed since training"):
        export_run(run, tmp_path / "bundle")
    (run / "stipple" / "reference_label.npy").unlink()
    with pytest.raises(UserError, match="reference_label.npy is missing"):
        export_run(run, tmp_path / "bundle")
    info = json.loads((run / "run.json").read_text())
    info["extra"].pop("stipple")
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="records no STIPPLE prior"):
        export_run(run, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
