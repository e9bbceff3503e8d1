"""The `edgeseg` command line: thin typer commands over the typed core.

Heavy imports (torch, brevitas, onnx) happen inside the commands that need them, so
`edgeseg --help` is instant and the runtime commands work on a torch-free device install.
A `UserError` ends the command with one red line and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from edgeseg.errors import UserError

app = typer.Typer(
    name="edgeseg",
    help="Medical image segmentation from training to the edge: train, quantize, export, segment, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (see configs/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to create (or resume).")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key: key.sub=value.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")] = False,
) -> None:
    """Train a float model; writes checkpoints, config and a JSONL log to --out.

    Data-parallel on several GPUs or CPU processes: `torchrun --nproc-per-node N -m edgeseg train ...`
    (train.batch_size is then the global batch; see README "Scale out").
    """
    from edgeseg.config import load_experiment
    from edgeseg.train import distributed
    from edgeseg.train.experiment import train_experiment

    cfg = load_experiment(config, set_ or [])
    result = train_experiment(cfg, out, resume=resume, config_dir=config.parent.resolve(), console=console)
    if result.interrupted:
        raise typer.Exit(130)
    if not distributed.is_main():
        return
    best = "n/a" if result.best_dice is None else f"{result.best_dice:.4f} (epoch {result.best_epoch})"
    console.print(f"[green]done[/green]: {result.epochs_done} epochs in {result.seconds / 60:.1f} min; "
                  f"best val {'keypoint F1' if cfg.train.scheme == 'keypoints' else 'Dice'} {best}; run dir {out}")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory from `edgeseg train`, or a bundle (runtime evaluation).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Dataset folder (default: the run's; required for a bundle).")] = None,
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "test",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write per-case and mean metrics here.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda (run directories).")] = "auto",
    include_background: Annotated[bool, typer.Option("--include-background", help="Also score class 0 (bundles).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --json file.")] = False,
    modalities: Annotated[Optional[str], typer.Option(
        "--modalities", help="HeMIS runs and bundles: score with only these modalities present, e.g. mod0,mod2.")] = None,
    splits: Annotated[Optional[Path], typer.Option(
        "--splits", help="Bundles: the JSON split file (default: DATA/splits.json, else the seeded split).")] = None,
    label_suffixes: Annotated[Optional[str], typer.Option(
        "--label-suffixes", help="Bundles, sidecar layout: the label file endings, e.g. _gmseg_manual,_gmseg_goldstandard "
                                 "(the run's data.label_suffixes).")] = None,
) -> None:
    """Per-case and mean metrics on a data split: of a trained model, or of a bundle through the device runtime."""
    from edgeseg.atomic import write_json
    from edgeseg.cli.tables import metrics_table
    from edgeseg.runtime.evaluate_bundle import is_bundle_path

    if not run_dir.exists():
        raise UserError(f"run directory or bundle not found: {run_dir}")
    if json_out is not None:
        check_output_file(json_out, inputs=[run_dir], overwrite=overwrite, flag="--json")
    if is_bundle_path(run_dir):
        from edgeseg.cli.segment_cmd import parse_names
        from edgeseg.runtime.evaluate_bundle import evaluate_bundle

        if data is None:
            raise UserError("evaluating a bundle needs --data DATASET_FOLDER")
        if splits is not None and not splits.is_file():
            raise UserError(f"--splits file not found: {splits}")
        result = evaluate_bundle(run_dir, data, split, include_background=include_background,
                                 modalities=parse_names(modalities, "--modalities"),
                                 splits_file="splits.json" if splits is None else str(splits.resolve()),
                                 label_suffixes=parse_names(label_suffixes, "--label-suffixes"))
    else:
        if splits is not None or label_suffixes is not None:
            raise UserError("--splits and --label-suffixes apply to bundles; a run directory uses its own config's")
        from edgeseg.train.experiment import evaluate_run

        chosen = None if modalities is None else [m.strip() for m in modalities.split(",") if m.strip()]
        result = evaluate_run(run_dir, data=data, split=split, console=console, device=device, modalities=chosen)
    console.print(metrics_table(result["summary"], title=f"{run_dir} — {split} ({len(result['cases'])} cases)"))
    if json_out is not None:
        write_json(json_out, result)
        console.print(f"metrics written to {json_out}")


@app.command("list")
def list_(
    what: Annotated[str, typer.Argument(help="models, losses or configs.")] = "models",
) -> None:
    """List registered models, losses or shipped configs."""
    if what == "models":
        from edgeseg.nets import available_models, model_capabilities, option_defaults

        items = {}
        for name, desc in available_models().items():
            options = ", ".join(f"{k}={v}" for k, v in option_defaults(name).items())
            items[name] = (f"{desc}\n    supports: {model_capabilities(name).summary()}"
                           + (f"\n    model.options: {options}" if options else ""))
    elif what == "losses":
        from edgeseg.losses import available_losses

        items = available_losses()
    elif what == "configs":
        from edgeseg.cli.demo import config_summary, shipped_configs

        items = {p.stem: f"{config_summary(p)}\n    {p}" for p in shipped_configs()}
    else:
        from edgeseg.errors import unknown_name

        raise unknown_name("list target", what, ["models", "losses", "configs"])
    for name, desc in items.items():
        # soft_wrap: one logical line per line whatever the terminal width (readable when piped or grepped)
        console.print(f"[bold]{name}[/bold]  {desc}", soft_wrap=True)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes everything.")] = Path("edgeseg-demo"),
    data: Annotated[Optional[Path], typer.Option("--data", help="Run on a real dataset folder instead.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier demo in --out.")] = False,
) -> None:
    """The whole pipeline on built-in synthetic phantoms (or --data), end to end."""
    from edgeseg.cli.demo import run_demo

    run_demo(out, data=data, overwrite=overwrite, console=console)


# Files of a run directory or bundle that an output must never replace.
_RUN_FILES = ("config.yaml", "run.json", "log.jsonl", "metrics.json", "manifest.json")
_RUN_FOLDERS = ("checkpoints", "engines")


def _part_of(source: Path, target: Path) -> bool:
    """True when `target` is `source` or one of its files (run: config, run info, log, checkpoints;
    bundle: manifest and every file it lists). Other new files inside a run (test_metrics.json) are fine."""
    if target == source:
        return True
    if source not in target.parents:
        return False
    relative = target.relative_to(source)
    if relative.parts[0] in _RUN_FOLDERS or relative.as_posix() in _RUN_FILES:
        return True
    manifest = source / "manifest.json"
    if manifest.is_file():
        try:
            import json

            return relative.as_posix() in json.loads(manifest.read_text()).get("files", {})
        except (ValueError, AttributeError):
            return True  # an unreadable manifest: keep clear of the whole bundle
    return False


def check_output_file(path: Path, *, inputs: list[Path], overwrite: bool, flag: str) -> None:
    """Refuse, before any work, an output file that exists (without --overwrite) or that would replace
    one of the command's inputs or a file of them (a run directory, a bundle): outputs never replace inputs."""
    target = path.resolve()
    for source in inputs:
        if _part_of(source.resolve(), target):
            raise UserError(f"{flag} {path} would replace the input {source} or one of its files; choose another path")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path} already exists (pass --overwrite to replace it)")


