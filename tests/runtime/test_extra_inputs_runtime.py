"""Extra model inputs in the runtime: metadata from sidecars / tables / --metadata normalised as in training,
HeMIS modality masks from the files given and --modalities, fed with every tile batch (TTA, MC included).

Oracles: hand-computed normalisation; a recording backend (what each model call receives); and, end to end on
tiny runs trained for 2 steps on phantoms, the run's PyTorch model fed by training's own case preparation
(`edgeseg.data.cases.prepare_case`) and metadata normalised by hand from the sidecar and run.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from edgeseg.data.io import Volume
from edgeseg.errors import UserError
from edgeseg.runtime.bundle import Manifest, McSite, MetadataInput, ModalityInput, ModelForm
from edgeseg.runtime.case_inputs import (
    case_metadata,
    check_input_options,
    model_inputs,
    normalized_metadata,
    parse_metadata_values,
)
from edgeseg.runtime.pipeline import collect_cases, read_case, segment_options, segment_volume

REPO = Path(__file__).resolve().parents[2]
PREPROCESS = {"reorient": True, "target_spacing": None, "normalization": "none", "clip_percentiles": [0.5, 99.5],
              "label_map": {}}
META = MetadataInput(input="metadata", fields=["contrast", "age"], method="zscore", mean=[10.0, -2.0], std=[4.0, 0.5])
MODS = ModalityInput(input="modality_mask", names=["t1", "t2", "flair"])


def _manifest(channels: int = 1, metadata: MetadataInput | None = META, modalities: ModalityInput | None = None,
              mc: bool = False) -> Manifest:
    extra = [s.input for s in (metadata, modalities) if s is not None]
    sites = [McSite("mc_mask_0", 4, 0.5)] if mc else []
    forms = {"float": ModelForm(file="model.onnx", backend="any", precision="fp32", inputs=["image", *extra])}
    if mc:
        forms["mc"] = ModelForm(file="model_mc.onnx", backend="any", precision="fp32", mc=True,
                                inputs=["image", *extra, "mc_mask_0"])
    return Manifest(spatial_dims=3, in_channels=channels, class_names=["bg", "fg"], tile_size=[8, 8, 8],
                    min_input_multiple=4, preprocess=dict(PREPROCESS), forms=forms, files={}, mc_sites=sites,
                    metadata=metadata, modalities=modalities, schema_version=2)


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.eye(4)), str(path))
    return path


# ---- metadata: sources and normalisation ----------------------------------------------------------------


def test_metadata_is_normalised_as_hand_computed():
    np.testing.assert_allclose(normalized_metadata(META, [18.0, -1.0]), [2.0, 2.0])  # (18-10)/4, (-1+2)/0.5
    np.testing.assert_allclose(normalized_metadata(META, [4.0, -3.0]), [-1.5, -2.0])
    plain = MetadataInput(input="metadata", fields=["a"], method="none", mean=[0.0], std=[1.0])
    np.testing.assert_allclose(normalized_metadata(plain, [7.25]), [7.25])
    inputs = model_inputs(_manifest(), (18.0, -1.0), None)
    assert set(inputs) == {"metadata"} and inputs["metadata"].dtype == np.float32


def test_metadata_sources_cli_over_table_over_sidecar_and_errors_name_case_and_field(tmp_path):
    a = _write(tmp_path / "in" / "a.nii.gz", np.zeros((8, 8, 8)))
    b = _write(tmp_path / "in" / "b.nii.gz", np.zeros((8, 8, 8)))
    (tmp_path / "in" / "a.json").write_text(json.dumps({"contrast": 1, "age": 50, "other": "x"}))
    manifest = _manifest()
    assert case_metadata("a.nii.gz", [a], META, {}) == (1.0, 50.0)  # the sidecar
    assert case_metadata("a.nii.gz", [a], META, {"age": 70.0}) == (1.0, 70.0)  # --metadata wins
    assert case_metadata("b.nii.gz", [b], META, {"age": 1.0, "contrast": 0.0}) == (0.0, 1.0)  # no sidecar needed
    with pytest.raises(UserError, match=r"case 'b.nii.gz': metadata field 'contrast' not given: no sidecar .*b.json"):
        case_metadata("b.nii.gz", [b], META, {"age": 3.0})
    (tmp_path / "in" / "a.json").write_text(json.dumps({"contrast": 1}))
    with pytest.raises(UserError, match=r"case 'a.nii.gz': metadata field 'age' missing from .*a.json"):
        case_metadata("a.nii.gz", [a], META, {})
    table = tmp_path / "meta.tsv"
    table.write_text("case\tcontrast\tage\na\t0\t33\nb.nii.gz\t1\t44\n")
    assert case_metadata("a.nii.gz", [a], META, {}, table) == (0.0, 33.0)  # by stem
    assert case_metadata("b.nii.gz", [b], META, {"contrast": 5.0}, table) == (5.0, 44.0)
    # through the segment options: every case resolved up front
    options = segment_options(manifest, metadata={"contrast": 2.0}, metadata_table=table)
    cases = collect_cases([tmp_path / "in"], manifest, options)
    assert [(c.name, c.metadata) for c in cases] == [("a.nii.gz", (2.0, 33.0)), ("b.nii.gz", (2.0, 44.0))]
    (tmp_path / "in" / "a.json").write_text(json.dumps({"contrast": 1, "age": 50}))
    with pytest.raises(UserError, match=r"case 'b.nii.gz': metadata field 'age' not given"):
        collect_cases([tmp_path / "in"], manifest, segment_options(manifest, metadata={"contrast": 2.0}))


@pytest.mark.parametrize("text, message", [
    ("contrast", "expected field=value pairs"),
    ("contrast=high", "not a number"),
    ("contrast=nan", "not a finite number"),
    ("contrast=1,contrast=2", "twice"),
])
def test_bad_metadata_option_values(text, message):
    with pytest.raises(UserError, match=message):
        parse_metadata_values(text)


def test_metadata_option_parsing_and_refusals():
    assert parse_metadata_values("contrast=1, age=-63.5,flag=true") == {"contrast": 1.0, "age": -63.5, "flag": 1.0}
    with pytest.raises(UserError, match="unknown metadata field .* 'agee'.*age"):
        check_input_options(_manifest(), {"agee": 1.0}, None, None)
    with pytest.raises(UserError, match="takes no metadata input"):
        check_input_options(_manifest(metadata=None), {"age": 1.0}, None, None)
    with pytest.raises(UserError, match="not a HeMIS model"):
        check_input_options(_manifest(), None, None, ["t1"])
    with pytest.raises(UserError, match=r"choose a non-empty subset of \['t1', 't2', 'flair'\]"):
        check_input_options(_manifest(3, None, MODS), None, None, ["t1", "dwi"])


# ---- every tile batch gets the case's inputs ------------------------------------------------------------


class Recorder:
    """A backend that records each call's feeds and answers logits that depend on the metadata row."""

    name, form, description = "recorder", "float", "recording backend"

    def __init__(self):
        self.calls: list[tuple[tuple[int, ...], dict[str, np.ndarray]]] = []

    def run(self, image, masks=None):
        feeds = {k: np.array(v) for k, v in (masks or {}).items()}
        self.calls.append((image.shape, feeds))
        out = np.zeros((len(image), 2, *image.shape[2:]), np.float32)
        if "metadata" in feeds:
            out[:, 1] = feeds["metadata"][:, 0].reshape(-1, 1, 1, 1)
        return out

    def close(self):
        pass


