"""Score a model on prepared cases, on each case's original grid (what a user's files show)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgeseg.data.cases import PreparedCase
from edgeseg.data.preprocess import PreprocessSpec, undo_spatial
from edgeseg.metrics import aggregate, case_metrics


def score_case(
    case: PreparedCase,
    predicted: np.ndarray,
    spec: PreprocessSpec,
    class_names: Sequence[str],
    include_background: bool,
) -> dict[str, Any]:
    """Metrics of one prediction (on the preprocessed grid) against the case's original label."""
    assert case.original_label is not None
    on_original = undo_spatial(predicted, spec, case.original)
    return case_metrics(on_original, case.original_label, case.original.spacing, list(class_names),
                        include_background=include_background)


def evaluate_predictions(
    cases: Sequence[PreparedCase],
    predict: Callable[[PreparedCase], np.ndarray],
    spec: PreprocessSpec,
    class_names: Sequence[str],
    include_background: bool = False,
    on_case: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run `predict` (case -> labels on the preprocessed grid) over labelled cases; per-case and summary metrics."""
    per_case = {}
    for case in cases:
        if case.original_label is None:
            continue
        per_case[case.name] = score_case(case, predict(case), spec, class_names, include_background)
        if on_case is not None:
            on_case(case.name)
    return {"cases": per_case, "summary": aggregate(list(per_case.values()))}


def mean_foreground_dice(summary: dict[str, Any]) -> float:
    """The 'mean' pseudo-class Dice from `aggregate` (model selection criterion)."""
    return float(summary["mean"]["dice"]["mean"])
