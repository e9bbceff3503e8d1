"""The `edgeseg evaluate` table: keypoint runs show their own metrics, segmentation runs keep theirs.

Oracles: hand-placed keypoints (distances 5 mm and 13 mm, a 3-4-5 and a 5-12-13 triangle) and hand-made
segmentation summaries."""

from __future__ import annotations

from rich.console import Console

from edgeseg.cli.tables import COLUMNS, metrics_table
from edgeseg.metrics.keypoints import case_keypoint_metrics, summarize_keypoints


def _render(table) -> list[str]:
    console = Console(record=True, width=240)
    console.print(table)
    return console.export_text().splitlines()


def _header(lines: list[str]) -> list[str]:
    row = next(line for line in lines if "class" in line)
    return [cell.strip() for cell in row.strip("┃│ ").replace("┃", "│").split("│")]


def test_keypoint_table_shows_f1_error_and_nearest_distance():
    # one case; class a: a detection 5 mm from its keypoint (matched within 10 mm); class b: 13 mm away (unmatched)
    case = case_keypoint_metrics({"a": [[0.0, 0.0, 0.0]], "b": [[0.0, 0.0, 0.0]]},
                                 {"a": [[3.0, 4.0, 0.0]], "b": [[5.0, 12.0, 0.0]]}, max_distance_mm=10.0)
    lines = _render(metrics_table(summarize_keypoints([case])["summary"], title="keypoints"))
    assert _header(lines) == ["class", "precision", "recall", "f1", "error_mm", "nearest_mm"]
    rows = {line.strip("│ ").split()[0]: [c.strip() for c in line.strip("│ ").split("│")[1:]]
            for line in lines if line.startswith("│")}
    assert rows["a"] == ["1.0000 ± 0.0000"] * 3 + ["5.0000 ± 0.0000", "5.0000 ± 0.0000"]
    assert rows["b"] == ["0.0000 ± 0.0000"] * 3 + ["n/a", "13.0000 ± 0.0000"]  # no matched pair: no error
    # the mean pseudo-class: per case, the mean over defined class values
    assert rows["mean"] == ["0.5000 ± 0.0000"] * 3 + ["5.0000 ± 0.0000", "9.0000 ± 0.0000"]


def test_segmentation_table_is_unchanged():
    stat = {"mean": 0.75, "std": 0.25, "n": 2, "n_inf": 0}
    summary = {"liver": {name: dict(stat) for name in COLUMNS}, "mean": {name: dict(stat) for name in COLUMNS}}
    summary["liver"]["hd95"] = {"mean": 3.0, "std": 0.0, "n": 1, "n_inf": 1}
    lines = _render(metrics_table(summary))
    assert _header(lines) == ["class", *COLUMNS]
    assert COLUMNS == ("dice", "iou", "precision", "recall", "hd95", "assd", "abs_volume_error_mm3")
    text = "\n".join(lines)
    assert "f1" not in text and "nearest_mm" not in text and "3.0000 ± 0.0000 (1 inf)" in text
