"""Registry-driven contract tests (timm style): every registered model is held to what its class declares.

For each model and each declared dimensionality: forward shape, backward with a gradient for
every parameter, MC dropout where declared, ONNX export parity where exportable (ONNX Runtime vs
PyTorch, also at a second tile size: the graph has dynamic axes), a brevitas QAT twin where
quantizable (folded float model -> QuantLayers twin -> calibration -> close to the float model ->
train-mode backward), and the pipeline's refusal where a capability is off.
Sizes are tiny (widths 4..16, 32² / 16³ inputs) so the whole module stays well under a minute.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeseg.config import ExperimentConfig, ModelConfig
from edgeseg.errors import UserError
from edgeseg.nets import (
    Capabilities,
    available_models,
    create_model,
    model_capabilities,
    model_class,
    model_options,
    set_mc_dropout,
)

MODELS = list(available_models())
CASES = [(name, dims) for name in MODELS for dims in model_capabilities(name).spatial_dims]
IDS = [f"{name}-{dims}d" for name, dims in CASES]
TEST_OPTIONS = {"utransformer": {"heads": 2}, "film_unet": {"metadata_dim": 3}}
SIZE = {2: (32, 32), 3: (16, 16, 16)}
OTHER_SIZE = {2: (16, 24), 3: (8, 16, 24)}  # another tile, multiples of 2**depth = 4
IN_CHANNELS, OUT_CHANNELS, DEPTH = 2, 3, 2
# the input multiple each model must declare: 2**depth for the U-Nets; 1 for pool-free networks
MIN_INPUT_MULTIPLE = {"countception": 1}


def build(name: str, dims: int, **kwargs):
    settings = {"depth": DEPTH, "base_width": 4, "dropout": 0.1, **TEST_OPTIONS.get(name, {}), **kwargs}
    return create_model(name, spatial_dims=dims, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, **settings)


def extra_inputs(model, batch: int) -> tuple[torch.Tensor, ...]:
    """The inputs a model declares besides the image, in declared order."""
    makers = {
        "metadata": lambda: torch.randn(batch, model.metadata_dim),
        # case 0 lacks the last modality, case 1 has all: every encoder still gets a gradient
        "modality_mask": lambda: torch.tensor([[1.0] * (IN_CHANNELS - 1) + [0.0]] + [[1.0] * IN_CHANNELS] * (batch - 1)),
    }
    return tuple(makers[n]() for n in type(model).capabilities.extra_inputs)


def image(dims: int, batch: int = 2, size=None) -> torch.Tensor:
    return torch.randn(batch, IN_CHANNELS, *(size or SIZE[dims]))


def plain(t):
    return t.value if hasattr(t, "value") else t


# ---- declarations ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_capabilities_and_options_are_declared(name):
    cls = model_class(name)
    assert isinstance(cls.capabilities, Capabilities)
    assert dataclasses.is_dataclass(cls.Options)
    # every option a test sets goes through the config validation the pipeline uses
    assert set(TEST_OPTIONS.get(name, {})) <= set(model_options(name, TEST_OPTIONS.get(name, {})))
    for extra in cls.capabilities.extra_inputs:
        assert extra in ("metadata", "modality_mask"), f"unknown extra input {extra}: teach extra_inputs()"


@pytest.mark.parametrize(("name", "dims"), CASES, ids=IDS)
def test_forward_backward_every_parameter_gets_gradient(name, dims):
    torch.manual_seed(0)
    decoder = "transposed" if dims == 2 else "upsample"  # both decoders, without doubling the cases
    model = build(name, dims, decoder=decoder)
    assert model.min_input_multiple == MIN_INPUT_MULTIPLE.get(name, 2**DEPTH)
    x = image(dims)
    out = model(x, *extra_inputs(model, 2))
    assert out.shape == (2, OUT_CHANNELS) + x.shape[2:]
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing}"
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"identically zero gradient for {zero}"


@pytest.mark.parametrize(("name", "dims"), CASES, ids=IDS)
def test_mc_dropout_as_declared(name, dims):
    torch.manual_seed(0)
    model = build(name, dims, dropout=0.5).eval()  # p = 0.5: some of the few channels are surely dropped
    x = image(dims, batch=1)
    extra = extra_inputs(model, 1)
    sites = set_mc_dropout(model, True)
    assert (sites > 0) == model_capabilities(name).mc_dropout
    with torch.no_grad():
        if sites:
            assert not torch.equal(model(x, *extra), model(x, *extra))
            assert not any(m.training for m in model.modules())  # batch norm stays in eval mode
        set_mc_dropout(model, False)
        assert torch.equal(model(x, *extra), model(x, *extra))


# ---- export ---------------------------------------------------------------------------------------

EXPORTABLE = [(n, d) for n, d in CASES if model_capabilities(n).exportable]


@pytest.mark.parametrize(("name", "dims"), EXPORTABLE, ids=[f"{n}-{d}d" for n, d in EXPORTABLE])
def test_onnx_export_matches_pytorch(name, dims):
    from edgeseg.export.torch_export import export_float

    torch.manual_seed(0)
    model = build(name, dims).eval()
    names = model_capabilities(name).extra_inputs  # graph inputs after the image (FiLM metadata, HeMIS mask)
    graph = export_float(model, (image(dims, batch=1), *extra_inputs(model, 1)), dims, extra_inputs=names)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    for size in (SIZE[dims], OTHER_SIZE[dims]):
        x = image(dims, batch=2, size=size)
        extra = extra_inputs(model, 2)  # a different row per batch item
        with torch.no_grad():
            reference = model(x, *extra).numpy()
        out = session.run(None, {"image": x.numpy(), **{n: t.numpy() for n, t in zip(names, extra)}})[0]
        assert out.shape == reference.shape
        assert np.abs(out - reference).max() <= 1e-4, size


def test_export_refuses_what_is_not_exportable(tmp_path, monkeypatch):
    """Every shipped model exports today, so a model is made to declare exportable=False."""
    from edgeseg.export.run_export import export_run
    from edgeseg.nets import registry

    real = registry.model_capabilities
    monkeypatch.setattr(registry, "model_capabilities",
                        lambda n: dataclasses.replace(real(n), exportable=False, notes="no ONNX form"))
    run = _fake_run(tmp_path, "unet")
    with pytest.raises(UserError, match="model 'unet' cannot be exported .*no ONNX form"):
        export_run(run, tmp_path / "bundle.zip")
    assert not (tmp_path / "bundle.zip").exists()


# ---- quantization ---------------------------------------------------------------------------------

QUANTIZABLE = [(n, d) for n, d in CASES if model_capabilities(n).quantizable]


@pytest.mark.parametrize(("name", "dims"), QUANTIZABLE, ids=[f"{n}-{d}d" for n, d in QUANTIZABLE])
def test_qat_twin_tracks_float_model_and_trains(name, dims):
    """The pipeline's steps on the model: fold BN, build the QuantLayers twin, load, calibrate, QAT step."""
    from brevitas.nn import QuantConv2d, QuantConv3d

    from edgeseg.quantize.bits import parse_bits
    from edgeseg.quantize.calibrate import calibrate
    from edgeseg.quantize.fold import fold_batch_norms
    from edgeseg.quantize.layers import QuantLayers
    from edgeseg.quantize.twin import load_folded_weights

    torch.manual_seed(0)
    decoder = "transposed" if dims == 2 else "upsample"
    float_model = build(name, dims, norm="batch", decoder=decoder)
    with torch.no_grad():  # real running statistics for batch norm
        for _ in range(3):
            float_model(image(dims, batch=4))
    folded = fold_batch_norms(float_model)
    assert folded
    layers = QuantLayers(dims, parse_bits("8/8"), norm="none", signed_concat=decoder == "transposed")
    twin = build(name, dims, decoder=decoder, layers=layers)
    load_folded_weights(twin, float_model)
    calibrate(twin, [image(dims) for _ in range(3)])
    convs = [m for m in twin.modules() if isinstance(m, (QuantConv2d, QuantConv3d))]
    assert len(convs) >= 10  # the U-Net trunk at least is quantized

    twin.eval()
    x = image(dims)
    with torch.no_grad():
        reference, quantized = float_model(x), plain(twin(x))
    # oracle: the folded float model; 8-bit weights and activations stay close to it
    assert (quantized - reference).abs().max() <= 0.1 * reference.abs().max()
    assert (quantized.argmax(1) == reference.argmax(1)).float().mean() >= 0.9

    twin.train()
    plain(twin(x)).square().mean().backward()
    missing = [n for n, p in twin.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


# the U-Net's quantized export is covered in depth by tests/export/test_quant_export.py
QUANT_EXPORT = [n for n in MODELS if model_capabilities(n).quantizable and model_capabilities(n).exportable
                and n != "unet"]
# countception: with float scales the float32 evaluations (brevitas, and ONNX Runtime's Q/DQ reference)
# round a few 6-bit activations of its 20x20 convs (sums of 22,400 terms) to the neighbouring level;
# brevitas-fp32 and brevitas-fp64 disagree as much end to end; the export gate compares layer by layer
# (edgeseg/export/layer_parity.py), each layer fed brevitas' own codes. With power-of-two scales the graph is
# bit-exact (tests/nets/test_countception.py).


@pytest.mark.parametrize("name", QUANT_EXPORT)
def test_quantized_twin_exports_through_the_pipeline(name):
    """`export_model` on a calibrated 4/6 twin: QCDQ vs brevitas, CPU int8 and TensorRT forms, MC form, all gated."""
    from edgeseg.export.run_export import BundleInfo, export_model
    from edgeseg.quantize.bits import parse_bits
    from edgeseg.quantize.calibrate import calibrate
    from edgeseg.quantize.layers import QuantLayers

    torch.manual_seed(0)
    twin = build(name, 2, layers=QuantLayers(2, parse_bits("4/6"), norm="none"))
    calibrate(twin, [image(2, size=(16, 16)) for _ in range(2)])
    info = BundleInfo(spatial_dims=2, in_channels=IN_CHANNELS, class_names=["bg", "a", "b"], tile_size=[16, 16],
                      preprocess={"normalization": "zscore"})
    result = export_model(twin.eval(), info)  # raises UserError when any form misses its parity gate
    assert {"cpu_int8", "trt", "mc"} <= set(result.manifest.forms)


@pytest.mark.parametrize("name", [n for n in MODELS if not model_capabilities(n).quantizable])
def test_quantize_refuses_what_is_not_quantizable(name, tmp_path):
    from edgeseg.quantize.qat import quantize_run

    run = _fake_run(tmp_path, name)
    with pytest.raises(UserError, match=f"model '{name}' cannot be quantized"):
        quantize_run(run, "4/6", tmp_path / "q")


def _fake_run(tmp_path, name: str):
    """A float run directory holding only config and run info (the refusals come before any weights are read)."""
    from edgeseg.train.rundir import RunDir, RunInfo

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_config(ExperimentConfig(model=ModelConfig(name=name, options=TEST_OPTIONS.get(name, {}))))
    run.write_info(RunInfo(spatial_dims=3, in_channels=IN_CHANNELS, class_names=["bg", "a", "b"],
                           patch_size=[16, 16, 16], tile_size=[16, 16, 16], preprocess={}, data_root=None))
    return run.path
