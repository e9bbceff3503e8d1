"""INERRANT partial-label training (Petit, Thome & Soler 2021): the ambiguity-weighted BCE, the ambiguity maps and
targets, the prediction rule, pseudo-label selection and the relabelling schedule, the partial-label record, and
whole runs (resume exact across relabelling steps, export and QAT carry the sigmoid outputs).

Oracles: values computed by hand, the uninterrupted run for resume, and the torch model's evaluation for the
exported bundle.
"""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from rich.console import Console
from tiny_runs import TINY_INERRANT_RUN, phantom_cases

from edgeseg.config import load_experiment
from edgeseg.config.loader import from_dict, to_dict
from edgeseg.config.schema import ExperimentConfig, LossConfig
from edgeseg.data.cases import PreparedCase
from edgeseg.errors import UserError
from edgeseg.losses import PartialLabelBCELoss, build_loss
from edgeseg.runtime.bundle import MULTILABEL_BACKGROUND
from edgeseg.train.inerrant import (
    Relabeller,
    RelabelSchedule,
    ambiguity_map,
    annotated_flags,
    apply_partial_labels,
    erase_unannotated,
    multilabel_rule,
    partial_targets,
    resolve_partial_labels,
    select_pseudo_labels,
    sigmoid_multilabel,
)
from edgeseg.train.rundir import RunDir
from edgeseg.train.sampling import BatchSampler
from edgeseg.train.schemes import build_relabeller, build_sampler, build_training_loss, output_activation

QUIET = Console(quiet=True)
CLASSES = ("background", "sphere", "blob")
INERRANT = ["train.scheme=inerrant", "loss.name=partial_bce"]
F, T = False, True
LN3 = math.log(3.0)

# ------------------------------------------------------------------------------------- loss and targets


def test_partial_bce_by_hand():
    # one sample, 3 voxels; class 1 (sphere) annotated, class 2 (blob) missing; voxel 0 is a sphere
    target = torch.from_numpy(partial_targets(np.array([1, 0, 0]), np.array([F, T, F])))[None]
    scores = torch.tensor([[[7.0, -7.0, 3.0],          # background channel: never read
                            [0.0, LN3, -LN3],          # sphere: p = 1/2, 3/4, 1/4
                            [LN3, 0.0, 0.0]]])         # blob: p = 3/4, then two ambiguous voxels
    # sphere: -ln(1/2) - ln(1/4) - ln(3/4); blob: only voxel 0 (a known negative): -ln(1/4); / (B K N = 6)
    by_hand = (math.log(2) + math.log(4) + math.log(4 / 3) + math.log(4)) / 6
    loss = PartialLabelBCELoss()
    x = scores.clone().requires_grad_(True)
    value = loss(x, target)
    assert value.item() == pytest.approx(by_hand, rel=1e-6)
    value.backward()
    assert torch.isfinite(x.grad).all()
    assert not x.grad[0, 0].any() and not x.grad[0, 2, 1:].any()  # no gradient on background and ambiguous voxels
    assert x.grad[0, 2, 0] == pytest.approx((0.75 - 0.0) / 6, rel=1e-5)  # (p - y) / 6 on the known negative
    changed = scores.clone()
    changed[0, 2, 1:] = torch.tensor([-20.0, 20.0])
    assert float(loss(changed, target)) == pytest.approx(by_hand, rel=1e-6)  # ambiguous voxels do not count
    # class indices (and one-hot maps) are fully annotated: every voxel of every class counts
    full = (math.log(2) + math.log(4) + math.log(4 / 3) + math.log(4) + 2 * math.log(2)) / 6
    assert float(loss(scores, torch.tensor([[1, 0, 0]]))) == pytest.approx(full, rel=1e-6)


def test_partial_bce_of_a_batch_is_the_mean_of_its_halves():
    torch.manual_seed(0)
    scores = torch.randn(4, 3, 5, 5)
    labels = torch.randint(0, 3, (4, 5, 5)).numpy()
    flags = [np.array([T, T, T]), np.array([F, T, F]), np.array([F, F, T]), np.array([F, F, F])]
    target = torch.from_numpy(np.stack([partial_targets(lab, a) for lab, a in zip(labels, flags)]))
    loss = build_loss(LossConfig(name="partial_bce"))
    halves = (loss(scores[:2], target[:2]) + loss(scores[2:], target[2:])) / 2
    assert float(loss(scores, target)) == pytest.approx(float(halves), rel=1e-6)


