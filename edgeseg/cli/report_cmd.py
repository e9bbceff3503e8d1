"""`edgeseg report`: accuracy / memory / latency trade-off over bit widths (registered in app.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeseg.errors import UserError


def _named_bundles(bundles: list[str]) -> list[tuple[str, Path]]:
    """NAME=PATH pairs (or bare paths, named after the folder / file stem)."""
    out = []
    for item in bundles:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name.removesuffix(".zip"), item
        if not Path(path).exists():
            raise UserError(f"--bundles: bundle not found: {path}")
        out.append((name, Path(path)))
    return out


# What a report directory holds (edgeseg.report.sweep); --overwrite deletes only such a folder.
REPORT_ENTRIES = ("float_run", "runs", "bundles", "settings", "state", "results.json", "report.md", "report.html")


def _check_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an --out that is or holds an input, and an --overwrite of a folder that is not a report."""
    target = out.resolve()
    for source in inputs:
        source = source.resolve()
        if target == source or (overwrite and target in source.parents):
            raise UserError(f"--out {out} would replace or delete the input {source}; choose another --out")
    if overwrite and out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} is a file, not a report folder")
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name not in REPORT_ENTRIES and not p.name.startswith(".") and p.suffix != ".png")
        if foreign:
            raise UserError(f"--out {out} is not an edgeseg report folder (it holds {', '.join(foreign[:3])}); "
                            "--overwrite only deletes report folders")


def report(
    out: Annotated[Path, typer.Option("--out", "-o", help="Report directory (re-running reuses finished settings).")],
    config: Annotated[Path | None, typer.Option(
        "--config", help="Experiment YAML to train the float run from (when --out has none yet).")] = None,
    bits: Annotated[str, typer.Option(
        "--bits", help="Comma-separated settings: fp32 and W/A with W, A in 2..8.")] = "fp32,8/8,4/8,4/6,4/4,2/4",
    bundles: Annotated[list[str] | None, typer.Option(
        "--bundles", help="Report on existing bundles instead (repeatable): PATH or NAME=PATH. "
                          "Skips training, QAT and export.")] = None,
    runs: Annotated[list[Path] | None, typer.Option(
        "--runs", help="Report on existing run directories (repeatable; float or quantized): each is exported "
                       "to OUT/bundles/ unless already there. Combines with --bundles.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Dataset folder (default: the run's).")] = None,
    split: Annotated[str, typer.Option("--split", help="Split to evaluate on.")] = "test",
    qat_epochs: Annotated[int | None, typer.Option("--qat-epochs", help="QAT epochs (default: quant.epochs).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key for the float run.")] = None,
    no_memory: Annotated[bool, typer.Option(
        "--no-memory", help="Skip the peak-memory subprocess (it evaluates each setting a second time).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete --out first (no reuse).")] = False,
) -> None:
    """QAT, export and runtime-evaluate each bit-width setting; write report.md/.html, results.json and plots.

    With --runs and/or --bundles, report on those instead (no training or QAT; --config/--bits unused).
    """
    import shutil

    from rich.console import Console

    from edgeseg.report.sweep import parse_bits_list

    names = parse_bits_list(bits)  # a bad --bits fails before anything heavy is imported
    existing = _named_bundles(bundles) if bundles else ([] if runs else None)
    for run in runs or []:
        if not (run / "run.json").is_file():
            raise UserError(f"--runs: not a run directory (no run.json): {run}")
    if data is not None and not data.is_dir():
        raise UserError(f"data folder not found: {data}")
    if config is not None and not config.is_file():
        raise UserError(f"config file not found: {config}")
    if bundles and not runs and data is None:
        raise UserError("--bundles needs --data DATASET_FOLDER (bundles do not record where their data lives)")
    inputs = [p for _, p in existing or []] + list(runs or []) + [p for p in (data, config) if p is not None]
    _check_out(out, inputs, overwrite)
    if overwrite and out.exists():
        shutil.rmtree(out)
    console = Console()
    from edgeseg.report.collect import subprocess_peak_rss

    memory = None if no_memory else subprocess_peak_rss
    if existing is not None:
        from edgeseg.report.collect import default_evaluate, run_evaluation
        from edgeseg.report.sweep import export_existing_runs, run_existing

        evaluate = default_evaluate
        if runs:  # the runs' dataset folder and scored classes, unless --data says otherwise
            data, evaluate = run_evaluation(runs[0], data, evaluate)
        if data is None:
            raise UserError("--bundles needs --data DATASET_FOLDER (bundles do not record where their data lives)")
        exported, failed_exports = export_existing_runs(out, runs) if runs else ([], [])
        results = run_existing(out, [*exported, *existing], data=data, split=split, evaluate=evaluate,
                               measure_memory=memory,
                               progress=lambda name: console.print(f"evaluating {name}"), failed=failed_exports)
    else:
        from edgeseg.report.sweep import run_sweep

        results = run_sweep(out, names, config=config, overrides=set_ or [], qat_epochs=qat_epochs, data=data,
                            split=split, measure_memory=memory, console=console)
    failed = [s["name"] for s in results["settings"] if s["status"] != "ok"]
    console.print(f"[green]report written[/green]: {out / 'report.md'}, {out / 'report.html'}; "
                  f"Pareto front: {', '.join(results['pareto_front']) or '-'}")
    if failed:
        console.print(f"[yellow]failed settings[/yellow]: {', '.join(failed)} (see the report)")
