"""INERRANT partial-label training (Petit, Thome & Soler 2021, "Iterative confidence relabeling with deep ConvNets
for organ segmentation with partial labels", Computerized Medical Imaging and Graphics, 2021; HAL hal-03243619).

Each training volume labels only some of the K foreground classes (`data.partial_labels`); a class that a
volume does not annotate is unknown there, not background. The scheme (`train.scheme: inerrant`):

1. Targets: the sampler turns every augmented class-index patch into per-class targets in which the
   ambiguous entries are NaN (`partial_targets`): for an unannotated class k, only voxels labelled as
   another class are known (negatives: classes do not overlap); elsewhere k, and so background, is
   ambiguous. `ambiguity_map` is the paper's w (1 known, 0 ambiguous).
2. Loss: K sigmoids and sum_k sum_i w_ik * BCE (`edgeseg.losses.partial`).
3. Prediction: the class of maximum probability, background when all are below 0.5 (`multilabel_rule`);
   `sigmoid_multilabel` expresses it as per-class maps whose argmax gives it, as the runtime does.
4. Iterative relabelling (`Relabeller`): after `initial_epochs`, the remaining epochs form T steps; step t
   starts by predicting every partially labelled training volume with the current model and adding as
   pseudo-labels, for each missing class of each volume, the top gamma_t = (t / T) * gamma_max fraction of
   the voxels predicted as that class (on voxels the partial label calls background), ranked by
   confidence; then training fine-tunes on them. Pseudo-labels are recomputed from the original partial
   labels at every step (not accumulated). The confidence (`train.inerrant.confidence`) is the maximum class
   probability, or the estimate of a learned True-Class-Probability head (`edgeseg.train.tcp`), fitted at the
   start of each step with the network frozen.

The step t, its pseudo-labels and the TCP head's weights are saved in the training checkpoint, so a resumed run trains on exactly
the labels the uninterrupted run did. edgeseg's models keep one output channel per class name; channel 0
(background) is not trained and not read.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from edgeseg.config.schema import check_partial_labels
from edgeseg.data.cases import PreparedCase
from edgeseg.data.io import strip_suffix
from edgeseg.data.jsonfile import read_json_object
from edgeseg.errors import UserError, suggest
from edgeseg.runtime.bundle import MULTILABEL_BACKGROUND
from edgeseg.train import distributed
from edgeseg.train.inference import predict_probabilities
from edgeseg.train.sampling import BatchSampler
from edgeseg.train.tcp import TcpConfidence

PartialRecord = dict[str, tuple[str, ...]]  # case name -> annotated foreground class names

# ------------------------------------------------------------------------------------- partial-label record


def resolve_partial_labels(spec: str | Mapping[str, Sequence[str]] | None, class_names: Sequence[str], root: Path,
                           case_names: Sequence[str]) -> PartialRecord | None:
    """The checked record {full case name: annotated classes in class order} from `data.partial_labels`: a mapping,
    or a JSON file of one (absolute, or relative to the data root `root`). Entries may name a case or its name
    without suffix ("hippocampus_001"); an unknown name or class is a UserError naming it."""
    if spec is None:
        return None
    source = "data.partial_labels"
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        path = path if path.is_absolute() else Path(root) / path
        if not path.is_file():
            raise UserError(f"data.partial_labels: file not found: {path}")
        spec = read_json_object(path, "data.partial_labels file", '{"case name": [annotated class names], ...}')
        source = str(path)
    try:
        check_partial_labels(dict(spec), tuple(class_names), source)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    by_name = {n: n for n in case_names} | {strip_suffix(n): n for n in case_names}
    out: PartialRecord = {}
    for entry, classes in spec.items():
        name = by_name.get(entry)
        if name is None:
            raise UserError(f"{source}: no case '{entry}' in the dataset{suggest(entry, list(by_name))}")
        if name in out:
            raise UserError(f"{source}: case '{name}' is listed twice")
        out[name] = tuple(c for c in class_names[1:] if c in classes)
    return out


def annotated_flags(record: Mapping[str, Sequence[str]] | None, class_names: Sequence[str], case_name: str) -> np.ndarray:
    """Which classes a case annotates, (C,) bool: a foreground class as the record says (every class for a case
    it leaves out), background (index 0) only when every foreground class is annotated. A 2D slice "case#i"
    takes its volume's entry."""
    flags = np.ones(len(class_names), dtype=bool)
    if record:
        entry = record.get(case_name)
        if entry is None and "#" in case_name:
            entry = record.get(case_name.rsplit("#", 1)[0])
        if entry is not None:
            flags[1:] = [c in entry for c in class_names[1:]]
            flags[0] = bool(flags[1:].all())
    return flags