def test_ambiguity_maps_and_targets_by_hand():
    label = np.array([[0, 1], [1, 0]])
    partial = np.array([F, T, F])  # blob missing: ambiguous for blob and background on the unlabelled voxels
    np.testing.assert_array_equal(ambiguity_map(label, partial), [[[0, 1], [1, 0]], [[1, 1], [1, 1]],
                                                                  [[0, 1], [1, 0]]])
    target = partial_targets(label, partial)
    np.testing.assert_array_equal(target[1], [[0, 1], [1, 0]])
    np.testing.assert_array_equal(target[2], [[np.nan, 0], [0, np.nan]])  # sphere voxels: known negatives
    np.testing.assert_array_equal(target[0], [[np.nan, 0], [0, np.nan]])
    assert ambiguity_map(label, np.array([T, T, T])).all()  # a fully annotated case: plain per-class BCE
    # a pseudo-labelled blob voxel (label 2 in a case that does not annotate blob) is a known positive
    pseudo = np.array([[2, 1], [0, 0]])
    np.testing.assert_array_equal(partial_targets(pseudo, partial)[2], [[1, 0], [np.nan, np.nan]])
    np.testing.assert_array_equal(erase_unannotated(np.array([[2, 1], [0, 2]]), partial), [[0, 1], [0, 0]])


def test_annotated_flags_and_erasure_of_the_training_cases():
    record = {"a.nii.gz": ("sphere",), "b.nii.gz": ()}
    np.testing.assert_array_equal(annotated_flags(record, CLASSES, "a.nii.gz"), [F, T, F])
    np.testing.assert_array_equal(annotated_flags(record, CLASSES, "a.nii.gz#7"), [F, T, F])  # a 2D slice of it
    np.testing.assert_array_equal(annotated_flags(record, CLASSES, "b.nii.gz"), [F, F, F])
    np.testing.assert_array_equal(annotated_flags(record, CLASSES, "c.nii.gz"), [T, T, T])
    label = np.array([0, 1, 2, 2], np.uint8)
    cases = [PreparedCase(n, np.zeros((1, 4), np.float32), label, (1.0,), None, None)  # type: ignore[arg-type]
             for n in ("a.nii.gz", "c.nii.gz")]
    erased, _ = apply_partial_labels(cases, record, CLASSES)
    np.testing.assert_array_equal(erased[0].label, [0, 1, 0, 0])
    assert erased[1] is cases[1] and cases[0].label is label and label[2] == 2  # copies; the input is untouched
    with pytest.raises(TypeError, match="resolved"):
        apply_partial_labels(cases, "partial.json", CLASSES)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- prediction and relabelling


def test_prediction_rule_by_hand():
    probs = np.array([[0.3, 0.6, 0.5, 0.7, np.nextafter(np.float32(0.5), np.float32(0))],
                      [0.4, 0.9, 0.2, 0.7, 0.1]], np.float32)  # (K=2, 5 voxels)
    np.testing.assert_array_equal(multilabel_rule(probs), [0, 2, 1, 1, 0])
    # sigmoid_multilabel's maps give the same labels through their argmax (the edge value 1 ulp below 1/2 would not
    # survive the logit round trip, so 0.45 stands in for it)
    probs[0, 4] = 0.45
    logits = torch.from_numpy(np.log(probs / (1 - probs)))[None]
    scores = torch.cat([torch.full_like(logits[:, :1], 100.0), logits], dim=1)[..., None]  # (1, 3, 5, 1)
    maps = sigmoid_multilabel(scores)
    assert (maps[0, 0] == MULTILABEL_BACKGROUND).all()
    np.testing.assert_array_equal(maps.argmax(1)[0, :, 0].numpy(), [0, 2, 1, 1, 0])


