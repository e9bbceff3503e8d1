"""The keypoint scheme (train.scheme keypoints): Count-ception-style keypoint detection trained on Gaussian heatmaps.

Cohen et al. 2017 (Count-ception) as ivadomed trains it for intervertebral discs: label volumes hold one voxel per
keypoint, valued with its class; the network regresses one heatmap per class (the sigmoid of its output channel k,
channel 0 unused: its target is 0 and it is never decoded, which keeps the one-channel-per-class output every
model, quantizer and bundle shares), with the Adaptive Wing loss (Wang et al. 2019) or MSE.

- targets (`HeatmapTargets`): rendered after augmentation from each case's keypoints, moved by the spatial
  transforms the patch went through (`edgeseg.data.heatmaps.move_keypoints`), Gaussians of train.keypoints.sigma_mm;
- prediction (`predict_heatmaps`): whole volumes like segmentation validation (padding or tiling; slice by slice
  for 2D models on 3D volumes), read through `heatmap_activation`;
- scoring (`evaluate_keypoints`): heatmaps mapped back onto each case's original grid, decoded there
  (`edgeseg.data.heatmaps.decode_keypoints`, the rule the device runtime applies), positions taken to world mm
  through the image's affine and matched per class to the reference keypoints (`edgeseg.metrics.keypoints`);
- validation (`KeypointValidation`): the loop keeps the checkpoint of best mean detection F1. Every process of
  a data-parallel run scores every validation case (the same result on each).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeseg.config import ExperimentConfig
from edgeseg.config.schema import KeypointConfig
from edgeseg.data.augment import Compose
from edgeseg.data.cases import PreparedCase
from edgeseg.data.heatmaps import (
    Keypoint,
    KeypointDecoding,
    gaussian_heatmaps,
    keypoints_from_label_volume,
    move_keypoints,
)
from edgeseg.data.preprocess import PreprocessSpec, undo_spatial
from edgeseg.metrics.keypoints import summarize_keypoints
from edgeseg.runtime.keypoints import score_keypoints
from edgeseg.train.inference import predict_probabilities
from edgeseg.train.loop import FitParts, ValScore

HEATMAP_ACTIVATION = "heatmap"  # the output activation name of keypoint runs (`edgeseg.train.inference`)
OUTPUT_KIND = "heatmap"  # the bundle output kind of keypoint runs (`edgeseg.runtime.bundle.OUTPUT_KINDS`)


def heatmap_activation(scores: torch.Tensor) -> torch.Tensor:
    """Model output -> heatmaps: sigmoid of channels 1..K-1, channel 0 (background, unused) set to 0.
    The runtime's `pipeline.heatmaps` is the same. Shape: (B, K, *S) -> (B, K, *S) float32."""
    heat = torch.sigmoid(scores.float())
    return torch.cat([torch.zeros_like(heat[:, :1]), heat[:, 1:]], dim=1)


def decoding(settings: KeypointConfig) -> KeypointDecoding:
    """The decoding rule of train.keypoints (what bundles record for the runtime)."""
    return KeypointDecoding(settings.radius_mm, settings.threshold, settings.max_per_class)


# ------------------------------------------------------------------------------------- training targets


class HeatmapTargets:
    """The batch sampler's target hook (`BatchSampler(heatmap_targets=...)`): a patch's heatmaps, rendered from
    its case's keypoints moved by the augmentation its image went through.

    Keypoints of the whole case are used (positions relative to the patch's origin), so a keypoint just outside
    the patch still lays its Gaussian tail inside it. Cases are indexed as the sampler indexes them (the
    labelled ones, in order). Shape: (K, *patch) float32, channel 0 zero, channel k the heatmap of class k.
    """

    def __init__(self, cases: Sequence[PreparedCase], num_classes: int, patch_size: Sequence[int], sigma_mm: float):
        labelled = [c for c in cases if c.label is not None]
        labels = range(1, num_classes)
        self.points = [keypoints_from_label_volume(c.label, labels) for c in labelled]  # type: ignore[arg-type]
        self.spacing = [tuple(c.spacing) for c in labelled]
        self.labels = tuple(labels)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.sigma_mm = float(sigma_mm)

    def __call__(self, index: int, origin: Sequence[int], augmentation: Compose) -> np.ndarray:
        shifted = [Keypoint(p.label, tuple(x - o for x, o in zip(p.position, origin))) for p in self.points[index]]
        moved, shape, spacing = move_keypoints(shifted, augmentation.history, self.patch_size, self.spacing[index])
        heat = gaussian_heatmaps(moved, self.labels, shape, spacing, self.sigma_mm)
        return np.concatenate([np.zeros((1, *shape), np.float32), heat])


# ------------------------------------------------------------------------------------- prediction, scoring


