"""`edgeseg quantize`: float run -> folded float model -> quantized twin -> calibration -> QAT -> QRUN_DIR.

    QRUN_DIR/
      config.yaml        the parent's config with the quant section actually used
      run.json           RunInfo with bits ("4/6") and parent_run; extra: layer plan, float islands
      checkpoints/       best.safetensors (quantized weights + scales), last.safetensors (resume state)
      log.jsonl          one line per QAT epoch
      metrics.json       float vs quantized Dice (or the scheme's own score) side by side on val (and test)

Both models are scored by `evaluate_predictions` on the original grids, exactly as
`edgeseg evaluate` scores float runs. The float reference is the batch-norm-folded model, which
is equal to the trained model in eval mode (up to float rounding). A training scheme with its own
validation score (`edgeseg.train.schemes.validation_score`, e.g. keypoint detection F1) brings it to
QAT as `FitParts.score`: QAT then trains with the scheme's loss and targets, selects its checkpoint by
that score, and metrics.json compares float and quantized models by it (`score_float`, `score_quant`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from edgeseg.atomic import write_json
from edgeseg.config import ExperimentConfig, QuantConfig, from_dict, to_dict
from edgeseg.config.loader import apply_overrides
from edgeseg.data.augment import Compose
from edgeseg.data.cases import PreparedCase, to_slices
from edgeseg.data.preprocess import PreprocessSpec
from edgeseg.errors import UserError
from edgeseg.nets import require_capability
from edgeseg.quantize.bits import BitWidths, parse_bits
from edgeseg.quantize.calibrate import calibrate
from edgeseg.quantize.fold import fold_batch_norms
from edgeseg.quantize.twin import (
    build_twin,
    count_parameters,
    float_islands,
    load_folded_weights,
    twin_spec,
    weight_bits_total,
)
from edgeseg.train import distributed, schemes
from edgeseg.train.checkpoint import load_weights, save_weights
from edgeseg.train.evaluation import evaluate_predictions, mean_foreground_dice
from edgeseg.train.experiment import load_cases, load_run_model
from edgeseg.train.inference import predict_labels
from edgeseg.train.loop import FitParts, FitSchedule, ValScore, dice_score, fit
from edgeseg.train.optim import build_optimizer, build_scheduler
from edgeseg.train.rundir import RunDir, RunInfo
from edgeseg.train.sampling import BatchSampler
from edgeseg.train.setup import configure_torch, labelled_train_refs, load_data_splits, pick_device

# Config sections a quantize call may change with --set; the architecture and data preparation
# are fixed by the parent run (its weights and preprocessing would no longer fit).
SETTABLE_SECTIONS = ("quant", "train")


def check_quantizable(cfg: ExperimentConfig) -> None:
    """UserError when a run of `cfg` cannot be quantized: its model says so (e.g. one fed extra inputs) or its
    training scheme's output needs what QAT does not train (STIPPLE's prior). `edgeseg report` asks before it
    trains the float run, so a float-only method is refused in seconds, not after training."""
    require_capability(cfg.model.name, "quantizable", "quantized")
    schemes.output_activation(cfg)


def quantize_run(
    run_dir: Path,
    bits: str | None,
    out: Path,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    data: Path | None = None,
    overrides: Sequence[str] = (),
    console: Console | None = None,
) -> dict[str, Any]:
    """Quantize the float run in `run_dir` into `out`; returns the metrics written to out/metrics.json.

    `bits` ("W/A" or "fp32"; None = the config's quant.bits) and `epochs`/`lr` override the
    quant section; `overrides` are `--set quant.x=...` / `train.x=...` strings. fp32 runs the same
    schedule on the folded float model (a control: what the extra fine-tuning alone gives).
    """
    console = console or Console()
    run_dir, out = Path(run_dir), Path(out)
    parent = RunDir(run_dir)
    cfg, info = parent.read_config(), parent.read_info()
    check_quantizable(cfg)
    if info.bits != "fp32" or info.parent_run is not None:
        raise UserError(f"{run_dir} is already a quantized run ({info.bits}); quantize its float parent "
                        f"{info.parent_run} instead")
    cfg = _with_overrides(cfg, overrides)
    qbits = parse_bits(bits) if bits is not None else parse_bits(cfg.quant.bits, "quant.bits")
    quant = _quant_settings(cfg.quant, qbits, epochs, lr)
    cfg = replace(cfg, quant=quant)
    qrun = RunDir(out)
    if out.resolve() == run_dir.resolve():
        raise UserError("--out must differ from the float run directory")
    if qrun.config_path.is_file() or qrun.last.is_file():
        raise UserError(f"{out} already holds a run; choose another --out")

    configure_torch(cfg.train)
    device = pick_device(cfg.train.device)
    distributed.setup(device)  # under torchrun: join before rank 0 writes, so no rank sees its files as "a run"
    distributed.barrier()
    main = distributed.is_main()  # only rank 0 writes run files (the ranks compute the same metrics)
    activation = schemes.output_activation(cfg)  # SoftSeg runs are read through their normalized ReLU
    float_model, _, _ = load_run_model(run_dir)
    folded = fold_batch_norms(float_model)
    spec = twin_spec(cfg.model, quant, qbits)
    out_channels = len(info.class_names)
    twin, plan = build_twin(cfg.model, spec, spatial_dims=info.spatial_dims, in_channels=info.in_channels,
                            out_channels=out_channels)
    load_folded_weights(twin, float_model)
    islands = float_islands(twin)

    root = Path(data) if data is not None else Path(info.data_root or "")
    if not root.is_dir():
        raise UserError(f"data folder not found: {root} (pass --data)")
    splits = load_data_splits(root, cfg.data.layout, cfg.data.splits, cfg.train.seed,
                              label_suffixes=cfg.data.label_suffixes)
    pspec = PreprocessSpec.from_dict(info.preprocess)
    num_classes = len(info.class_names)
    train_cases = load_cases(labelled_train_refs(cfg, splits.get("train")), pspec, num_classes, console, "train cases")
    val_cases = load_cases(splits.val, pspec, num_classes, console, "val cases") if splits.val else []
    test_cases = load_cases(splits.test, pspec, num_classes, console, "test cases") if splits.test else []
    sample_cases = train_cases
    if info.spatial_dims == 2 and train_cases[0].image.ndim == 4:
        sample_cases = [s for c in train_cases for s in to_slices(c, info.slice_axis)]
    patch = tuple(info.patch_size)

    out.mkdir(parents=True, exist_ok=True)
    qinfo = replace(info, bits=str(qbits), parent_run=str(run_dir.resolve()), data_root=str(root.resolve()),
                    extra={**info.extra, "layer_plan": plan, "float_islands": islands,
                           "folded_batch_norms": len(folded)})
    if main:
        qrun.write_config(cfg)
        qrun.write_info(qinfo)
    console.print(f"quantizing {run_dir} to {qbits} ({_plan_summary(plan, spec.first_last)}); "
                  f"{len(folded)} batch norms folded; float islands: {_short_list(islands)}; "
                  f"device {device}; run dir {out}")

    metrics: dict[str, Any] = {"bits": str(qbits), "parent_run": str(run_dir.resolve()), "layer_plan": plan,
                               "float_islands": islands, "folded_batch_norms": folded,
                               "parameters": count_parameters(twin), **weight_bits_total(twin)}
    twin.to(device)
    float_model.to(device)
    if not qbits.is_float:
        metrics["calibration_batches"] = _calibrate(twin, sample_cases, patch, cfg, quant.calibration_batches,
                                                    device, console)
    # after calibration (the optimizer takes the calibrated quantizer parameters): the float run's own training
    # schemes (mixup, soft labels, SoftSeg's activation and loss, keypoint heatmaps and score) carry over to QAT;
    # a scheme with its own score (parts.score) is compared by it below too
    parts = _fit_parts(twin, sample_cases, val_cases, patch, cfg, qinfo, pspec, device)
    weights_meta = {"bits": str(qbits), "parent_run": str(run_dir.resolve())}
    calibrated = None  # the calibrated model's validation score, the one fine-tuning must beat
    if not qbits.is_float and val_cases:
        calibrated = _own_score(parts, twin, val_cases, console, "val (after calibration)")
        key = "val_dice_after_calibration" if parts.score is None else "val_score_after_calibration"
        metrics[key] = calibrated.value
        if main and quant.epochs > 0:  # the checkpoint to keep if no QAT epoch validates better
            save_weights(qrun.best, twin, {**weights_meta, "epoch": 0, calibrated.name: calibrated.value})

    if quant.epochs > 0:
        metrics["qat"] = _fine_tune(parts, cfg, qrun, weights_meta, console, calibrated)
        if metrics["qat"]["interrupted"]:
            if main:
                write_json(out / "metrics.json", metrics)
            return metrics
        distributed.barrier()  # rank 0's best checkpoint is complete before every rank reads it
        load_weights(qrun.best, twin)
    elif main:
        save_weights(qrun.best, twin, {**weights_meta, "epoch": 0, "val_dice": None})

    metrics["splits"] = {}
    for split, cases in (("val", val_cases), ("test", test_cases)):
        if not cases:
            continue
        if parts.score is not None:
            metrics["splits"][split] = _compare_own_scores(parts, float_model, twin, cases, split, str(qbits),
                                                           console)
            continue
        f_res = _score(float_model, cases, qinfo, pspec, device, console, f"{split} (float)", activation)
        q_res = _score(twin, cases, qinfo, pspec, device, console, f"{split} ({qbits})", activation)
        f_dice, q_dice = mean_foreground_dice(f_res["summary"]), mean_foreground_dice(q_res["summary"])
        metrics["splits"][split] = {
            "cases": len(q_res["cases"]),
            "dice_float": f_dice,
            "dice_quant": q_dice,
            "dice_delta": q_dice - f_dice,
            "per_class_dice": {c: {"float": f_res["summary"][c]["dice"]["mean"],
                                   "quant": q_res["summary"][c]["dice"]["mean"]}
                               for c in q_res["summary"] if c != "mean"},
            "float": f_res["summary"],
            "quant": q_res["summary"],
        }
    if "val" in metrics["splits"]:
        metrics["splits"]["val"]["note"] = "the quantized checkpoint was selected on val; test is unbiased"
    if main:
        write_json(out / "metrics.json", metrics)
    console.print(_comparison_table(metrics, str(qbits)))
    return metrics


def load_quant_model(qrun_dir: Path) -> tuple[torch.nn.Module, ExperimentConfig, RunInfo]:
    """Rebuild the quantized twin a QRUN_DIR describes and load its best weights, in eval mode on the CPU.

    For a `--bits fp32` control run this is the folded float model. Every quantizer scale is
    loaded from the checkpoint (no statistics are re-collected), so outputs equal those at QAT's end.
    """
    qrun = RunDir(Path(qrun_dir))
    cfg, info = qrun.read_config(), qrun.read_info()
    if info.parent_run is None:
        raise UserError(f"{qrun_dir} is not a quantized run (it has no parent run; run `edgeseg quantize` first)")
    spec = twin_spec(cfg.model, cfg.quant, parse_bits(info.bits, f"{qrun.info_path}: bits"))
    model, _ = build_twin(cfg.model, spec, spatial_dims=info.spatial_dims, in_channels=info.in_channels,
                          out_channels=len(info.class_names))
    load_weights(qrun.weights(), model)
    return model.eval(), cfg, info


# ---- steps ---------------------------------------------------------------------------------------

def _with_overrides(cfg: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    for item in overrides:
        section = item.split("=", 1)[0].strip().split(".", 1)[0]
        if section not in SETTABLE_SECTIONS:
            raise UserError(f"--set {item}: only {' and '.join(f'{s}.*' for s in SETTABLE_SECTIONS)} settings can "
                            "change when quantizing (architecture and data preparation are the parent run's)")
    if not overrides:
        return cfg
    return from_dict(ExperimentConfig, apply_overrides(to_dict(cfg), list(overrides)))


def _quant_settings(quant: QuantConfig, bits: BitWidths, epochs: int | None, lr: float | None) -> QuantConfig:
    quant = replace(quant, bits=str(bits), epochs=quant.epochs if epochs is None else epochs,
                    lr=quant.lr if lr is None else lr)
    if quant.epochs < 0:
        raise UserError(f"--epochs must be >= 0 (0 = calibration only), got {quant.epochs}")
    if quant.lr <= 0:
        raise UserError(f"--lr must be positive, got {quant.lr}")
    if quant.steps_per_epoch < 1:
        raise UserError(f"quant.steps_per_epoch must be >= 1, got {quant.steps_per_epoch}")
    if quant.calibration_batches < 1:
        raise UserError(f"quant.calibration_batches must be >= 1, got {quant.calibration_batches}")
    return quant


def _calibrate(model: torch.nn.Module, cases: Sequence[PreparedCase], patch: tuple[int, ...],
               cfg: ExperimentConfig, n_batches: int, device: torch.device, console: Console) -> int:
    """Calibration batches: training patches without augmentation (the distribution seen at inference)."""
    sampler = BatchSampler(cases, patch, cfg.data.foreground_oversample, Compose([]), seed=cfg.train.seed + 1)

    def batches():
        for _ in range(n_batches):
            images, _ = sampler.next_batch(cfg.train.batch_size)
            yield torch.from_numpy(images).to(device)

    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("calibrating activation scales", total=n_batches)
        return calibrate(model, batches(), on_batch=lambda _: progress.advance(task))


def _fit_parts(model, cases, val_cases, patch, cfg: ExperimentConfig, info: RunInfo, pspec,
               device) -> FitParts:
    """The loop's parts for QAT, built by the float run's schemes (`edgeseg.train.schemes`): its sampler and
    targets, loss, output activation and, where the scheme has one, its own validation score."""
    quant = cfg.quant
    optimizer = build_optimizer(model.parameters(), cfg.train, lr=quant.lr)
    scheduler = build_scheduler(optimizer, cfg.train.schedule, max(quant.epochs, 1) * quant.steps_per_epoch)
    sampler = schemes.build_sampler(cfg, cases, patch, info.spatial_dims, seed=cfg.train.seed)
    return FitParts(model=model, loss_fn=schemes.build_training_loss(cfg), optimizer=optimizer, scheduler=scheduler,
                    sampler=sampler, val_cases=val_cases, spec=pspec, class_names=info.class_names,
                    patch_size=patch, tile_size=tuple(info.tile_size), spatial_dims=info.spatial_dims,
                    device=device, slice_axis=info.slice_axis, include_background=info.evaluate_background,
                    output_activation=schemes.output_activation(cfg), score=schemes.validation_score(cfg))


def _fine_tune(parts: FitParts, cfg: ExperimentConfig, qrun: RunDir, weights_meta: dict[str, Any],
               console: Console, calibrated: ValScore | None = None) -> dict[str, Any]:
    """QAT with the float training loop: straight-through estimators are inside brevitas' quantizers.

    Mixed precision is off: bf16 autocast would round the quantizer scales and break the
    integer grid the deployed model runs on. The best checkpoint is the one of the best validation score:
    mean foreground Dice, or the scheme's own (`parts.score`); "best_val" holds the fields logged with it.
    `calibrated`: the calibrated model's score, already saved as the best checkpoint (epoch 0): QAT can
    make a model worse (a 4-bit Count-ception validated keypoint F1 1.0 after calibration and collapsed to
    a constant heatmap, F1 0, within two QAT epochs), and then the calibrated model is the one kept.
    """
    quant = cfg.quant
    schedule = FitSchedule(quant.epochs, quant.steps_per_epoch, cfg.train.batch_size, cfg.train.val_every,
                           cfg.train.max_minutes, amp=False)
    result = fit(parts, schedule, qrun, resume=False, console=console, weights_meta=weights_meta,
                 initial_best=None if calibrated is None else calibrated.value)
    best = next((r for r in result.history if r["epoch"] == result.best_epoch), {})
    summary: dict[str, Any] = {"epochs": result.epochs_done, "best_epoch": result.best_epoch}
    if calibrated is not None and result.best_epoch == 0:
        best = calibrated.fields
        summary["kept_calibrated"] = True
        console.print(f"[yellow]no QAT epoch validated better than the calibrated model ({calibrated.text}): "
                      "keeping the calibrated weights")
    if parts.score is None:
        summary["best_val_dice"] = result.best_dice
    else:
        summary["best_val_score"] = result.best_dice
    summary["best_val"] = {k: v for k, v in best.items() if k.startswith("val_")}
    return {**summary, "seconds": round(result.seconds, 1), "interrupted": result.interrupted, "lr": quant.lr,
            "steps_per_epoch": quant.steps_per_epoch}


def _own_score(parts: FitParts, model: torch.nn.Module, cases: Sequence[PreparedCase], console: Console,
               label: str) -> ValScore:
    """The validation score the loop selects by (the scheme's own `parts.score`, else mean foreground Dice) of
    `model` on `cases`."""
    model.eval()
    with console.status(f"evaluating {label}") if console.is_terminal else contextlib.nullcontext():
        return (parts.score or dice_score)(replace(parts, model=model, val_cases=cases))


def _compare_own_scores(parts: FitParts, float_model: torch.nn.Module, twin: torch.nn.Module,
                        cases: Sequence[PreparedCase], split: str, bits: str, console: Console) -> dict[str, Any]:
    """One split's float vs quantized row by the scheme's own score; the fields logged with it lose their
    "val_" prefix (e.g. keypoint_f1, keypoint_precision, keypoint_recall, keypoint_error_mm)."""
    f_score = _own_score(parts, float_model, cases, console, f"{split} (float)")
    q_score = _own_score(parts, twin, cases, console, f"{split} ({bits})")
    return {"cases": len(cases), "score": f_score.name.removeprefix("val_"), "score_float": f_score.value,
            "score_quant": q_score.value, "score_delta": q_score.value - f_score.value,
            "float": _unprefixed(f_score.fields), "quant": _unprefixed(q_score.fields)}


def _unprefixed(fields: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("val_"): v for k, v in fields.items()}


def _score(model: torch.nn.Module, cases: Sequence[PreparedCase], info: RunInfo, pspec: PreprocessSpec,
           device: torch.device, console: Console, label: str, activation: str = "softmax") -> dict[str, Any]:
    """The one evaluation path for float and quantized models (as `edgeseg evaluate` does it)."""
    model.eval()

    def predict(case: PreparedCase):
        return predict_labels(model, case.image, tuple(info.tile_size), device, info.spatial_dims, info.slice_axis,
                              activation=activation)

    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"evaluating {label}", total=len(cases))
        return evaluate_predictions(cases, predict, pspec, info.class_names, info.evaluate_background,
                                    on_case=lambda _: progress.advance(task))


def _short_list(names: list[str], keep: int = 3) -> str:
    if not names:
        return "none"
    return ", ".join(names[:keep]) + (f" and {len(names) - keep} more" if len(names) > keep else "")


def _plan_summary(plan: dict[str, str], first_last: BitWidths) -> str:
    if not plan:
        return "all float"
    return f"first/last {first_last}, {len(plan)} quantized or float-kept layers"


def _comparison_table(metrics: dict[str, Any], bits: str) -> Table:
    rows = list(metrics["splits"].values())
    own = next((r["score"] for r in rows if "score" in r), None)  # a scheme's own score, e.g. keypoint_score
    table = Table(title=f"float vs {bits} ({'mean foreground Dice' if own is None else own})")
    for column in ("split", "cases", "float", bits, "delta"):
        table.add_column(column, justify="right" if column != "split" else "left")
    key = "dice" if own is None else "score"
    for split, row in metrics["splits"].items():
        table.add_row(split, str(row["cases"]), f"{row[f'{key}_float']:.4f}", f"{row[f'{key}_quant']:.4f}",
                      f"{row[f'{key}_delta']:+.4f}")
    return table