def test_pseudo_label_selection_by_hand():
    # 6 voxels; voxel 0 is a labelled sphere; blob missing. Rule: voxels 1-3 -> blob, 4 -> background, 5 -> sphere
    p_sphere = [0.9, 0.1, 0.1, 0.1, 0.1, 0.75]
    p_blob = [0.95, 0.8, 0.6, 0.95, 0.3, 0.7]
    probs = np.array([[MULTILABEL_BACKGROUND] * 6, p_sphere, p_blob], np.float32)
    label, flags = np.array([1, 0, 0, 0, 0, 0]), np.array([F, T, F])
    for gamma, expected in ((0.3, []), (0.5, [3]), (0.7, [3, 1]), (1.0, [3, 1, 2])):  # floor(gamma * 3) voxels
        index, classes = select_pseudo_labels(probs, label, flags, gamma)
        assert index.tolist() == expected and classes.tolist() == [2] * len(expected), gamma
    # an annotated class is never pseudo-labelled, and a fully annotated case gets nothing
    assert not len(select_pseudo_labels(probs, label, np.array([T, T, T]), 1.0)[0])
    # in 3D: flat indices of the case's grid
    index, _ = select_pseudo_labels(probs.reshape(3, 1, 2, 3), label.reshape(1, 2, 3), flags, 1.0)
    assert index.tolist() == [3, 1, 2]


def test_relabel_schedule():
    even = RelabelSchedule(epochs=10, initial_epochs=4, steps=3, gamma_max=0.6)
    assert [even.step(e) for e in range(1, 11)] == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert [even.gamma(t) for t in range(4)] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    uneven = RelabelSchedule(epochs=9, initial_epochs=4, steps=3, gamma_max=0.5)
    assert [uneven.step(e) for e in range(5, 10)] == [1, 1, 2, 2, 3]
    assert RelabelSchedule(epochs=5, initial_epochs=1, steps=0, gamma_max=0.5).step(5) == 0


def test_relabeller_state_round_trips_and_feeds_the_sampler():
    cfg = load_experiment(None, [*INERRANT, "data.class_names=[background, sphere, blob]", "train.epochs=4",
                                 "train.inerrant.initial_epochs=2", "train.inerrant.relabel_steps=2",
                                 "augment.flip_axes=[]", "augment.gamma_prob=0", "augment.noise_prob=0",
                                 "data.partial_labels={c0: [sphere], c2: []}"])
    cases = phantom_cases(4, (16, 16, 16))
    sampler = build_sampler(cfg, cases, (16, 16, 16), 3, seed=0)
    relabeller = build_relabeller(cfg, cases, sampler, (16, 16, 16))
    assert relabeller is not None and relabeller.partial == [0, 2]
    blob = np.flatnonzero(cases[0].label.ravel() == 2)[:5]
    relabeller._apply(1, {0: (blob, np.full(5, 2, np.uint8))})  # as if step 1 had pseudo-labelled 5 blob voxels
    state, tensors = relabeller.state(), relabeller.tensors()
    assert state["step"] == 1 and tensors[Relabeller.TENSOR].tolist() == [[0] * 5, blob.tolist(), [2] * 5]
    np.testing.assert_array_equal(sampler.samplers[0].label.ravel()[blob], 2)  # the sampler trains on them
    assert (sampler.samplers[0].label == 2).sum() == 5
    fresh_sampler = build_sampler(cfg, cases, (16, 16, 16), 3, seed=0)
    fresh = build_relabeller(cfg, cases, fresh_sampler, (16, 16, 16))
    fresh.restore(state, tensors)
    assert fresh.step == 1 and fresh.pseudo_voxels() == 5
    np.testing.assert_array_equal(fresh_sampler.samplers[0].label, sampler.samplers[0].label)
    # the targets of the whole case 0 patch: pseudo voxels are known blob positives, other unlabelled voxels ambiguous
    _, labels = fresh_sampler.next_batch(2)
    assert labels.shape == (2, 3, 16, 16, 16) and labels.dtype == np.float32 and np.isnan(labels).any()
    with pytest.raises(UserError, match="other training cases"):
        build_relabeller(cfg, cases[1:], build_sampler(cfg, cases[1:], (16, 16, 16), 3, seed=0),
                         (16, 16, 16)).restore(state, tensors)


class ConstantScores(torch.nn.Module):
    """A stand-in model: logits (-5 background, -5 sphere, +5 blob) everywhere, so every voxel is predicted blob."""

    min_input_multiple = 1

    def forward(self, x):
        shape = (x.shape[0], 1, *x.shape[2:])
        return torch.cat([torch.full(shape, -5.0), torch.full(shape, -5.0), torch.full(shape, 5.0)], dim=1)


