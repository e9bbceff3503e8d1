"""Segment volumes with a bundle: what `edgeseg segment` and bundle evaluation run (torch-free).

Per volume: read -> preprocess exactly as the manifest says (reorient, normalise, resample;
`edgeseg.data.preprocess`) -> tiled inference (`tiling.iter_slabs`: even tile steps, Gaussian or
constant blending of softmax probabilities, as training-time evaluation does) -> per-slab
reduction -> back onto the input's grid (`undo_spatial`) -> optional uncertainty figures and
removal of unstable structures -> atomic writes with the input's affine and header.

Samples: S = F x N, with F flip sets (`tta.flip_sets`, identity included) and N Monte Carlo
dropout passes (N = 1 without MC). All S run inside the same tile pass: each tile batch is
predicted under every flip and every MC mask set, so no sample needs a full-volume copy. An MC
pass keeps its dropout masks for every tile of the volume (one coherent draw of the network,
as dropout on the whole volume would be); the masks come from `bundle.make_mc_masks` with a
seeded generator, so a run is reproducible. Without uncertainty outputs the samples are averaged
per tile before blending (blending is linear, so this equals averaging blended samples) and the
accumulator holds K channels; with them it holds S x K.

Peak memory: the preprocessed input, one tile-deep slab of accumulators (K or S x K channels;
`tiling.iter_slabs`), the outputs on the preprocessed grid (labels uint8; probabilities and
entropy float32 and S per-sample label maps uint8 only when asked for) and their copies on the
input grid. The input as read is released once it is preprocessed (only its geometry is kept).

Models with extra inputs (FiLM metadata, HeMIS modality mask; `case_inputs`): each case's values are
resolved before any work (metadata: --metadata, a table or the case's JSON sidecar; modalities: which
channel files are given and --modalities), and fed with every tile batch, one row per tile, under every
TTA flip and MC pass (`model_predictor`).

Labels are the argmax of the mean probability on the model's grid, mapped back nearest-neighbour
(as `edgeseg evaluate` scores runs, so bundle and run evaluation agree); probabilities and the
entropy map are mapped back linearly. Output labels are class indices (0 = class_names[0]).

STIPPLE bundles (manifest `stipple`, `Bundle.stipple_prior`): the mean probabilities of the whole volume are
kept on the model's grid; the prior is placed on them and they are reweighted (`edgeseg.priors.predict.PriorModel`,
the code `edgeseg evaluate RUN` runs), and the labels are the argmax of the prior-driven probabilities, which are
also what `probabilities` returns. The placement shift is reported per case (`Segmentation.prior_shift`).
Per-sample uncertainty outputs are refused for them (the prior is placed on the mean only).

Keypoint bundles (output_kind "heatmap"): the mean heatmaps are the output, written as a float NIfTI with the
decoded keypoints as JSON beside it (`edgeseg.runtime.keypoints`); no label mask, no uncertainty outputs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.special import expit, softmax

from edgeseg.data.io import (
    IMAGE_SUFFIXES,
    Volume,
    file_suffix,
    is_image_file,
    read_image,
    strip_suffix,
    write_label,
    write_map,
)
from edgeseg.data.preprocess import PreprocessSpec, preprocess_case, undo_spatial
from edgeseg.errors import UserError
from edgeseg.runtime.backends import Backend
from edgeseg.runtime.bundle import MULTILABEL_BACKGROUND, Manifest, make_mc_masks
from edgeseg.runtime.case_inputs import (
    assemble_modalities,
    batched,
    case_metadata,
    check_input_options,
    modality_indices,
    model_inputs,
)
from edgeseg.runtime.tiling import BLEND_MODES, Predictor, iter_slabs, iter_slices
from edgeseg.runtime.tta import flip_sets, split_samples, tta_predictor
from edgeseg.runtime.uncertainty import (
    case_summary,
    entropy_map,
    remove_uncertain_structures,
    structure_uncertainty,
)

if TYPE_CHECKING:
    from edgeseg.priors.predict import PriorModel

DEFAULT_SLICE_AXIS = 2  # 2D models on 3D volumes without a manifest slice_axis: axial planes of the RAS grid
OnBatch = Callable[[int, int], None]


# ------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Sampling:
    """Which samples each tile is predicted under: flip sets x MC mask sets."""

    flips: list[tuple[int, ...]] = field(default_factory=lambda: [()])
    mc_masks: list[dict[str, np.ndarray]] = field(default_factory=list)  # one mask set per MC pass; each (1, C, 1...)

    @property
    def num_samples(self) -> int:
        return len(self.flips) * max(len(self.mc_masks), 1)

    @property
    def sources(self) -> dict[str, int]:
        return {"tta_flips": len(self.flips), "mc_passes": max(len(self.mc_masks), 1)}


def make_sampling(manifest: Manifest, *, tta_axes: Sequence[int] | None, mc_passes: int,
                  rng: np.random.Generator) -> Sampling:
    """Flip sets over `tta_axes` (None: no TTA) and `mc_passes` MC mask sets drawn from `rng`."""
    flips: list[tuple[int, ...]] = [()] if tta_axes is None else flip_sets(manifest.spatial_dims, tta_axes)
    masks = [make_mc_masks(manifest, 1, rng) for _ in range(mc_passes)]
    return Sampling(flips=flips, mc_masks=masks)


def check_options(manifest: Manifest, *, tta_axes: Sequence[int] | None = None, mc_passes: int = 0,
                  uncertainty: bool = False, overlap: float = 0.5, batch_size: int = 1, blend: str = "gaussian",
                  tile: Sequence[int] | None = None, iou_threshold: float | None = None) -> list[int]:
    """Validate the segmentation options against the bundle; returns the tile to use."""
    if not 0.0 <= overlap < 1.0:
        raise UserError(f"--overlap must be within [0, 1), got {overlap}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if blend not in BLEND_MODES:
        from edgeseg.errors import unknown_name

        raise unknown_name("blend mode", blend, BLEND_MODES)
    if mc_passes < 0:
        raise UserError(f"--mc must be >= 0 (number of Monte Carlo dropout passes), got {mc_passes}")
    if mc_passes and not manifest.mc_available:
        raise UserError("--mc: this bundle has no Monte Carlo dropout form (export a model trained with "
                        "model.dropout > 0)")
    if tta_axes is not None:
        if not len(tta_axes):
            raise UserError("--tta-axes needs at least one axis")
        flip_sets(manifest.spatial_dims, tta_axes)  # validates the axes
    samples = (1 if tta_axes is None else 2 ** len(tta_axes)) * max(mc_passes, 1)
    if manifest.stipple is not None and (uncertainty or iou_threshold is not None):
        raise UserError("this STIPPLE bundle places its prior on the mean probabilities of each volume: per-sample "
                        "uncertainty outputs (--uncertainty, --iou-threshold) are not available for it")
    if (uncertainty or iou_threshold is not None) and samples < 2:
        raise UserError("uncertainty needs several samples: add --tta and/or --mc N (N >= 2)")
    if iou_threshold is not None and not 0.0 <= iou_threshold <= 1.0:
        raise UserError(f"--iou-threshold must be within [0, 1], got {iou_threshold}")
    tile = list(manifest.tile_size if tile is None else tile)
    if len(tile) != manifest.spatial_dims:
        raise UserError(f"--tile {tile} needs {manifest.spatial_dims} values for this {manifest.spatial_dims}D model")
    if any(t < 1 or t % manifest.min_input_multiple for t in tile):
        raise UserError(f"--tile {tile} must be positive multiples of {manifest.min_input_multiple} "
                        f"(the model's min_input_multiple)")
    return tile


def tile_warning(manifest: Manifest, tile: Sequence[int]) -> str | None:
    """A warning when `tile` is smaller than the training patch along some axis (tiles then lack the context the
    model was trained with: 8-17 Dice points lost on hippocampus, shared/research/reference-runs.md)."""
    patch = manifest.training.get("patch_size")
    if not patch or len(patch) != len(tile) or all(t >= p for t, p in zip(tile, patch)):
        return None
    return (f"tile {list(tile)} is smaller than the training patch {list(patch)}: tiles see less context than the "
            "model was trained with, which usually costs accuracy")


# ------------------------------------------------------------------------------------- predictors


def normalized_relu(scores: np.ndarray) -> np.ndarray:
    """SoftSeg's output activation (Gros et al. 2021), as `edgeseg.train.softseg.normalized_relu` computes it
    in training: relu(s) / max relu(s) per sample (max over channels and voxels), then, with K > 2 channels,
    divided by the channel sum at each voxel; a voxel (or sample) with nothing positive gives 0. K = 2 (binary,
    ivadomed's one-channel model): f = relu(s1 - s0) / max relu(s1 - s0) per sample, served as (1 - f, f).
    Shape: (B, K, *T) -> (B, K, *T) float32 soft maps in [0, 1].
    """
    def peak_normalized(positive: np.ndarray) -> np.ndarray:
        peak = positive.reshape(len(positive), -1).max(axis=1).reshape(-1, *([1] * (positive.ndim - 1)))
        return positive / np.where(peak > 0, peak, np.float32(1))

    scores = scores.astype(np.float32, copy=False)
    if scores.shape[1] == 2:
        foreground = peak_normalized(np.maximum(scores[:, 1:2] - scores[:, 0:1], np.float32(0)))
        return np.concatenate([np.float32(1) - foreground, foreground], axis=1)
    out = peak_normalized(np.maximum(scores, np.float32(0)))
    if scores.shape[1] > 1:
        total = out.sum(axis=1, keepdims=True)
        out = out / np.where(total > 0, total, np.float32(1))
    return out


def sigmoid_multilabel(scores: np.ndarray) -> np.ndarray:
    """INERRANT's K sigmoids (Petit et al. 2021), as `edgeseg.train.inerrant.sigmoid_multilabel` computes them in
    training: channel 0 becomes the constant MULTILABEL_BACKGROUND (just below 0.5), channels 1..K sigmoid(s_k).
    Their argmax is the class of maximum probability, background when all are below 0.5; averaging samples
    (TTA, MC dropout) or blending tiles leaves the constant channel as it is (up to float rounding), so the
    argmax of a mean applies the same rule to the mean class probabilities.
    Shape: (B, C, *T) -> (B, C, *T) float32.
    """
    out = expit(scores.astype(np.float32, copy=False)).astype(np.float32, copy=False)
    out[:, 0] = np.float32(MULTILABEL_BACKGROUND)
    return out


def heatmaps(scores: np.ndarray) -> np.ndarray:
    """Keypoint heatmaps (output_kind "heatmap"), as `edgeseg.train.keypoints.heatmap_activation` computes them in
    training: sigmoid of channels 1..K, channel 0 (unused) set to 0. Shape: (B, C, *T) -> (B, C, *T) float32."""
    out = expit(scores.astype(np.float32, copy=False)).astype(np.float32, copy=False)
    out[:, 0] = np.float32(0.0)
    return out


def model_predictor(backend: Backend, manifest: Manifest, sampling: Sampling, *, keep_samples: bool,
                    batch_size: int | None = None, inputs: dict[str, np.ndarray] | None = None) -> Predictor:
    """Tile batch -> class probabilities under every sample, or their mean (for output_kind
    "normalized_relu": SoftSeg's soft maps).

    `inputs`: the case's extra model inputs (`case_inputs.model_inputs`, unbatched), repeated to the size of
    every call (TTA packs flipped tiles into calls of any size; flips do not touch them).
    Shape: (B, C_in, *T) -> (B, S * K, *T) with keep_samples (sample s in channels [s*K, (s+1)*K),
    s = flip index * N + MC pass), else (B, K, *T).
    """
    num_classes = len(manifest.class_names)
    missing = [n for n in manifest.extra_inputs if n not in (inputs or {})]
    if missing:
        raise UserError(f"the bundle's model needs its {' and '.join(missing)} input(s) for every case")
    case_inputs = {n: np.asarray(v, np.float32) for n, v in (inputs or {}).items()}
    repeated: dict[int, dict[str, np.ndarray]] = {}  # by batch size: tiles of one case share the values

    def probabilities(batch: np.ndarray, masks: dict[str, np.ndarray] | None) -> np.ndarray:
        feeds = dict(masks or {})
        if case_inputs:
            if len(batch) not in repeated:
                repeated[len(batch)] = batched(case_inputs, len(batch))
            feeds.update(repeated[len(batch)])
        out = backend.run(batch, feeds or None)
        if out.shape[1] != manifest.model_channels():
            raise UserError(f"the model returns {out.shape[1]} channels but the bundle lists {num_classes} classes"
                            f" (output_kind {manifest.output_kind})")
        if manifest.output_kind == "logits":
            out = softmax(out, axis=1)
        elif manifest.output_kind == "sigmoid":
            foreground = expit(out)
            out = np.concatenate([1.0 - foreground, foreground], axis=1)
        elif manifest.output_kind == "normalized_relu":
            out = normalized_relu(out)
        elif manifest.output_kind == "sigmoid_multilabel":
            out = sigmoid_multilabel(out)
        elif manifest.output_kind == "heatmap":
            out = heatmaps(out)
        return out.astype(np.float32, copy=False)

    average = not keep_samples and sampling.num_samples > 1
    passes = len(sampling.mc_masks)

    def mc(batch: np.ndarray) -> np.ndarray:
        """Every MC pass of one batch, written into one preallocated result (summed, then divided, when
        averaging), so no list of N outputs is held. Shape: (B, C_in, *T) -> (B, N * K or K, *T)."""
        if not passes:
            return probabilities(batch, None)
        out: np.ndarray | None = None
        for n, masks in enumerate(sampling.mc_masks):
            probs = probabilities(batch, {k: np.repeat(v, len(batch), axis=0) for k, v in masks.items()})
            classes = probs.shape[1]
            if out is None:  # a copy: the backend may hand out an array it keeps
                out = (probs.copy() if average
                       else np.empty((len(batch), passes * classes, *probs.shape[2:]), np.float32))
            elif average:
                out += probs
            if not average:
                out[:, n * classes:(n + 1) * classes] = probs
        assert out is not None
        if average:
            out /= np.float32(passes)
        return out

    if sampling.flips == [()]:
        return mc
    # TTA packs the flipped tiles into calls of batch_size (the backend's batch; TensorRT's profile batch) and, when
    # averaging, adds each call's output straight into the mean: the mean of the F flip means of N passes each is
    # the mean of all S = F x N samples.
    return tta_predictor(mc, sampling.flips, batch_size, mean=average)


# ------------------------------------------------------------------------------------- the model's grid


@dataclass
class GridOutputs:
    """Predictions on the preprocessed (model) grid P.

    Shape: labels (*P) uint8/uint16; probabilities (K, *P) float32; entropy (*P) float32;
    sample_labels (S, *P) uint8/uint16 (argmax of each sample).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    entropy: np.ndarray | None = None
    sample_labels: np.ndarray | None = None


def label_dtype(num_classes: int) -> type:
    return np.uint8 if num_classes <= 256 else np.uint16


def _blocks(image: np.ndarray, predict: Predictor, *, model_dims: int, slice_axis: int, tile: Sequence[int],
            overlap: float, batch_size: int, blend: str,
            on_batch: OnBatch | None) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """(spatial index, blended block (channels, *region)) covering the image in order.

    3D model (or 2D model on a 2D image): the tiler's slabs along the first axis. 2D model on a
    3D volume: planes along `slice_axis` in order, tiled in 2D with batches spanning planes.
    """
    if image.ndim - 1 == model_dims:
        for z0, z1, block in iter_slabs(image, predict, tile, overlap=overlap, batch_size=batch_size, blend=blend,
                                        on_batch=on_batch):
            yield (slice(z0, z1),), block
        return
    for i, probs in iter_slices(image, predict, tile, axis=slice_axis, overlap=overlap, batch_size=batch_size,
                                blend=blend, on_batch=on_batch):
        index = [slice(None)] * 3
        index[slice_axis] = slice(i, i + 1)
        yield tuple(index), np.expand_dims(probs, slice_axis + 1)


def predict_on_grid(image: np.ndarray, predict: Predictor, *, num_classes: int, num_samples: int, model_dims: int,
                    tile: Sequence[int], slice_axis: int = DEFAULT_SLICE_AXIS, overlap: float = 0.5,
                    batch_size: int = 1, blend: str = "gaussian", keep_probabilities: bool = False,
                    keep_uncertainty: bool = False, on_batch: OnBatch | None = None) -> GridOutputs:
    """Run the tiled predictor over a preprocessed image and reduce it slab by slab.

    `predict` returns num_samples x num_classes channels (1 x K when samples are averaged per tile).
    Shape: image (C, *P) -> GridOutputs on P.
    """
    spatial = image.shape[1:]
    dtype = label_dtype(num_classes)
    out = GridOutputs(labels=np.zeros(spatial, dtype))
    if keep_probabilities:
        out.probabilities = np.zeros((num_classes, *spatial), np.float32)
    if keep_uncertainty:
        out.entropy = np.zeros(spatial, np.float32)
        out.sample_labels = np.zeros((num_samples, *spatial), dtype)
    for index, block in _blocks(image, predict, model_dims=model_dims, slice_axis=slice_axis, tile=tile,
                                overlap=overlap, batch_size=batch_size, blend=blend, on_batch=on_batch):
        samples = split_samples(block, num_samples)  # (S, K, *region)
        mean = samples[0] if num_samples == 1 else samples.mean(axis=0)
        out.labels[index] = mean.argmax(axis=0)
        if out.probabilities is not None:
            out.probabilities[(slice(None), *index)] = mean
        if out.entropy is not None and out.sample_labels is not None:
            out.entropy[index] = entropy_map(mean)
            for sample, labels in zip(samples, out.sample_labels):  # one int64 argmax temporary at a time
                labels[index] = sample.argmax(axis=0)
    return out


# ------------------------------------------------------------------------------------- one volume


@dataclass
class Prepared:
    """A volume on the model's grid, and the input's geometry (its voxels released)."""

    image: np.ndarray  # (C, *P) float32
    original: Volume  # the input's affine, header, spacing; array is a zero-stride placeholder of its shape
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # extra model inputs of the case (unbatched)


def geometry_only(volume: Volume) -> Volume:
    """`volume` without its voxels: a zero-stride array of the same shape (no memory)."""
    placeholder = np.broadcast_to(np.zeros((), np.float32), volume.array.shape)
    return Volume(placeholder, volume.affine, volume.spacing, volume.header)


def prepare(volume: Volume, manifest: Manifest, source: str = "input", present: np.ndarray | None = None) -> Prepared:
    """Check channels and dimensionality against the bundle, then preprocess as its manifest says.

    `present` (C,) bool: channels (HeMIS modalities) that hold an image; the others are zero after
    preprocessing, as training fills a missing modality.
    """
    channels, ndim = volume.array.shape[0], volume.array.ndim - 1
    if channels != manifest.in_channels:
        raise UserError(f"{source}: {channels} channel(s), but the bundle's model takes {manifest.in_channels}")
    if ndim < manifest.spatial_dims:
        raise UserError(f"{source}: a {ndim}D image, but the bundle's model is {manifest.spatial_dims}D")
    spec = PreprocessSpec.from_dict(manifest.preprocess)
    if spec.target_spacing is not None and len(spec.target_spacing) != ndim:
        raise UserError(f"{source}: a {ndim}D image, but the bundle resamples to {len(spec.target_spacing)}D "
                        f"spacing {list(spec.target_spacing)}")
    image, _, _ = preprocess_case(volume, None, spec)
    if present is not None and not np.all(present):
        image[~np.asarray(present, bool)] = 0.0
    return Prepared(image=image, original=geometry_only(volume))


@dataclass
class Segmentation:
    """One volume's results on the input's grid S.

    Shape: labels (*S) uint8/uint16 class indices; probabilities (K, *S) float32 mean
    probabilities; uncertainty (*S) float32 entropy of the mean probability (nats).
    """

    labels: np.ndarray
    probabilities: np.ndarray | None
    uncertainty: np.ndarray | None
    structures: list[dict[str, Any]] | None  # uncertainty.structure_uncertainty records (+ "removed")
    removed: int
    sampling: Sampling
    prior_shift: tuple[int, ...] | None = None  # STIPPLE bundles: the prior's translation from the reference volume

    def class_volumes_mm3(self, spacing: Sequence[float], class_names: Sequence[str]) -> dict[str, float]:
        counts = np.bincount(self.labels.ravel(), minlength=len(class_names))
        voxel = float(np.prod(spacing))
        return {name: float(counts[i] * voxel) for i, name in enumerate(class_names)}


def finish(grid: GridOutputs, original: Volume, manifest: Manifest, sampling: Sampling, *,
           iou_threshold: float | None = None) -> Segmentation:
    """Map grid outputs back onto the input's grid; structure uncertainty and removal there (mm³ of the input)."""
    spec = PreprocessSpec.from_dict(manifest.preprocess)
    labels = undo_spatial(grid.labels, spec, original)
    probs = None if grid.probabilities is None else undo_spatial(grid.probabilities, spec, original)
    entropy = None if grid.entropy is None else undo_spatial(grid.entropy[None], spec, original)[0]
    structures, removed = None, 0
    if grid.sample_labels is not None and entropy is not None:
        samples = np.stack([undo_spatial(s, spec, original) for s in grid.sample_labels])
        structures = structure_uncertainty(labels, samples, entropy, original.spacing, manifest.class_names)
        del samples
        for record in structures:
            record["removed"] = iou_threshold is not None and record["iou_across_samples"] < iou_threshold
        removed = sum(r["removed"] for r in structures)
        if removed:
            labels = remove_uncertain_structures(labels, structures, iou_threshold)  # type: ignore[arg-type]
    return Segmentation(labels=labels, probabilities=probs, uncertainty=entropy, structures=structures,
                        removed=removed, sampling=sampling)


def segment_prepared(prepared: Prepared, manifest: Manifest, backend: Backend, *, tta_axes: Sequence[int] | None = None,
                     mc_passes: int = 0, uncertainty: bool = False, probabilities: bool = False, overlap: float = 0.5,
                     batch_size: int = 1, blend: str = "gaussian", tile: Sequence[int] | None = None,
                     iou_threshold: float | None = None, seed: int = 0,
                     on_batch: OnBatch | None = None, prior: PriorModel | None = None) -> Segmentation:
    """Segment a prepared volume (see `segment_volume`); drops `prepared.image` once the tiles have run.
    `prior`: a STIPPLE bundle's `Bundle.stipple_prior()`, required exactly for those bundles."""
    if (manifest.stipple is None) != (prior is None):
        raise UserError("a STIPPLE bundle needs its prior (pass prior=bundle.stipple_prior()), and only it takes one")
    tile = check_options(manifest, tta_axes=tta_axes, mc_passes=mc_passes, uncertainty=uncertainty, overlap=overlap,
                         batch_size=batch_size, blend=blend, tile=tile, iou_threshold=iou_threshold)
    keep = uncertainty or iou_threshold is not None
    sampling = make_sampling(manifest, tta_axes=tta_axes, mc_passes=mc_passes, rng=np.random.default_rng(seed))
    predict = model_predictor(backend, manifest, sampling, keep_samples=keep, batch_size=batch_size,
                              inputs=prepared.inputs)
    slice_axis = DEFAULT_SLICE_AXIS if manifest.slice_axis is None else manifest.slice_axis
    grid = predict_on_grid(prepared.image, predict, num_classes=len(manifest.class_names),
                           num_samples=sampling.num_samples if keep else 1, model_dims=manifest.spatial_dims,
                           tile=tile, slice_axis=slice_axis, overlap=overlap, batch_size=batch_size, blend=blend,
                           keep_probabilities=probabilities or prior is not None, keep_uncertainty=keep,
                           on_batch=on_batch)
    prepared.image = np.empty((0,), np.float32)  # the caller's reference no longer pins the input
    shift = None
    if prior is not None:  # STIPPLE: the prior placed on the whole volume's mean probabilities, then argmax
        assert grid.probabilities is not None
        placed = prior.place(grid.probabilities)
        grid.labels = placed.probabilities.argmax(axis=0).astype(grid.labels.dtype)
        grid.probabilities = placed.probabilities if probabilities else None
        shift = placed.shift
    seg = finish(grid, prepared.original, manifest, sampling, iou_threshold=iou_threshold)
    seg.prior_shift = shift
    return seg


def segment_volume(volume: Volume, manifest: Manifest, backend: Backend, *, tta_axes: Sequence[int] | None = None,
                   mc_passes: int = 0, uncertainty: bool = False, probabilities: bool = False, overlap: float = 0.5,
                   batch_size: int = 1, blend: str = "gaussian", tile: Sequence[int] | None = None,
                   iou_threshold: float | None = None, seed: int = 0, on_batch: OnBatch | None = None,
                   metadata: Mapping[str, float] | None = None, present: Sequence[bool] | None = None,
                   prior: PriorModel | None = None) -> Segmentation:
    """Segment one volume as read by `edgeseg.data.io.read_image`; results on its grid.

    tta_axes: None = no TTA, else the model axes whose flips (all 2**n subsets) are averaged;
    mc_passes: Monte Carlo dropout passes (0 = the plain form); uncertainty: keep per-sample
    labels for the entropy map and structure figures (needs >= 2 samples); iou_threshold: remove
    structures whose IoU across samples is below it; seed: of the MC masks.
    metadata: raw values by field (bundles with a metadata input; normalised here as in training);
    present: (M,) which channels (modalities) hold an image (HeMIS bundles; default all);
    prior: STIPPLE bundles' `Bundle.stipple_prior()`.
    """
    raw = None
    if manifest.metadata is not None:
        fields = manifest.metadata.fields
        missing = [f for f in fields if f not in (metadata or {})]
        if missing:
            raise UserError(f"the bundle's model needs metadata field '{missing[0]}': pass metadata={{field: value}} "
                            f"for {', '.join(fields)}")
        raw = tuple(float(metadata[f]) for f in fields)  # type: ignore[index]
    mask = None if present is None else np.asarray(present, bool)
    if mask is not None and (mask.shape != (manifest.in_channels,) or not mask.any()):
        raise UserError(f"present must name {manifest.in_channels} channels with at least one present, got {list(mask)}")
    prepared = prepare(volume, manifest, present=mask)
    prepared.inputs = model_inputs(manifest, raw, mask)
    return segment_prepared(prepared, manifest, backend, tta_axes=tta_axes, mc_passes=mc_passes,
                            uncertainty=uncertainty, probabilities=probabilities, overlap=overlap,
                            batch_size=batch_size, blend=blend, tile=tile, iou_threshold=iou_threshold, seed=seed,
                            on_batch=on_batch, prior=prior)


# ------------------------------------------------------------------------------------- files


_CHANNEL = re.compile(r"^(?P<id>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class InputCase:
    """One input: its output file name, its image files, and its extra model inputs' sources."""

    name: str  # e.g. "hippocampus_001.nii.gz"; multi-channel cases drop the _0000 suffix
    paths: tuple[Path, ...]
    channels: tuple[int, ...] | None = None  # HeMIS: the modality of each channel read (None: all, in order)
    metadata: tuple[float, ...] | None = None  # raw metadata in the manifest's field order (FiLM bundles)


@dataclass(frozen=True)
class OutputPaths:
    mask: Path  # keypoint bundles: the heatmaps (NIfTI)
    probabilities: Path | None = None
    uncertainty: Path | None = None
    summary: Path | None = None
    keypoints: Path | None = None  # keypoint bundles: the decoded keypoints (JSON)

    def all(self) -> list[Path]:
        return [p for p in (self.mask, self.probabilities, self.uncertainty, self.summary, self.keypoints)
                if p is not None]


@dataclass
class CaseResult:
    case: InputCase
    outputs: OutputPaths
    seconds: float
    volumes_mm3: dict[str, float]
    structures: int | None
    removed: int
    prior_shift: tuple[int, ...] | None = None  # STIPPLE bundles: the prior's translation (voxels, model grid)


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")


def collect_inputs(inputs: Sequence[str | Path], in_channels: int = 1, *, partial: bool = False,
                   file_channels: Sequence[int] | None = None) -> list[InputCase]:
    """Files, folders (their image files, not recursive) and glob patterns -> cases, in order.

    With in_channels > 1, files are grouped by the nnU-Net channel suffix (case_0000.nii.gz,
    case_0001.nii.gz ...) and each case is named without it. `partial` (HeMIS bundles): a case may
    lack some channel files (`InputCase.channels` lists those it has), and with `file_channels`
    (the --modalities indices) a file without the suffix is one case holding those channels, in order.
    """
    import glob

    if not inputs:
        raise UserError("no input given: name image files, folders or glob patterns")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(f for f in path.iterdir() if is_image_file(f))
            if not found:
                raise UserError(f"{path}: no image files in this folder (supported: {', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            if file_suffix(path) not in IMAGE_SUFFIXES:
                raise UserError(f"{path}: not a supported image file (supported: {', '.join(IMAGE_SUFFIXES)})")
            files.append(path)
        elif _is_pattern(str(item)):
            matched = sorted(Path(m) for m in glob.glob(str(item), recursive=True) if is_image_file(Path(m)))
            if not matched:
                raise UserError(f"{item}: the pattern matches no image files")
            files.extend(matched)
        else:
            raise UserError(f"input not found: {item}")
    unique = list(dict.fromkeys(f.resolve() for f in files))
    cases = ([InputCase(f.name, (f,)) for f in unique] if in_channels == 1
             else _group_channels(unique, in_channels, partial, file_channels))
    by_name: dict[str, InputCase] = {}
    for case in cases:
        if case.name in by_name:
            raise UserError(f"two inputs would write the same output {case.name}: {by_name[case.name].paths[0]} and "
                            f"{case.paths[0]}; segment them into different output folders")
        by_name[case.name] = case
    return cases


def _group_channels(files: list[Path], in_channels: int, partial: bool = False,
                    file_channels: Sequence[int] | None = None) -> list[InputCase]:
    groups: dict[str, dict[int, Path]] = {}
    cases = []
    for f in files:
        suffix = file_suffix(f)
        match = _CHANNEL.match(f.name[: -len(suffix)])
        if match is None and partial and file_channels is not None:
            cases.append(InputCase(f.name, (f,), channels=tuple(file_channels)))
            continue
        if match is None:
            hint = " (or pass --modalities to say which modalities the file holds)" if partial else ""
            raise UserError(f"{f}: the model takes {in_channels} channels; name the files of a case "
                            f"<case>_0000{suffix} ... <case>_{in_channels - 1:04d}{suffix}{hint}")
        groups.setdefault(match["id"] + suffix, {})[int(match["channel"])] = f
    for name, by_index in groups.items():
        indices = sorted(by_index)
        if partial and indices and indices[-1] < in_channels:
            cases.append(InputCase(name, tuple(by_index[i] for i in indices), channels=tuple(indices)))
            continue
        if indices != list(range(in_channels)):
            raise UserError(f"{name}: channel files {indices} found, the model needs 0..{in_channels - 1}")
        cases.append(InputCase(name, tuple(by_index[i] for i in range(in_channels))))
    return cases


def output_paths(case: InputCase, out_dir: Path, *, probabilities: bool = False,
                 uncertainty: bool = False, keypoints: bool = False) -> OutputPaths:
    """OUTDIR/<input name> for the mask (same format), NIfTI maps and a JSON summary beside it; for keypoint
    bundles OUTDIR/<stem>_heatmaps.nii.gz and OUTDIR/<stem>_keypoints.json instead."""
    stem = strip_suffix(case.name)
    out_dir = Path(out_dir)
    if keypoints:
        return OutputPaths(mask=out_dir / f"{stem}_heatmaps.nii.gz", keypoints=out_dir / f"{stem}_keypoints.json")
    return OutputPaths(
        mask=out_dir / case.name,
        probabilities=out_dir / f"{stem}_probabilities.nii.gz" if probabilities else None,
        uncertainty=out_dir / f"{stem}_uncertainty.nii.gz" if uncertainty else None,
        summary=out_dir / f"{stem}_uncertainty.json" if uncertainty else None,
    )


def check_outputs(cases: Sequence[InputCase], plans: Sequence[OutputPaths], overwrite: bool) -> None:
    """Refuse before any work: outputs that exist (without overwrite) or that are an input file."""
    inputs = {p.resolve() for c in cases for p in c.paths}
    for plan in plans:
        for path in plan.all():
            if path.resolve() in inputs:
                raise UserError(f"{path}: the output would replace an input file; choose another output folder")
            if path.exists() and not overwrite:
                raise UserError(f"{path} already exists (pass --overwrite to replace it)")


@dataclass(frozen=True)
class SegmentOptions:
    """How every volume of a call is segmented, resolved against the bundle (`segment_options`).

    Plain values only, so batch workers (`edgeseg.runtime.batch`) receive a copy.
    """

    tta_axes: tuple[int, ...] | None = None  # None = no TTA
    mc_passes: int = 0
    keep_samples: bool = False  # uncertainty outputs (entropy map, JSON summary, structure removal)
    probabilities: bool = False
    overlap: float = 0.5
    batch_size: int = 1
    blend: str = "gaussian"
    tile: tuple[int, ...] = ()
    iou_threshold: float | None = None
    seed: int = 0
    metadata: tuple[tuple[str, float], ...] = ()  # --metadata values, for every case (FiLM bundles)
    metadata_table: str | None = None  # --metadata-table (FiLM bundles; default: each case's JSON sidecar)
    modalities: tuple[str, ...] | None = None  # --modalities: only these count as present (HeMIS bundles)
    keypoints: bool = False  # a keypoint bundle (output_kind "heatmap"): heatmaps + keypoints JSON per case


def segment_options(manifest: Manifest, *, tta: bool = False, tta_axes: Sequence[int] | None = None,
                    mc_passes: int = 0, uncertainty: bool = False, probabilities: bool = False, overlap: float = 0.5,
                    batch_size: int | None = None, blend: str = "gaussian", tile: Sequence[int] | None = None,
                    iou_threshold: float | None = None, seed: int = 0, metadata: Mapping[str, float] | None = None,
                    metadata_table: str | Path | None = None,
                    modalities: Sequence[str] | None = None) -> SegmentOptions:
    """`segment_files`' options with defaults filled in from the bundle, checked (UserError) before any work."""
    check_input_options(manifest, metadata, metadata_table, modalities)
    keypoints = manifest.output_kind == "heatmap"
    if keypoints and (uncertainty or iou_threshold is not None):
        raise UserError("this keypoint bundle writes heatmaps and keypoints: --uncertainty and --iou-threshold are "
                        "for segmentation bundles")
    probabilities = probabilities or keypoints  # a keypoint bundle's heatmaps are its output
    batch = manifest.batch if batch_size is None else batch_size
    if tta_axes is None and tta:
        tta_axes = list(range(manifest.spatial_dims))
    keep = uncertainty or iou_threshold is not None
    checked = check_options(manifest, tta_axes=tta_axes, mc_passes=mc_passes, uncertainty=keep, overlap=overlap,
                            batch_size=batch, blend=blend, tile=tile, iou_threshold=iou_threshold)
    return SegmentOptions(tta_axes=None if tta_axes is None else tuple(tta_axes), mc_passes=mc_passes,
                          keep_samples=keep, probabilities=probabilities, overlap=overlap, batch_size=batch,
                          blend=blend, tile=tuple(checked), iou_threshold=iou_threshold, seed=seed,
                          metadata=tuple((k, float(v)) for k, v in (metadata or {}).items()),
                          metadata_table=None if metadata_table is None else str(metadata_table),
                          modalities=None if modalities is None else tuple(modalities), keypoints=keypoints)


def collect_cases(inputs: Sequence[str | Path], manifest: Manifest, options: SegmentOptions) -> list[InputCase]:
    """`collect_inputs` for this bundle, each case with its raw metadata resolved (UserError naming the case
    and field when one is missing), so every case is known to be feedable before any work."""
    selected = None
    if manifest.modalities is not None and options.modalities is not None:
        selected = modality_indices(manifest.modalities, options.modalities)
    cases = collect_inputs(inputs, manifest.in_channels, partial=manifest.modalities is not None,
                           file_channels=selected)
    if manifest.metadata is None:
        return cases
    table = None if options.metadata_table is None else Path(options.metadata_table)
    given = dict(options.metadata)
    return [replace(c, metadata=case_metadata(c.name, c.paths, manifest.metadata, given, table)) for c in cases]


def read_case(case: InputCase, manifest: Manifest, options: SegmentOptions) -> tuple[Volume, np.ndarray | None]:
    """A case's image with the bundle's channels, and which are present (HeMIS bundles; else None)."""
    volume = read_image(list(case.paths))
    if manifest.modalities is None:
        return volume, None
    selected = None if options.modalities is None else modality_indices(manifest.modalities, options.modalities)
    channels = case.channels if case.channels is not None else tuple(range(volume.array.shape[0]))
    return assemble_modalities(volume, channels, manifest.modalities, selected, f"case '{case.name}'")


def plan_outputs(cases: Sequence[InputCase], out_dir: Path | str, options: SegmentOptions) -> list[OutputPaths]:
    return [output_paths(c, Path(out_dir), probabilities=options.probabilities, uncertainty=options.keep_samples,
                         keypoints=options.keypoints) for c in cases]


def segment_case(case: InputCase, plan: OutputPaths, manifest: Manifest, engine: Backend, options: SegmentOptions, *,
                 bundle_path: Path | str, on_batch: OnBatch | None = None,
                 prior: PriorModel | None = None) -> CaseResult:
    """Read, segment and write one case (every file atomically); the unit of work of `segment_files` and of
    each batch worker. `prior`: a STIPPLE bundle's `Bundle.stipple_prior()`."""
    from edgeseg.atomic import write_json

    started = time.perf_counter()
    volume, present = read_case(case, manifest, options)
    prepared = prepare(volume, manifest, str(case.paths[0]), present)
    del volume
    prepared.inputs = model_inputs(manifest, case.metadata, present, case.name)
    original = prepared.original
    seg = segment_prepared(prepared, manifest, engine, tta_axes=options.tta_axes, mc_passes=options.mc_passes,
                           uncertainty=options.keep_samples, probabilities=options.probabilities,
                           overlap=options.overlap, batch_size=options.batch_size, blend=options.blend,
                           tile=options.tile, iou_threshold=options.iou_threshold, seed=options.seed,
                           on_batch=on_batch, prior=prior)
    del prepared
    if plan.keypoints is not None:  # a keypoint bundle: heatmaps and decoded keypoints
        from edgeseg.runtime.keypoints import write_keypoint_outputs

        return write_keypoint_outputs(case, plan, seg, original, manifest, bundle_path=bundle_path,
                                      backend=engine.description, started=started)
    write_label(plan.mask, seg.labels, original)
    if plan.probabilities is not None and seg.probabilities is not None:
        write_map(plan.probabilities, seg.probabilities, original)
    if plan.uncertainty is not None and seg.uncertainty is not None:
        write_map(plan.uncertainty, seg.uncertainty, original)
    volumes = seg.class_volumes_mm3(original.spacing, manifest.class_names)
    seconds = time.perf_counter() - started
    if plan.summary is not None:
        write_json(plan.summary, _summary(case, plan, seg, volumes, original, bundle_path, engine,
                                          options.iou_threshold, seconds, _inputs_record(manifest, case, present)))
    return CaseResult(case=case, outputs=plan, seconds=seconds, volumes_mm3=volumes,
                      structures=None if seg.structures is None else len(seg.structures), removed=seg.removed,
                      prior_shift=seg.prior_shift)


def segment_files(
    bundle_path: Path | str,
    inputs: Sequence[str | Path],
    out_dir: Path | str,
    *,
    tta: bool = False,
    tta_axes: Sequence[int] | None = None,
    mc_passes: int = 0,
    uncertainty: bool = False,
    probabilities: bool = False,
    backend: str = "auto",
    overlap: float = 0.5,
    batch_size: int | None = None,
    blend: str = "gaussian",
    tile: Sequence[int] | None = None,
    iou_threshold: float | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    seed: int = 0,
    metadata: Mapping[str, float] | None = None,
    metadata_table: str | Path | None = None,
    modalities: Sequence[str] | None = None,
    on_start: Callable[[str, int], None] | None = None,
    on_batch: OnBatch | None = None,
    on_case: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Segment every input with a bundle into `out_dir`; see the module docstring.

    TTA flips `tta_axes` when given, else every spatial axis of the model with `tta`.
    Everything that can be checked is checked before the first volume runs (options, inputs,
    existing outputs); the first failing volume stops the call (`edgeseg.runtime.batch` keeps going
    instead and runs volumes in parallel). `on_start(backend description, number of cases)`,
    `on_batch(done, total)` (tile batches of the current volume) and `on_case(result)` report progress.
    """
    from edgeseg.runtime.backends import open_backend
    from edgeseg.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    options = segment_options(manifest, tta=tta, tta_axes=tta_axes, mc_passes=mc_passes, uncertainty=uncertainty,
                              probabilities=probabilities, overlap=overlap, batch_size=batch_size, blend=blend,
                              tile=tile, iou_threshold=iou_threshold, seed=seed, metadata=metadata,
                              metadata_table=metadata_table, modalities=modalities)
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    cases = collect_cases(inputs, manifest, options)
    plans = plan_outputs(cases, out_dir, options)
    check_outputs(cases, plans, overwrite)
    prior = bundle.stipple_prior()
    engine = open_backend(bundle, backend, mc=mc_passes > 0, threads=threads, batch_size=options.batch_size,
                          tile=list(options.tile))
    if on_start is not None:
        on_start(engine.description, len(cases))
    results = []
    try:
        for case, plan in zip(cases, plans):
            result = segment_case(case, plan, manifest, engine, options, bundle_path=bundle_path, on_batch=on_batch,
                                  prior=prior)
            results.append(result)
            if on_case is not None:
                on_case(result)
    finally:
        engine.close()
    return results


def _inputs_record(manifest: Manifest, case: InputCase, present: np.ndarray | None) -> dict[str, Any]:
    """The extra inputs a case was segmented with, for its JSON summary: raw metadata, modalities present."""
    record: dict[str, Any] = {}
    if manifest.metadata is not None and case.metadata is not None:
        record["metadata"] = dict(zip(manifest.metadata.fields, case.metadata))
    if manifest.modalities is not None:
        names = manifest.modalities.names
        record["modalities_present"] = [n for n, p in zip(names, present if present is not None else [True] * len(names))
                                        if p]
    return record


def _summary(case: InputCase, plan: OutputPaths, seg: Segmentation, volumes: dict[str, float], original: Volume,
             bundle_path: Path | str, engine: Backend, iou_threshold: float | None, seconds: float,
             inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The per-case JSON: structures with volume (mm³) and uncertainty figures, class volumes, provenance."""
    summary = case_summary(seg.structures or [], seg.sampling.num_samples, seg.sampling.sources, seg.removed)
    return {
        "case": case.name,
        "inputs": [str(p) for p in case.paths],
        "mask": str(plan.mask),
        "uncertainty_map": str(plan.uncertainty) if plan.uncertainty else None,
        "bundle": str(bundle_path),
        "backend": engine.description,
        "spacing_mm": [float(s) for s in original.spacing],
        "iou_threshold": iou_threshold,
        "class_volumes_mm3": volumes,
        **(inputs or {}),
        "uncertainty_units": "entropy of the mean probability, nats",
        **summary,
        "seconds": round(seconds, 3),
    }