def erase_unannotated(label: np.ndarray, annotated: np.ndarray) -> np.ndarray:
    """The label with every unannotated class's voxels set to 0 (what a partial annotation shows)."""
    missing = np.flatnonzero(~annotated[1:]) + 1
    if not len(missing):
        return label
    return np.where(np.isin(label, missing), 0, label).astype(label.dtype)


def apply_partial_labels(cases: Sequence[PreparedCase], record: Mapping[str, Sequence[str]] | str | None,
                         class_names: Sequence[str]) -> tuple[list[PreparedCase], list[np.ndarray]]:
    """The labelled training cases with their unannotated classes erased (copies; the input is untouched), and
    each case's annotated flags (`annotated_flags`), in the order `BatchSampler` indexes them."""
    if isinstance(record, str):
        raise TypeError("data.partial_labels must be resolved to a mapping first (resolve_partial_labels)")
    out, flags = [], []
    for case in cases:
        if case.label is None:
            continue
        annotated = annotated_flags(record, class_names, case.name)
        erased = erase_unannotated(case.label, annotated)
        out.append(case if erased is case.label else replace(case, label=erased))
        flags.append(annotated)
    return out, flags


# ------------------------------------------------------------------------------------- targets and ambiguity


def partial_targets(label: np.ndarray, annotated: np.ndarray) -> np.ndarray:
    """Per-class targets of a partial label: one-hot, with NaN where the entry is ambiguous.

    Foreground class k: known everywhere when annotated; otherwise known (0) only on voxels labelled as a class
    (another class, or class k itself after pseudo-labelling), NaN elsewhere. Background: known when every class
    is annotated or the voxel is labelled; NaN on unlabelled voxels of a partial case (a missing class may be
    there). Shape: label (*S) int, annotated (C,) bool -> (C, *S) float32.
    """
    classes = len(annotated)
    target = (label[None] == np.arange(classes).reshape(-1, *([1] * label.ndim))).astype(np.float32)
    unlabelled = label == 0
    for k in np.flatnonzero(~annotated):
        target[k][unlabelled] = np.nan
    return target


def ambiguity_map(label: np.ndarray, annotated: np.ndarray) -> np.ndarray:
    """INERRANT's w: 1 where the per-class label is known, 0 where ambiguous. Shape: (*S) -> (C, *S) float32."""
    return np.isfinite(partial_targets(label, annotated)).astype(np.float32)


# ------------------------------------------------------------------------------------- prediction


def sigmoid_multilabel(scores: torch.Tensor) -> torch.Tensor:
    """K sigmoids as per-class maps whose argmax is INERRANT's rule: channel 0 the constant MULTILABEL_BACKGROUND
    (the largest float32 below 0.5), channels 1..K sigmoid(s_k); a class wins with probability >= 0.5 and the
    highest probability, background when every probability is below 0.5 (ties go to the lower index).
    The runtime's `pipeline.sigmoid_multilabel` is the same. Computed in float32.
    Shape: (B, C, *S) -> (B, C, *S).
    """
    probs = torch.sigmoid(scores.float())
    return torch.cat([torch.full_like(probs[:, :1], MULTILABEL_BACKGROUND), probs[:, 1:]], dim=1)


def multilabel_rule(probabilities: np.ndarray) -> np.ndarray:
    """The prediction rule itself: 1 + the class of maximum probability, 0 (background) when all are below 0.5.
    Shape: (K, *S) foreground probabilities -> (*S) int64."""
    best = probabilities.argmax(axis=0)
    return np.where(probabilities.max(axis=0) >= 0.5, best + 1, 0)


# ------------------------------------------------------------------------------------- relabelling