@pytest.mark.parametrize("tta, mc, batch", [(False, 0, 1), (True, 0, 3), (True, 2, 2), (False, 3, 4)])
def test_each_tile_batch_carries_the_cases_metadata_under_tta_and_mc(tta, mc, batch):
    manifest = _manifest(mc=mc > 0)
    volume = Volume(np.random.default_rng(0).standard_normal((1, 16, 12, 12)).astype(np.float32), np.eye(4),
                    (1.0, 1.0, 1.0))
    backend = Recorder()
    seg = segment_volume(volume, manifest, backend, tta_axes=[0, 2] if tta else None, mc_passes=mc, batch_size=batch,
                         metadata={"contrast": 18.0, "age": -1.0}, probabilities=True)
    assert backend.calls
    expected = np.array([2.0, 2.0], np.float32)  # hand-normalised (18-10)/4, (-1+2)/0.5
    for shape, feeds in backend.calls:
        assert feeds["metadata"].shape == (shape[0], 2)  # repeated to the size of every call
        np.testing.assert_array_equal(feeds["metadata"], np.tile(expected, (shape[0], 1)))
        assert ("mc_mask_0" in feeds) == (mc > 0)
        if mc:
            assert feeds["mc_mask_0"].shape == (shape[0], 4, 1, 1, 1)
    sizes = {shape[0] for shape, _ in backend.calls}
    assert max(sizes) <= batch and (batch == 1 or len(sizes) >= 1)
    # the answer used the metadata: p(fg) = sigmoid(2) everywhere
    np.testing.assert_allclose(seg.probabilities[1], 1 / (1 + np.exp(-2.0)), rtol=1e-5)


