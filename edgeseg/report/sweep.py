"""The full report: float run -> (QAT -> export) per bit-width setting -> runtime evaluation -> report.

Layout of the report directory (every stage's output is detected and reused on a re-run):

    float_run/            the float run (trained here when absent; resumed when unfinished)
    runs/<tag>/           quantized run per setting (tag: fp32, w4a6, ...)
    bundles/<tag>/        exported bundle per setting
    settings/<tag>.json   the setting's report row (see edgeseg.report.collect)
    state/float_done.json written when the float run finished training
    results.json, report.md, report.html, *.png

"fp32" exports the float run itself (the baseline); `quantize_run(..., "fp32")` would instead add a
float fine-tuning control, which the report does not need. A setting whose QAT or export raises is a
"failed" row with the message; the other settings go on.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from edgeseg.atomic import write_json
from edgeseg.errors import UserError
from edgeseg.quantize.bits import parse_bits
from edgeseg.report.collect import (
    Evaluate,
    MeasureMemory,
    collect,
    default_evaluate,
    failed_row,
    run_evaluation,
    subprocess_peak_rss,
)
from edgeseg.report.example import example_writer
from edgeseg.report.render import write_report

DEFAULT_BITS = ("fp32", "8/8", "4/8", "4/6", "4/4", "2/4")


def setting_tag(bits: str) -> str:
    """Directory-safe name of a bits setting: "fp32" or "w4a6"."""
    parsed = parse_bits(bits)
    return "fp32" if parsed.is_float else f"w{parsed.weight}a{parsed.act}"


def parse_bits_list(text: str) -> list[str]:
    """"fp32,8/8,4/6" -> ["fp32", "8/8", "4/6"], each validated, duplicates refused."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError("--bits: give at least one setting, e.g. fp32,8/8,4/6")
    names = [str(parse_bits(t)) for t in items]
    if len(set(names)) != len(names):
        raise UserError(f"--bits lists a setting twice: {text}")
    return names


def _quant_finished(qrun: Path) -> bool:
    """quantize_run writes metrics.json with "splits" only when QAT finished (not interrupted)."""
    path = qrun / "metrics.json"
    if not path.is_file():
        return False
    try:
        return "splits" in json.loads(path.read_text())
    except ValueError:
        return False


def _check_quantizable(out: Path, config: Path | None, overrides: Sequence[str]) -> None:
    """Refuse quantized settings of a run that cannot be quantized before any training (the reason + a way out)."""
    from edgeseg.config import load_experiment
    from edgeseg.quantize.qat import check_quantizable
    from edgeseg.train.rundir import RunDir

    existing = RunDir(out / "float_run")
    if config is not None:
        cfg = load_experiment(config, list(overrides))
    elif existing.config_path.is_file():
        cfg = existing.read_config()
    else:
        return  # ensure_float_run says what is missing
    try:
        check_quantizable(cfg)
    except UserError as exc:
        raise UserError(f"{exc}; for a float-only report pass --bits fp32") from None


def ensure_float_run(out: Path, *, config: Path | None, overrides: Sequence[str], console: Console) -> Path:
    """out/float_run, trained from `config` if absent and resumed if unfinished; returns its path."""
    from edgeseg.config import load_experiment
    from edgeseg.train.experiment import train_experiment
    from edgeseg.train.rundir import RunDir

    run = out / "float_run"
    done = out / "state" / "float_done.json"
    if done.is_file():
        return run
    if config is None and not run.is_dir():
        raise UserError(f"{out} has no float run yet; pass --config to train one")
    rundir = RunDir(run)
    if rundir.last.is_file():
        console.print(f"resuming the float run in {run}")
        result = train_experiment(rundir.read_config(), run, resume=True, console=console)
    else:
        if run.exists():
            shutil.rmtree(run)  # stopped before its first checkpoint: nothing to resume
        cfg = load_experiment(config, list(overrides))
        console.print(f"training the float run in {run}")
        result = train_experiment(cfg, run, config_dir=None if config is None else Path(config).parent,
                                  console=console)
    if result.interrupted:
        raise UserError(f"float training was interrupted; re-run the report to resume {run}")
    write_json(done, {"epochs_done": result.epochs_done, "best_dice": result.best_dice})
    return run


def build_setting(float_run: Path, bits: str, out: Path, *, qat_epochs: int | None, data: Path | None,
                  console: Console) -> Path:
    """The bundle of one setting (QAT + export as needed, finished outputs reused); returns its path."""
    from edgeseg.export.run_export import export_run
    from edgeseg.quantize.qat import quantize_run

    tag = setting_tag(bits)
    bundle = out / "bundles" / tag
    if bundle.is_dir() and (bundle / "manifest.json").is_file():  # write_bundle is atomic: present = finished
        return bundle
    if parse_bits(bits).is_float:
        source = float_run
    else:
        source = out / "runs" / tag
        if not _quant_finished(source):
            if source.exists():
                shutil.rmtree(source)  # an interrupted QAT cannot be resumed by quantize_run; redo it
            metrics = quantize_run(float_run, bits, source, epochs=qat_epochs, data=data, console=console)
            if metrics.get("qat", {}).get("interrupted"):
                raise UserError(f"QAT for {bits} was interrupted")
    export_run(source, bundle, overwrite=True)
    return bundle


