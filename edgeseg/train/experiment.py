"""`edgeseg train` and `edgeseg evaluate` for float runs: config -> run directory -> metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from edgeseg.config import ExperimentConfig
from edgeseg.data.cases import PreparedCase, prepare_cases, to_slices
from edgeseg.errors import UserError
from edgeseg.nets import build_from_config
from edgeseg.train import distributed
from edgeseg.train.checkpoint import load_weights
from edgeseg.train.inerrant import resolve_partial_labels
from edgeseg.train.inputs import (
    attach_metadata,
    check_extra_inputs,
    fit_metadata,
    keep_modalities,
    modality_names,
    recorded_metadata,
    with_metadata_dim,
    with_resolved_table,
)
from edgeseg.train.loop import FitParts, FitResult, FitSchedule, fit
from edgeseg.train.optim import build_optimizer, build_scheduler
from edgeseg.train.rundir import RunDir, RunInfo
from edgeseg.train.schemes import (
    balanced_epochs,
    build_relabeller,
    build_sampler,
    build_training_loss,
    network_activation,
    validation_score,
)
from edgeseg.train.setup import (
    configure_torch,
    labelled_train_refs,
    load_data_splits,
    pick_device,
    preprocess_spec,
    resolve_data_root,
    with_resolved_splits,
)
from edgeseg.train.stipple import (
    RECORD_KEY,
    PriorPredictor,
    RunPrior,
    build_run_prior,
    load_run_prior,
    save_run_prior,
)


def load_cases(refs, spec, num_classes: int, console: Console, label: str) -> list[PreparedCase]:
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"loading {label}", total=len(refs))
        return prepare_cases(refs, spec, num_classes, on_case=lambda _: progress.advance(task))


def _check_dims(cases: list[PreparedCase], spatial_dims: int, source: str) -> None:
    ndim = cases[0].image.ndim - 1
    if ndim == 2 and spatial_dims == 3:
        raise UserError(f"{source}: the data is 2D but data.spatial_dims is 3 (set data.spatial_dims=2)")


def train_experiment(cfg: ExperimentConfig, out: Path, *, resume: bool = False, config_dir: Path | None = None,
                     console: Console | None = None) -> FitResult:
    """Train the float model an experiment describes into run directory `out`.

    Under torchrun every process calls this: each loads the data, rank 0 alone writes the run
    directory, and `fit` trains data-parallel (`edgeseg.train.distributed`).
    """
    console = console or Console()
    run = RunDir(out)
    if resume:
        if not run.last.is_file():
            raise UserError(f"nothing to resume in {out} (no checkpoints/last.safetensors)")
        cfg = run.read_config()
    elif run.last.is_file() or run.config_path.is_file():
        raise UserError(f"{out} already holds a run; use --resume to continue it or choose another --out")
    extra_inputs = check_extra_inputs(cfg)  # before anything is written
    cfg = with_metadata_dim(cfg)
    configure_torch(cfg.train)
    ctx = distributed.setup(pick_device(cfg.train.device))
    device = ctx.device
    if resume and ctx.is_main:
        run.remove_orphaned_temporaries()  # of checkpoint writes a kill interrupted
    if not ctx.is_main:
        console = Console(quiet=True)
    distributed.barrier()  # every rank has checked `out` before rank 0 writes into it
    out.mkdir(parents=True, exist_ok=True)
    recorded = run.read_info().data_root if resume and run.info_path.is_file() else None
    if recorded and Path(recorded).is_dir():
        root = Path(recorded)  # a resumed run trains on the folder it started on, wherever it is resumed from
    else:
        with distributed.main_first():  # rank 0 writes synthetic phantoms once; the others then read them
            if cfg.train.scheme == "keypoints":  # keypoint phantoms for root synthetic
                from edgeseg.train.keypoints import resolve_data_root as resolve_keypoint_root

                root = resolve_keypoint_root(cfg, out, config_dir)
            else:
                root = resolve_data_root(cfg, out, config_dir)
    if cfg.data.root == "synthetic":
        cfg = replace(cfg, data=replace(cfg.data, root=str(root.resolve())))
    cfg = with_resolved_table(cfg, root, config_dir)
    cfg = with_resolved_splits(cfg, root, config_dir)
    splits = load_data_splits(root, cfg.data.layout, cfg.data.splits, cfg.train.seed, cfg.data.modalities,
                              label_suffixes=cfg.data.label_suffixes)
    if cfg.data.partial_labels is not None:  # checked against the data, and kept in the run's config as a mapping
        names = [c.name for c in (*splits.train, *splits.val, *splits.test)]
        record = resolve_partial_labels(cfg.data.partial_labels, cfg.data.class_names, root, names)
        cfg = replace(cfg, data=replace(cfg.data, partial_labels=record))
    spec = preprocess_spec(cfg)
    num_classes = cfg.data.num_classes
    train_refs = labelled_train_refs(cfg, splits.get("train"))
    train_cases = load_cases(train_refs, spec, num_classes, console, "train cases")
    val_cases = load_cases(splits.val, spec, num_classes, console, "val cases") if splits.val else []
    _check_dims(train_cases, cfg.data.spatial_dims, str(root))
    metadata = None
    if cfg.data.metadata is not None:  # fitted on the training split once; a resumed run reads the record
        metadata = (recorded_metadata(run.read_info().metadata, cfg, str(run.info_path)) if resume
                    else fit_metadata(cfg, train_refs, root))
        attach_metadata(train_cases, train_refs, cfg, root, metadata)
        attach_metadata(val_cases, splits.val, cfg, root, metadata)
    in_channels = train_cases[0].image.shape[0]
    sample_cases = train_cases
    if cfg.data.spatial_dims == 2 and train_cases[0].image.ndim == 4:
        sample_cases = [s for c in train_cases for s in to_slices(c, cfg.data.slice_axis)]
    model = build_from_config(cfg.model, spatial_dims=cfg.data.spatial_dims, in_channels=in_channels,
                              out_channels=num_classes)
    patch = tuple(cfg.data.patch_size)
    for field_name, size in (("patch_size", patch), ("inference_tile", cfg.data.tile_size)):
        if any(p % model.min_input_multiple for p in size):
            raise UserError(f"data.{field_name} {list(size)} must be divisible by {model.min_input_multiple} "
                            f"(2**model.depth)")
    optimizer = build_optimizer(model.parameters(), cfg.train)
    total = cfg.train.epochs * cfg.train.steps_per_epoch
    scheduler = build_scheduler(optimizer, cfg.train.schedule, total, cfg.train.warmup_epochs * cfg.train.steps_per_epoch)
    run_prior: RunPrior | None = None
    if cfg.train.scheme == "stipple":  # built once from the training labels; a resumed run reads it back
        settings = cfg.train.stipple_settings
        run_prior = (load_run_prior(out, run.read_info().extra.get(RECORD_KEY), settings) if resume
                     else build_run_prior(train_cases, cfg.data.class_names, settings))
    sampler = build_sampler(cfg, sample_cases, patch, cfg.data.spatial_dims, seed=cfg.train.seed, prior=run_prior)
    if not resume and ctx.is_main:
        extra = {} if run_prior is None else {RECORD_KEY: save_run_prior(run_prior, out)}
        run.write_config(cfg)
        run.write_info(RunInfo(
            spatial_dims=cfg.data.spatial_dims, in_channels=in_channels, class_names=list(cfg.data.class_names),
            patch_size=list(patch), tile_size=list(cfg.data.tile_size), preprocess=spec.to_dict(), data_root=str(root), slice_axis=cfg.data.slice_axis,
            evaluate_background=cfg.data.evaluate_background,
            metadata=None if metadata is None else metadata.to_dict(),
            modalities=modality_names(cfg, root, in_channels), extra=extra,
        ))
    parts = FitParts(model=model, loss_fn=build_training_loss(cfg), optimizer=optimizer, scheduler=scheduler,
                     sampler=sampler, val_cases=val_cases, spec=spec, class_names=cfg.data.class_names,
                     patch_size=patch, tile_size=tuple(cfg.data.tile_size), spatial_dims=cfg.data.spatial_dims, device=device,
                     slice_axis=cfg.data.slice_axis, include_background=cfg.data.evaluate_background,
                     output_activation=network_activation(cfg), score=validation_score(cfg),
                     relabel=build_relabeller(cfg, sample_cases, sampler, tuple(cfg.data.tile_size)),
                     extra_inputs=extra_inputs,
                     predict=None if run_prior is None else PriorPredictor(run_prior, tuple(cfg.data.tile_size),
                                                                           extra_inputs))
    console.print(f"training {cfg.model.name} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
                  f"{len(train_cases)} cases, validating on {len(val_cases)}; device {device}; run dir {out}")
    if run_prior is not None:
        console.print(f"STIPPLE prior: {run_prior.prior.num_bins} axial bins, boxes "
                      f"{', '.join(f'{o.name} {list(o.box)}' for o in run_prior.prior.organs)}; reference volume "
                      f"{run_prior.reference.name} ({out / 'stipple'})")
    schedule = FitSchedule(cfg.train.epochs, cfg.train.steps_per_epoch, cfg.train.batch_size, cfg.train.val_every,
                           cfg.train.max_minutes, cfg.train.amp, balanced_epochs=balanced_epochs(cfg))
    return fit(parts, schedule, run, resume=resume, console=console)


def load_run_model(run_dir: Path, weights: Path | None = None, layers=None) -> tuple[torch.nn.Module, ExperimentConfig, RunInfo]:
    """Rebuild a run's model and load its best (or given) weights, in eval mode on the CPU."""
    run = RunDir(run_dir)
    cfg, info = run.read_config(), run.read_info()
    model = build_from_config(cfg.model, spatial_dims=info.spatial_dims, in_channels=info.in_channels,
                              out_channels=len(info.class_names), layers=layers)
    load_weights(weights or run.weights(), model)
    return model.eval(), cfg, info