def test_relabelling_predicts_2d_slices_of_partially_labelled_volumes():
    from edgeseg.data.cases import to_slices

    cfg = load_experiment(None, [*INERRANT, "data.class_names=[background, sphere, blob]", "data.spatial_dims=2",
                                 "data.patch_size=[16, 16]", "train.epochs=2", "train.inerrant.initial_epochs=1",
                                 "train.inerrant.relabel_steps=1", "data.partial_labels={c0: [sphere]}"])
    slices = [s for case in phantom_cases(2, (16, 16, 16)) for s in to_slices(case, 2)]  # "c0#0" ... "c1#15"
    sampler = build_sampler(cfg, slices, (16, 16), 2, seed=0)
    relabeller = build_relabeller(cfg, slices, sampler, (16, 16))
    assert relabeller.partial == list(range(16))  # the slices of c0
    relabeller.begin_epoch(2, ConstantScores(), torch.device("cpu"), QUIET)
    assert relabeller.step == 1
    for i in (0, 7, 15):
        erased = np.where(slices[i].label == 2, 0, slices[i].label)
        unlabelled = np.flatnonzero(erased.ravel() == 0)  # all predicted blob with the same confidence
        index, classes = relabeller.pseudo[i]
        assert index.tolist() == unlabelled[:len(unlabelled) // 2].tolist() and set(classes.tolist()) == {2}
        expected = erased.copy()
        expected.ravel()[index] = 2
        np.testing.assert_array_equal(sampler.samplers[i].label, expected)
    np.testing.assert_array_equal(sampler.samplers[20].label, slices[20].label)  # c1 is fully annotated


def test_sampler_targets_partial_cases_and_naive_baselines_erase():
    cases = phantom_cases(2, (16, 16, 16))
    base = ["data.class_names=[background, sphere, blob]", "data.partial_labels={c0: [sphere]}"]
    sampler = build_sampler(load_experiment(None, [*INERRANT, *base]), cases, (8, 8, 8), 3, seed=1)
    single, ranks = sampler, [build_sampler(load_experiment(None, [*INERRANT, *base]), cases, (8, 8, 8), 3, seed=1)
                              for _ in (0, 1)]
    for r, s in enumerate(ranks):
        s.shard(r, 2)
    _, labels = single.next_batch(8)
    shares = [s.next_batch(8)[1] for s in ranks]
    np.testing.assert_array_equal(labels, np.concatenate(shares))  # NaN-equal: the ranks build the same targets
    known = np.isfinite(labels)
    assert known[:, 1].all()  # sphere is annotated everywhere
    assert np.nansum(labels[:, 1:], axis=1).max() <= 1  # classes do not overlap
    # naive training reads the erased class as background: no blob voxel of c0 ever reaches a batch
    naive = build_sampler(load_experiment(None, base), cases[:1], (8, 8, 8), 3, seed=1)
    assert not (naive.next_batch(16)[1] == 2).any()
    assert (build_sampler(load_experiment(None, []), cases[:1], (8, 8, 8), 3, seed=1).next_batch(16)[1] == 2).any()
    same_loss = load_experiment(None, [*INERRANT, *base, "train.inerrant.ambiguity_map=false",
                                       "train.inerrant.relabel_steps=0"])
    assert np.isfinite(build_sampler(same_loss, cases, (8, 8, 8), 3, seed=1).next_batch(8)[1]).all()


# ------------------------------------------------------------------------------------- config and record


def test_config_rules_and_round_trip():
    cfg = load_experiment(None, [*INERRANT, "train.epochs=6", "train.inerrant.initial_epochs=3"])
    assert output_activation(cfg) == "sigmoid_multilabel" and isinstance(build_training_loss(cfg), PartialLabelBCELoss)
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg
    bad = {
        "set loss {name: partial_bce}": ["train.scheme=inerrant"],
        "needs train.scheme inerrant": ["loss.name=partial_bce"],
        "crisp partial labels": [*INERRANT, "augment.mixup_alpha=0.4"],
        "only applies to train.scheme inerrant": ["train.inerrant.relabel_steps=2"],
        r"3 initial epochs \+ 3 relabelling steps .* exceed train.epochs \(5\)":
            [*INERRANT, "train.epochs=5", "train.inerrant.initial_epochs=3"],
        "gamma_max must be within": [*INERRANT, "train.inerrant.gamma_max=0"],
        "no missing classes to relabel": [*INERRANT, "train.inerrant.ambiguity_map=false"],
        r"'blobb' is not a foreground class \(did you mean 'blob'\?\)": ["data.class_names=[background, sphere, blob]",
                                                                   "data.partial_labels={c0: [blobb]}"],
        "is not a foreground class": ["data.class_names=[background, sphere, blob]",
                                      "data.partial_labels={c0: [background]}"],
        "listed twice": ["data.class_names=[background, sphere, blob]", "data.partial_labels={c0: [blob, blob]}"],
        "'max_probabilty' is not one of": [*INERRANT, "train.inerrant.confidence=max_probabilty"],
    }
    for message, overrides in bad.items():
        with pytest.raises(UserError, match=message):
            load_experiment(None, overrides)


def test_resolve_partial_labels_from_a_mapping_or_a_file(tmp_path):
    names = ["hippocampus_001.nii.gz", "hippocampus_002.nii.gz"]
    record = resolve_partial_labels({"hippocampus_001": ["blob", "sphere"]}, CLASSES, tmp_path, names)
    assert record == {"hippocampus_001.nii.gz": ("sphere", "blob")}  # full names, classes in class order
    (tmp_path / "partial.json").write_text(json.dumps({"hippocampus_002.nii.gz": ["sphere"]}))
    assert resolve_partial_labels("partial.json", CLASSES, tmp_path, names) == {"hippocampus_002.nii.gz": ("sphere",)}
    with pytest.raises(UserError, match="no case 'hippocampus_003'.*did you mean"):
        resolve_partial_labels({"hippocampus_003": ["sphere"]}, CLASSES, tmp_path, names)
    with pytest.raises(UserError, match="listed twice"):
        resolve_partial_labels({"hippocampus_001": [], "hippocampus_001.nii.gz": []}, CLASSES, tmp_path, names)
    with pytest.raises(UserError, match="file not found"):
        resolve_partial_labels("missing.json", CLASSES, tmp_path, names)
    (tmp_path / "bad.json").write_text(json.dumps({"hippocampus_001": "sphere"}))
    with pytest.raises(UserError, match="expected a list of annotated class names"):
        resolve_partial_labels("bad.json", CLASSES, tmp_path, names)


# ------------------------------------------------------------------------------------- whole runs


TINY = list(TINY_INERRANT_RUN)


def _train(out, overrides=(), *, resume=False):
    from edgeseg.train.experiment import train_experiment

    return train_experiment(load_experiment(None, [*TINY, *overrides]), out, resume=resume, console=QUIET)


def _checkpoint(run_dir):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(RunDir(run_dir).last), framework="pt") as fh:
        trainer = json.loads(fh.metadata()["trainer"])
    return trainer, load_file(str(RunDir(run_dir).last))


