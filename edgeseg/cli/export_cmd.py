"""`edgeseg export`, `edgeseg bundle` and `edgeseg build-engine` (registered in `edgeseg.cli.app`).

Heavy imports stay inside the commands: `export` needs torch/brevitas/onnx, `bundle` onnx,
`build-engine` only the runtime install plus TensorRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from edgeseg.errors import UserError

console = Console()


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} '{text}': expected comma-separated numbers") from None


def parse_tile(text: str | None) -> list[int] | None:
    """`D,H,W` (or `H,W`) -> list of ints; None stays None."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--tile '{text}': expected comma-separated integers like 48,64,48") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"--tile '{text}': sizes must be positive integers")
    return values


def check_bundle_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse, before any work, a bundle --out that is or holds an input, or that --overwrite would
    replace although it is not a bundle (a folder of other files is never deleted)."""
    from edgeseg.runtime.bundle import MANIFEST, is_archive

    target = out.resolve()
    for source in inputs:
        source = source.resolve()
        if target == source or target in source.parents:
            raise UserError(f"--out {out} would replace the input {source}; choose another --out")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a folder")
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} already exists (pass --overwrite to replace it)")
        if not ((out.is_dir() and (out / MANIFEST).is_file()) or (out.is_file() and is_archive(out))):
            raise UserError(f"{out} exists and is not an edgeseg bundle; --overwrite only replaces bundles")


def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory from `edgeseg train` or `edgeseg quantize`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle to write: a directory, or a single file ending in .zip.")],
    target: Annotated[str, typer.Option("--target", help="onnx, or tensorrt (also builds the engine; needs TensorRT and a GPU).")] = "onnx",
    tile: Annotated[str | None, typer.Option("--tile", help="Inference tile D,H,W (default: the training patch).")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Batch of the TensorRT optimisation profile.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle at --out.")] = False,
) -> None:
    """Export a float or quantized run to an ONNX bundle (float, CPU int8, TensorRT and MC-dropout forms)."""
    from edgeseg.export.run_export import export_run

    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    check_bundle_output(out, [run_dir], overwrite)
    result = export_run(run_dir, out, target=target, tile=parse_tile(tile), batch=batch, overwrite=overwrite)
    for line in result.summary:
        console.print(f"  {line}", highlight=False)
    console.print(f"[green]done[/green]: {out}")


def bundle(
    onnx_model: Annotated[Path, typer.Option("--onnx", help="The ONNX segmentation model to wrap.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle to write: a directory, or a file ending in .zip.")],
    classes: Annotated[str, typer.Option("--classes", help="Class names, one per output channel: background,liver.")],
    tile: Annotated[str | None, typer.Option("--tile", help="Inference tile D,H,W (default: the model's fixed size).")] = None,
    in_channels: Annotated[int | None, typer.Option("--in-channels", help="Input channels when the model leaves them dynamic.")] = None,
    min_multiple: Annotated[int, typer.Option("--min-multiple", help="Spatial sizes must be multiples of this (e.g. 16).")] = 1,
    normalization: Annotated[str, typer.Option("--normalization", help="zscore, percentile or none.")] = "zscore",
    spacing: Annotated[str | None, typer.Option("--spacing", help="Resample to this spacing in mm, e.g. 1,1,1 (default: native).")] = None,
    reorient: Annotated[bool, typer.Option("--reorient/--no-reorient", help="Reorient to RAS+ before inference.")] = True,
    clip_percentiles: Annotated[str, typer.Option("--clip-percentiles", help="Intensity percentiles clipped before normalising.")] = "0.5,99.5",
    output_kind: Annotated[str, typer.Option("--output-kind", help="logits (softmax), probabilities, or sigmoid (binary model, one output channel).")] = "logits",
    batch: Annotated[int, typer.Option("--batch", help="Batch of the TensorRT optimisation profile.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing bundle at --out.")] = False,
) -> None:
    """Wrap any ONNX segmentation model in a bundle whose manifest comes from these flags."""
    try:
        from edgeseg.export.third_party import make_bundle
    except ImportError as exc:
        raise UserError(f"`edgeseg bundle` needs the onnx package ({exc}); pip install onnx") from None

    check_bundle_output(out, [onnx_model], overwrite)
    percentiles = _floats(clip_percentiles, "--clip-percentiles") or []
    if len(percentiles) != 2:
        raise UserError(f"--clip-percentiles '{clip_percentiles}': expected two numbers like 0.5,99.5")
    manifest = make_bundle(onnx_model, out, class_names=[c.strip() for c in classes.split(",")], tile=parse_tile(tile),
                           in_channels=in_channels, min_input_multiple=min_multiple, normalization=normalization,
                           target_spacing=_floats(spacing, "--spacing"), reorient=reorient,
                           clip_percentiles=(percentiles[0], percentiles[1]), output_kind=output_kind, batch=batch,
                           overwrite=overwrite)
    console.print(f"  {manifest.parity.get('smoke_test')}; TensorRT parser rules: "
                  f"{'passed' if manifest.parity.get('trt_rules') == 'passed' else 'see manifest'}", highlight=False)
    console.print(f"[green]done[/green]: {out} ({manifest.sizes['bundle_bytes'] / 1e3:.1f} kB)")


def build_engine(
    bundle_path: Annotated[Path, typer.Argument(help="A bundle directory or .zip from `edgeseg export`/`edgeseg bundle`.")],
    form: Annotated[str | None, typer.Option("--form", help="Model form to build (default: the TensorRT form).")] = None,
    mc: Annotated[bool, typer.Option("--mc", help="Build the Monte Carlo dropout form.")] = False,
    batch: Annotated[int | None, typer.Option("--batch", help="Batch size (default: the bundle's).")] = None,
    tile: Annotated[str | None, typer.Option("--tile", help="Tile D,H,W (default: the bundle's).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Engine cache folder (default: beside the bundle).")] = None,
    workspace_mib: Annotated[int, typer.Option("--workspace-mib", help="TensorRT builder workspace limit.")] = 1024,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when a cached engine matches.")] = False,
) -> None:
    """Build this device's TensorRT engine from a bundle (needs TensorRT and an NVIDIA GPU)."""
    from edgeseg.runtime.trt_build import build_engine as build

    built = build(bundle_path, form=form, mc=mc, batch=batch, tile=parse_tile(tile), out_dir=out_dir,
                  workspace_mib=workspace_mib, force=force)
    state = "cached engine is up to date" if built.cached else "built"
    console.print(f"[green]{state}[/green]: {built.path} (TensorRT {built.trt_version}, {built.gpu.name})")
