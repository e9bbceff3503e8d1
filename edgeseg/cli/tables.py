"""Rich tables for metrics summaries."""

from __future__ import annotations

from typing import Any

from rich.table import Table

COLUMNS = ("dice", "iou", "precision", "recall", "hd95", "assd", "abs_volume_error_mm3")


def metrics_table(summary: dict[str, Any], title: str = "") -> Table:
    """One row per class (and the mean), mean ± std per metric; inf distances counted separately."""
    table = Table(title=title)
    table.add_column("class")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    for cls, metrics in summary.items():
        cells = []
        for col in COLUMNS:
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
