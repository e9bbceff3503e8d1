"""Rich tables for metrics summaries."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from edgeseg.metrics.keypoints import KEYPOINT_METRICS

COLUMNS = ("dice", "iou", "precision", "recall", "hd95", "assd", "abs_volume_error_mm3")
KEYPOINT_COLUMNS = KEYPOINT_METRICS  # precision, recall, f1, error_mm, nearest_mm (`edgeseg.metrics.keypoints`)


def summary_columns(summary: dict[str, Any]) -> tuple[str, ...]:
    """The metric columns of a summary: keypoint metrics when every class holds only those (a keypoint run's
    `summarize_keypoints`), else the segmentation metrics."""
    names = {metric for metrics in summary.values() for metric in metrics}
    return KEYPOINT_COLUMNS if names and names <= set(KEYPOINT_METRICS) else COLUMNS


def metrics_table(summary: dict[str, Any], title: str = "") -> Table:
    """One row per class (and the mean), mean ± std per metric; inf distances counted separately."""
    columns = summary_columns(summary)
    table = Table(title=title)
    table.add_column("class")
    for col in columns:
        table.add_column(col, justify="right")
    for cls, metrics in summary.items():
        cells = []
        for col in columns:
            m = metrics.get(col)
            if m is None:
                cells.append("")
                continue
            text = f"{m['mean']:.4f} ± {m['std']:.4f}" if m.get("n") else "n/a"
            if m.get("n_inf"):
                text += f" ({m['n_inf']} inf)"
            cells.append(text)
        table.add_row(cls, *cells)
    return table
