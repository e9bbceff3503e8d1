"""The experiment configuration: small frozen dataclasses, one per concern.

Only builders read these (dataset builder, model builder, trainer); components take
explicit keyword arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeseg.config.loader import apply_overrides, from_dict, read_yaml
from edgeseg.errors import suggest, unknown_name

Layout = Literal["auto", "pairs", "msd", "bids", "png", "sidecar"]
Normalization = Literal["zscore", "percentile", "none"]


MetadataNormalization = Literal["zscore", "none"]


@dataclass(frozen=True)
class MetadataConfig:
    """Per-case metadata for models with a metadata input (film_unet): which numbers, from where, how scaled.

    Each case's vector holds `fields` in this order, read from a JSON sidecar beside its image
    (`<image folder>/<case stem>.json`, BIDS style) or, with `table`, from one row of a CSV/TSV file whose
    `case_column` holds the case name (with or without its suffix) or its group (the BIDS subject).
    `normalization: zscore` centres and scales each field with the mean and population std of the training
    split, recorded in the run (run.json) so evaluation and export reuse them.
    """

    fields: tuple[str, ...] = ()
    table: str | None = None  # CSV/TSV (by suffix), relative to the data root or the config's folder; None = sidecars
    case_column: str = "case"
    normalization: MetadataNormalization = "zscore"

    def validate(self) -> None:
        if not self.fields:
            raise ValueError("metadata.fields must name at least one metadata value, e.g. [contrast, age]")
        if len(set(self.fields)) != len(self.fields):
            raise ValueError(f"metadata.fields lists a field twice: {list(self.fields)}")
        if any(not f.strip() for f in self.fields):
            raise ValueError("metadata.fields must be non-empty names")
        if self.table is not None and not self.table.strip():
            raise ValueError("metadata.table: give a CSV/TSV file, or leave it out to read JSON sidecars")
        if not self.case_column.strip():
            raise ValueError("metadata.case_column must be a column name")


@dataclass(frozen=True)
class ModalitiesConfig:
    """Multi-modal cases in which a modality may be missing (HeMIS; Havaei et al. 2016).

    Channels are the modalities, one file each (MSD / nnU-Net layout, `<case>_0000.nii.gz`, `_0001` ...); a
    case may lack some of the files: its channel is zero-filled and its modality mask says absent. During
    training each present modality is also dropped with probability `drop_prob` (redrawn until at least
    one is kept: with 0.5, every non-empty subset of the present modalities is equally likely), and the
    dropped channels are zero-filled too.
    """

    names: tuple[str, ...] = ()  # modality names in channel order; () = dataset.json's channel names
    drop_prob: float = 0.5

    def validate(self) -> None:
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"modalities.drop_prob must be within [0, 1), got {self.drop_prob}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"modalities.names lists a name twice: {list(self.names)}")


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how each volume is prepared."""

    root: str = "synthetic"  # a dataset folder, or "synthetic" for the built-in phantoms
    layout: Layout = "auto"
    # JSON splits file: absolute, relative to the data root, or (when not under the root) relative to the config
    # file's folder, where `edgeseg train` resolves it to an absolute path in the run's config (so a split can
    # ship under configs/ beside a read-only dataset); a missing file -> seeded 70/15/15 split
    splits: str | None = "splits.json"
    # sidecar layout: label = image stem + the first of these suffixes that exists (e.g. [_gmseg_manual,
    # _gmseg_goldstandard] keeps the grey-matter labels only: images with none of them are unlabelled cases,
    # which training and evaluation leave out). None = discovery's default SIDECAR_LABEL_SUFFIXES
    label_suffixes: tuple[str, ...] | None = None
    spatial_dims: Literal[2, 3] = 3  # dimensionality of the model (2D models can train on 3D volumes)
    slice_axis: int = 2  # for 2D models on 3D volumes: which axis is sliced
    class_names: tuple[str, ...] = ("background", "foreground")
    label_map: dict[int, int] = field(default_factory=dict)  # e.g. {255: 1}
    normalization: Normalization = "zscore"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    target_spacing: tuple[float, ...] | None = None  # mm; None keeps the native spacing
    reorient: bool = True  # to the closest canonical (RAS+) orientation
    patch_size: tuple[int, ...] = (48, 64, 48)  # training patch
    inference_tile: tuple[int, ...] | None = None  # sliding-window tile at inference; None = patch_size
    foreground_oversample: float = 0.33  # fraction of patches centred on a foreground voxel
    evaluate_background: bool = False  # report metrics for class 0 too (e.g. EM membranes)
    synthetic_cases: int = 24  # only for root == "synthetic"
    synthetic_shape: tuple[int, ...] = (48, 48, 48)
    synthetic_modalities: int = 1  # phantoms with this many modalities (MSD layout when > 1)
    synthetic_missing: float = 0.0  # probability that a phantom modality file is absent (one always kept)
    synthetic_metadata: bool = False  # phantoms with JSON sidecars {contrast, gain} that change the image
    metadata: MetadataConfig | None = None  # per-case metadata vectors (film_unet); None = none
    modalities: ModalitiesConfig | None = None  # modality masks, missing modalities allowed (hemis_unet)
    # partial labels (training cases only): {case name: [annotated class names]}, or a JSON file of that
    # mapping (absolute, or relative to the data root); a case left out is fully annotated. A class not
    # listed for a case is unknown there, not background: train.scheme inerrant treats it so (Petit et al.
    # 2021); other schemes erase its voxels to background (naive training on partial labels).
    partial_labels: str | dict[str, tuple[str, ...]] | None = None
    # few labelled volumes: train on the labels of only the first N cases of the training split (split order);
    # the other training cases are left out (no scheme trains on unlabelled volumes yet). None = all of them.
    labelled_train_cases: int | None = None

    def validate(self) -> None:
        if len(self.class_names) < 2:
            raise ValueError("class_names needs at least background and one class")
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(
                f"patch_size {list(self.patch_size)} has {len(self.patch_size)} values "
                f"but spatial_dims is {self.spatial_dims}"
            )
        if self.inference_tile is not None and len(self.inference_tile) != self.spatial_dims:
            raise ValueError(f"inference_tile {list(self.inference_tile)} must have {self.spatial_dims} values")
        if any(p < 8 for p in self.patch_size):
            raise ValueError("patch_size values must be >= 8")
        if not 0.0 <= self.foreground_oversample <= 1.0:
            raise ValueError("foreground_oversample must be within [0, 1]")
        if not 0 <= self.slice_axis <= 2:
            raise ValueError("slice_axis must be 0, 1 or 2")
        lo, hi = self.clip_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError("clip_percentiles must satisfy 0 <= low < high <= 100")
        for src, dst in self.label_map.items():
            if not 0 <= dst < len(self.class_names):
                raise ValueError(f"label_map {src}: {dst} is not a class index (0..{len(self.class_names) - 1})")
        if isinstance(self.partial_labels, str) and not self.partial_labels.strip():
            raise ValueError("partial_labels: give a JSON file or a mapping {case: [annotated classes]}")
        if isinstance(self.partial_labels, dict):
            check_partial_labels(self.partial_labels, self.class_names, "partial_labels")
        if self.synthetic_modalities < 1:
            raise ValueError("synthetic_modalities must be >= 1")
        if not 0.0 <= self.synthetic_missing < 1.0:
            raise ValueError("synthetic_missing must be within [0, 1)")
        if self.synthetic_missing > 0 and self.synthetic_modalities < 2:
            raise ValueError("synthetic_missing needs synthetic_modalities >= 2 (a case keeps at least one)")
        if self.label_suffixes is not None:
            if not self.label_suffixes or not all(s.strip() for s in self.label_suffixes):
                raise ValueError(f"label_suffixes must be a non-empty list of non-empty strings (e.g. [_seg]), "
                                 f"got {list(self.label_suffixes)}")
            if any("/" in s or "\\" in s for s in self.label_suffixes):
                raise ValueError(f"label_suffixes are file-name endings, not paths: {list(self.label_suffixes)}")
            if len(set(self.label_suffixes)) != len(self.label_suffixes):
                raise ValueError(f"label_suffixes lists a suffix twice: {list(self.label_suffixes)}")
            if self.layout not in ("auto", "sidecar"):
                raise ValueError(f"label_suffixes applies to the sidecar layout (labels beside their images), "
                                 f"not to layout '{self.layout}'")
        if self.labelled_train_cases is not None and self.labelled_train_cases < 1:
            raise ValueError(f"labelled_train_cases must be >= 1 (null = every training case), "
                             f"got {self.labelled_train_cases}")

    @property
    def tile_size(self) -> tuple[int, ...]:
        return tuple(self.inference_tile or self.patch_size)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def check_partial_labels(mapping: dict[str, Any], class_names: tuple[str, ...], source: str) -> None:
    """A partial-label record: case name -> list of distinct foreground class names (ValueError otherwise)."""
    foreground = class_names[1:]
    for case, classes in mapping.items():
        if not isinstance(case, str) or not case:
            raise ValueError(f"{source}: case names must be non-empty strings, got {case!r}")
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"{source}.{case}: expected a list of annotated class names, got {classes!r}")
        for name in classes:
            if name not in foreground:
                raise ValueError(f"{source}.{case}: '{name}' is not a foreground class{suggest(name, foreground)}; "
                                 f"classes: {', '.join(foreground)}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"{source}.{case}: a class is listed twice in {list(classes)}")


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentations applied to training patches (each records its parameters)."""

    flip_axes: tuple[int, ...] = (0, 1, 2)  # spatial axes that may be flipped (p = 0.5 each)
    rotate90: bool = False  # random 90-degree rotations in the first two spatial axes
    affine_prob: float = 0.0
    rotate_degrees: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    gamma_prob: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_prob: float = 0.15
    noise_std: float = 0.1
    # mixup (Zhang et al. 2018): every training sample is lam * x1 + (1 - lam) * x2 with the same mix of
    # their one-hot labels, lam ~ Beta(mixup_alpha, mixup_alpha); 0 = off
    mixup_alpha: float = 0.0
    # soft-label augmentation by dilation (ivadomed's DilateGT): each object of each class is dilated
    # round(factor * sqrt(object voxels)) times; added voxels get values falling with the distance; 0 = off
    soft_dilation_factor: float = 0.0

    def validate(self) -> None:
        for name in ("affine_prob", "gamma_prob", "noise_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {v}")
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0 = off), got {self.mixup_alpha}")
        if self.soft_dilation_factor < 0:
            raise ValueError(f"soft_dilation_factor must be >= 0 (0 = off), got {self.soft_dilation_factor}")

    @property
    def soft_labels(self) -> bool:
        """True when an augmentation makes labels soft (per-class float maps instead of class indices)."""
        return self.mixup_alpha > 0 or self.soft_dilation_factor > 0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture; input/output channels and dimensionality come from the data."""

    name: str = "unet"
    depth: int = 3  # number of poolings
    base_width: int = 16
    norm: Literal["batch", "instance", "none"] = "batch"
    dropout: float = 0.0
    decoder: Literal["transposed", "upsample"] = "upsample"
    # architecture-specific settings (e.g. utransformer: {heads: 4}); `edgeseg list models` names them.
    # Checked against the model's own Options dataclass (names, types, ranges) when the model is built.
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not 1 <= self.depth <= 6:
            raise ValueError("model.depth must be between 1 and 6")
        if self.base_width < 1:
            raise ValueError("model.base_width must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("model.dropout must be within [0, 1)")


# The options each registered loss reads (edgeseg.losses builds them; a test checks that both name
# the same losses). Kept here, torch-free, so that a config is validated once, at load.
_DICE_OPTIONS = ("dice_reduction", "smooth", "include_background")
_FOCAL_OPTIONS = ("gamma", "alpha")
LOSS_OPTIONS: dict[str, tuple[str, ...]] = {
    "dice": _DICE_OPTIONS,
    "ce": (),
    "dice_ce": (*_DICE_OPTIONS, "dice_weight", "ce_weight"),
    "generalized_dice": (*_DICE_OPTIONS, "absent_class"),
    "focal": _FOCAL_OPTIONS,
    "focal_dice": (*_DICE_OPTIONS, *_FOCAL_OPTIONS, "dice_weight", "focal_weight"),
    "adaptive_wing": ("wing_omega", "wing_theta", "wing_epsilon", "wing_alpha", "heatmap_activation"),
    "combined": ("terms",),
    "partial_bce": (),
    "mse": ("heatmap_activation",),  # mean squared error of the heatmap / soft map (keypoints, SoftSeg)
}


@dataclass(frozen=True)
class LossConfig:
    """The training loss: a registered name (`edgeseg list losses`) and the options it reads.

    An option that the named loss does not read must stay at its default, so a typo'd or misplaced
    option fails at load instead of being silently ignored. `combined` sums weighted `terms`.
    """

    name: str = "dice_ce"
    dice_reduction: Literal["batch", "sample"] = "batch"  # Dice reduction set: whole batch or per sample
    smooth: float = 1e-5  # epsilon added to Dice numerator and denominator
    include_background: bool = False  # Dice variants: score class 0 too
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    focal_weight: float = 1.0
    gamma: float = 2.0  # focal focusing parameter (0 = cross-entropy)
    alpha: float | None = None  # focal balance: 1 - alpha for background, alpha for the other classes
    absent_class: Literal["empty", "missing"] = "empty"  # generalized Dice: a class absent from the target
    wing_omega: float = 14.0  # adaptive wing (Wang et al. 2019) defaults
    wing_theta: float = 0.5
    wing_epsilon: float = 1.0
    wing_alpha: float = 2.1
    heatmap_activation: Literal["sigmoid", "none"] = "sigmoid"  # adaptive wing, mse: logits -> heatmap
    terms: tuple[LossTermConfig, ...] = ()  # combined: the weighted losses to sum

    def validate(self) -> None:
        if self.name not in LOSS_OPTIONS:
            raise ValueError(str(unknown_name("loss", self.name, LOSS_OPTIONS)))
        reads = LOSS_OPTIONS[self.name]
        for f in dataclasses.fields(LossConfig):
            if f.name != "name" and f.name not in reads and getattr(self, f.name) != f.default:
                raise ValueError(
                    f"loss '{self.name}' does not read option '{f.name}'{suggest(f.name, reads)}; "
                    f"its options: {', '.join(reads) or 'none'}"
                )
        if self.name == "combined" and not self.terms:
            raise ValueError("loss 'combined' needs terms, e.g. [{name: dice}, {name: focal, weight: 0.5}]")
        if self.smooth <= 0:
            raise ValueError("loss.smooth must be positive (it keeps the Dice of empty classes finite)")
        for name in ("ce_weight", "dice_weight", "focal_weight", "gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError("loss.alpha must be within [0, 1]")
        if min(self.wing_omega, self.wing_theta, self.wing_epsilon) <= 0:
            raise ValueError("loss.wing_omega, wing_theta and wing_epsilon must be positive")
        if self.wing_alpha <= 2.0:
            raise ValueError("loss.wing_alpha must be > 2 (alpha - y > 1 for targets in [0, 1]: smooth at 0)")


@dataclass(frozen=True)
class LossTermConfig(LossConfig):
    """One term of a `combined` loss: any registered loss with its options, times `weight`."""

    weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.weight < 0:
            raise ValueError("loss term weight must be >= 0")


@dataclass(frozen=True)
class TwoStepConfig:
    """Two-step training with class sampling (ivadomed): `balanced_epochs` epochs on patches drawn half
    positive (holding foreground), half negative (holding none), then the remaining epochs of
    train.epochs on uniformly placed patches (the data's own, imbalanced distribution)."""

    balanced_epochs: int = 1

    def validate(self) -> None:
        if self.balanced_epochs < 1:
            raise ValueError(f"two_step.balanced_epochs must be >= 1, got {self.balanced_epochs}")


TrainingScheme = Literal["standard", "softseg", "inerrant", "stipple", "keypoints"]


# --- keypoint detection (train.scheme keypoints; edgeseg.train.keypoints) ---------------------------------------
HEATMAP_LOSSES = ("adaptive_wing", "mse")  # regression losses the keypoint scheme trains its heatmaps with


@dataclass(frozen=True)
class KeypointConfig:
    """Keypoint detection (Count-ception, Cohen et al. 2017, as ivadomed trains it) for train.scheme keypoints.

    Label volumes hold one voxel per keypoint whose value is its class (class_names[k]; 0 elsewhere). The network
    regresses one Gaussian heatmap per class (sigmoid of its channel k; `sigma_mm`), rendered after spatial
    augmentation from the moved points; channel 0 (background) has a zero target and is never decoded. Decoding:
    per class, the local maxima >= `threshold`, at least `radius_mm` apart, the `max_per_class` best (null: all).
    A decoded keypoint within `match_mm` of a reference keypoint of its class (one-to-one matching) is a true
    positive; validation keeps the checkpoint of best mean F1 (`edgeseg.metrics.keypoints`)."""

    sigma_mm: float = 2.0
    radius_mm: float = 4.0
    threshold: float = 0.5
    max_per_class: int | None = None
    match_mm: float = 5.0

    def validate(self) -> None:
        for name in ("sigma_mm", "radius_mm", "match_mm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"keypoints.{name} must be positive (mm), got {getattr(self, name)}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"keypoints.threshold must be within (0, 1], got {self.threshold}")
        if self.max_per_class is not None and self.max_per_class < 1:
            raise ValueError(f"keypoints.max_per_class must be >= 1 (null = every peak), got {self.max_per_class}")
# --- end keypoint detection --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StippleConfig:
    """STIPPLE's 3D spatial prior (Petit et al. 2021; edgeseg.priors, edgeseg.train.stipple) for train.scheme
    stipple: the prior is built from the training labels into `num_bins` axial bins per organ (1 < B < the
    organ's axial extent); at evaluation it is placed on each volume by the integer translation, within
    +-`max_shift` voxels per axis, that minimises the KL divergence between the network's probabilities and a
    reference training volume's labels, smoothed as (1 - a) one-hot + a / K with a = `reference_smoothing`,
    searched coarse to fine over the pooling `factors`. Prior values are floored at `eps` so that ln p stays
    finite. The training loss is loss(s + ln p) + `coarse_loss_weight` * loss(s): the second term trains the
    network's own probabilities, which place the prior (0 = the prior-driven term alone)."""

    num_bins: int = 3
    max_shift: int = 16
    factors: tuple[int, ...] = (4, 2, 1)
    eps: float = 1e-6
    reference_smoothing: float = 0.1
    coarse_loss_weight: float = 1.0

    def validate(self) -> None:
        if self.num_bins < 2:
            raise ValueError(f"stipple.num_bins must be >= 2 (1 < B < the organ's axial extent), got {self.num_bins}")
        if self.max_shift < 0:
            raise ValueError(f"stipple.max_shift must be >= 0 voxels, got {self.max_shift}")
        f = list(self.factors)
        if not f or f != sorted(set(f), reverse=True) or f[-1] != 1:
            raise ValueError(f"stipple.factors must decrease strictly and end with 1, e.g. [4, 2, 1]; got {f}")
        if not 0.0 < self.eps < 0.5:
            raise ValueError(f"stipple.eps must be within (0, 0.5), got {self.eps}")
        if not 0.0 <= self.reference_smoothing < 1.0:
            raise ValueError(f"stipple.reference_smoothing must be within [0, 1), got {self.reference_smoothing}")
        if self.coarse_loss_weight < 0:
            raise ValueError(f"stipple.coarse_loss_weight must be >= 0, got {self.coarse_loss_weight}")


@dataclass(frozen=True)
class InerrantConfig:
    """INERRANT iterative relabelling (Petit, Thome & Soler 2021; edgeseg.train.inerrant) for train.scheme
    inerrant: `initial_epochs` on the partial labels alone, then the remaining epochs split into
    `relabel_steps` (T) steps; step t starts by adding as pseudo-labels the top gamma_t = (t / T) * gamma_max
    fraction of each missing class's predicted voxels, ranked by `confidence`. relabel_steps 0: no relabelling.
    ambiguity_map false is the naive baseline with the same K sigmoids and BCE: unannotated classes are read
    as background (w = 1 everywhere). confidence "max_probability" ranks by p_k; "tcp" by a learned
    True-Class-Probability head (edgeseg.train.tcp), fitted for `tcp_steps` Adam steps (lr `tcp_lr`) at the
    start of each relabelling step, the network frozen."""

    initial_epochs: int | None = None  # None = half of train.epochs
    relabel_steps: int = 3
    gamma_max: float = 0.5
    confidence: Literal["max_probability", "tcp"] = "max_probability"
    ambiguity_map: bool = True
    tcp_steps: int = 200  # confidence tcp: head training steps per relabelling step
    tcp_lr: float = 1e-3  # confidence tcp: the head's Adam learning rate

    def validate(self) -> None:
        if self.initial_epochs is not None and self.initial_epochs < 1:
            raise ValueError(f"inerrant.initial_epochs must be >= 1, got {self.initial_epochs}")
        if self.relabel_steps < 0:
            raise ValueError(f"inerrant.relabel_steps must be >= 0 (0 = no relabelling), got {self.relabel_steps}")
        if not 0.0 < self.gamma_max <= 1.0:
            raise ValueError(f"inerrant.gamma_max must be within (0, 1], got {self.gamma_max}")
        if self.tcp_steps < 1:
            raise ValueError(f"inerrant.tcp_steps must be >= 1, got {self.tcp_steps}")
        if self.tcp_lr <= 0:
            raise ValueError(f"inerrant.tcp_lr must be positive, got {self.tcp_lr}")
        if not self.ambiguity_map and self.relabel_steps:
            raise ValueError("inerrant.ambiguity_map false (the naive baseline) has no missing classes to relabel: "
                             "set inerrant.relabel_steps to 0")

    def first_epochs(self, epochs: int) -> int:
        """Epochs trained before relabelling step 1."""
        return self.initial_epochs if self.initial_epochs is not None else max(1, epochs // 2)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    steps_per_epoch: int = 50
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    warmup_epochs: int = 0
    seed: int = 0
    amp: bool = True  # mixed precision on CUDA, and bf16 on CPUs with native bf16 (AMX/AVX512-BF16)
    val_every: int = 1
    max_minutes: float | None = None  # stop after this wall time (the last finished epoch counts)
    deterministic: bool = False
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # "softseg" (Gros et al. 2021): soft labels end to end, normalized-ReLU outputs, a regression loss
    # "inerrant" (Petit et al. 2021): partial labels (data.partial_labels), K sigmoids, ambiguity-weighted BCE
    scheme: TrainingScheme = "standard"
    two_step: TwoStepConfig | None = None  # two-step training with class sampling; None = off
    inerrant: InerrantConfig | None = None  # settings of train.scheme inerrant; None = the defaults
    # "stipple" (Petit et al. 2021): a 3D spatial prior from the training labels, added to the logits as ln p
    stipple: StippleConfig | None = None  # settings of train.scheme stipple; None = the defaults
    keypoints: KeypointConfig | None = None  # settings of train.scheme keypoints; None = the defaults

    def validate(self) -> None:
        if self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 1:
            raise ValueError("epochs, steps_per_epoch and batch_size must be >= 1")
        if self.lr <= 0:
            raise ValueError("train.lr must be positive")
        if self.val_every < 1:
            raise ValueError("train.val_every must be >= 1")
        if self.two_step is not None and self.two_step.balanced_epochs >= self.epochs:
            raise ValueError(f"train.two_step.balanced_epochs ({self.two_step.balanced_epochs}) must be less than "
                             f"train.epochs ({self.epochs}): step 2 fine-tunes on the natural distribution")
        if self.scheme != "inerrant" and self.inerrant is not None:
            raise ValueError(f"train.inerrant only applies to train.scheme inerrant (the scheme is '{self.scheme}'; "
                             "--set train.inerrant=null drops it)")
        if self.scheme != "keypoints" and self.keypoints is not None:
            raise ValueError(f"train.keypoints only applies to train.scheme keypoints (the scheme is '{self.scheme}'; "
                             "--set train.keypoints=null drops it)")
        if self.scheme != "stipple" and self.stipple is not None:
            raise ValueError(f"train.stipple only applies to train.scheme stipple (the scheme is '{self.scheme}'; "
                             "--set train.stipple=null drops it)")
        steps, first = self.inerrant_settings.relabel_steps, self.inerrant_settings.first_epochs(self.epochs)
        if self.scheme == "inerrant" and steps and first + steps > self.epochs:
            raise ValueError(f"train.inerrant: {first} initial epochs + {steps} relabelling steps of at least one "
                             f"epoch each exceed train.epochs ({self.epochs})")

    @property
    def inerrant_settings(self) -> InerrantConfig:
        """train.inerrant, or its defaults when not given."""
        return self.inerrant or InerrantConfig()

    @property
    def keypoints_settings(self) -> KeypointConfig:
        """train.keypoints, or its defaults when not given."""
        return self.keypoints or KeypointConfig()

    @property
    def stipple_settings(self) -> StippleConfig:
        """train.stipple, or its defaults when not given."""
        return self.stipple or StippleConfig()


@dataclass(frozen=True)
class QuantConfig:
    """Quantization-aware training settings (used by `edgeseg quantize`)."""

    bits: str = "4/6"  # "W/A" or "fp32"
    epochs: int = 10
    steps_per_epoch: int = 50
    lr: float = 2e-4
    calibration_batches: int = 16
    first_last_bits: int | None = 8  # first conv + head at this width (2..8; 32 = float, as the 2019 paper); None = bits
    power_of_two_scales: bool = False
    learned_weight_scales: bool = True
    # factory layer-name glob (e.g. "dec0.*", quoted in YAML when it starts with *) -> "W/A", or "fp32" (convs only)
    layer_overrides: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)

    def validate(self) -> None:
        """Rules that span sections (each section validated itself first)."""
        if self.train.scheme == "softseg":
            terms = self.loss.terms if self.loss.name == "combined" else (self.loss,)
            if not all(t.name in HEATMAP_LOSSES and t.heatmap_activation == "none" for t in terms):
                raise ValueError(
                    "train.scheme 'softseg' trains a regression of the normalized-ReLU output on soft labels: "
                    "set loss {name: adaptive_wing, heatmap_activation: none} (Gros et al. 2021; or name: mse)")
        terms = self.loss.terms if self.loss.name == "combined" else (self.loss,)
        inerrant = self.train.scheme == "inerrant"
        if inerrant and self.loss.name != "partial_bce":
            raise ValueError("train.scheme 'inerrant' trains K sigmoids with the ambiguity-weighted BCE: "
                             "set loss {name: partial_bce} (Petit et al. 2021)")
        if not inerrant and any(t.name == "partial_bce" for t in terms):
            raise ValueError("loss 'partial_bce' reads per-class sigmoids and partial-label targets: it needs "
                             "train.scheme inerrant")
        if inerrant and (self.augment.mixup_alpha > 0 or self.augment.soft_dilation_factor > 0):
            raise ValueError("train.scheme 'inerrant' trains on crisp partial labels: set augment.mixup_alpha and "
                             "augment.soft_dilation_factor to 0")
        if self.train.scheme == "stipple":
            if self.data.spatial_dims != 3:
                raise ValueError("train.scheme 'stipple' places a 3D spatial prior: it needs data.spatial_dims 3")
            if self.augment.mixup_alpha > 0:
                raise ValueError("train.scheme 'stipple' does not mix the priors of two patches: set "
                                 "augment.mixup_alpha to 0")
            if self.data.partial_labels is not None:
                raise ValueError("train.scheme 'stipple' builds its prior from fully labelled volumes: "
                                 "data.partial_labels is not supported with it")
        if self.train.scheme == "keypoints":  # --- keypoint detection (edgeseg.train.keypoints) ---
            if not all(t.name in HEATMAP_LOSSES and t.heatmap_activation == "sigmoid" for t in terms):
                raise ValueError("train.scheme 'keypoints' regresses sigmoid heatmaps: set loss {name: adaptive_wing} "
                                 "(Wang et al. 2019) or {name: mse}, with heatmap_activation sigmoid")
            if self.augment.mixup_alpha > 0 or self.augment.soft_dilation_factor > 0:
                raise ValueError("train.scheme 'keypoints' renders heatmaps from keypoints: set augment.mixup_alpha "
                                 "and augment.soft_dilation_factor to 0")
            if self.data.partial_labels is not None:
                raise ValueError("train.scheme 'keypoints' does not support data.partial_labels")
            if self.data.target_spacing is not None:
                raise ValueError("train.scheme 'keypoints': keypoint labels are single voxels, which resampling would "
                                 "drop or duplicate; set data.target_spacing to null (the native spacing)")

    def data_root(self, base: Path | None = None) -> Path | None:
        """The data folder resolved against `base` (the config file's folder); None for synthetic."""
        if self.data.root == "synthetic":
            return None
        root = Path(self.data.root).expanduser()
        if not root.is_absolute() and base is not None and not root.exists():
            candidate = base / root
            if candidate.exists():
                return candidate
        return root


def load_experiment(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment (or the defaults when `path` is None), apply `--set` overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return from_dict(ExperimentConfig, data)