def predict_heatmaps(model: torch.nn.Module, image: np.ndarray, tile: tuple[int, ...], device: torch.device,
                     spatial_dims: int, slice_axis: int = 2, inputs: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Heatmaps of one preprocessed case (`heatmap_activation`); 2D models on 3D volumes slice by slice.
    Shape: (C, *S) -> (K, *S) float32."""
    if spatial_dims == 2 and image.ndim == 4:
        slices = [predict_probabilities(model, np.take(image, i, axis=slice_axis + 1), tile, device,
                                        activation=HEATMAP_ACTIVATION, inputs=inputs)
                  for i in range(image.shape[slice_axis + 1])]
        return np.stack(slices, axis=slice_axis + 1)
    return predict_probabilities(model, image, tile, device, activation=HEATMAP_ACTIVATION, inputs=inputs)


def score_keypoint_case(case: PreparedCase, heatmaps: np.ndarray, spec: PreprocessSpec, class_names: Sequence[str],
                        settings: KeypointConfig) -> tuple[dict[str, Any], list[dict]]:
    """One case's metrics (`case_keypoint_metrics`) and its decoded keypoint records, on its original grid.
    Shape: heatmaps (K, *P) on the preprocessed grid."""
    if case.original_label is None:
        raise ValueError(f"case {case.name} has no reference keypoints")
    original = undo_spatial(heatmaps, spec, case.original)
    return score_keypoints(original, case.original_label, case.original, class_names, decoding(settings),
                           settings.match_mm)


def evaluate_keypoints(model: torch.nn.Module, cases: Sequence[PreparedCase], spec: PreprocessSpec,
                       class_names: Sequence[str], settings: KeypointConfig, tile: tuple[int, ...],
                       device: torch.device, spatial_dims: int, slice_axis: int = 2,
                       extra_inputs: Sequence[str] = (), on_case: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per-case keypoint metrics of labelled cases and their summaries (`summarize_keypoints`: "summary",
    "detection", "score"), plus each case's decoded keypoints ("keypoints") and the settings used."""
    per_case: dict[str, Any] = {}
    decoded: dict[str, list[dict]] = {}
    for case in cases:
        if case.original_label is None:
            continue
        heat = predict_heatmaps(model, case.image, tile, device, spatial_dims, slice_axis,
                                case.model_inputs(extra_inputs))
        per_case[case.name], decoded[case.name] = score_keypoint_case(case, heat, spec, class_names, settings)
        if on_case is not None:
            on_case(case.name)
    summaries = summarize_keypoints(list(per_case.values()))
    return {"cases": per_case, **summaries, "keypoints": decoded,
            "settings": {"match_mm": settings.match_mm, "sigma_mm": settings.sigma_mm, **decoding(settings).to_dict()}}


TIE_BREAK = 1e-6  # weight of the localisation error in the validation score: it only orders equal F1s


class KeypointValidation:
    """The loop's validation score for keypoint runs (`FitParts.score`): the mean detection F1 over classes, ties
    broken by the lower pooled localisation error (score = F1 - 1e-6 error / match_mm: matched errors are at most
    match_mm, so the error never outweighs a difference in F1). F1, pooled precision, recall and error, and
    per-class F1 are logged. Also `edgeseg quantize`'s score (QAT selection, float vs quantized comparison)."""

    def __init__(self, settings: KeypointConfig):
        self.settings = settings

    def __call__(self, parts: FitParts) -> ValScore:
        result = evaluate_keypoints(parts.model, parts.val_cases, parts.spec, parts.class_names, self.settings,
                                    tuple(parts.tile_size or parts.patch_size), parts.device, parts.spatial_dims,
                                    parts.slice_axis, parts.extra_inputs)
        detection = result["detection"]
        per_class = {c: d["f1"] for c, d in detection.items() if c != "all"}
        error = detection["all"]["error_mm"]
        fields = {"val_keypoint_f1": result["score"], "val_keypoint_f1_per_class": per_class,
                  "val_keypoint_precision": detection["all"].get("precision"),
                  "val_keypoint_recall": detection["all"].get("recall"), "val_keypoint_error_mm": error}
        shown = " ".join(f"{c} {'n/a' if v is None else f'{v:.3f}'}" for c, v in per_class.items())
        text = (f"val keypoint F1 {result['score']:.4f} ({shown}), error "
                f"{'n/a' if error is None else f'{error:.2f} mm'}")
        score = result["score"] - (0.0 if error is None else TIE_BREAK * error / self.settings.match_mm)
        return ValScore("val_keypoint_score", score, fields, text)


# ------------------------------------------------------------------------------------- data


def resolve_data_root(cfg: ExperimentConfig, out: Path, config_dir: Path | None) -> Path:
    """`edgeseg.train.setup.resolve_data_root`, with keypoint phantoms for `root: synthetic` (written once into
    OUT/synthetic_data: data.synthetic_cases of data.synthetic_shape, one keypoint per foreground class)."""
    from edgeseg.train.setup import resolve_data_root as resolve_segmentation_root

    if cfg.data.root != "synthetic":
        return resolve_segmentation_root(cfg, out, config_dir)
    from edgeseg.data.phantoms import write_keypoint_phantom_dataset

    root = out / "synthetic_data"
    if not (root / "splits.json").is_file():
        write_keypoint_phantom_dataset(root, n_cases=cfg.data.synthetic_cases, shape=tuple(cfg.data.synthetic_shape),
                                       seed=cfg.train.seed, num_classes=cfg.data.num_classes)
    return root


__all__ = ["HeatmapTargets", "KeypointValidation", "decoding", "evaluate_keypoints", "heatmap_activation",
           "predict_heatmaps", "resolve_data_root", "score_keypoint_case"]
