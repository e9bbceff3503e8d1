"""Write the trade-off report: results.json, report.md, a self-contained report.html and PNG plots.

Input is the list of report rows from `edgeseg.report.collect` (status "ok" or "failed"). The plots use
matplotlib's Agg backend (no display needed); the HTML embeds them as base64 so the one file can be
mailed or attached to an issue.

The accuracy axis follows the rows' kind (`edgeseg.report.collect.report_metric`): mean Dice for segmentation
bundles, mean keypoint F1 for keypoint bundles; `MetricView` says how each is tabulated and plotted.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeseg.atomic import write_bytes, write_json, write_text
from edgeseg.report.collect import BACKEND, DICE, F1, MEMORY_METHOD, as_accuracy_row, report_metric
from edgeseg.report.pareto import pareto_front

RESULTS = "results.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
LATENCY_METHOD = "median over cases of the in-process wall time of the runtime predictor per volume"


def plot_files(metric: str) -> dict[str, str]:
    """The plots' file names for an accuracy metric ("dice": dice_vs_size.png, ...; "f1": f1_vs_size.png, ...)."""
    return {"size": f"{metric}_vs_size.png", "latency": f"{metric}_vs_latency.png", "classes": f"per_class_{metric}.png"}


PLOTS = plot_files(DICE)  # a segmentation report's plots


@dataclass(frozen=True)
class ClassColumn:
    """One per-class column group of the table: a `per_class` metric, its header ("{}": the class) and format."""

    metric: str
    header: str
    fmt: str
    count_inf: bool = False  # append "(k inf)" from the row's `<metric>_n_inf`


@dataclass(frozen=True)
class MetricView:
    """How a report shows its accuracy metric: labels, per-class columns and what they mean."""

    metric: str  # the rows' accuracy_metric
    label: str  # "Dice" / "F1" (axis labels, titles, the mean column)
    ranked_by: str  # the Pareto front's accuracy, in words
    columns: tuple[ClassColumn, ...]
    explained: str  # the per-class columns, in words

    @property
    def plots(self) -> dict[str, str]:
        return plot_files(self.metric)


VIEWS = {
    DICE: MetricView(
        DICE, "Dice", "mean Dice",
        (ClassColumn("dice", "Dice {}", ".3f"), ClassColumn("hd95", "HD95 {} (mm)", ".2f", count_inf=True),
         ClassColumn("abs_volume_error_mm3", "vol. err. {} (mm³)", ".1f")),
        ("HD95 is the mean over finite values; '(k inf)' counts cases where exactly one of prediction and "
         "reference was empty.")),
    F1: MetricView(
        F1, "F1", "mean keypoint F1 over cases and classes",
        (ClassColumn("f1", "F1 {}", ".3f"), ClassColumn("error_mm", "loc. err. {} (mm)", ".2f")),
        ("Keypoint F1 per case and class is 2 TP / (predictions + references), a prediction being a true positive "
         "when matched one to one to a reference keypoint within the bundle's match radius; localisation error is "
         "the mean distance of the matched pairs, averaged over the cases with a match ('-': no match at all).")),
}


def metric_view(results: dict[str, Any]) -> MetricView:
    """The view of a results document (reports written before `accuracy_metric` existed are Dice reports)."""
    return VIEWS[results.get("accuracy_metric", DICE)]


def ok_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def build_results(rows: Sequence[dict[str, Any]], *, split: str, data: str | None) -> dict[str, Any]:
    """The results.json document: the rows plus the Pareto front (names, by increasing size) on the rows'
    accuracy metric (`accuracy_metric`: "dice" or "f1"); rows of both kinds are a UserError."""
    rows = [as_accuracy_row(r) for r in rows]
    metric = report_metric(rows)
    points = [(float(r["bundle_bytes"]), float(r["accuracy_mean"])) if r.get("status") == "ok"
              and r.get("accuracy_mean") is not None else None for r in rows]
    front = [rows[i]["name"] for i in pareto_front(points)]
    return {
        "format": "edgeseg-report", "schema_version": 1, "split": split, "data": data, "backend": BACKEND,
        "latency_method": LATENCY_METHOD, "memory_method": MEMORY_METHOD,
        "accuracy_metric": metric, "pareto_front": front,
        "settings": [{**r, "pareto": r["name"] in front} for r in rows],
    }


