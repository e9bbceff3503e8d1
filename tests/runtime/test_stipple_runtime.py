"""STIPPLE bundles: the runtime places the exported prior on each volume and predicts what the torch path does.

Oracles: a hand-made network and volume whose placement and labels are worked out by hand (the organ moved by a
known shift, undecided voxels the prior decides); for a trained run, `edgeseg evaluate RUN` (PyTorch, the run's
own files) against `edgeseg evaluate BUNDLE` / `edgeseg segment` (ONNX Runtime, the bundle's files).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from rich.console import Console
from tiny_runs import TINY_PHANTOM_RUN
from torch import nn

from edgeseg.config import load_experiment
from edgeseg.config.schema import StippleConfig
from edgeseg.data.io import Volume, read_image
from edgeseg.data.preprocess import PreprocessSpec, preprocess_case, undo_spatial
from edgeseg.errors import UserError
from edgeseg.priors.reference import Reference, save_reference
from edgeseg.priors.stipple import build_prior, save_prior
from edgeseg.runtime.bundle import MANIFEST, load_bundle
from edgeseg.runtime.pipeline import segment_volume

QUIET = Console(quiet=True)
NO_NORMALISATION = {"reorient": True, "target_spacing": None, "normalization": "none", "clip_percentiles": [0.5, 99.5],
                    "label_map": {}}


class _EvidenceNet(nn.Module):
    """Logits (-5e, 5e) from the evidence e in image channel 0: +1 organ, -1 background, 0 undecided."""

    min_input_multiple = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-5.0 * x[:, :1], 5.0 * x[:, :1]], dim=1)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def evidence_bundle(tmp_path_factory):
    """A bundle of `_EvidenceNet` with a one-organ prior built from a reference label (organ centre (4, 5, 6))."""
    from edgeseg.export.bundle_writer import write_bundle
    from edgeseg.export.run_export import BundleInfo, export_model
    from edgeseg.export.stipple_export import prior_files

    root = tmp_path_factory.mktemp("evidence")
    ref_label = np.zeros((16, 16, 16), np.uint8)
    ref_label[3:6, 4:7, 5:9] = 1
    save_prior(build_prior([ref_label], ["background", "organ"], num_bins=2), root / "run" / "stipple")
    save_reference(Reference("ref", ref_label, 2), root / "run" / "stipple")
    record = {"folder": "stipple", "sha256": _digests(root / "run" / "stipple")}
    settings = StippleConfig(max_shift=6, factors=(2, 1))
    info = BundleInfo(spatial_dims=3, in_channels=1, class_names=["background", "organ"], tile_size=[24, 16, 16],
                      preprocess=dict(NO_NORMALISATION),
                      prior=prior_files(root / "run", record, settings, ["background", "organ"]))
    result = export_model(_EvidenceNet(), info)
    write_bundle(root / "bundle", result.files, result.manifest)
    return root / "bundle", settings, ref_label


def _evidence_volume() -> tuple[Volume, np.ndarray]:
    """The organ of the reference moved by (5, -2, 3), two undecided voxels inside it and one far away."""
    evidence = -np.ones((18, 16, 16), np.float32)
    evidence[8:11, 2:5, 8:12] = 1.0
    evidence[9, 3, 9:11] = 0.0  # the prior (p = 1 there) makes them organ
    evidence[15, 14, 1] = 0.0  # the prior (p = eps there) makes it background
    expected = np.zeros((18, 16, 16), np.uint8)
    expected[8:11, 2:5, 8:12] = 1
    return Volume(evidence[None], np.eye(4), (1.0, 1.0, 1.0)), expected


@pytest.mark.parametrize("tta", [None, [0, 1, 2]])
def test_segment_places_the_prior_by_the_known_shift_and_matches_the_torch_predictor(evidence_bundle, tta):
    from edgeseg.data.cases import PreparedCase
    from edgeseg.runtime.backends import open_backend
    from edgeseg.train.stipple import PriorPredictor, RunPrior

    path, settings, ref_label = evidence_bundle
    bundle = load_bundle(path)
    assert bundle.manifest.schema_version == 3 and bundle.manifest.stipple is not None
    volume, expected = _evidence_volume()
    backend = open_backend(bundle, "onnxruntime")
    seg = segment_volume(volume, bundle.manifest, backend, tta_axes=tta, probabilities=True,
                         prior=bundle.stipple_prior())
    assert seg.prior_shift == (5, -2, 3)
    np.testing.assert_array_equal(seg.labels, expected)
    # the network alone leaves the three undecided voxels at 0.5 / 0.5: the prior decided them
    assert seg.probabilities is not None and seg.probabilities[1, 9, 3, 9] > 0.99 and seg.probabilities[1, 15, 14, 1] < 1e-3
    # the torch path (edgeseg evaluate RUN's predictor) on the same network, prior and volume
    run_prior = RunPrior(build_prior([ref_label], ["background", "organ"], num_bins=2), Reference("ref", ref_label, 2),
                         settings)
    predictor = PriorPredictor(run_prior, (24, 16, 16))
    case = PreparedCase(name="v", image=volume.array, label=None, spacing=(1.0, 1.0, 1.0), original=None,  # type: ignore[arg-type]
                        original_label=None)
    torch_probs = predictor.probabilities(_EvidenceNet(), case, torch.device("cpu"))
    assert predictor.shifts == {"v": [5, -2, 3]}
    np.testing.assert_allclose(seg.probabilities, torch_probs, atol=1e-6)


def test_segment_refuses_a_missing_prior_and_uncertainty_outputs(evidence_bundle):
    from edgeseg.runtime.backends import open_backend

    bundle = load_bundle(evidence_bundle[0])
    volume, _ = _evidence_volume()
    backend = open_backend(bundle, "onnxruntime")
    with pytest.raises(UserError, match="needs its prior"):
        segment_volume(volume, bundle.manifest, backend)
    with pytest.raises(UserError, match="per-sample uncertainty outputs"):
        segment_volume(volume, bundle.manifest, backend, tta_axes=[0], uncertainty=True, prior=bundle.stipple_prior())


# ------------------------------------------------------------------------------------- a trained run

TINY = [
    *TINY_PHANTOM_RUN,
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "train.scheme=stipple",
    "train.stipple.max_shift=6",
    "data.labelled_train_cases=3",
]


@pytest.fixture(scope="module")
def stipple_export(tmp_path_factory):
    """A tiny STIPPLE run and its bundle (`edgeseg export`)."""
    from edgeseg.export.run_export import export_run
    from edgeseg.train.experiment import train_experiment

    root = tmp_path_factory.mktemp("stipple")
    train_experiment(load_experiment(None, TINY), root / "run", console=QUIET)
    result = export_run(root / "run", root / "bundle")
    return root / "run", root / "bundle", result


def test_export_copies_the_run_prior_and_records_it(stipple_export):
    run, bundle, result = stipple_export
    record = json.loads((run / "run.json").read_text())["extra"]["stipple"]
    manifest = json.loads((bundle / MANIFEST).read_text())
    section = manifest["stipple"]
    assert manifest["schema_version"] == 3 and manifest["output_kind"] == "logits"
    assert section["files"] == {f"stipple/{n}": d for n, d in record["sha256"].items()}
    for name in record["sha256"]:
        assert (bundle / "stipple" / name).read_bytes() == (run / "stipple" / name).read_bytes()
        assert manifest["files"][f"stipple/{name}"]["sha256"] == record["sha256"][name]
    assert section["reference_case"] == record["reference_case"] and section["boxes"] == record["boxes"]
    assert section["class_names"] == ["background", "sphere", "blob"] and section["max_shift"] == 6
    assert section["factors"] == [4, 2, 1] and section["eps"] == 1e-6 and section["reference_smoothing"] == 0.1
    assert any("STIPPLE prior: 5 files" in line for line in result.summary)


def test_bundle_predicts_exactly_what_the_run_predicts(stipple_export, tmp_path):
    from edgeseg.runtime.batch import SUMMARY_FILE, segment_batch
    from edgeseg.runtime.evaluate_bundle import evaluate_bundle
    from edgeseg.train.experiment import evaluate_run, load_run_model
    from edgeseg.train.inference import predict_probabilities
    from edgeseg.train.stipple import PriorPredictor, load_run_prior

    run, bundle, _ = stipple_export
    data = run / "synthetic_data"
    by_run = evaluate_run(run, data=None, split="train", console=QUIET)
    by_bundle = evaluate_bundle(bundle, data, "train", backend="onnxruntime")
    assert len(by_run["cases"]) == 6
    assert by_bundle["cases"] == by_run["cases"]  # every metric of every case
    assert by_bundle["stipple"]["shifts"] == by_run["stipple"]["shifts"]

    # `edgeseg segment` (segment_batch) on two volumes: masks and prior-driven probabilities against the torch path
    names = sorted(by_run["cases"])[:2]
    out = tmp_path / "out"
    segment_batch(bundle, [data / "images" / n for n in names], out, probabilities=True, backend="onnxruntime")
    summary = {c["case"]: c for c in json.loads((out / SUMMARY_FILE).read_text())["cases"]}
    model, cfg, info = load_run_model(run)
    predictor = PriorPredictor(load_run_prior(run, info.extra["stipple"], cfg.train.stipple_settings),
                               tuple(info.tile_size))
    spec = PreprocessSpec.from_dict(info.preprocess)
    changed = 0
    for name in names:
        volume = read_image(data / "images" / name)
        image, _, _ = preprocess_case(volume, None, spec)
        from edgeseg.data.cases import PreparedCase

        case = PreparedCase(name=name, image=image, label=None, spacing=volume.spacing, original=volume,  # type: ignore[arg-type]
                            original_label=None)
        probs = predictor.probabilities(model, case, torch.device("cpu"))
        labels = undo_spatial(probs.argmax(0).astype(np.uint8), spec, volume)
        np.testing.assert_array_equal(np.asarray(nib.load(str(out / name)).dataobj), labels)
        written = np.asarray(nib.load(str(out / f"{name[:-7]}_probabilities.nii.gz")).dataobj)
        # float32 ONNX Runtime vs PyTorch convolutions (export parity: logits within 1e-4; here ~1e-7)
        np.testing.assert_allclose(np.moveaxis(written, -1, 0), undo_spatial(probs, spec, volume), atol=1e-5)
        assert summary[name]["prior_shift"] == predictor.shifts[name] == by_run["stipple"]["shifts"][name]
        plain = predict_probabilities(model, image, tuple(info.tile_size), torch.device("cpu")).argmax(0)
        changed += int((undo_spatial(plain.astype(np.uint8), spec, volume) != labels).sum())
    assert changed > 0  # the prior changed labels, so a runtime that skipped it would fail above


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def _edit(bundle: Path, edit) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    edit(data)
    (bundle / MANIFEST).write_text(json.dumps(data))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _swap_file(bundle: Path, name: str, content: bytes, *, record_in_section: bool) -> None:
    """Replace a prior file and update its manifest entry (and the stipple section's record, if asked)."""
    (bundle / name).write_bytes(content)
    digest = hashlib.sha256(content).hexdigest()

    def edit(d):
        d["files"][name] = {"sha256": digest, "bytes": len(content)}
        if record_in_section:
            d["stipple"]["files"][name] = digest

    _edit(bundle, edit)


def test_report_example_places_the_prior_and_says_why_there_is_no_entropy(stipple_export, tmp_path):
    """The report's example slice of a STIPPLE bundle (it once failed asking for uncertainty) is the `edgeseg segment
    --tta` mask of the same case, with the third panel's reason instead of an entropy map."""
    from edgeseg.report.example import NO_ENTROPY_STIPPLE, plot_example, segment_example
    from edgeseg.runtime.batch import segment_batch

    run, bundle, _ = stipple_export
    example = segment_example("fp32", bundle, run / "synthetic_data", "test")
    segment_batch(bundle, [run / "synthetic_data" / "images" / example.case], tmp_path, tta_axes=[0, 1, 2],
                  backend="onnxruntime")
    mask = np.asarray(nib.load(str(tmp_path / example.case)).dataobj)
    assert example.axis == 2 and example.samples == 8
    np.testing.assert_array_equal(example.labels, mask[:, :, example.index])
    assert example.uncertainty is None and example.note == NO_ENTROPY_STIPPLE
    assert example.caption() == f"the runtime's mask (mean of 8 flip-TTA samples); {NO_ENTROPY_STIPPLE}"
    assert plot_example(example)[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_tampered_missing_or_malformed_prior_is_refused(stipple_export, tmp_path):
    from edgeseg.runtime.batch import segment_batch

    _, bundle, _ = stipple_export
    image = stipple_export[0] / "synthetic_data" / "images" / "phantom_000.nii.gz"

    tampered = _copy(bundle, tmp_path / "a")
    raw = (tampered / "stipple" / "prior_1.npy").read_bytes()
    (tampered / "stipple" / "prior_1.npy").write_bytes(raw[:-1] + bytes([raw[-1] ^ 0x40]))
    with pytest.raises(UserError, match="prior_1.npy does not match its SHA-256"):
        load_bundle(tampered)
    with pytest.raises(UserError, match="prior_1.npy does not match its SHA-256"):
        segment_batch(tampered, [image], tmp_path / "out", backend="onnxruntime")

    rehashed = _copy(bundle, tmp_path / "b")  # the manifest's file list follows the change, the prior record not
    _swap_file(rehashed, "stipple/prior_1.npy", raw[:-1] + bytes([raw[-1] ^ 0x40]), record_in_section=False)
    with pytest.raises(UserError, match="SHA-256 differs from the prior's record"):
        load_bundle(rehashed)

    reshaped = _copy(bundle, tmp_path / "c")  # consistent hashes, wrong shape
    _swap_file(reshaped, "stipple/prior_1.npy", _npy(np.zeros((3, 2, 2), np.float32)), record_in_section=True)
    with pytest.raises(UserError, match="does not match box"):
        load_bundle(reshaped)

    missing = _copy(bundle, tmp_path / "d")
    (missing / "stipple" / "reference_label.npy").unlink()
    with pytest.raises(UserError, match="reference_label.npy is missing"):
        load_bundle(missing)

    unlisted = _copy(bundle, tmp_path / "e")
    _edit(unlisted, lambda d: d["stipple"]["files"].pop("stipple/prior_2.npy"))
    with pytest.raises(UserError, match="stipple/prior_2.npy is not listed in the manifest's stipple.files"):
        load_bundle(unlisted)

    older = _copy(bundle, tmp_path / "f")
    _edit(older, lambda d: d.update(schema_version=2))
    with pytest.raises(UserError, match="'stipple' .* needs schema_version 3"):
        load_bundle(older)

    other_classes = _copy(bundle, tmp_path / "g")
    _edit(other_classes, lambda d: d["stipple"].update(class_names=["background", "blob", "sphere"]))
    with pytest.raises(UserError, match="differ from the model's class_names"):
        load_bundle(other_classes)