def test_relabelling_steps_are_checkpointed_and_resume_exactly(tmp_path, monkeypatch):
    full = _train(tmp_path / "a")
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["relabel_step"] for r in log] == [0, 0, 1, 2]
    assert log[0]["pseudo_voxels"] == 0 and 0 < log[2]["pseudo_voxels"] < log[3]["pseudo_voxels"]
    assert full.epochs_done == 4 and all(np.isfinite(r["train_loss"]) for r in log)

    calls = {"n": 0}
    original = BatchSampler.next_batch

    def interrupting(self, batch_size):
        calls["n"] += 1
        if calls["n"] == 8:  # inside epoch 3 (its second step), after relabelling step 1
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch_size)

    monkeypatch.setattr(BatchSampler, "next_batch", interrupting)
    assert _train(tmp_path / "b").interrupted
    monkeypatch.setattr(BatchSampler, "next_batch", original)
    trainer, tensors = _checkpoint(tmp_path / "b")
    assert trainer["epoch"] == 2 and trainer["step"] == 2 and trainer["relabel"]["step"] == 1
    assert tensors["extra/inerrant/pseudo"].shape[1] == log[2]["pseudo_voxels"]  # the step's pseudo-labels
    assert _train(tmp_path / "b", resume=True).epochs_done == 4
    (_, a), (_, b) = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)  # weights and step 2's pseudo-labels