def test_segment_volume_requires_the_metadata():
    volume = Volume(np.zeros((1, 8, 8, 8), np.float32), np.eye(4), (1.0, 1.0, 1.0))
    with pytest.raises(UserError, match="needs metadata field 'age'"):
        segment_volume(volume, _manifest(), Recorder(), metadata={"contrast": 1.0})


# ---- HeMIS: which modalities a case has ------------------------------------------------------------------


def _hemis_files(root: Path) -> None:
    rng = np.random.default_rng(1)
    for name in ("p_0000", "p_0002", "q_0001"):
        _write(root / f"{name}.nii.gz", rng.standard_normal((8, 8, 8)) + 5)
    _write(root / "r.nii.gz", rng.standard_normal((8, 8, 8)) + 5)


def test_modality_masks_follow_the_files_given_and_the_modalities_option(tmp_path):
    _hemis_files(tmp_path)
    manifest = _manifest(3, None, MODS)
    files = [tmp_path / f"{n}.nii.gz" for n in ("p_0000", "p_0002", "q_0001")]
    plain = segment_options(manifest)
    cases = collect_cases(files, manifest, plain)
    assert [(c.name, c.channels) for c in cases] == [("p.nii.gz", (0, 2)), ("q.nii.gz", (1,))]
    volume, present = read_case(cases[0], manifest, plain)
    assert present.tolist() == [True, False, True] and volume.array.shape == (3, 8, 8, 8)
    assert not volume.array[1].any() and volume.array[0].any() and volume.array[2].any()
    only = segment_options(manifest, modalities=["flair", "t2"])
    volume, present = read_case(collect_cases(files[:2], manifest, only)[0], manifest, only)
    assert present.tolist() == [False, False, True] and not volume.array[0].any() and volume.array[2].any()
    with pytest.raises(UserError, match=r"case 'q.nii.gz': none of the modalities t1 is given \(it has t2\)"):
        t1 = segment_options(manifest, modalities=["t1"])
        read_case(collect_cases(files[2:], manifest, t1)[0], manifest, t1)
    # a file without the channel suffix holds the --modalities listed
    t2 = segment_options(manifest, modalities=["t2"])
    case = collect_cases([tmp_path / "r.nii.gz"], manifest, t2)[0]
    volume, present = read_case(case, manifest, t2)
    assert case.channels == (1,) and present.tolist() == [False, True, False] and volume.array[1].any()
    with pytest.raises(UserError, match="or pass --modalities"):
        collect_cases([tmp_path / "r.nii.gz"], manifest, plain)
    two = segment_options(manifest, modalities=["t1", "t2"])
    with pytest.raises(UserError, match=r"1 channel\(s\), but 2 modalities were named"):
        read_case(collect_cases([tmp_path / "r.nii.gz"], manifest, two)[0], manifest, two)
    inputs = model_inputs(manifest, None, np.array([True, False, True]))
    np.testing.assert_array_equal(inputs["modality_mask"], [1.0, 0.0, 1.0])