def run_sweep(out: Path, bits: Sequence[str] = DEFAULT_BITS, *, config: Path | None = None,
              overrides: Sequence[str] = (), qat_epochs: int | None = None, data: Path | None = None,
              split: str = "test", evaluate: Evaluate = default_evaluate,
              measure_memory: MeasureMemory | None = subprocess_peak_rss, console: Console | None = None,
              ) -> dict[str, Any]:
    """Train (if needed), quantize, export and evaluate every setting; write the report into `out`."""
    from rich.progress import Progress

    console = console or Console()
    out = Path(out)
    names = [str(parse_bits(b)) for b in bits]
    if not all(parse_bits(n).is_float for n in names):
        _check_quantizable(out, config, overrides)
    float_run = ensure_float_run(out, config=config, overrides=overrides, console=console)
    data_for_eval, evaluate = run_evaluation(float_run, data, evaluate)
    built: list[tuple[str, Path]] = []
    failed: dict[str, dict[str, Any]] = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("QAT + export", total=len(names))
        for name in names:
            progress.update(task, description=f"QAT + export {name}")
            try:
                built.append((name, build_setting(float_run, name, out, qat_epochs=qat_epochs, data=data,
                                                  console=console)))
            except Exception as exc:  # noqa: BLE001 - any failure of one setting is reported, not fatal
                failed[name] = failed_row(name, None, exc, stage="quantize/export")
                console.print(f"[red]{name} failed[/red]: {failed[name]['error']}")
            progress.advance(task)
        task = progress.add_task("evaluate", total=len(built))

        def step(name: str) -> None:
            progress.update(task, description=f"evaluate {name}", advance=1)

        rows = collect(built, data=data_for_eval, split=split, cache_dir=out / "settings", evaluate=evaluate,
                       measure_memory=measure_memory, progress=step)
    by_name = {r["name"]: r for r in rows} | failed
    ordered = [by_name[n] for n in names]
    return write_report(out, ordered, split=split, data=None if data_for_eval is None else str(data_for_eval),
                        example=example_writer(data_for_eval, split, **_split_options(evaluate)))


def export_existing_runs(out: Path, runs: Sequence[Path]) -> tuple[list[tuple[str, Path]], list[dict[str, Any]]]:
    """Export existing run dirs (float or quantized) to out/bundles/<tag>, reusing finished bundles.

    Each run is named by its bits (run.json); returns the (name, bundle) settings and failed rows.
    """
    from edgeseg.export.run_export import export_run
    from edgeseg.train.rundir import RunDir

    settings: list[tuple[str, Path]] = []
    failed: list[dict[str, Any]] = []
    for run in runs:
        name = str(run)
        try:
            name = str(parse_bits(RunDir(Path(run)).read_info().bits, f"{run}/run.json bits"))
            if name in [n for n, _ in settings]:
                raise UserError(f"--runs: two runs have bits {name}; report one run per setting")
            bundle = Path(out) / "bundles" / setting_tag(name)
            if not (bundle / "manifest.json").is_file():
                export_run(Path(run), bundle, overwrite=True)
            settings.append((name, bundle))
        except Exception as exc:  # noqa: BLE001 - any failure of one setting is reported, not fatal
            failed.append(failed_row(name, None, exc, stage="export"))
    return settings, failed


def _split_options(evaluate: Evaluate) -> dict[str, Any]:
    """How the evaluator finds the split (layout, split file, seed, label files), so the example uses the same
    cases."""
    keywords = getattr(evaluate, "keywords", {})
    return {k: keywords[k] for k in ("layout", "splits_file", "seed", "label_suffixes") if k in keywords}


def run_existing(out: Path, settings: Sequence[tuple[str, Path]], *, data: Path | None, split: str = "test",
                 evaluate: Evaluate = default_evaluate, measure_memory: MeasureMemory | None = subprocess_peak_rss,
                 progress: Callable[[str], None] | None = None,
                 failed: Sequence[dict[str, Any]] = (), example: bool = True) -> dict[str, Any]:
    """The report over existing bundles (name, path): evaluate (reusing out/settings) and write it.

    `failed` rows (e.g. from `export_existing_runs`) are appended to the report as they are.
    """
    rows = collect(settings, data=data, split=split, cache_dir=Path(out) / "settings", evaluate=evaluate,
                   measure_memory=measure_memory, progress=progress) + list(failed)
    return write_report(Path(out), rows, split=split, data=None if data is None else str(data),
                        example=example_writer(data, split, **_split_options(evaluate)) if example else None)
