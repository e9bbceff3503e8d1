"""`edgeseg bundle`: wrap any ONNX segmentation model in an edgeseg bundle, its manifest built from flags.

Torch-free (onnx + onnxruntime). The model must take one image input (N, C, *S) with 2 or 3
spatial axes and return per-class scores (N, classes, *S). Its weights go to `weights.bin` like
those of exported models; the graph itself is not changed. The bundle is smoke-tested: the
model is run once in ONNX Runtime on a zero tile and the output shape checked; the TensorRT
parser rules (`trt_rules`) are checked and reported, and decide whether the form is marked
for both backends or ONNX Runtime only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from edgeseg import __version__
from edgeseg.errors import UserError
from edgeseg.export import graph as g
from edgeseg.export.bundle_writer import write_bundle
from edgeseg.export.packing import WEIGHTS_FILE, externalize
from edgeseg.export.parity import ort_run
from edgeseg.export.trt_rules import check_trt_onnx
from edgeseg.runtime.bundle import OUTPUT_KINDS, Manifest, ModelForm, sha256_hex

MODEL_FILE = "model.onnx"


def _static_dims(info: onnx.ValueInfoProto) -> list[int | None]:
    dims = info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


def make_bundle(onnx_path: Path, out: Path, *, class_names: Sequence[str], tile: Sequence[int] | None = None,
                in_channels: int | None = None, min_input_multiple: int = 1, normalization: str = "zscore",
                target_spacing: Sequence[float] | None = None, reorient: bool = True,
                clip_percentiles: tuple[float, float] = (0.5, 99.5), output_kind: str = "logits", batch: int = 1,
                overwrite: bool = False) -> Manifest:
    """Bundle a third-party ONNX model; returns the written manifest."""
    from edgeseg.data.preprocess import PreprocessSpec

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX model not found: {onnx_path}")
    if output_kind not in OUTPUT_KINDS:
        from edgeseg.errors import unknown_name

        raise unknown_name("output kind", output_kind, OUTPUT_KINDS)
    if len(class_names) < 1 or any(not c for c in class_names):
        raise UserError("--classes needs one non-empty name per output channel, e.g. background,liver")
    if output_kind == "sigmoid" and len(class_names) != 2:
        raise UserError("--output-kind sigmoid is for a binary model with one output channel: "
                        "--classes needs exactly two names, e.g. background,lesion")
    try:
        model = onnx.load(str(onnx_path))  # external data next to the file is read in
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, OSError, ValueError) as exc:
        raise UserError(f"{onnx_path}: not a valid ONNX model ({type(exc).__name__}: {exc})") from None
    preprocess = PreprocessSpec(reorient=reorient, target_spacing=tuple(target_spacing) if target_spacing else None,
                                normalization=normalization, clip_percentiles=clip_percentiles).to_dict()

    inputs = [i for i in model.graph.input if i.name in set(g.input_names(model))]
    if len(inputs) != 1:
        raise UserError(f"{onnx_path}: the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                        "an edgeseg bundle feeds exactly one image input")
    dims = _static_dims(inputs[0])
    if len(dims) not in (4, 5):
        raise UserError(f"{onnx_path}: input '{inputs[0].name}' has rank {len(dims)}; expected (N, C, H, W) or "
                        "(N, C, D, H, W)")
    spatial_dims = len(dims) - 2
    channels = dims[1] if in_channels is None else in_channels
    if channels is None:
        raise UserError(f"{onnx_path}: the channel axis of '{inputs[0].name}' is dynamic; pass --in-channels")
    if dims[1] is not None and dims[1] != channels:
        raise UserError(f"--in-channels {channels} contradicts the model's input channels {dims[1]}")
    fixed = dims[2:]
    if tile is None:
        if any(d is None for d in fixed):
            raise UserError(f"{onnx_path}: the model's spatial size is dynamic; pass --tile")
        tile = [int(d) for d in fixed]  # type: ignore[arg-type]
    tile = [int(t) for t in tile]
    if len(tile) != spatial_dims:
        raise UserError(f"--tile {tile} needs {spatial_dims} values for this {spatial_dims}D model")
    for t, d in zip(tile, fixed):
        if d is not None and t != d:
            raise UserError(f"--tile {tile} differs from the model's fixed spatial size {fixed}")
    if min_input_multiple < 1 or any(t % min_input_multiple for t in tile):
        raise UserError(f"--tile {tile} must be multiples of --min-multiple {min_input_multiple}")

    out_name = model.graph.output[0].name
    probe = np.zeros((1, channels, *tile), np.float32)
    try:
        result = ort_run(model, {inputs[0].name: probe})
    except Exception as exc:  # noqa: BLE001 - onnxruntime's pybind errors share no base class but Exception
        raise UserError(f"{onnx_path}: ONNX Runtime cannot run the model on a {tile} tile ({exc})") from None
    expected = (1, 1 if output_kind == "sigmoid" else len(class_names), *tile)
    if tuple(result.shape) != expected:
        per = "one sigmoid channel" if output_kind == "sigmoid" else "one channel per --classes name"
        raise UserError(f"{onnx_path}: output '{out_name}' has shape {list(result.shape)} for a {tile} tile; "
                        f"expected {list(expected)} ({per})")

    problems = check_trt_onnx(model)
    form = ModelForm(file=MODEL_FILE, backend="any" if not problems else "onnxruntime", precision="fp32",
                     opset=g.opset(model), ir_version=model.ir_version, inputs=[inputs[0].name])
    original = onnx_path.read_bytes()
    weights = externalize({"float": model})
    files = {MODEL_FILE: model.SerializeToString(), WEIGHTS_FILE: weights}
    source: dict[str, Any] = {"third_party": True, "onnx": onnx_path.name, "onnx_sha256": sha256_hex(original)}
    manifest = Manifest(
        spatial_dims=spatial_dims, in_channels=int(channels), class_names=list(class_names), tile_size=tile,
        min_input_multiple=min_input_multiple, preprocess=preprocess, forms={"float": form}, files={},
        input_name=inputs[0].name, output_name=out_name, output_kind=output_kind, batch=batch,
        training={"patch_size": None, "spacing": preprocess["target_spacing"],
                  "orientation": "RAS" if reorient else "native"},
        bits={"nominal": "unknown (third-party model)", "weights_at_rest": "as provided"},
        parity={"smoke_test": f"ONNX Runtime ran a {tile} tile, output {list(result.shape)}",
                "trt_rules": problems[:20] or "passed"},
        source=source, edgeseg_version=__version__,
    )
    return write_bundle(out, files, manifest, overwrite=overwrite)