# ---- end to end on tiny trained runs ----------------------------------------------------------------------

TINY = ["data.root=synthetic", "data.class_names=[background, sphere, blob]", "data.synthetic_cases=6",
        "data.synthetic_shape=[16, 16, 16]", "data.patch_size=[16, 16, 16]", "model.depth=2", "model.base_width=4",
        "train.batch_size=2", "train.num_threads=1", "train.deterministic=true", "train.epochs=1",
        "train.steps_per_epoch=2"]
FILM = ["model.name=film_unet", "data.synthetic_metadata=true", "data.metadata={fields: [contrast, gain]}",
        "model.dropout=0.2"]
HEMIS = ["model.name=hemis_unet", "data.synthetic_modalities=3", "data.synthetic_missing=0.4",
         "data.modalities={drop_prob: 0.5}", "model.norm=instance"]


def _train_and_export(root: Path, extra: list[str]) -> tuple[Path, Path]:
    from rich.console import Console

    from edgeseg.config import load_experiment
    from edgeseg.export.run_export import export_run
    from edgeseg.train.experiment import train_experiment

    train_experiment(load_experiment(None, TINY + extra), root / "run", console=Console(quiet=True))
    export_run(root / "run", root / "bundle.zip")
    return root / "run", root / "bundle.zip"


@pytest.fixture(scope="module")
def film(tmp_path_factory):
    pytest.importorskip("torch")
    return _train_and_export(tmp_path_factory.mktemp("film"), FILM)


@pytest.fixture(scope="module")
def hemis(tmp_path_factory):
    pytest.importorskip("torch")
    return _train_and_export(tmp_path_factory.mktemp("hemis"), HEMIS)


def _torch_probabilities(run: Path, image: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """The run's PyTorch model on one whole preprocessed volume (one tile): softmax. Shape: (C, *S) -> (K, *S)."""
    import torch

    from edgeseg.train.experiment import load_run_model

    model, _, _ = load_run_model(run)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(image[None]), torch.from_numpy(np.asarray(extra, np.float32)[None]))
    return torch.softmax(logits, 1)[0].numpy()


def _prepared(run: Path, ref):
    from edgeseg.data.cases import prepare_case
    from edgeseg.data.preprocess import PreprocessSpec
    from edgeseg.train.rundir import RunDir

    info = RunDir(run).read_info()
    return prepare_case(ref, PreprocessSpec.from_dict(info.preprocess), len(info.class_names)), info


def _probabilities(path: Path) -> np.ndarray:
    return np.moveaxis(np.asarray(nib.load(str(path)).dataobj), -1, 0)


def _app():
    from edgeseg.cli.app import app

    return app