def _classes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Foreground classes in first-seen order, the "mean" pseudo-class left out (it is its own column)."""
    out: list[str] = []
    for r in ok_rows(rows):
        out.extend(c for c in r["per_class"] if c != "mean" and c not in out)
    return out


# ------------------------------------------------------------------------------------------ plots


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, draw) -> bytes:
    """Run `draw()` on a new figure, then return it as PNG bytes; the figure is always closed."""
    import io

    try:
        draw()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        pyplot().close(fig)


def _figure_png(draw) -> bytes:
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2), dpi=100)
    return figure_png(fig, lambda: draw(ax))


def _accuracy(row: dict[str, Any]) -> float:
    """A row's mean accuracy for plotting (0 where undefined)."""
    return row.get("accuracy_mean") or 0.0


def plot_accuracy_vs_size(results: dict[str, Any]) -> bytes:
    """Mean accuracy against bundle size (kB), the Pareto front drawn as a step line. Returns PNG bytes."""
    rows = ok_rows(results["settings"])
    by_name = {r["name"]: r for r in rows}
    label = metric_view(results).label

    def draw(ax):
        ax.scatter([r["bundle_bytes"] / 1e3 for r in rows], [_accuracy(r) for r in rows], color="tab:blue")
        for r in rows:
            ax.annotate(r["name"], (r["bundle_bytes"] / 1e3, _accuracy(r)), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        front = [by_name[n] for n in results["pareto_front"]]
        if front:
            ax.step([r["bundle_bytes"] / 1e3 for r in front], [r["accuracy_mean"] for r in front], where="post",
                    color="tab:red", label="Pareto front")
            ax.legend(loc="lower right")
        ax.set_xscale("log")
        from matplotlib.ticker import ScalarFormatter

        ax.xaxis.set_major_formatter(ScalarFormatter())  # plain kB numbers, not 4x10^1
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("bundle size at rest (kB, log scale)")
        ax.set_ylabel(f"mean {label}")
        ax.set_title(f"{label} vs model size")
    return _figure_png(draw)


def plot_accuracy_vs_latency(results: dict[str, Any]) -> bytes:
    """Mean accuracy against median latency per volume. Returns PNG bytes."""
    rows = ok_rows(results["settings"])
    label = metric_view(results).label

    def draw(ax):
        ax.scatter([r["latency_s_median"] for r in rows], [_accuracy(r) for r in rows], color="tab:green")
        for r in rows:
            ax.annotate(r["name"], (r["latency_s_median"], _accuracy(r)), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"median latency per volume (s), {BACKEND}")
        ax.set_ylabel(f"mean {label}")
        ax.set_title(f"{label} vs latency")
    return _figure_png(draw)


def plot_per_class_accuracy(results: dict[str, Any]) -> bytes:
    """Grouped bars: per-class mean accuracy (Dice or F1) for each setting. Returns PNG bytes."""
    rows = ok_rows(results["settings"])
    classes = _classes(rows)
    view = metric_view(results)

    def draw(ax):
        width = 0.8 / max(len(rows), 1)
        for k, r in enumerate(rows):
            values = [r["per_class"].get(c, {}).get(view.metric) or 0.0 for c in classes]
            ax.bar([i + k * width for i in range(len(classes))], values, width=width, label=r["name"])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))], classes)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"mean {view.label}")
        ax.set_title(f"Per-class {view.label}")
        if rows:
            ax.legend(fontsize=8)
    return _figure_png(draw)


# ------------------------------------------------------------------------------------------ tables