def test_partial_label_run_exports_and_quantizes_with_sigmoid_outputs(tmp_path):
    """End to end on phantoms with blob's labels removed from half the cases: training relabels, the run's own
    evaluation and its exported bundle (read by the runtime as sigmoid_multilabel) agree, and QAT trains with
    the partial-label loss."""
    from edgeseg.export.run_export import export_run
    from edgeseg.quantize.qat import quantize_run
    from edgeseg.runtime.evaluate_bundle import evaluate_bundle
    from edgeseg.train.experiment import evaluate_run

    _train(tmp_path / "run", ["train.epochs=3", "train.inerrant.relabel_steps=1"])
    config = RunDir(tmp_path / "run").read_config()
    assert sum(1 for name, classes in config.data.partial_labels.items() if classes == ("sphere",)) == 4
    torch_metrics = evaluate_run(tmp_path / "run", data=None, split="test", console=QUIET)
    bundle = export_run(tmp_path / "run", tmp_path / "bundle")
    assert bundle.manifest.output_kind == "sigmoid_multilabel"
    data = RunDir(tmp_path / "run").read_info().data_root
    runtime_metrics = evaluate_bundle(tmp_path / "bundle", data, "test", backend="onnxruntime")
    for name in ("sphere", "blob"):
        assert runtime_metrics["summary"][name]["dice"]["mean"] == pytest.approx(
            torch_metrics["summary"][name]["dice"]["mean"], abs=0.01), name
    metrics = quantize_run(tmp_path / "run", "8/8", tmp_path / "q", epochs=1, console=QUIET,
                           overrides=["quant.steps_per_epoch=2", "quant.calibration_batches=2"])
    assert 0.0 <= metrics["splits"]["test"]["dice_quant"] <= 1.0
    assert export_run(tmp_path / "q", tmp_path / "qbundle").manifest.output_kind == "sigmoid_multilabel"


@pytest.mark.slow
def test_relabelling_under_two_processes_matches_one_process(tmp_path):
    """Under torchrun the ranks predict a share of the partial cases each and exchange the pseudo-labels: every
    optimizer step matches the single-process run (test_distributed's harness and tolerance)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("edgeseg_test_distributed",
                                                  Path(__file__).with_name("test_distributed.py"))
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    overrides = ["data.patch_size=[8, 8, 8]", "model.depth=1", "loss.dice_reduction=batch", *INERRANT,
                 "data.synthetic_cases=6", "data.synthetic_shape=[16, 16, 16]", "data.inference_tile=[16, 16, 16]",
                 "data.partial_labels={" + ", ".join(f"phantom_{i:03d}: [sphere]" for i in range(0, 6, 2)) + "}",
                 "train.inerrant.initial_epochs=1", "train.inerrant.relabel_steps=1", "train.inerrant.gamma_max=1.0"]
    single = harness.train_recording(tmp_path / "single", overrides=overrides)
    harness.run_torchrun([{"out": str(tmp_path / "ddp"), "resume": False, "record": str(tmp_path / "ddp"),
                           "overrides": overrides}], tmp_path)
    ddp = [np.load(tmp_path / f"ddp_rank{r}.npy") for r in (0, 1)]
    assert ddp[0].shape == single.shape
    for step in range(len(single)):
        np.testing.assert_array_equal(ddp[0][step], ddp[1][step], err_msg=f"ranks differ after step {step + 1}")
        np.testing.assert_allclose(ddp[0][step], single[step], rtol=0, atol=harness.TOLERANCE,
                                   err_msg=f"2 processes differ from 1 after step {step + 1}")
    logs = [[json.loads(line) for line in (tmp_path / r / "log.jsonl").read_text().splitlines()]
            for r in ("single", "ddp")]
    assert [(r["relabel_step"], r["pseudo_voxels"]) for r in logs[1]] == \
        [(r["relabel_step"], r["pseudo_voxels"]) for r in logs[0]]
    assert logs[0][1]["pseudo_voxels"] > 0
