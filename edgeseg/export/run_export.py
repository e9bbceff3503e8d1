"""`edgeseg export`: a float or quantized run -> a verified model bundle (and optionally a TensorRT engine).

Forms written (docs/bundle.md):

- float run: `float` (model.onnx) and, with MC dropout, `mc` (model_mc.onnx, mask inputs); a model
  with extra inputs (FiLM metadata, HeMIS modality mask; `extra_inputs`) takes them as graph inputs
  in every form (float runs only: such models are not quantizable);
- a STIPPLE run (`train.scheme: stipple`) exports like a standard float run, plus its spatial prior: the
  files of RUN/stipple/ (checked against run.json) in BUNDLE/stipple/ and the manifest's `stipple` section
  (`stipple_export`), which the runtime places on every volume;
- quantized run (brevitas): `cpu_int8` (model_cpu.onnx: QCDQ with weight Clips folded, runs
  QLinearConv in ONNX Runtime), `trt` (model_trt.onnx: symmetric int8 Q/DQ for TensorRT's
  parser), and with MC dropout `mc` (model_mc.onnx: the TensorRT-style graph with mask inputs,
  runnable in both ONNX Runtime and TensorRT).

Every export is gated by measurements, printed at the end: float parity against PyTorch
(max |delta logit| <= 1e-4 + 1e-5 x max |logit|); for quantized runs, per-layer integer parity of the QCDQ graph
against brevitas (every quantized activation within 1 LSB when both sides are fed the same
integer inputs, `layer_parity`; the end-to-end QCDQ-vs-brevitas numbers are reported, not gated,
since one-LSB float-rounding flips propagate); the TensorRT form exactly equal to the QCDQ graph
in ONNX Runtime and clean under `trt_rules`; and the written bundle re-loaded and re-run
bit-identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from edgeseg import __version__
from edgeseg.errors import UserError
from edgeseg.export import graph as g
from edgeseg.export.bundle_writer import write_bundle
from edgeseg.export.cpu_form import conv_kernel_summary, cpu_form, optimized_op_counts
from edgeseg.export.extra_inputs import example_inputs, liveness, manifest_specs, model_extra_inputs
from edgeseg.export.layer_parity import layer_parity
from edgeseg.export.mc import random_masks, with_mask_inputs
from edgeseg.export.packing import WEIGHTS_FILE, PackResult, externalize, pack_int4_weights, weight_bit_widths
from edgeseg.export.parity import Difference, difference, ort_run, output_step
from edgeseg.export.stipple_export import PriorFiles, prior_files
from edgeseg.export.torch_export import INPUT_NAME, OUTPUT_NAME, export_float, export_qcdq, is_brevitas_model
from edgeseg.export.trt_form import trt_form
from edgeseg.export.trt_rules import check_trt_onnx
from edgeseg.runtime.bundle import (
    BASE_SCHEMA_VERSION,
    EXTRA_INPUTS_SCHEMA_VERSION,
    STIPPLE_SCHEMA_VERSION,
    Manifest,
    McSite,
    ModelForm,
    load_bundle,
)

FLOAT_TOLERANCE = 1e-4  # max |delta logit| between ONNX Runtime and PyTorch, float32 ...
FLOAT_RELATIVE_TOLERANCE = 1e-5  # ... plus this fraction of max |logit|: both sum the same float32 products in
# different orders, so their difference grows with the outputs' magnitude. 1e-5 is ~80 float32 ulps; an
# untrained Count-ception's heatmaps reach 120 and differed by 2.1e-4 (1.8e-6 of it).
QUANT_STEP_TOLERANCE = 1.0  # output quantization steps between a quantized graph and brevitas, end to end
LABEL_AGREEMENT_TOLERANCE = 0.995  # ... or labels this similar (see _within; the MC form's gate)
LOGIT_RANGE_TOLERANCE = 0.02  # ... with logits within this fraction of their range
TARGETS = ("onnx", "tensorrt")
FORM_FILES = {"float": "model.onnx", "cpu_int8": "model_cpu.onnx", "trt": "model_trt.onnx", "mc": "model_mc.onnx"}


@dataclass(frozen=True)
class BundleInfo:
    """What the manifest says about the data the model expects (from the run's RunInfo)."""

    spatial_dims: int
    in_channels: int
    class_names: list[str]
    tile_size: list[int]
    preprocess: dict[str, Any]
    batch: int = 1
    slice_axis: int | None = None
    training: dict[str, Any] = field(default_factory=dict)
    bits: str = "fp32"
    source: dict[str, Any] = field(default_factory=dict)
    output_kind: str = "logits"  # "normalized_relu" for SoftSeg runs, "sigmoid_multilabel" for INERRANT runs
    metadata: dict[str, Any] | None = None  # FiLM: RunInfo.metadata (fields, method, mean, std) [+ table, case_column]
    modalities: list[str] | None = None  # HeMIS: RunInfo.modalities (one name per image channel)
    keypoints: dict[str, Any] | None = None  # keypoint runs (output_kind "heatmap"): decoding + sigma_mm, match_mm
    prior: PriorFiles | None = None  # STIPPLE runs: the spatial prior's manifest section and files


@dataclass
class ExportResult:
    manifest: Manifest
    files: dict[str, bytes]
    summary: list[str]
    references: dict[str, np.ndarray]  # form -> ONNX Runtime output on `feeds`, before packing
    feeds: dict[str, dict[str, np.ndarray]]  # form -> the inputs used for `references`
    path: Path | None = None
    engine: Path | None = None


def round_tile(tile: Sequence[int], multiple: int) -> list[int]:
    """Each size rounded up to a multiple of `multiple` (the model's 2**depth)."""
    return [int(-(-int(t) // multiple) * multiple) for t in tile]


def _gate(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _fmt(d: Difference) -> str:
    steps = "" if d.max_steps is None else f", {d.max_steps:.3g} output steps"
    return (f"max |delta| {d.max_abs:.2e}{steps}, {100 * d.differing_fraction:.2f}% of logits not bit-identical, "
            f"labels agree on {100 * d.label_agreement:.3f}% of voxels")


def _dtype_names(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Container types the deployed graph really uses for weights and activations."""
    inits = g.initializers(model)
    weights, acts = set(), set()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            tensor = inits[node.input[0]]
            if tensor.data_type != onnx.TensorProto.INT32:
                weights.add(onnx.TensorProto.DataType.Name(tensor.data_type).lower())
        elif node.op_type == "QuantizeLinear":
            zero = inits.get(node.input[2]) if len(node.input) > 2 else None
            acts.add("uint8" if zero is None else onnx.TensorProto.DataType.Name(zero.data_type).lower())
    if not weights:
        weights = {"float32"}
    return {"weights": sorted(weights), "activations": sorted(acts) or ["float32"]}


def _weight_sizes(model: onnx.ModelProto, bit_widths: dict[str, int]) -> dict[str, int]:
    """Parameter counts and bytes of conv weights/biases: float32, nominal bits, as deployed (int8 / fp32)."""
    inits = g.initializers(model)
    producers = g.producers(model)

    def source(name: str) -> onnx.TensorProto | None:
        if name in inits:
            return inits[name]
        node = producers.get(name)
        return inits.get(node.input[0]) if node is not None and node.op_type == "DequantizeLinear" else None

    params = nominal_bits = deployed = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        for index in (1, 2):
            if len(node.input) <= index or not node.input[index]:
                continue
            tensor = source(node.input[index])
            if tensor is None:
                continue
            count = int(np.prod(tensor.dims))
            params += count
            bits = bit_widths.get(tensor.name, 32) if index == 1 else 32
            nominal_bits += bits * count
            deployed += count * (1 if tensor.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4) else 4)
    return {"parameters": params, "float32_bytes": 4 * params, "nominal_bytes": -(-nominal_bits // 8),
            "deployed_bytes": deployed}


@dataclass(frozen=True)
class _Example:
    """One example input of the export checks: the image and the model's extra inputs (forward order)."""

    image: torch.Tensor
    extra: tuple[torch.Tensor, ...] = ()

    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.image, *self.extra)

    def feeds(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {INPUT_NAME: self.image.numpy(), **{n: t.numpy() for n, t in zip(names, self.extra)}}


def _feeds(base: dict[str, np.ndarray], masks: list[torch.Tensor] | None,
           sites: list[McSite] | None) -> dict[str, np.ndarray]:
    feeds = dict(base)
    for site, mask in zip(sites or [], masks or []):
        feeds[site.input] = mask.numpy()
    return feeds


def _mc_differs(model: onnx.ModelProto, base: dict[str, np.ndarray], sites: list[McSite], spatial_dims: int,
                generator: torch.Generator) -> float:
    """max |delta| between two ONNX Runtime passes with different random masks (must be > 0)."""
    batch = len(base[INPUT_NAME])
    a = ort_run(model, _feeds(base, random_masks(sites, batch, spatial_dims, generator), sites))
    b = ort_run(model, _feeds(base, random_masks(sites, batch, spatial_dims, generator), sites))
    return float(np.abs(a - b).max())


@dataclass
class _Forms:
    """What the export passes accumulate: graphs per form, their manifest kinds, measurements, report lines."""

    forms: dict[str, onnx.ModelProto] = field(default_factory=dict)
    kinds: dict[str, tuple[str, str, dict[str, str]]] = field(default_factory=dict)  # backend, precision, config
    parity: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)

    def add(self, name: str, model: onnx.ModelProto, backend: str, precision: str) -> None:
        self.forms[name] = model
        self.kinds[name] = (backend, precision, {})


def _float64_reference(model: nn.Module, inputs: list[torch.Tensor]) -> list[np.ndarray] | None:
    """brevitas' forward in float64: the quantized model's outputs with (nearly) exact convolution sums.

    brevitas simulates integer arithmetic in float32, so a pre-activation within a few ulps of a
    rounding boundary may round either way depending on summation order (PyTorch's oneDNN and ONNX
    Runtime's MLAS differ); float64 settles those ties the way exact integer arithmetic would. An
    independent reference that tells a float rounding gap from a wrong graph
    (benchmarks/qcdq_rounding.py). None if the model cannot run in float64.
    """
    import copy

    try:
        double = copy.deepcopy(model).double()
        with torch.no_grad():
            outs = [double(x.double()) for x in inputs]
        return [(o.value if hasattr(o, "value") else o).float().numpy() for o in outs]
    except (RuntimeError, TypeError):  # a quantizer without float64 support: fall back to the fp32 reference
        return None


def _within(d: Difference, *, labels_fallback: bool = True) -> bool:
    """End-to-end quantized closeness: one output step where the step is known, else the float tolerance;
    or, failing that, the same labels on >= LABEL_AGREEMENT_TOLERANCE of the voxels with logits within
    LOGIT_RANGE_TOLERANCE of their range. The MC form's gate; with labels_fallback=False, the
    `within_one_step` figure reported for QCDQ vs brevitas (whose gate is per layer, `layer_parity`).

    Why the second criterion: ONNX Runtime and PyTorch sum a convolution's float products in different
    orders, so a pre-activation lying almost exactly between two quantization levels can round to
    different levels; one flipped intermediate step then moves downstream logits by many output steps.
    Seen on trained, batch-norm-folded U-Nets (e.g. 164 steps = 2.3e-3 logits, 0.1% labels changed),
    never on the random-weight test models. The measured numbers are always reported.
    """
    if d.max_steps is not None and d.max_steps <= QUANT_STEP_TOLERANCE:
        return True
    if d.max_steps is None and d.max_abs <= float_tolerance(d):
        return True
    if not labels_fallback:
        return False
    return (d.label_agreement >= LABEL_AGREEMENT_TOLERANCE
            and d.max_abs <= LOGIT_RANGE_TOLERANCE * max(d.logit_range, 1e-12))


def float_tolerance(d: Difference) -> float:
    """The largest float32 |ONNX Runtime - PyTorch| difference accepted for outputs like the reference of `d`."""
    return FLOAT_TOLERANCE + FLOAT_RELATIVE_TOLERANCE * d.reference_max_abs


def _float_forms(model: nn.Module, examples: list[_Example], reference: list[np.ndarray], spatial_dims: int,
                 extra_names: tuple[str, ...], acc: _Forms) -> onnx.ModelProto:
    main = export_float(model, examples[0].args(), spatial_dims, extra_inputs=extra_names)
    g.check(main)
    worst = max((difference(ort_run(main, e.feeds(extra_names)), r) for e, r in zip(examples, reference)),
                key=lambda d: d.max_abs)
    tolerance = float_tolerance(worst)
    acc.parity["float_vs_pytorch"] = {**worst.to_dict(), "tolerance": tolerance, "inputs": len(examples)}
    with_extra = f" (with {' and '.join(extra_names)} inputs)" if extra_names else ""
    acc.summary.append(f"float ONNX vs PyTorch{with_extra}: max |delta logit| {worst.max_abs:.2e} "
                       f"(tolerance {tolerance:.2g})")
    _gate(worst.max_abs <= tolerance, f"float export parity failed: max |delta logit| {worst.max_abs:.3e} > "
                                      f"{tolerance:.3g} ({FLOAT_TOLERANCE:g} + {FLOAT_RELATIVE_TOLERANCE:g} x max "
                                      f"|logit| {worst.reference_max_abs:.3g})")
    if extra_names:
        moved = liveness(lambda feeds: ort_run(main, feeds), examples[0].feeds(extra_names), extra_names)
        acc.parity["extra_inputs"] = {name: {"output_change_max_abs": v} for name, v in moved.items()}
        acc.summary.append("extra inputs: " + "; ".join(f"changing {n} moves the logits by up to {v:.3g}"
                                                         for n, v in moved.items()))
        inert = [n for n, v in moved.items() if not v > 0.0]
        _gate(not inert, f"the exported graph ignores its {' and '.join(inert)} input (traced into a constant?)")
    acc.add("float", main, "any", "fp32")
    return main


def _quant_forms(model: nn.Module, inputs: list[torch.Tensor], reference: list[np.ndarray], spatial_dims: int,
                 acc: _Forms) -> tuple[onnx.ModelProto, dict[str, int], bool]:
    """QCDQ (checked against brevitas) -> CPU int8 form and, where possible, the TensorRT form.

    Returns the CPU form (for size accounting), the nominal weight bit widths, and whether a TensorRT form exists.
    """
    qcdq = export_qcdq(model, (inputs[0],), spatial_dims)
    g.check(qcdq)
    per_layer = layer_parity(qcdq, model, inputs)
    acc.parity["qcdq_per_layer"] = per_layer.to_dict()
    acc.summary.append(per_layer.summary())
    _gate(per_layer.ok, f"quantized export parity failed: {per_layer.failure()}")

    # End to end: reported, not gated (a correct graph may differ by many output steps, see _within).
    step = output_step(qcdq)
    qcdq_out = [ort_run(qcdq, {INPUT_NAME: x.numpy()}, optimize=False) for x in inputs]
    worst = max((difference(o, r, step) for o, r in zip(qcdq_out, reference)), key=lambda d: d.max_abs)
    acc.parity["qcdq_vs_brevitas"] = {**worst.to_dict(), "within_one_step": _within(worst, labels_fallback=False),
                                      "gated": False, "ort_optimization": "disabled (reference Q/DQ semantics)"}
    acc.summary.append(f"QCDQ ONNX vs brevitas end to end (reported): {_fmt(worst)}")
    float64 = _float64_reference(model, inputs)
    if float64 is not None:
        worst64 = max((difference(o, r, step) for o, r in zip(qcdq_out, float64)), key=lambda d: d.max_abs)
        spread = max((difference(e, r, step) for e, r in zip(float64, reference)), key=lambda d: d.max_abs)
        acc.parity["qcdq_vs_brevitas_float64"] = {**worst64.to_dict(),
                                                  "within_one_step": _within(worst64, labels_fallback=False)}
        acc.parity["brevitas_float32_vs_float64"] = spread.to_dict()
        acc.summary.append(f"QCDQ ONNX vs brevitas in float64 (exact sums, reported): {_fmt(worst64)}")
        acc.summary.append(f"brevitas float32 vs float64 (its own rounding spread): {_fmt(spread)}")

    cpu = cpu_form(qcdq)
    g.check(cpu)
    exact = difference(ort_run(cpu, {INPUT_NAME: inputs[0].numpy()}, optimize=False), qcdq_out[0])
    _gate(exact.max_abs == 0.0, f"CPU form differs from the QCDQ graph: {_fmt(exact)}")
    cpu_worst = max((difference(ort_run(cpu, {INPUT_NAME: x.numpy()}), q, step) for x, q in zip(inputs, qcdq_out)),
                    key=lambda d: d.max_abs)
    kernels = conv_kernel_summary(optimized_op_counts(cpu.SerializeToString()))
    acc.parity["cpu_int8_vs_qcdq"] = {**cpu_worst.to_dict(), "ort_optimization": "all (int8 kernels)", **kernels}
    acc.summary.append(f"CPU int8 form: {kernels['int8_conv']} convolutions run as QLinearConv, "
                       f"{kernels['float_conv']} in float; vs QCDQ {_fmt(cpu_worst)}")
    acc.add("cpu_int8", cpu, "onnxruntime", "int8")
    trt_ok = _add_trt_form(qcdq, inputs, qcdq_out, step, acc)
    return cpu, weight_bit_widths(qcdq), trt_ok


def _mc_form(wrapper: nn.Module, sites: list[McSite], example: _Example, extra_names: tuple[str, ...],
             spatial_dims: int, quantized: bool, trt_ok: bool, generator: torch.Generator,
             acc: _Forms) -> dict[str, np.ndarray]:
    """The MC dropout form (masks as inputs), checked against the model with the same masks; returns its feeds."""
    x = example.image
    masks = random_masks(sites, 1, spatial_dims, generator)
    with torch.no_grad():
        ref = wrapper(*example.args(), *masks)
    ref = (ref.value if hasattr(ref, "value") else ref).numpy()
    base = example.feeds(extra_names)
    feeds = _feeds(base, masks, sites)
    if quantized:
        mc_qcdq = export_qcdq(wrapper, (x, *masks), spatial_dims, sites)
        # TensorRT-style int8 graph (runs in ONNX Runtime too); the CPU form when TensorRT cannot take the model
        mc_model = trt_form(mc_qcdq) if trt_ok else cpu_form(mc_qcdq)
        problems = check_trt_onnx(mc_model) if trt_ok else []
        _gate(not problems, f"MC dropout form breaks a TensorRT parser rule: {problems[0] if problems else ''}")
        diff = difference(ort_run(mc_model, feeds, optimize=False), ref, output_step(mc_qcdq))
        ok = _within(diff)
        acc.add("mc", mc_model, "any" if trt_ok else "onnxruntime", "int8")
    else:
        mc_model = export_float(wrapper, (*example.args(), *masks), spatial_dims, sites, extra_names)
        diff = difference(ort_run(mc_model, feeds), ref)
        ok = diff.max_abs <= float_tolerance(diff)
        acc.add("mc", mc_model, "any", "fp32")
    g.check(mc_model)
    _gate(ok, f"MC dropout export parity failed: {_fmt(diff)}")
    spread = _mc_differs(mc_model, base, sites, spatial_dims, generator)
    _gate(spread > 0.0, "MC dropout export is inert: two passes with different masks gave the same output")
    acc.parity["mc_vs_pytorch"] = {**diff.to_dict(), "two_pass_max_abs_difference": spread}
    acc.summary.append(f"MC dropout: {len(sites)} mask inputs; vs {'brevitas' if quantized else 'PyTorch'} with the "
                       f"same masks {_fmt(diff)}; two passes differ by up to {spread:.3g}")
    return feeds


def export_model(model: nn.Module, info: BundleInfo, *, seed: int = 0) -> ExportResult:
    """Export `model` (float or brevitas, eval mode) into bundle files + manifest, measuring parity on the way."""
    model = model.eval()
    multiple = int(getattr(model, "min_input_multiple", 1))
    tile = round_tile(info.tile_size, multiple)
    if len(tile) != info.spatial_dims:
        raise UserError(f"--tile {tile} needs {info.spatial_dims} values")
    generator = torch.Generator().manual_seed(seed)
    shape = (1, info.in_channels, *tile)
    quantized = is_brevitas_model(model)
    extra_names = model_extra_inputs(model)
    if extra_names and quantized:
        raise UserError(f"quantized export of a model with extra inputs ({', '.join(extra_names)}) is not supported; "
                        "export the float run")
    meta_spec, modality_spec = manifest_specs(extra_names, model, info.metadata, info.modalities, info.in_channels)
    # a unit-variance input (z-scored images) and a large one that drives activations into their clip range
    inputs = [torch.randn(shape, generator=generator), 3.0 * torch.randn(shape, generator=generator)]
    examples = [_Example(x, example_inputs(model, extra_names, 1, k, generator)) for k, x in enumerate(inputs)]
    with torch.no_grad():
        outputs = [model(*e.args()) for e in examples]
    reference = [(o.value if hasattr(o, "value") else o).numpy() for o in outputs]  # brevitas may return QuantTensor
    acc = _Forms()
    if quantized:
        weights_model, bit_widths, trt_ok = _quant_forms(model, inputs, reference, info.spatial_dims, acc)
    else:
        weights_model = _float_forms(model, examples, reference, info.spatial_dims, extra_names, acc)
        bit_widths, trt_ok = {}, True
    feeds = {name: examples[0].feeds(extra_names) for name in acc.forms}
    wrapped = with_mask_inputs(model, inputs[0], examples[0].extra)
    sites = wrapped[1] if wrapped else []
    if wrapped is not None:
        feeds["mc"] = _mc_form(wrapped[0], sites, examples[0], extra_names, info.spatial_dims, quantized, trt_ok,
                               generator, acc)
    references = {name: ort_run(m, feeds[name], optimize=False) for name, m in acc.forms.items()}

    deployed = {name: _dtype_names(m) for name, m in acc.forms.items()}
    sizes = {"weights": _weight_sizes(weights_model, bit_widths)}
    files, form_entries, packed_count = _pack_forms(acc.forms, acc.kinds, sites, extra_names)
    if info.prior is not None:
        files.update(info.prior.files)
        acc.summary.append(f"STIPPLE prior: {len(info.prior.files)} files from the run (sha256 as run.json records), "
                           f"reference volume {info.prior.spec.reference_case}, placed by the runtime on each volume")
    sizes["weights"]["at_rest_bytes"] = len(files[WEIGHTS_FILE])
    sizes["weights"]["int4_packed_tensors"] = packed_count
    at_rest = "int4" if packed_count else ("int8" if quantized else "float32")
    manifest = Manifest(
        spatial_dims=info.spatial_dims, in_channels=info.in_channels, class_names=list(info.class_names),
        tile_size=tile, min_input_multiple=multiple, preprocess=dict(info.preprocess), forms=form_entries, files={},
        input_name=INPUT_NAME, output_name=OUTPUT_NAME, output_kind=info.output_kind, batch=info.batch,
        slice_axis=info.slice_axis, training=dict(info.training),
        bits={"nominal": info.bits, "weights_at_rest": at_rest, "deployed": deployed,
              "weight_bit_widths": sorted(set(bit_widths.values())) or [32]},
        mc_sites=list(sites), sizes=sizes, parity=acc.parity, source=dict(info.source), edgeseg_version=__version__,
        metadata=meta_spec, modalities=modality_spec, keypoints=info.keypoints,
        stipple=None if info.prior is None else info.prior.spec,
        schema_version=(STIPPLE_SCHEMA_VERSION if info.prior is not None
                        else EXTRA_INPUTS_SCHEMA_VERSION if extra_names else BASE_SCHEMA_VERSION),
    )
    w = sizes["weights"]
    acc.summary.append(f"weights: {w['parameters']:,} parameters; float32 {w['float32_bytes'] / 1e3:.1f} kB, nominal "
                       f"{info.bits} {w['nominal_bytes'] / 1e3:.1f} kB, deployed {w['deployed_bytes'] / 1e3:.1f} kB, "
                       f"at rest {w['at_rest_bytes'] / 1e3:.1f} kB ({at_rest})")
    return ExportResult(manifest=manifest, files=files, summary=acc.summary, references=references, feeds=feeds)


def _add_trt_form(qcdq: onnx.ModelProto, inputs: list[torch.Tensor], qcdq_out: list[np.ndarray],
                  step: np.ndarray | None, acc: _Forms) -> bool:
    """Add the TensorRT form if the model can have one (e.g. not with unsigned 8-bit activations); gate its exactness."""
    try:
        trt = trt_form(qcdq)
    except UserError as exc:
        acc.parity["trt_vs_qcdq"] = {"skipped": str(exc)}
        acc.summary.append(f"TensorRT form: not written ({exc})")
        return False
    g.check(trt)
    problems = check_trt_onnx(trt)
    _gate(not problems, f"TensorRT form breaks a parser rule: {problems[0] if problems else ''}")
    worst = max((difference(ort_run(trt, {INPUT_NAME: x.numpy()}, optimize=False), q, step)
                 for x, q in zip(inputs, qcdq_out)), key=lambda d: d.max_abs)
    acc.parity["trt_vs_qcdq"] = {**worst.to_dict(), "trt_rules": "passed", "ort_optimization": "disabled"}
    acc.summary.append(f"TensorRT form: parser rules OK; vs QCDQ in ONNX Runtime {_fmt(worst)}")
    _gate(worst.max_abs == 0.0, f"TensorRT form is not exact against the QCDQ graph: {_fmt(worst)}")
    acc.add("trt", trt, "tensorrt", "int8")
    return True


def _pack_forms(forms: dict[str, onnx.ModelProto], kinds: dict[str, tuple[str, str, dict[str, str]]],
                sites: list[McSite], extra_names: Sequence[str] = ()) -> tuple[dict[str, bytes], dict[str, ModelForm], int]:
    """INT4-pack and externalize every form; returns the files, the manifest form entries, #packed weights."""
    at_rest: dict[str, onnx.ModelProto] = {}
    entries: dict[str, ModelForm] = {}
    packed_total = 0
    for name, model in forms.items():
        g.compact_names(model)
        packed = g.copy(model)
        result = pack_int4_weights(packed)
        if result.packed:
            try:
                g.check(packed)
            except onnx.checker.ValidationError:
                # Some operator does not validate at the INT4 opset (21): keep this form unpacked.
                packed = g.copy(model)
                result = PackResult(packed=0, opset=g.opset(model), ir_version=model.ir_version)
        packed_total = max(packed_total, result.packed)
        backend, precision, config = kinds[name]
        mc = name == "mc"
        entries[name] = ModelForm(file=FORM_FILES[name], backend=backend, precision=precision, mc=mc,
                                  packed_int4=result.packed > 0, opset=result.opset, ir_version=result.ir_version,
                                  inputs=g.input_names(model), session_config=config)
        expected = [INPUT_NAME, *extra_names] + ([s.input for s in sites] if mc else [])
        if entries[name].inputs != expected:
            raise RuntimeError(f"form {name} has inputs {entries[name].inputs}, expected {expected}")
        at_rest[name] = packed
    blob = externalize(at_rest)
    files = {FORM_FILES[name]: m.SerializeToString() for name, m in at_rest.items()}
    files[WEIGHTS_FILE] = blob
    return files, entries, packed_total


def verify_bundle(path: Path, result: ExportResult) -> list[str]:
    """Re-load the written bundle and check every form reproduces its pre-packing output bit for bit."""
    bundle = load_bundle(path)
    lines = []
    for name, reference in result.references.items():
        out = ort_run(bundle.model_bytes(name), result.feeds[name], optimize=False)
        if not np.array_equal(out, reference):
            raise RuntimeError(f"bundle form {name} does not reproduce the exported graph after loading")
        lines.append(name)
    return [f"bundle re-loaded: hashes verified; forms {', '.join(lines)} reproduce the checked graphs exactly"]


def _load_run(run_dir: Path) -> tuple[nn.Module, BundleInfo]:
    from edgeseg.nets import require_capability
    from edgeseg.train.rundir import RunDir
    from edgeseg.train.schemes import bundle_output_kind

    cfg = RunDir(run_dir).read_config()
    require_capability(cfg.model.name, "exportable", "exported")
    output_kind = bundle_output_kind(cfg)  # the runtime reads the model's output as the run was trained to
    keypoints = None
    if cfg.train.scheme == "keypoints":  # the runtime decodes heatmaps as evaluation does
        from edgeseg.train.keypoints import decoding

        settings = cfg.train.keypoints_settings
        keypoints = {**decoding(settings).to_dict(), "sigma_mm": settings.sigma_mm, "match_mm": settings.match_mm}
    info = RunDir(run_dir).read_info()
    if info.parent_run is not None:
        from edgeseg.quantize.qat import load_quant_model

        model, _, info = load_quant_model(run_dir)
    else:
        from edgeseg.train.experiment import load_run_model

        model, _, info = load_run_model(run_dir)
    preprocess = dict(info.preprocess)
    prior = None
    if cfg.train.scheme == "stipple":  # the prior the run was trained and evaluated with, checked against run.json
        prior = prior_files(Path(run_dir), info.extra.get("stipple"), cfg.train.stipple_settings, info.class_names)
    metadata = None
    if info.metadata is not None:
        metadata = dict(info.metadata)
        meta_cfg = cfg.data.metadata
        if meta_cfg is not None:  # a table under the data root (kept relative by training) serves `evaluate --data`
            relative = meta_cfg.table is not None and not Path(meta_cfg.table).expanduser().is_absolute()
            metadata.update(table=meta_cfg.table if relative else None, case_column=meta_cfg.case_column)
    training = {
        "patch_size": list(info.patch_size),
        "spacing": preprocess.get("target_spacing"),  # None: each volume's native spacing was kept
        "orientation": "RAS" if preprocess.get("reorient", True) else "native",
    }
    return model, BundleInfo(
        spatial_dims=info.spatial_dims, in_channels=info.in_channels, class_names=list(info.class_names),
        tile_size=list(info.tile_size), preprocess=preprocess,
        slice_axis=info.slice_axis if info.spatial_dims == 2 else None, training=training, bits=info.bits,
        source={"run_dir": str(Path(run_dir).resolve()), "parent_run": info.parent_run,
                "trained_with": info.edgeseg_version},
        output_kind=output_kind, metadata=metadata, modalities=None if info.modalities is None else list(info.modalities),
        keypoints=keypoints, prior=prior,
    )


def export_run(run_dir: Path, out: Path, *, target: str = "onnx", tile: Sequence[int] | None = None, batch: int = 1,
               overwrite: bool = False, seed: int = 0) -> ExportResult:
    """Export a run directory (float or quantized) to a bundle at `out`; with target "tensorrt" also build the engine."""
    if target not in TARGETS:
        from edgeseg.errors import unknown_name

        raise unknown_name("export target", target, TARGETS)
    if batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    if target == "tensorrt":
        from edgeseg.runtime.trt_build import detect_gpu, require_tensorrt

        require_tensorrt()  # fail in one line before the (slow) export when TensorRT or a GPU is missing
        detect_gpu()
    if Path(out).exists() and not overwrite:
        raise UserError(f"{out} already exists (pass --overwrite to replace it)")
    model, info = _load_run(Path(run_dir))
    if tile is not None:
        if len(tile) != info.spatial_dims:
            raise UserError(f"--tile {list(tile)} needs {info.spatial_dims} values for this {info.spatial_dims}D model")
        info = replace(info, tile_size=list(tile))
    info = replace(info, batch=batch)
    result = export_model(model, info, seed=seed)
    result.manifest = write_bundle(out, result.files, result.manifest, overwrite=overwrite)
    result.path = Path(out)
    result.summary.extend(verify_bundle(Path(out), result))
    result.summary.append(f"bundle: {out} ({result.manifest.sizes['bundle_bytes'] / 1e3:.1f} kB, "
                          f"forms {', '.join(result.manifest.forms)})")
    if target == "tensorrt":
        from edgeseg.runtime.trt_build import build_engine

        built = build_engine(Path(out), batch=batch)
        result.engine = built.path
        result.summary.append(f"TensorRT engine: {built.path}")
    return result