def _output_dirs(argv: list[str]) -> list[Path]:
    """The --out/-o/--json paths of a command line (what a command may create)."""
    flags = ("--out", "-o", "--json", "--out-dir")
    paths = []
    for i, arg in enumerate(argv):
        if arg in flags and i + 1 < len(argv):
            paths.append(Path(argv[i + 1]))
        elif arg.startswith(tuple(f + "=" for f in flags)):
            paths.append(Path(arg.split("=", 1)[1]))
    return paths


def _missing_parts(path: Path) -> list[Path]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for candidate in (path, *path.absolute().parents):
        if candidate.exists() or candidate.is_symlink():
            break
        missing.append(candidate.absolute())
    return missing


def _remove_new_empty_dirs(created: list[Path]) -> None:
    """After a failed command: remove the output folders it created and left empty (deepest first).
    Only folders that did not exist before the command and are empty now: never a file, never older data."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): a file inside is the command's to clean, not ours
            break


def _os_error_line(exc: OSError) -> str:
    """One line for a failed file operation: what failed and where (disk full, permissions, not a folder)."""
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason}: {where}" if where else reason


def _register_stage_commands() -> None:
    """Stage commands live in their own modules (each imports its heavy dependencies lazily)."""
    from edgeseg.cli.export_cmd import build_engine, bundle, export
    from edgeseg.cli.quantize_cmd import quantize
    from edgeseg.cli.report_cmd import report
    from edgeseg.cli.segment_cmd import segment

    app.command()(quantize)
    app.command()(export)
    app.command()(bundle)
    app.command("build-engine")(build_engine)
    app.command()(segment)
    app.command()(report)


_register_stage_commands()


def main() -> None:
    """Console-script entry point: user errors become one line and exit code 2."""
    # Idle OpenMP threads sleep instead of spinning: on a shared or busy CPU, spinning threads
    # made 3D training steps 2-6x slower here (measured); set OMP_WAIT_POLICY to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Output folders the command may create, and which of their parts are new: on a failure the
    # ones left empty are removed, so a failed command leaves nothing behind (docs/reliability.md).
    created = [p for out in _output_dirs(sys.argv[1:]) for p in _missing_parts(out)]
    try:
        app()
    except UserError as exc:
        _remove_new_empty_dirs(created)
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:  # the environment failed (disk full, permissions, a file where a folder goes)
        _remove_new_empty_dirs(created)
        if os.environ.get("EDGESEG_DEBUG"):
            raise
        err_console.print(f"[red]error:[/red] {escape(_os_error_line(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
