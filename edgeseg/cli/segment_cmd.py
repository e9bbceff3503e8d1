"""`edgeseg segment`: a bundle + images -> masks (and probabilities, uncertainty) (registered in app.py).

Runs on the base install (numpy, nibabel, onnxruntime; TensorRT where present): nothing here or in
`edgeseg.runtime` imports torch. Many volumes: `--workers N` spreads them over N processes
(`edgeseg.runtime.batch`); every run keeps going past a failed case, skips cases already segmented,
and ends with a summary (exit code 1 when a case failed).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeseg.errors import UserError

if TYPE_CHECKING:
    from edgeseg.runtime.batch import BatchReport, Outcome

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


def parse_names(text: str | None, flag: str) -> list[str] | None:
    """`t1,flair` -> ["t1", "flair"]; None stays None."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"{flag} needs at least one name")
    return names


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
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo cases whose outputs exist (default: skip them).")] = False,
    threads: Annotated[int | None, typer.Option("--threads", help="ONNX Runtime CPU threads per worker (default: cores / workers).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the Monte Carlo dropout masks.")] = 0,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Worker processes segmenting volumes in parallel (one GPU each, round-robin, where GPUs are visible).")] = 1,
    metadata: Annotated[str | None, typer.Option("--metadata", help="FiLM bundles: metadata values for every input, e.g. contrast=1,gain=0.9 (default: each case's JSON sidecar <case>.json beside its image).")] = None,
    metadata_table: Annotated[Path | None, typer.Option("--metadata-table", help="FiLM bundles: a CSV/TSV with one row per case (a 'case' column, or the bundle's case column) instead of sidecars.")] = None,
    modalities: Annotated[str | None, typer.Option("--modalities", help="HeMIS bundles: use only these modalities, e.g. t1,flair (the others count as missing); a file without the _0000 channel suffix holds them, in this order.")] = None,
) -> None:
    """Segment images with a bundle, on the device: tiled inference, optional TTA / MC-dropout uncertainty.

    Keeps going past a failed case, skips cases whose outputs exist (--overwrite redoes them), writes
    OUT/segment_summary.json and exits with code 1 when any case failed.

    Bundles with extra model inputs (docs/bundle.md): a FiLM bundle reads each case's metadata from
    --metadata, --metadata-table or the JSON sidecar beside its image, normalised as in training; a HeMIS
    bundle takes any subset of its modalities: channel files <case>_0000 ... may be missing, and
    --modalities chooses which count as present.
    """
    from edgeseg.cli.export_cmd import parse_tile
    from edgeseg.runtime.batch import SUMMARY_FILE, segment_batch
    from edgeseg.runtime.case_inputs import parse_metadata_values

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    volumes = progress.add_task("volumes", total=None, visible=False)
    tiles = progress.add_task("tile batches", total=None, visible=False)
    seen_backends: set[str] = set()

    def on_start(description: str, count: int, skipped: int) -> None:
        console.print(f"backend: {description}", highlight=False, soft_wrap=True)
        if skipped:
            console.print(f"skipping {skipped} case(s) whose outputs exist (--overwrite to redo them)", highlight=False)
        progress.update(volumes, total=count, visible=True)

    def on_batch(done: int, total: int) -> None:
        progress.update(tiles, completed=done, total=total, visible=True)

    def on_outcome(outcome: Outcome) -> None:
        if outcome.status == "skipped":
            return
        progress.advance(volumes)
        where = ""
        if outcome.worker is not None:
            where = f", worker {outcome.worker}" + (f" on GPU {outcome.gpu}" if outcome.gpu else "")
            if outcome.backend and outcome.backend not in seen_backends:
                seen_backends.add(outcome.backend)
                console.print(f"  workers' backend: {outcome.backend}", highlight=False, soft_wrap=True)
        if outcome.status == "failed":
            console.print(f"  [red]failed[/red] {outcome.case}: {outcome.reason}", highlight=False, soft_wrap=True)
        else:
            extra = "" if outcome.structures is None else f"; {outcome.structures} structures, {outcome.removed} removed"
            console.print(f"  {outcome.case} -> {outcome.mask} ({outcome.seconds:.1f} s{extra}{where})",
                          highlight=False, soft_wrap=True)

    tile_list = parse_tile(tile)
    if tile_list is not None and bundle.exists():
        from edgeseg.runtime.bundle import read_manifest
        from edgeseg.runtime.pipeline import tile_warning

        warning = tile_warning(read_manifest(bundle), tile_list)
        if warning:
            console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    with progress:
        report = segment_batch(bundle, inputs, out_dir, workers=workers, backend=backend, threads=threads,
                               overwrite=overwrite, on_start=on_start, on_outcome=on_outcome, on_batch=on_batch,
                               tta=tta, tta_axes=parse_axes(tta_axes), mc_passes=mc, uncertainty=uncertainty,
                               probabilities=probabilities, overlap=overlap, batch_size=batch_size, blend=blend,
                               tile=tile_list, iou_threshold=iou_threshold, seed=seed,
                               metadata=parse_metadata_values(metadata), metadata_table=metadata_table,
                               modalities=parse_names(modalities, "--modalities"))
    console.print(summary_table(report))
    for failed in report.failed:
        console.print(f"[red]failed[/red] {failed.case}: {failed.reason}", highlight=False, soft_wrap=True)
    console.print(f"summary written to {out_dir / SUMMARY_FILE}", highlight=False, soft_wrap=True)
    if report.failed:
        raise typer.Exit(1)
    console.print(f"[green]done[/green]: {report.count('done')} volume(s) segmented into {out_dir}"
                  + (f", {report.count('skipped')} skipped" if report.count("skipped") else ""), highlight=False)


def summary_table(report: BatchReport) -> Table:
    """Cases per outcome, with the time spent and the throughput of the segmented ones."""
    table = Table(title=f"segment: {len(report.outcomes)} case(s), {report.workers} worker(s), "
                        f"{report.seconds:.1f} s")
    for column in ("outcome", "cases", "note"):
        table.add_column(column, justify="right" if column == "cases" else "left")
    done = report.count("done")
    rate = f"{60 * done / report.seconds:.1f} volumes/min" if done and report.seconds > 0 else ""
    table.add_row("segmented", str(done), rate)
    table.add_row("skipped", str(report.count("skipped")), "outputs existed" if report.count("skipped") else "")
    table.add_row("failed", str(report.count("failed")), "reasons below" if report.failed else "",
                  style="red" if report.failed else None)
    return table