@dataclass(frozen=True)
class RelabelSchedule:
    """Which relabelling step each epoch belongs to: 0 for the first `initial_epochs`, then steps 1..`steps`
    splitting the remaining epochs as evenly as possible (each at least one epoch)."""

    epochs: int
    initial_epochs: int
    steps: int
    gamma_max: float

    def step(self, epoch: int) -> int:
        """The step of 1-based `epoch` (a function of the epoch, so a resumed run lands in the right one)."""
        if epoch <= self.initial_epochs or not self.steps:
            return 0
        return 1 + (epoch - self.initial_epochs - 1) * self.steps // (self.epochs - self.initial_epochs)

    def gamma(self, step: int) -> float:
        """gamma_t = (t / T) * gamma_max: the fraction of predicted voxels pseudo-labelled at step t."""
        return 0.0 if not self.steps else step / self.steps * self.gamma_max


def select_pseudo_labels(probabilities: np.ndarray, label: np.ndarray, annotated: np.ndarray,
                         gamma: float, confidence: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-labels of one case: for each missing class k, the floor(gamma * n_k) most confident of the n_k voxels
    that the partial label calls background and the prediction rule assigns to k; confidence = `confidence[k]`
    (e.g. the TCP head's estimate) when given, else the maximum class probability (p_k there). Ties keep the
    lower flat index first.
    Shape: probabilities (C, *S) as `sigmoid_multilabel` gives them, label (*S), annotated (C,),
    confidence (C, *S) or None -> (flat voxel indices int64, their classes uint8), in class then confidence order.
    """
    predicted = probabilities.argmax(axis=0).ravel()
    per_class = None if confidence is None else confidence.reshape(len(confidence), -1)
    best = probabilities.max(axis=0).ravel()
    unlabelled = label.ravel() == 0
    indices, classes = [], []
    for k in np.flatnonzero(~annotated[1:]) + 1:
        candidates = np.flatnonzero(unlabelled & (predicted == k))
        take = math.floor(gamma * len(candidates) + 1e-9)
        if take <= 0:
            continue
        score = best[candidates] if per_class is None else per_class[k][candidates]
        order = np.argsort(-score, kind="stable")[:take]
        indices.append(candidates[order])
        classes.append(np.full(take, k, dtype=np.uint8))
    if not indices:
        return np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(indices).astype(np.int64), np.concatenate(classes)


class Relabeller:
    """INERRANT's iterative relabelling during `edgeseg.train.loop.fit`: at the first epoch of each step t >= 1 it
    predicts every partially labelled training case with the model and hands the sampler their labels with
    the step's pseudo-labels written in (`select_pseudo_labels`). Under torchrun the ranks predict a share of
    the cases each and exchange the results, so every rank's sampler holds the same labels.

    `cases` and `annotated` are `apply_partial_labels`' output (labelled cases), in the sampler's case order.
    `confidence`: the TCP head that ranks the pseudo-labels (fitted at the start of each step, on the sampler's
    batches of the partial labels alone); None ranks by maximum class probability.
    """

    TENSOR = "inerrant/pseudo"  # (3, N) int64 rows: case index, flat voxel index, class

    def __init__(self, cases: Sequence[PreparedCase], annotated: Sequence[np.ndarray], sampler: BatchSampler,
                 schedule: RelabelSchedule, tile: tuple[int, ...], confidence: TcpConfidence | None = None):
        self.cases, self.annotated, self.sampler = list(cases), list(annotated), sampler
        self.schedule, self.tile = schedule, tuple(tile)
        self.confidence = confidence
        self.partial = [i for i, flags in enumerate(self.annotated) if not flags.all()]
        self.step = 0
        self.pseudo: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def begin_epoch(self, epoch: int, model: torch.nn.Module, device: torch.device, console: Console) -> None:
        """Relabel when `epoch` starts a new step (the model is the one the step starts from)."""
        if self.confidence is not None:
            self.confidence.check(model)  # a network without a final 1x1 conv fails at epoch 1, not at step 1
        step = self.schedule.step(epoch)
        if step == self.step:
            return
        gamma = self.schedule.gamma(step)
        if self.confidence is not None:
            self._apply(self.step, {})  # the head learns from annotations only, not from the last step's guesses
            loss = self.confidence.fit(model, self.sampler, device)
            console.print(f"INERRANT TCP head: {self.confidence.steps} steps, L2 loss {loss:.4f}")
        rank, world = distributed.rank(), distributed.world_size()
        mine = {}
        for i in self.partial[rank::world]:
            image, label = self.cases[i].image, self._label(i)
            if self.confidence is None:
                probs = predict_probabilities(model, image, self.tile, device, activation="sigmoid_multilabel")
                mine[i] = select_pseudo_labels(probs, label, self.annotated[i], gamma)
            else:
                probs, confidence = self.confidence.predict(model, image, self.tile, device)
                mine[i] = select_pseudo_labels(probs, label, self.annotated[i], gamma, confidence)
        found = {i: v for part in distributed.gather_objects(mine) for i, v in part.items()}
        self._apply(step, found)
        console.print(f"INERRANT relabelling step {step}/{self.schedule.steps} (gamma {gamma:.3f}): "
                      f"{self.pseudo_voxels()} pseudo-labelled voxels in {len(self.partial)} partially labelled cases")

    def _apply(self, step: int, pseudo: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> None:
        changed = set(self.pseudo) | set(pseudo)
        self.step = step
        self.pseudo = {i: v for i, v in pseudo.items() if len(v[0])}
        for i in sorted(changed):
            label = self._label(i).copy()
            if i in self.pseudo:
                index, classes = self.pseudo[i]
                label.reshape(-1)[index] = classes
            self.sampler.set_label(i, label)

    def _label(self, index: int) -> np.ndarray:
        """Case `index`'s partial label, without pseudo-labels."""
        label = self.cases[index].label
        if label is None:
            raise ValueError(f"case {self.cases[index].name} has no label")
        return label

    def pseudo_voxels(self) -> int:
        return int(sum(len(index) for index, _ in self.pseudo.values()))

    def log_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"relabel_step": self.step, "pseudo_voxels": self.pseudo_voxels()}
        if self.confidence is not None:
            fields["tcp_loss"] = self.confidence.last_loss  # the head's last fit; None before step 1
        return fields

    def _fingerprint(self) -> str:
        names = "\n".join(self.cases[i].name for i in self.partial)
        return hashlib.sha1(names.encode("utf-8")).hexdigest()

    def state(self) -> dict[str, Any]:
        """JSON part of the checkpoint: the step and which cases the pseudo-labels index (and the TCP head's last
        loss)."""
        state: dict[str, Any] = {"step": self.step, "partial_cases": self._fingerprint()}
        if self.confidence is not None:
            state["tcp_loss"] = self.confidence.last_loss
        return state

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensor part of the checkpoint: every pseudo-label as (case index, flat voxel index, class), and the TCP
        head's weights once it exists."""
        rows = [np.stack([np.full(len(index), i, np.int64), index, classes.astype(np.int64)])
                for i, (index, classes) in sorted(self.pseudo.items())]
        table = np.concatenate(rows, axis=1) if rows else np.zeros((3, 0), np.int64)
        head = {} if self.confidence is None else self.confidence.tensors()
        return {self.TENSOR: torch.from_numpy(table), **head}

    def restore(self, state: Mapping[str, Any] | None, tensors: Mapping[str, torch.Tensor]) -> None:
        """Back to the saved step and pseudo-labels (a checkpoint from before any relabelling restores step 0)."""
        if not state:
            return
        if state.get("partial_cases") != self._fingerprint():
            raise UserError("the checkpoint's INERRANT pseudo-labels were made for other training cases "
                            "(data.partial_labels or the data changed); start a new run")
        if self.confidence is not None:
            if not self.confidence.restore(tensors) and int(state["step"]) > 0:
                raise UserError("the checkpoint has no TCP head (it was trained with train.inerrant.confidence "
                                "max_probability); resume with that setting or start a new run")
            self.confidence.last_loss = state.get("tcp_loss")
        table = tensors.get(self.TENSOR, torch.zeros(3, 0, dtype=torch.int64)).numpy()
        pseudo = {int(i): (table[1, table[0] == i], table[2, table[0] == i].astype(np.uint8))
                  for i in np.unique(table[0])}
        self._apply(int(state["step"]), pseudo)
