"""The training loop: epochs of sampled batches, validation, best/last checkpoints, exact resume.

Used by `edgeseg train` (float) and by `edgeseg quantize` (QAT fine-tuning) alike: the caller
builds the model, loss, optimizer, scheduler and sampler; this module only runs them. Under
torchrun the same loop runs data-parallel (`edgeseg.train.distributed`): DDP for the gradients, a
sharded sampler, validation split over ranks, and files written by rank 0 only. Training schemes
(`edgeseg.train.schemes`) reach the loop as parts: the sampler (mixup, soft labels), the loss and
output activation (SoftSeg, INERRANT), the epoch-dependent patch placement of two-step training
(`edgeseg.train.two_step`), which the loop switches and records in checkpoints and the log, and INERRANT's
relabelling (`edgeseg.train.inerrant.Relabeller`), run at the start of each relabelling step, its step and
pseudo-labels saved in checkpoints. STIPPLE (`edgeseg.train.stipple`): batches carry each patch's prior maps p,
which the loss receives as a third argument; validation predicts through the scheme's own `predict` (the prior
placed by translation). A scheme may also bring its own validation score (`FitParts.score`, e.g. the keypoint
scheme's detection F1, `edgeseg.train.keypoints`); the best checkpoint is the one of the highest score.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from edgeseg.data.cases import PreparedCase
from edgeseg.data.preprocess import PreprocessSpec
from edgeseg.errors import UserError
from edgeseg.metrics import aggregate
from edgeseg.train import distributed, two_step
from edgeseg.train.checkpoint import (
    load_extra_tensors,
    load_training_state,
    save_training_state,
    save_weights,
)
from edgeseg.train.evaluation import evaluate_predictions, mean_foreground_dice
from edgeseg.train.inerrant import Relabeller
from edgeseg.train.inference import predict_labels
from edgeseg.train.rundir import RunDir
from edgeseg.train.sampling import BatchSampler


@dataclass
class FitParts:
    """Everything the loop runs, built by the caller."""

    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: BatchSampler
    val_cases: Sequence[PreparedCase]
    spec: PreprocessSpec
    class_names: Sequence[str]
    patch_size: tuple[int, ...]
    spatial_dims: int
    device: torch.device
    tile_size: tuple[int, ...] | None = None  # inference tile for validation; None = patch_size
    slice_axis: int = 2
    include_background: bool = False
    output_activation: str = "softmax"  # how validation reads the output: softmax, normalized_relu (SoftSeg), ...
    relabel: Relabeller | None = None  # INERRANT's pseudo-labelling of the sampler's cases
    extra_inputs: tuple[str, ...] = ()  # the model's inputs besides the image, in forward order (FiLM, HeMIS)
    # a scheme's own whole-volume prediction (model, case, device) -> labels (STIPPLE's prior); None = predict_labels
    predict: Callable[[torch.nn.Module, PreparedCase, torch.device], np.ndarray] | None = None
    # a scheme's own validation (parts) -> ValScore (the keypoint scheme's detection F1); None = mean foreground Dice
    score: Callable[[FitParts], ValScore] | None = None


@dataclass(frozen=True)
class ValScore:
    """One validation: the model-selection score (higher is better) under its log name, the fields logged
    with it and the text printed for the epoch."""

    name: str
    value: float
    fields: dict[str, Any]
    text: str


def dice_score(parts: FitParts) -> ValScore:
    """The default validation score: mean foreground Dice over the validation cases (`validate`)."""
    summary = validate(parts)["summary"]
    dice = mean_foreground_dice(summary)
    per_class = {c: v["dice"]["mean"] for c, v in summary.items() if c != "mean"}
    text = f"val Dice {dice:.4f} ({' '.join(f'{k} {v:.3f}' for k, v in per_class.items())})"
    return ValScore("val_dice", dice, {"val_dice": dice, "val_dice_per_class": per_class}, text)


@dataclass
class FitSchedule:
    epochs: int
    steps_per_epoch: int
    batch_size: int
    val_every: int = 1
    max_minutes: float | None = None
    amp: bool = True
    balanced_epochs: int | None = None  # two-step training: class-sampled epochs before the natural ones


@dataclass
class FitResult:
    epochs_done: int
    best_dice: float | None  # the best validation score: mean Dice, or the scheme's own (FitParts.score)
    best_epoch: int | None
    interrupted: bool
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


def validate(parts: FitParts) -> dict[str, Any]:
    """Whole-volume validation on the original grids; returns evaluate_predictions' dict.

    Under torchrun each rank scores every world_size-th case and the per-case metrics are gathered,
    so every rank returns the same summary as one process scoring all cases.
    """

    def predict(case: PreparedCase) -> np.ndarray:
        if parts.predict is not None:
            return parts.predict(parts.model, case, parts.device)
        return predict_labels(parts.model, case.image, parts.tile_size or parts.patch_size, parts.device,
                              parts.spatial_dims, parts.slice_axis, activation=parts.output_activation,
                              inputs=case.model_inputs(parts.extra_inputs))

    rank, world = distributed.rank(), distributed.world_size()
    if world == 1:
        return evaluate_predictions(parts.val_cases, predict, parts.spec, parts.class_names, parts.include_background)
    mine = evaluate_predictions(parts.val_cases[rank::world], predict, parts.spec, parts.class_names,
                                parts.include_background)["cases"]
    merged = {name: m for part in distributed.gather_objects(mine) for name, m in part.items()}
    per_case = {c.name: merged[c.name] for c in parts.val_cases if c.name in merged}
    return {"cases": per_case, "summary": aggregate(list(per_case.values()))}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 units (AMX or AVX512-BF16); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((ln for ln in fh if ln.startswith("flags")), "")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _autocast(device: torch.device, enabled: bool):
    """Mixed precision: bf16/fp16 on CUDA; bf16 on CPUs with native bf16 (about 2x faster 3D training
    measured on this project's AMX build machine); plain fp32 otherwise."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if enabled and device.type == "cpu" and cpu_has_fast_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _StopRequested(Exception):
    pass


class GracefulInterrupt:
    """While active, the first Ctrl-C (SIGINT) only sets `requested`; the loop stops at the next step
    boundary, so the saved state is consistent (never a half-applied optimizer step). A second
    Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def fit(parts: FitParts, schedule: FitSchedule, run: RunDir, *, resume: bool, console: Console | None = None,
        weights_meta: dict[str, Any] | None = None, initial_best: float | None = None) -> FitResult:
    """Train, validating every `val_every` epochs; `resume` continues from run.last exactly.

    `initial_best`: the validation score of the weights the caller already saved at run.best (QAT: the
    calibrated model, "epoch 0"); training replaces that checkpoint only with a better one.

    Under torchrun (see `edgeseg.train.distributed`) every rank runs this; `schedule.batch_size` is
    the global batch, and only rank 0 writes checkpoints and the log.
    """
    console = console or Console()
    ctx = distributed.setup(parts.device)
    main = ctx.is_main
    model, device = parts.model.to(ctx.device), ctx.device
    parts = replace(parts, model=model, device=device)
    parts.sampler.shard(ctx.rank, ctx.world_size)
    if schedule.batch_size % ctx.world_size:
        raise UserError(f"train.batch_size {schedule.batch_size} (the global batch) must be divisible by the "
                        f"number of processes ({ctx.world_size})")
    state: dict[str, Any] = {"epoch": 0, "step": 0, "loss_sum": 0.0, "loss_n": 0, "best_dice": initial_best,
                             "best_epoch": None if initial_best is None else 0, "seconds": 0.0,
                             "phase": two_step.phase(1, schedule.balanced_epochs)}
    if resume:
        state = load_training_state(run.last, model, parts.optimizer, parts.scheduler)
        parts.sampler.set_state(state.pop("sampler_rng"))
        if parts.relabel is not None:
            parts.relabel.restore(state.get("relabel"), load_extra_tensors(run.last))
        expected = two_step.phase(state["epoch"] + 1, schedule.balanced_epochs)
        if state["step"] and state.get("phase", expected) != expected:  # stopped inside an epoch of another phase
            raise UserError(f"{run.last} was saved in the '{state['phase']}' phase of epoch {state['epoch'] + 1}, "
                            f"but this run's train.two_step puts that epoch in the '{expected}' phase")
        if main:
            run.truncate_log(state["epoch"])
            if state.get("record") and run.last_logged_epoch() < state["epoch"]:
                run.append_log(state["record"])  # killed after the checkpoint, before its log line
        console.print(f"resuming from epoch {state['epoch'] + 1}, step {state['step']} ({run.last})")
    net = distributed.wrap_model(model, ctx)  # DDP under torchrun; `model` stays the unwrapped module
    if ctx.active:
        console.print(f"data-parallel: {ctx.world_size} processes, global batch {schedule.batch_size} "
                      f"({schedule.batch_size // ctx.world_size} per process), backend {distributed_backend()}")
    scaler = torch.amp.GradScaler("cuda", enabled=schedule.amp and device.type == "cuda"
                                  and not torch.cuda.is_bf16_supported())
    history: list[dict[str, Any]] = []
    started = time.monotonic() - state["seconds"]
    interrupted = False

    def snapshot() -> None:
        state["seconds"] = time.monotonic() - started
        extra = None
        if parts.relabel is not None:
            state["relabel"] = parts.relabel.state()
            extra = parts.relabel.tensors()
        if main:
            save_training_state(run.last, model, parts.optimizer, parts.scheduler,
                                {**state, "sampler_rng": parts.sampler.get_state()}, extra)

    columns = (TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn())
    stop = GracefulInterrupt()
    with stop:
        try:
            while state["epoch"] < schedule.epochs:
                epoch = state["epoch"] + 1
                _enter_phase(parts.sampler, state, two_step.phase(epoch, schedule.balanced_epochs), epoch, console)
                if parts.relabel is not None:
                    parts.relabel.begin_epoch(epoch, model, device, console)
                model.train()
                with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
                    task = progress.add_task("train", total=schedule.steps_per_epoch, completed=state["step"],
                                             epoch=epoch, loss=0.0)
                    while state["step"] < schedule.steps_per_epoch:
                        if distributed.any_rank(stop.requested):  # all ranks stop at the same step
                            raise _StopRequested
                        batch = parts.sampler.next_batch(schedule.batch_size)
                        x = torch.from_numpy(batch.images).to(device)
                        y = torch.from_numpy(batch.labels).to(device)
                        extra = [torch.from_numpy(batch.inputs[name]).to(device) for name in parts.extra_inputs]
                        parts.optimizer.zero_grad(set_to_none=True)
                        with _autocast(device, schedule.amp):
                            if batch.prior is None:
                                loss = parts.loss_fn(net(x, *extra), y)
                            else:  # STIPPLE: the loss also reads the patches' prior maps
                                loss = parts.loss_fn(net(x, *extra), y, torch.from_numpy(batch.prior).to(device))
                        loss_value = distributed.mean_over_ranks(loss.detach())  # the global batch's loss
                        if not np.isfinite(loss_value):
                            raise FloatingPointError(f"loss became {loss_value} at epoch {epoch}, step {state['step']}")
                        scaler.scale(loss).backward()
                        scaler.step(parts.optimizer)
                        scaler.update()
                        parts.scheduler.step()
                        state["step"] += 1
                        state["loss_sum"] += loss_value
                        state["loss_n"] += 1
                        progress.update(task, advance=1, loss=state["loss_sum"] / state["loss_n"])
                record: dict[str, Any] = {"epoch": epoch, "train_loss": state["loss_sum"] / max(state["loss_n"], 1),
                                          "lr": parts.optimizer.param_groups[0]["lr"]}
                if ctx.active:
                    record["processes"] = ctx.world_size
                if schedule.balanced_epochs is not None:
                    record["phase"] = state["phase"]
                if parts.relabel is not None:
                    record.update(parts.relabel.log_fields())
                distributed.broadcast_buffers(model)  # one set of batch-norm statistics for validation and checkpoints
                val_text = None
                if parts.val_cases and (epoch % schedule.val_every == 0 or epoch == schedule.epochs):
                    scored = (parts.score or dice_score)(parts)  # state["best_dice"] holds the best score
                    record.update(scored.fields)
                    val_text = scored.text
                    if state["best_dice"] is None or scored.value > state["best_dice"]:
                        state["best_dice"], state["best_epoch"] = scored.value, epoch
                        if main:
                            save_weights(run.best, model, {**(weights_meta or {}), "epoch": epoch,
                                                           scored.name: scored.value})
                state.update(epoch=epoch, step=0, loss_sum=0.0, loss_n=0)
                record["seconds"] = round(time.monotonic() - started, 1)
                state["record"] = record  # lets a resume restore this log line if a kill lands before it is written
                snapshot()
                if main:
                    run.append_log(record)
                history.append(record)
                _print_epoch(console, record, schedule.epochs, val_text)
                over_budget = schedule.max_minutes is not None and record["seconds"] > 60 * schedule.max_minutes
                if distributed.any_rank(over_budget):
                    console.print(f"time budget of {schedule.max_minutes} min reached after epoch {epoch}")
                    break
        except _StopRequested:
            snapshot()
            interrupted = True
            console.print(f"[yellow]interrupted: state saved to {run.last}; continue with --resume")
    if not parts.val_cases and main:
        save_weights(run.best, model, {**(weights_meta or {}), "epoch": state["epoch"], "val_dice": None})
    distributed.barrier()  # rank 0's files exist before any rank returns (callers may read them)
    return FitResult(state["epoch"], state["best_dice"], state["best_epoch"], interrupted,
                     time.monotonic() - started, history)


def _enter_phase(sampler: BatchSampler, state: dict[str, Any], phase: str, epoch: int, console: Console) -> None:
    """Set the sampler's patch placement for `epoch` (two-step training switches it once)."""
    if sampler.mode != phase:
        sampler.set_mode(phase)  # type: ignore[arg-type]
        if phase != "standard":
            what = "balanced class sampling" if phase == "balanced" else "the natural distribution"
            console.print(f"two-step training: epoch {epoch} on {what}")
    state["phase"] = phase


def distributed_backend() -> str:
    return torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"


def _print_epoch(console: Console, record: dict[str, Any], epochs: int, val_text: str | None = None) -> None:
    parts = [f"epoch {record['epoch']:>4}/{epochs}", f"loss {record['train_loss']:.4f}", f"lr {record['lr']:.2e}"]
    if val_text is not None:
        parts.append(val_text)
    parts.append(f"{record['seconds']:.0f} s")
    console.print(" | ".join(parts))
