"""FiLM metadata and HeMIS modality masks through the batch sampler, `edgeseg train` and `edgeseg evaluate`."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from edgeseg.config import load_experiment
from edgeseg.data.augment import Compose
from edgeseg.data.cases import PreparedCase
from edgeseg.data.io import Volume
from edgeseg.errors import UserError
from edgeseg.train import inputs as inputs_module
from edgeseg.train.experiment import evaluate_run, load_run_model, train_experiment
from edgeseg.train.rundir import RunDir
from edgeseg.train.sampling import BatchSampler

QUIET = Console(quiet=True)
TINY = ["data.root=synthetic", "data.class_names=[background, sphere, blob]", "data.synthetic_cases=6",
        "data.synthetic_shape=[16, 16, 16]", "data.patch_size=[16, 16, 16]", "model.depth=2", "model.base_width=4",
        "train.batch_size=2", "train.num_threads=1", "train.deterministic=true", "train.epochs=1",
        "train.steps_per_epoch=3"]
FILM = ["model.name=film_unet", "data.synthetic_metadata=true", "data.metadata={fields: [contrast, gain]}"]
HEMIS = ["model.name=hemis_unet", "data.synthetic_modalities=3", "data.synthetic_missing=0.4",
         "data.modalities={drop_prob: 0.5}"]


def _case(name: str, value: float, channels: int = 1, mask=None, metadata=None) -> PreparedCase:
    image = np.full((channels, 8, 8, 8), value, np.float32)
    if mask is not None:
        image[~np.asarray(mask)] = 0.0
    label = np.zeros((8, 8, 8), np.uint8)
    label[2:6, 2:6, 2:6] = 1
    return PreparedCase(name, image, label, (1.0,) * 3, Volume(image, np.eye(4), (1.0,) * 3), label,
                        metadata=None if metadata is None else np.asarray(metadata, np.float32),
                        modality_mask=None if mask is None else np.asarray(mask))


def test_batches_carry_each_samples_own_metadata():
    cases = [_case("a", 1.0, metadata=[10.0, -1.0]), _case("b", 2.0, metadata=[20.0, -2.0])]
    sampler = BatchSampler(cases, (8, 8, 8), 0.0, Compose([]), seed=0, extra_inputs=("metadata",))
    batch = sampler.next_batch(16)
    assert batch.inputs["metadata"].shape == (16, 2) and batch.inputs["metadata"].dtype == np.float32
    which = batch.images[:, 0, 0, 0, 0]  # each image is its case's constant
    assert set(which) == {1.0, 2.0}
    np.testing.assert_array_equal(batch.inputs["metadata"][:, 0], 10.0 * which)
    np.testing.assert_array_equal(batch.inputs["metadata"][:, 1], -which)
    images, labels = batch  # image-only callers unpack two arrays
    assert images is batch.images and labels is batch.labels


def test_modality_dropping_keeps_one_never_revives_a_missing_one_and_zero_fills():
    cases = [_case("full", 1.0, channels=3), _case("gap", 2.0, channels=3, mask=[True, False, True])]
    sampler = BatchSampler(cases, (8, 8, 8), 0.0, Compose([]), seed=3, extra_inputs=("modality_mask",),
                           modality_drop=0.5)
    masks, images = [], []
    for _ in range(8):
        batch = sampler.next_batch(16)
        masks.append(batch.inputs["modality_mask"])
        images.append(batch.images)
    mask, image = np.concatenate(masks), np.concatenate(images)
    assert set(np.unique(mask)) == {0.0, 1.0} and (mask.sum(1) >= 1).all()
    channel_max = np.abs(image).reshape(len(image), 3, -1).max(-1)
    np.testing.assert_array_equal(channel_max > 0, mask > 0)  # absent channels are exactly zero, others not
    from_gap = image[:, 0, 0, 0, 0] == 2.0
    from_gap |= (image[:, 2, 0, 0, 0] == 2.0)
    assert from_gap.any() and (mask[from_gap, 1] == 0).all()  # the missing modality is never present
    assert 0 < mask[~from_gap].mean() < 1 and (mask[~from_gap].sum(1) < 3).any()  # drops do happen
    plain = BatchSampler(cases, (8, 8, 8), 0.0, Compose([]), seed=3, extra_inputs=("modality_mask",))
    gap_rows = plain.next_batch(64)
    is_gap = gap_rows.images[:, 0, 0, 0, 0] == 2.0
    np.testing.assert_array_equal(gap_rows.inputs["modality_mask"][is_gap], np.tile([1.0, 0.0, 1.0], (is_gap.sum(), 1)))


def _sidecar_oracle(root, names):
    """Mean and population std of (contrast, gain), read straight from the sidecar files."""
    rows = [[json.loads((root / "images" / n.replace(".nii.gz", ".json")).read_text())[f] for f in ("contrast", "gain")]
            for n in names]
    rows = np.array(rows, np.float64)
    return rows.mean(0), rows.std(0)


def test_film_trains_and_evaluates_with_the_training_splits_normalisation(tmp_path, monkeypatch):
    run = tmp_path / "run"
    result = train_experiment(load_experiment(None, TINY + FILM), run, console=QUIET)
    assert result.epochs_done == 1 and result.best_dice is not None
    info = RunDir(run).read_info()
    data = run / "synthetic_data"
    mean, std = _sidecar_oracle(data, json.loads((data / "splits.json").read_text())["train"])
    assert info.metadata["fields"] == ["contrast", "gain"] and info.metadata["method"] == "zscore"
    np.testing.assert_allclose(info.metadata["mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(info.metadata["std"], std, rtol=1e-12)
    assert RunDir(run).read_config().model.options["metadata_dim"] == 2

    def refit(*args, **kwargs):
        raise AssertionError("evaluation must reuse the recorded normalisation")

    monkeypatch.setattr(inputs_module, "fit_metadata", refit)
    seen = []
    model, _, _ = load_run_model(run)
    original = type(model).forward

    def recording(self, x, metadata=None):
        seen.append(metadata.detach().clone())
        return original(self, x, metadata)

    monkeypatch.setattr(type(model), "forward", recording)
    metrics = evaluate_run(run, data=None, split="test", console=QUIET, device="cpu")
    assert set(metrics["summary"]) == {"sphere", "blob", "mean"}
    test_names = json.loads((data / "splits.json").read_text())["test"]
    raw = [[json.loads((data / "images" / n.replace(".nii.gz", ".json")).read_text())[f] for f in ("contrast", "gain")]
           for n in test_names]
    expected = (np.array(raw) - mean) / std
    got = np.stack([s[0].numpy() for s in seen])  # one forward per (whole-volume) test case
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_hemis_trains_resumes_exactly_and_evaluates_on_a_subset_of_modalities(tmp_path, monkeypatch):
    cfg = load_experiment(None, TINY + HEMIS + ["train.epochs=2", "train.steps_per_epoch=2"])
    train_experiment(cfg, tmp_path / "a", console=QUIET)
    info = RunDir(tmp_path / "a").read_info()
    assert info.in_channels == 3 and info.modalities == ["mod0", "mod1", "mod2"]

    calls = {"n": 0}
    original = BatchSampler.next_batch

    def interrupting(self, batch_size):
        calls["n"] += 1
        if calls["n"] == 3:  # the first step of epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch_size)

    monkeypatch.setattr(BatchSampler, "next_batch", interrupting)
    assert train_experiment(cfg, tmp_path / "b", console=QUIET).interrupted
    monkeypatch.setattr(BatchSampler, "next_batch", original)
    assert train_experiment(cfg, tmp_path / "b", resume=True, console=QUIET).epochs_done == 2
    from safetensors.torch import load_file

    a, b = load_file(str(RunDir(tmp_path / "a").last)), load_file(str(RunDir(tmp_path / "b").last))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    from edgeseg.nets.hemis import HeMISUNet

    masks = []
    forward = HeMISUNet.forward

    def recording(self, x, modality_mask=None):
        masks.append(modality_mask[0].tolist())
        return forward(self, x, modality_mask)

    monkeypatch.setattr(HeMISUNet, "forward", recording)
    data = tmp_path / "a" / "synthetic_data"
    test = json.loads((data / "splits.json").read_text())["train"]  # 4 cases, 2 of them without mod0 and mod2
    on_disk = {n: [(data / "imagesTr" / n.replace(".nii.gz", f"_{m:04d}.nii.gz")).is_file() for m in range(3)]
               for n in test}  # oracle: which modality files exist
    full = evaluate_run(tmp_path / "a", data=None, split="train", console=QUIET, device="cpu")
    assert masks == [[float(p) for p in on_disk[n]] for n in full["cases"]]
    masks.clear()
    only = evaluate_run(tmp_path / "a", data=None, split="train", console=QUIET, device="cpu", modalities=["mod0", "mod2"])
    expected = {n: [float(p[0]), 0.0, float(p[2])] for n, p in on_disk.items()}
    assert only["skipped_cases"] == [n for n in test if not any(expected[n])] and only["skipped_cases"]
    assert masks == [expected[n] for n in only["cases"]] and len(masks) == len(test) - len(only["skipped_cases"])
    with pytest.raises(UserError, match=r"choose a non-empty subset of \['mod0', 'mod1', 'mod2'\]"):
        evaluate_run(tmp_path / "a", data=None, split="test", console=QUIET, device="cpu", modalities=["t1"])


@pytest.mark.parametrize("overrides,message", [
    (["model.name=film_unet"], "needs per-case metadata: set data.metadata"),
    (["model.name=hemis_unet"], "needs modality masks: set data.modalities"),
    (["data.metadata={fields: [age]}"], "data.metadata is set but model 'unet' takes no metadata input"),
    (FILM + ["augment.mixup_alpha=0.4"], "augment.mixup_alpha is not supported with model 'film_unet'"),
    (FILM + ["model.options={metadata_dim: 3}"], "metadata_dim is 3 but data.metadata.fields lists 2"),
])
def test_unfed_extra_inputs_are_refused_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train_experiment(load_experiment(None, TINY + overrides), tmp_path / "run", console=QUIET)
    assert not (tmp_path / "run").exists()


def test_film_metadata_from_a_table_beside_the_config(tmp_path):
    """A TSV found in the config's folder (not the data root) is recorded by absolute path; z-score by hand."""
    contrast = [0.0, 1.0, 4.0, 9.0, 16.0, 25.0]  # phantom_000 .. phantom_005
    (tmp_path / "meta.tsv").write_text("case\tcontrast\n" + "".join(f"phantom_{i:03d}\t{v}\n"
                                                                    for i, v in enumerate(contrast)))
    overrides = ["model.name=film_unet", "data.metadata={fields: [contrast], table: meta.tsv}", "train.steps_per_epoch=1"]
    train_experiment(load_experiment(None, TINY + overrides), tmp_path / "run", config_dir=tmp_path, console=QUIET)
    run = RunDir(tmp_path / "run")
    assert run.read_config().data.metadata.table == str((tmp_path / "meta.tsv").resolve())
    train = json.loads((tmp_path / "run" / "synthetic_data" / "splits.json").read_text())["train"]
    values = np.array([contrast[int(n[len("phantom_"):len("phantom_") + 3])] for n in train])
    info = run.read_info()
    assert info.metadata["mean"] == pytest.approx([values.mean()])
    assert info.metadata["std"] == pytest.approx([np.sqrt(((values - values.mean()) ** 2).mean())])


@pytest.mark.parametrize("config", ["film_phantoms.yaml", "hemis_phantoms.yaml"])
def test_shipped_configs_train_through_the_cli(tmp_path, config):
    from typer.testing import CliRunner

    from edgeseg.cli.app import app

    repo = Path(__file__).resolve().parents[2]
    tiny = ["data.synthetic_cases=5", "data.synthetic_shape=[16, 16, 16]", "data.patch_size=[16, 16, 16]",
            "model.base_width=4", "train.epochs=1", "train.steps_per_epoch=2", "train.num_threads=1"]
    args = ["train", str(repo / "configs" / config), "--out", str(tmp_path / "run")]
    for item in tiny:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "done" in result.output and RunDir(tmp_path / "run").best.is_file()
    if config.startswith("hemis"):  # evaluate on one modality through the CLI flag
        out = tmp_path / "m.json"
        result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run"), "--split", "train", "--device", "cpu",
                                          "--modalities", "mod1", "--json", str(out)])
        assert result.exit_code == 0, result.output
        scored = json.loads(out.read_text())
        assert scored["modalities"] == ["mod1"] and set(scored["cases"]).isdisjoint(scored["skipped_cases"])