def test_film_segment_feeds_the_sidecar_metadata_normalised_as_in_training(film, tmp_path):
    from edgeseg.data.discovery import CaseRef

    run, bundle = film
    data = run / "synthetic_data" / "images"
    image = data / "phantom_000.nii.gz"
    out = tmp_path / "out"
    result = CliRunner().invoke(_app(), ["segment", str(bundle), str(image), "--out", str(out), "--probabilities",
                                         "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    prepared, info = _prepared(run, CaseRef("phantom_000.nii.gz", (image,), None))
    raw = json.loads((data / "phantom_000.json").read_text())
    hand = (np.array([raw["contrast"], raw["gain"]]) - np.array(info.metadata["mean"])) / np.array(info.metadata["std"])
    expected = _torch_probabilities(run, prepared.image, hand)
    got = _probabilities(out / "phantom_000_probabilities.nii.gz")
    np.testing.assert_allclose(got, expected, atol=1e-5)

    # the same image without its sidecar: one clear error naming the case and the field
    bare = tmp_path / "bare" / "case.nii.gz"
    bare.parent.mkdir()
    shutil.copy(image, bare)
    result = CliRunner().invoke(_app(), ["segment", str(bundle), str(bare), "--out", str(tmp_path / "o2")])
    assert isinstance(result.exception, UserError)  # main() prints it as one line, exit code 2
    assert "case 'case.nii.gz': metadata field 'contrast' not given" in str(result.exception)
    assert not (tmp_path / "o2" / "case.nii.gz").exists()

    # --metadata: other values change the runtime output exactly as they change PyTorch's
    other = {"contrast": 1.0 - raw["contrast"], "gain": raw["gain"] * 2.0}
    result = CliRunner().invoke(_app(), ["segment", str(bundle), str(bare), "--out", str(tmp_path / "o3"),
                                         "--probabilities", "--backend", "onnxruntime", "--metadata",
                                         f"contrast={other['contrast']},gain={other['gain']}"])
    assert result.exit_code == 0, result.output
    hand_other = ((np.array([other["contrast"], other["gain"]]) - np.array(info.metadata["mean"]))
                  / np.array(info.metadata["std"]))
    expected_other = _torch_probabilities(run, prepared.image, hand_other)
    got_other = _probabilities(tmp_path / "o3" / "case_probabilities.nii.gz")
    np.testing.assert_allclose(got_other, expected_other, atol=1e-5)
    assert np.abs(expected_other - expected).max() > 1e-4  # the metadata does change this model's output
    np.testing.assert_allclose(got_other - got, expected_other - expected, atol=2e-5)


def test_film_segment_with_tta_mc_and_uncertainty_records_the_metadata(film, tmp_path):
    run, bundle = film
    image = run / "synthetic_data" / "images" / "phantom_001.nii.gz"
    out = tmp_path / "out"
    result = CliRunner().invoke(_app(), ["segment", str(bundle), str(image), "--out", str(out), "--tta", "--mc", "2",
                                         "--uncertainty", "--batch-size", "3", "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "phantom_001_uncertainty.json").read_text())
    raw = json.loads((image.parent / "phantom_001.json").read_text())
    assert summary["metadata"] == {"contrast": raw["contrast"], "gain": raw["gain"]}
    assert summary["num_samples"] == 16 and summary["samples_from"] == {"tta_flips": 8, "mc_passes": 2}


def test_film_bundle_evaluation_agrees_with_the_runs(film):
    from rich.console import Console

    from edgeseg.runtime.evaluate_bundle import evaluate_bundle
    from edgeseg.train.experiment import evaluate_run

    run, bundle = film
    by_bundle = evaluate_bundle(bundle, run / "synthetic_data", "train", backend="onnxruntime")
    by_run = evaluate_run(run, data=None, split="train", console=Console(quiet=True), device="cpu")
    assert sorted(by_bundle["cases"]) == sorted(by_run["cases"])
    for case, scores in by_run["cases"].items():
        for name in ("sphere", "blob"):
            assert by_bundle["cases"][case][name]["dice"] == pytest.approx(scores[name]["dice"], abs=1e-6), case


def test_hemis_segment_with_missing_and_chosen_modalities_matches_pytorch(hemis, tmp_path):
    from edgeseg.data.discovery import discover_cases

    run, bundle = hemis
    data = run / "synthetic_data"
    refs = discover_cases(data, "msd", missing_channels=True, channels=3)
    ref = next(r for r in refs if 0 < len(r.missing_channels) < 2)  # a case with one modality file missing
    out = tmp_path / "out"
    result = CliRunner().invoke(_app(), ["segment", str(bundle), *map(str, ref.images), "--out", str(out),
                                         "--probabilities", "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    prepared, _ = _prepared(run, ref)  # training's zero-filling of the missing file
    mask = ref.present_channels().astype(np.float32)
    name = ref.name.replace(".nii.gz", "")
    np.testing.assert_allclose(_probabilities(out / f"{name}_probabilities.nii.gz"),
                               _torch_probabilities(run, prepared.image, mask), atol=1e-5)

    keep = int(np.flatnonzero(mask)[0])  # only one of its modalities
    result = CliRunner().invoke(_app(), ["segment", str(bundle), *map(str, ref.images), "--out", str(tmp_path / "o2"),
                                         "--probabilities", "--backend", "onnxruntime", "--modalities", f"mod{keep}"])
    assert result.exit_code == 0, result.output
    only = np.zeros(3, np.float32)
    only[keep] = 1.0
    image = prepared.image.copy()
    image[only == 0] = 0.0
    np.testing.assert_allclose(_probabilities(tmp_path / "o2" / f"{name}_probabilities.nii.gz"),
                               _torch_probabilities(run, image, only), atol=1e-5)


def test_hemis_bundle_evaluation_on_a_subset_of_modalities_through_the_cli(hemis, tmp_path):
    run, bundle = hemis
    out = tmp_path / "m.json"
    result = CliRunner().invoke(_app(), ["evaluate", str(bundle), "--data", str(run / "synthetic_data"), "--split",
                                         "train", "--modalities", "mod1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    scored = json.loads(out.read_text())
    from edgeseg.data.discovery import discover_cases

    refs = {r.name: r for r in discover_cases(run / "synthetic_data", "msd", missing_channels=True, channels=3)}
    train = json.loads((run / "synthetic_data" / "splits.json").read_text())["train"]
    on_disk = [n for n in train if 1 not in refs[n].missing_channels]  # oracle: which cases have a mod1 file
    assert scored["modalities"] == ["mod1"] and on_disk
    assert sorted(scored["cases"]) == sorted(on_disk)
    assert sorted(scored["skipped_cases"]) == sorted(set(train) - set(on_disk))


@pytest.mark.parametrize("which", ["film", "hemis"])
def test_report_example_feeds_the_extra_inputs_as_segment_does(which, request, tmp_path):
    """The report's example slice of a FiLM / HeMIS bundle (it once failed: no metadata, no modality mask) is the
    `edgeseg segment --tta [--mc 2]` mask of the same case, which reads the sidecar and channel files itself."""
    from edgeseg.report.example import segment_example

    run, bundle = request.getfixturevalue(which)
    data = run / "synthetic_data"
    example = segment_example("fp32", bundle, data, "test")
    stem = example.case.removesuffix(".nii.gz")
    images = sorted(p for p in data.rglob(f"{stem}*.nii.gz") if "label" not in p.parent.name)
    mc = ["--mc", "2"] if which == "film" else []  # the FiLM run has dropout, the HeMIS run none
    result = CliRunner().invoke(_app(), ["segment", str(bundle), *map(str, images), "--out", str(tmp_path), "--tta",
                                         *mc, "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    mask = np.asarray(nib.load(str(tmp_path / example.case)).dataobj)
    assert example.axis == 2 and example.samples == 8 * (2 if mc else 1)
    np.testing.assert_array_equal(example.labels, mask[:, :, example.index])
    assert example.uncertainty is not None and example.uncertainty.shape == example.labels.shape


def test_runtime_with_extra_inputs_stays_torch_free(film, hemis, tmp_path):
    code = (
        "import sys\n"
        "from edgeseg.runtime import segment_files\n"
        f"segment_files({str(film[1])!r}, [{str(film[0] / 'synthetic_data' / 'images' / 'phantom_002.nii.gz')!r}], "
        f"{str(tmp_path / 'a')!r}, tta=True, backend='onnxruntime')\n"
        f"segment_files({str(hemis[1])!r}, [{str(hemis[0] / 'synthetic_data' / 'imagesTr')!r}], "
        f"{str(tmp_path / 'b')!r}, backend='onnxruntime')\n"
        "print('LOADED:' + ','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'brevitas', 'onnx'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED:\n" in result.stdout
    assert (tmp_path / "a" / "phantom_002.nii.gz").is_file() and list((tmp_path / "b").glob("phantom_*.nii.gz"))


def test_tensorrt_profile_fixes_the_extra_inputs_to_the_engine_batch():
    from edgeseg.runtime.trt_build import plan_profile

    manifest = _manifest(3, META, MODS, mc=True)
    profile = plan_profile(manifest, "mc", 4, [8, 8, 8])
    assert {n: s[0] for n, s in profile.items()} == {"image": (4, 3, 8, 8, 8), "metadata": (4, 2),
                                                    "modality_mask": (4, 3), "mc_mask_0": (4, 4, 1, 1, 1)}