def _num(value: Any, fmt: str, inf_count: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "-"
    else:
        text = format(value, fmt)
    return f"{text} ({inf_count} inf)" if inf_count else text


def table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cell strings of the summary table (shared by Markdown and HTML)."""
    classes = _classes(results["settings"])
    view = metric_view(results)
    header = ["setting", "Pareto", "bundle kB", "weights at rest", f"mean {view.label}"]
    header += [col.header.format(c) for col in view.columns for c in classes] + ["latency s/vol", "peak RSS MiB"]
    cells = []
    for r in results["settings"]:
        if r.get("status") != "ok":
            cells.append([r["name"], "", "failed", "", ""] + [""] * (len(view.columns) * len(classes)) + ["", ""])
            continue
        pc = r["per_class"]
        line = [r["name"], "yes" if r["pareto"] else "", _num(r["bundle_bytes"] / 1e3, ".1f"),
                str(r.get("weights_at_rest") or ""), _num(r["accuracy_mean"], ".3f")]
        for col in view.columns:
            line += [_num(pc.get(c, {}).get(col.metric), col.fmt,
                          pc.get(c, {}).get(f"{col.metric}_n_inf", 0) if col.count_inf else 0) for c in classes]
        rss = r.get("peak_rss_bytes")
        line += [_num(r["latency_s_median"], ".3f"), _num(None if rss is None else rss / 2**20, ".0f")]
        cells.append(line)
    return header, cells


def _failures(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(r["name"], r.get("stage", ""), r.get("error") or "") for r in results["settings"]
            if r.get("status") != "ok"]


def _notes(results: dict[str, Any]) -> list[str]:
    view = metric_view(results)
    return [f"Split: {results['split']}; data: {results['data'] or 'from the run config'}; backend: {results['backend']}.",
            f"Latency: {results['latency_method']}.",
            f"Peak memory: {results['memory_method']}.",
            ("Pareto front: settings not beaten by another that is both smaller and at least as accurate "
             f"({view.ranked_by}). {view.explained}")]


def _example_lines(results: dict[str, Any]) -> list[str]:
    example = results.get("example")
    if not example:
        return []
    if example.get("error"):
        return ["", f"Example slice not drawn: {example['error']}"]
    return ["", f"Example ({example['setting']}, case {example['case']}): {example['caption']}.", "",
            f"![example]({example['png']})"]


def render_markdown(results: dict[str, Any]) -> str:
    header, cells = table(results)
    lines = ["# Accuracy / memory / latency trade-off", ""] + _notes(results) + [""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    failures = _failures(results)
    if failures:
        lines += ["", "## Failed settings", ""]
        lines += [f"- **{n}** ({stage}): {err.splitlines()[0] if err else ''}" for n, stage, err in failures]
    lines += ["", "## Plots", ""]
    lines += [f"![{key}]({name})" for key, name in metric_view(results).plots.items()]
    lines += _example_lines(results)
    return "\n".join(lines) + "\n"


def render_html(results: dict[str, Any], images: dict[str, bytes]) -> str:
    """One self-contained HTML page: no external files, plots as data URIs."""
    esc = html.escape
    header, cells = table(results)
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>edgeseg trade-off report</title>",
             ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
              "td,th{border:1px solid #bbb;padding:3px 6px;text-align:right}td:first-child{text-align:left}"
              "img{max-width:100%}</style></head><body>"),
             "<h1>Accuracy / memory / latency trade-off</h1>"]
    parts += [f"<p>{esc(n)}</p>" for n in _notes(results)]
    parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in cells]
    parts.append("</table>")
    failures = _failures(results)
    if failures:
        parts.append("<h2>Failed settings</h2><ul>")
        parts += [f"<li><b>{esc(n)}</b> ({esc(stage)}): <pre>{esc(err)}</pre></li>" for n, stage, err in failures]
        parts.append("</ul>")
    parts.append("<h2>Plots</h2>")
    for key, png in images.items():
        if key == "example":
            parts += [f"<p>{esc(line)}</p>" for line in _example_lines(results) if line and not line.startswith("![")]
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<p><img alt='{esc(key)}' src='data:image/png;base64,{data}'></p>")
    if results.get("example", {}).get("error"):
        parts.append(f"<p>{esc(_example_lines(results)[-1])}</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(out: Path, rows: Sequence[dict[str, Any]], *, split: str, data: str | None,
                 example: Callable[[dict[str, Any]], tuple[dict[str, Any], bytes | None]] | None = None,
                 ) -> dict[str, Any]:
    """Write results.json, the PNG plots, report.md and report.html into `out`; return the results.

    `example(results)` -> (record, png) draws the example slice (see `edgeseg.report.example`); its
    record goes into results.json under "example" (with "error" when it could not be drawn).
    """
    out = Path(out)
    results = build_results(rows, split=split, data=data)
    images = {"size": plot_accuracy_vs_size(results), "latency": plot_accuracy_vs_latency(results),
              "classes": plot_per_class_accuracy(results)}
    if example is not None:
        record, png = example(results)
        results["example"] = record
        if png is not None:
            write_bytes(out / record["png"], png)
            images["example"] = png
    write_json(out / RESULTS, results)
    for key, name in metric_view(results).plots.items():
        write_bytes(out / name, images[key])
    write_text(out / REPORT_MD, render_markdown(results))
    write_text(out / REPORT_HTML, render_html(results, images))
    return results
