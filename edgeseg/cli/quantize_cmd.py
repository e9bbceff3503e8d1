"""`edgeseg quantize`: quantization-aware training of a trained float run (registered in app.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from edgeseg.errors import UserError


def quantize(
    run_dir: Annotated[Path, typer.Argument(help="A float run directory from `edgeseg train`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Quantized run directory to create.")],
    bits: Annotated[str | None, typer.Option(
        "--bits", help="W/A with W and A in 2..8 (e.g. 4/6, 8/8, 2/4), or fp32 for a float fine-tuning control. "
                       "Default: the config's quant.bits.")] = None,
    epochs: Annotated[int | None, typer.Option(
        "--epochs", help="QAT epochs (0 = calibration only). Default: quant.epochs.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="QAT learning rate. Default: quant.lr.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Dataset folder (default: the run's).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a quant.* or train.* key, e.g. quant.first_last_bits=32 or "
                      "'quant.layer_overrides={dec0.*: 8/8}'.")] = None,
) -> None:
    """Fold batch norm, build the brevitas twin, calibrate, fine-tune (QAT) and compare Dice (or the training
    scheme's own score, e.g. keypoint F1) with the float model."""
    from edgeseg.quantize.bits import parse_bits

    if bits is not None:
        parse_bits(bits)  # a bad --bits fails here, before torch and brevitas are imported
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    from edgeseg.quantize.qat import quantize_run

    console = Console()
    metrics = quantize_run(run_dir, bits, out, epochs=epochs, lr=lr, data=data, overrides=set_ or [],
                           console=console)
    if metrics.get("qat", {}).get("interrupted"):
        raise typer.Exit(130)
    console.print(f"[green]done[/green]: {metrics['bits']} model in {out}; metrics in {out / 'metrics.json'}")
