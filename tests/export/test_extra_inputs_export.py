"""FiLM metadata and HeMIS modality masks as ONNX graph inputs: parity with PyTorch, the manifest record.

Oracles: the PyTorch model itself (fed the same metadata / mask), per batch row; the run record given to the
export (fields, normalisation, modality names).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeseg.errors import UserError
from edgeseg.export.run_export import BundleInfo
from edgeseg.nets import create_model, model_capabilities
from edgeseg.runtime.bundle import MANIFEST, load_bundle

PREPROCESS = {"reorient": True, "target_spacing": None, "normalization": "zscore", "clip_percentiles": [0.5, 99.5],
              "label_map": {}}
RECORD = {"fields": ["contrast", "age"], "method": "zscore", "mean": [0.5, 61.0], "std": [0.5, 12.5]}
NAMES = ["t1", "t2", "flair"]


def _film(dims: int = 3, dropout: float = 0.2) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("film_unet", spatial_dims=dims, in_channels=1, out_channels=3, depth=2, base_width=4,
                        dropout=dropout, metadata_dim=2, hidden=8).eval()


def _hemis(dims: int = 3, dropout: float = 0.2) -> torch.nn.Module:
    torch.manual_seed(1)
    return create_model("hemis_unet", spatial_dims=dims, in_channels=3, out_channels=3, depth=2, base_width=4,
                        dropout=dropout, norm="instance").eval()


def _info(dims: int, channels: int, **kw) -> BundleInfo:
    tile = [16] * dims
    return BundleInfo(spatial_dims=dims, in_channels=channels, class_names=["bg", "a", "b"], tile_size=tile,
                      preprocess=dict(PREPROCESS), training={"patch_size": tile}, **kw)


@pytest.fixture(scope="module")
def film_bundle(tmp_path_factory, kit):
    model = _film()
    return model, kit.export_to(model, _info(3, 1, metadata=dict(RECORD)), tmp_path_factory.mktemp("film") / "b")


@pytest.fixture(scope="module")
def hemis_bundle(tmp_path_factory, kit):
    model = _hemis()
    return model, kit.export_to(model, _info(3, 3, modalities=list(NAMES)), tmp_path_factory.mktemp("hemis") / "b.zip")


def _session(result, form="float"):
    return load_bundle(result.path).ort_session(form)


def test_film_bundle_matches_pytorch_row_by_row_with_different_metadata(film_bundle):
    model, result = film_bundle
    session = _session(result)
    assert [i.name for i in session.get_inputs()] == ["image", "metadata"]
    torch.manual_seed(5)
    for size in [(16, 16, 16), (8, 12, 20)]:  # dynamic spatial axes
        x = torch.randn(3, 1, *size)
        metadata = torch.tensor([[0.0, 0.0], [1.5, -2.0], [-3.0, 4.0]])  # a different row per batch item
        with torch.no_grad():
            reference = model(x, metadata).numpy()
        out = session.run(None, {"image": x.numpy(), "metadata": metadata.numpy()})[0]
        assert np.abs(out - reference).max() <= 1e-4
    # oracle for "changing the metadata changes the output as in PyTorch": the difference of two predictions
    x = torch.randn(1, 1, 16, 16, 16)
    a, b = torch.tensor([[-1.0, 0.5]]), torch.tensor([[2.0, -1.5]])
    with torch.no_grad():
        torch_delta = (model(x, b) - model(x, a)).numpy()
    ort_delta = (session.run(None, {"image": x.numpy(), "metadata": b.numpy()})[0]
                 - session.run(None, {"image": x.numpy(), "metadata": a.numpy()})[0])
    assert np.abs(torch_delta).max() > 1e-2  # the metadata matters to this model
    np.testing.assert_allclose(ort_delta, torch_delta, atol=2e-4)


def test_film_manifest_records_fields_and_training_normalisation(film_bundle):
    _, result = film_bundle
    raw = json.loads((result.path / MANIFEST).read_text())
    assert raw["schema_version"] == 2
    assert raw["metadata"] == {"input": "metadata", "fields": ["contrast", "age"], "method": "zscore",
                               "mean": [0.5, 61.0], "std": [0.5, 12.5], "table": None, "case_column": "case"}
    assert "modalities" not in raw
    manifest = load_bundle(result.path).manifest
    assert manifest.extra_inputs == ["metadata"] and manifest.extra_input_shapes(4) == {"metadata": (4, 2)}
    assert {name: form.inputs[:2] for name, form in manifest.forms.items()} == {
        "float": ["image", "metadata"], "mc": ["image", "metadata"]}
    assert result.manifest.parity["extra_inputs"]["metadata"]["output_change_max_abs"] > 0


def test_film_mc_form_with_unit_masks_is_the_plain_prediction(film_bundle):
    """Oracle: all-ones dropout masks leave the network as in eval mode, so the MC form equals PyTorch's plain output."""
    model, result = film_bundle
    bundle = load_bundle(result.path)
    session = bundle.ort_session("mc")
    x, metadata = torch.randn(2, 1, 16, 16, 16), torch.tensor([[1.0, -1.0], [-2.0, 3.0]])
    feeds = {"image": x.numpy(), "metadata": metadata.numpy()}
    feeds.update({k: np.ones(s, np.float32) for k, s in bundle.manifest.mc_mask_shapes(2).items()})
    with torch.no_grad():
        reference = model(x, metadata).numpy()
    assert np.abs(session.run(None, feeds)[0] - reference).max() <= 1e-4


