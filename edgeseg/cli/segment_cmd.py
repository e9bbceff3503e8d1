"""`edgeseg segment`: a bundle + images -> masks (and probabilities, uncertainty) (registered in app.py).

Runs on the base install (numpy, nibabel, onnxruntime; TensorRT where present): nothing here or in
`edgeseg.runtime` imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgeseg.errors import UserError

if TYPE_CHECKING:
    from edgeseg.runtime.pipeline import CaseResult

console = Console()


def parse_axes(text: str | None) -> list[int] | None:
    """`0,1,2` -> [0, 1, 2]; None stays None."""
    if text is None:
        return None
    try:
        axes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--tta-axes '{text}': expected comma-separated axis numbers like 0,1,2") from None
    if not axes:
        raise UserError("--tta-axes needs at least one axis")
    return axes


def segment(
    bundle: Annotated[Path, typer.Argument(help="A bundle directory or .zip from `edgeseg export` / `edgeseg bundle`.")],
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns (quote globs).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder; each mask keeps its input's file name.")],
    tta: Annotated[bool, typer.Option("--tta", help="Test-time augmentation: average over flips of the spatial axes.")] = False,
    tta_axes: Annotated[str | None, typer.Option("--tta-axes", help="Axes to flip for TTA, e.g. 0,1,2 (implies --tta; default all).")] = None,
    mc: Annotated[int, typer.Option("--mc", help="Monte Carlo dropout passes (0 = off; needs a bundle with dropout).")] = 0,
    uncertainty: Annotated[bool, typer.Option("--uncertainty", help="Write an entropy map and a JSON summary per case (needs --tta or --mc).")] = False,
    probabilities: Annotated[bool, typer.Option("--probabilities", help="Also write the mean class probabilities (4D NIfTI).")] = False,
    backend: Annotated[str, typer.Option("--backend", help="auto, onnxruntime or tensorrt.")] = "auto",
    overlap: Annotated[float, typer.Option("--overlap", help="Tile overlap in [0, 1).")] = 0.5,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Tiles per model call (default: the bundle's batch).")] = None,
    blend: Annotated[str, typer.Option("--blend", help="gaussian (MONAI map), gaussian-nnunet or constant weighting of overlapping tiles.")] = "gaussian",
    tile: Annotated[str | None, typer.Option("--tile", help="Tile D,H,W (default: the bundle's, the training patch).")] = None,
    iou_threshold: Annotated[float | None, typer.Option("--iou-threshold", help="Remove structures whose IoU across samples is below this (implies --uncertainty).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", help="ONNX Runtime CPU threads (default: all cores).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the Monte Carlo dropout masks.")] = 0,
) -> None:
    """Segment images with a bundle, on the device: tiled inference, optional TTA / MC-dropout uncertainty."""
    from edgeseg.cli.export_cmd import parse_tile
    from edgeseg.runtime.pipeline import segment_files

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    volumes = progress.add_task("volumes", total=None, visible=False)
    tiles = progress.add_task("tile batches", total=None, visible=False)

    def on_start(description: str, count: int) -> None:
        console.print(f"backend: {description}", highlight=False, soft_wrap=True)
        progress.update(volumes, total=count, visible=True)

    def on_batch(done: int, total: int) -> None:
        progress.update(tiles, completed=done, total=total, visible=True)

    def on_case(result: CaseResult) -> None:
        progress.advance(volumes)
        extra = ""
        if result.structures is not None:
            extra = f"; {result.structures} structures, {result.removed} removed"
        console.print(f"  {result.case.name} -> {result.outputs.mask} ({result.seconds:.1f} s{extra})", highlight=False,
                      soft_wrap=True)

    tile_list = parse_tile(tile)
    if tile_list is not None and bundle.exists():
        from edgeseg.runtime.bundle import read_manifest
        from edgeseg.runtime.pipeline import tile_warning

        warning = tile_warning(read_manifest(bundle), tile_list)
        if warning:
            console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    with progress:
        results = segment_files(bundle, inputs, out_dir, tta=tta, tta_axes=parse_axes(tta_axes), mc_passes=mc, uncertainty=uncertainty,
                                probabilities=probabilities, backend=backend, overlap=overlap, batch_size=batch_size,
                                blend=blend, tile=tile_list, iou_threshold=iou_threshold, overwrite=overwrite,
                                threads=threads, seed=seed, on_start=on_start, on_batch=on_batch, on_case=on_case)
    console.print(f"[green]done[/green]: {len(results)} volume(s) segmented into {out_dir}")