def evaluate_run(run_dir: Path, *, data: Path | None, split: str, console: Console | None = None,
                 device: str = "auto", modalities: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-case and summary metrics of a run's model on a split of its (or another) dataset.

    Metadata is normalised with the run's recorded statistics; `modalities` (names from run.json) keeps only
    those modalities, the others treated as missing (HeMIS's evaluation on every subset); cases that have
    none of them are left out and listed in "skipped_cases".
    """
    from edgeseg.data.preprocess import PreprocessSpec
    from edgeseg.train.evaluation import evaluate_predictions
    from edgeseg.train.inference import predict_labels

    console = console or Console()
    model, cfg, info = load_run_model(run_dir)
    dev = pick_device(device)
    model.to(dev)
    root = Path(data) if data is not None else Path(info.data_root or "")
    if not root.is_dir():
        raise UserError(f"data folder not found: {root} (pass --data)")
    extra_inputs = check_extra_inputs(cfg)
    splits = load_data_splits(root, cfg.data.layout, cfg.data.splits, cfg.train.seed, cfg.data.modalities,
                              label_suffixes=cfg.data.label_suffixes)
    spec = PreprocessSpec.from_dict(info.preprocess)
    refs = splits.get(split)
    cases = load_cases(refs, spec, len(info.class_names), console, f"{split} cases")
    if cfg.data.metadata is not None:
        attach_metadata(cases, refs, cfg, root, recorded_metadata(info.metadata, cfg, str(RunDir(run_dir).info_path)))
    skipped: list[str] = []
    if modalities is not None:
        if info.modalities is None:
            raise UserError(f"{run_dir} was not trained with data.modalities: no modalities to choose from")
        cases, skipped = keep_modalities(cases, info.modalities, modalities)

    prior_predictor = None
    if cfg.train.scheme == "stipple":  # the run's own prior, placed on each case by translation (labels unused)
        run_prior = load_run_prior(run_dir, info.extra.get(RECORD_KEY), cfg.train.stipple_settings)
        prior_predictor = PriorPredictor(run_prior, tuple(info.tile_size), extra_inputs)

    def predict(case: PreparedCase):
        if prior_predictor is not None:
            return prior_predictor(model, case, dev)
        return predict_labels(model, case.image, tuple(info.tile_size), dev, info.spatial_dims, info.slice_axis,
                              activation=network_activation(cfg), inputs=case.model_inputs(extra_inputs))

    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"evaluating {split}", total=len(cases))
        if cfg.train.scheme == "keypoints":  # decoded heatmaps matched to the reference keypoints, in mm
            from edgeseg.train.keypoints import evaluate_keypoints

            result = evaluate_keypoints(model, cases, spec, info.class_names, cfg.train.keypoints_settings,
                                        tuple(info.tile_size), dev, info.spatial_dims, info.slice_axis,
                                        extra_inputs, on_case=lambda _: progress.advance(task))
        else:
            result = evaluate_predictions(cases, predict, spec, info.class_names, info.evaluate_background,
                                          on_case=lambda _: progress.advance(task))
    result["run"] = str(run_dir)
    result["split"] = split
    result["data"] = str(root)
    if modalities is not None:
        result["modalities"] = list(modalities)
        result["skipped_cases"] = skipped  # none of those modalities on disk
    if prior_predictor is not None:
        result["stipple"] = {"prior": str(Path(run_dir) / "stipple"),
                             "reference_case": prior_predictor.run_prior.reference.name,
                             "shifts": prior_predictor.shifts}  # each case's placement (voxels from the reference)
    return result