def test_hemis_bundle_matches_pytorch_for_every_mask(hemis_bundle):
    model, result = hemis_bundle
    session = _session(result)
    assert [i.name for i in session.get_inputs()] == ["image", "modality_mask"]
    masks = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    x = torch.randn(4, 3, 16, 16, 16)
    x[masks == 0] = 0.0  # absent modalities are zero-filled, as the runtime feeds them
    with torch.no_grad():
        reference = model(x, masks).numpy()
    out = session.run(None, {"image": x.numpy(), "modality_mask": masks.numpy()})[0]
    assert np.abs(out - reference).max() <= 1e-4
    manifest = load_bundle(result.path).manifest
    assert manifest.modalities.names == NAMES and manifest.schema_version == 2
    assert manifest.extra_input_shapes(2) == {"modality_mask": (2, 3)}


def test_2d_film_and_hemis_export(kit, tmp_path):
    film = _film(dims=2, dropout=0.0)
    result = kit.export_to(film, _info(2, 1, metadata=dict(RECORD)), tmp_path / "film2d")
    x, metadata = torch.randn(2, 1, 24, 16), torch.tensor([[0.3, -0.7], [2.0, 1.0]])
    with torch.no_grad():
        reference = film(x, metadata).numpy()
    out = _session(result).run(None, {"image": x.numpy(), "metadata": metadata.numpy()})[0]
    assert np.abs(out - reference).max() <= 1e-4 and set(result.manifest.forms) == {"float"}
    hemis = _hemis(dims=2, dropout=0.0)
    result = kit.export_to(hemis, _info(2, 3), tmp_path / "hemis2d")
    assert result.manifest.modalities.names == ["0", "1", "2"]  # the run recorded no names: training's defaults


def test_export_refuses_film_without_a_recorded_normalisation_and_mismatched_records(kit, tmp_path):
    from edgeseg.export.run_export import export_model

    with pytest.raises(UserError, match="records no metadata normalization"):
        export_model(_film(dropout=0.0), _info(3, 1))
    with pytest.raises(UserError, match="takes 2 metadata values but the run records 1"):
        export_model(_film(dropout=0.0), _info(3, 1, metadata={**RECORD, "fields": ["a"], "mean": [0.0],
                                                                "std": [1.0]}))
    with pytest.raises(UserError, match="std"):
        export_model(_film(dropout=0.0), _info(3, 1, metadata={**RECORD, "std": [0.0, 1.0]}))
    with pytest.raises(UserError, match="must be 3 distinct names"):
        export_model(_hemis(dropout=0.0), _info(3, 3, modalities=["t1", "t1", "t2"]))


def test_image_only_bundles_stay_schema_version_1(float_export):
    assert float_export.manifest.schema_version == 1 and float_export.manifest.extra_inputs == []
    raw = json.loads((float_export.path / MANIFEST).read_text())
    assert "metadata" not in raw and "modalities" not in raw


def test_the_capabilities_claim_float_export_but_not_quantization():
    for name in ("film_unet", "hemis_unet"):
        caps = model_capabilities(name)
        assert caps.exportable and not caps.quantizable


def test_export_run_records_the_runs_metadata_and_table(tmp_path, kit):
    """`export_run` reads RunInfo.metadata and the config's relative table (what `evaluate --data` reads)."""
    from edgeseg.config import load_experiment
    from edgeseg.export.run_export import export_run
    from edgeseg.train.checkpoint import save_weights
    from edgeseg.train.rundir import RunDir, RunInfo

    cfg = load_experiment(None, ["model.name=film_unet", "model.depth=2", "model.base_width=4",
                                 "model.options={metadata_dim: 2, hidden: 8}",
                                 "data.metadata={fields: [contrast, age], table: meta.tsv, case_column: subject}",
                                 "data.patch_size=[16, 16, 16]"])
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_config(cfg)
    run.write_info(RunInfo(spatial_dims=3, in_channels=1, class_names=["bg", "a", "b"], patch_size=[16, 16, 16],
                           tile_size=[16, 16, 16], preprocess=dict(PREPROCESS), data_root=None, metadata=dict(RECORD)))
    save_weights(run.best, _film(dropout=0.0))
    export_run(run.path, tmp_path / "bundle")
    spec = load_bundle(tmp_path / "bundle").manifest.metadata
    assert (spec.fields, spec.mean, spec.std, spec.table, spec.case_column) == (
        ["contrast", "age"], [0.5, 61.0], [0.5, 12.5], "meta.tsv", "subject")
