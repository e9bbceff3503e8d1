"""Write the trade-off report: results.json, report.md, a self-contained report.html and PNG plots.

Input is the list of report rows from `edgeseg.report.collect` (status "ok" or "failed"). The plots use
matplotlib's Agg backend (no display needed); the HTML embeds them as base64 so the one file can be
mailed or attached to an issue.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeseg.atomic import write_bytes, write_json, write_text
from edgeseg.report.collect import BACKEND, MEMORY_METHOD
from edgeseg.report.pareto import pareto_front

RESULTS = "results.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS = {"size": "dice_vs_size.png", "latency": "dice_vs_latency.png", "classes": "per_class_dice.png"}
LATENCY_METHOD = "median over cases of the in-process wall time of the runtime predictor per volume"


def ok_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def build_results(rows: Sequence[dict[str, Any]], *, split: str, data: str | None) -> dict[str, Any]:
    """The results.json document: the rows plus the Pareto front (names, by increasing size)."""
    points = [(float(r["bundle_bytes"]), float(r["dice_mean"])) if r.get("status") == "ok"
              and r.get("dice_mean") is not None else None for r in rows]
    front = [rows[i]["name"] for i in pareto_front(points)]
    return {
        "format": "edgeseg-report", "schema_version": 1, "split": split, "data": data, "backend": BACKEND,
        "latency_method": LATENCY_METHOD, "memory_method": MEMORY_METHOD,
        "pareto_front": front,
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


def plot_dice_vs_size(results: dict[str, Any]) -> bytes:
    """Mean Dice against bundle size (kB), the Pareto front drawn as a step line. Returns PNG bytes."""
    rows = ok_rows(results["settings"])
    by_name = {r["name"]: r for r in rows}

    def draw(ax):
        ax.scatter([r["bundle_bytes"] / 1e3 for r in rows], [r["dice_mean"] or 0.0 for r in rows], color="tab:blue")
        for r in rows:
            ax.annotate(r["name"], (r["bundle_bytes"] / 1e3, r["dice_mean"] or 0.0), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        front = [by_name[n] for n in results["pareto_front"]]
        if front:
            ax.step([r["bundle_bytes"] / 1e3 for r in front], [r["dice_mean"] for r in front], where="post",
                    color="tab:red", label="Pareto front")
            ax.legend(loc="lower right")
        ax.set_xscale("log")
        from matplotlib.ticker import ScalarFormatter

        ax.xaxis.set_major_formatter(ScalarFormatter())  # plain kB numbers, not 4x10^1
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("bundle size at rest (kB, log scale)")
        ax.set_ylabel("mean Dice")
        ax.set_title("Dice vs model size")
    return _figure_png(draw)


def plot_dice_vs_latency(results: dict[str, Any]) -> bytes:
    """Mean Dice against median latency per volume. Returns PNG bytes."""
    rows = ok_rows(results["settings"])

    def draw(ax):
        ax.scatter([r["latency_s_median"] for r in rows], [r["dice_mean"] or 0.0 for r in rows], color="tab:green")
        for r in rows:
            ax.annotate(r["name"], (r["latency_s_median"], r["dice_mean"] or 0.0), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"median latency per volume (s), {BACKEND}")
        ax.set_ylabel("mean Dice")
        ax.set_title("Dice vs latency")
    return _figure_png(draw)


def plot_per_class_dice(results: dict[str, Any]) -> bytes:
    """Grouped bars: per-class mean Dice for each setting. Returns PNG bytes."""
    rows = ok_rows(results["settings"])
    classes = _classes(rows)

    def draw(ax):
        width = 0.8 / max(len(rows), 1)
        for k, r in enumerate(rows):
            values = [r["per_class"].get(c, {}).get("dice") or 0.0 for c in classes]
            ax.bar([i + k * width for i in range(len(classes))], values, width=width, label=r["name"])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(classes))], classes)
        ax.set_ylim(0, 1)
        ax.set_ylabel("mean Dice")
        ax.set_title("Per-class Dice")
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
    header = ["setting", "Pareto", "bundle kB", "weights at rest", "mean Dice"]
    header += [f"Dice {c}" for c in classes] + [f"HD95 {c} (mm)" for c in classes]
    header += [f"vol. err. {c} (mm³)" for c in classes] + ["latency s/vol", "peak RSS MiB"]
    cells = []
    for r in results["settings"]:
        if r.get("status") != "ok":
            cells.append([r["name"], "", "failed", "", ""] + [""] * (3 * len(classes)) + ["", ""])
            continue
        pc = r["per_class"]
        line = [r["name"], "yes" if r["pareto"] else "", _num(r["bundle_bytes"] / 1e3, ".1f"),
                str(r.get("weights_at_rest") or ""), _num(r["dice_mean"], ".3f")]
        line += [_num(pc.get(c, {}).get("dice"), ".3f") for c in classes]
        line += [_num(pc.get(c, {}).get("hd95"), ".2f", pc.get(c, {}).get("hd95_n_inf", 0)) for c in classes]
        line += [_num(pc.get(c, {}).get("abs_volume_error_mm3"), ".1f") for c in classes]
        rss = r.get("peak_rss_bytes")
        line += [_num(r["latency_s_median"], ".3f"), _num(None if rss is None else rss / 2**20, ".0f")]
        cells.append(line)
    return header, cells


def _failures(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(r["name"], r.get("stage", ""), r.get("error") or "") for r in results["settings"]
            if r.get("status") != "ok"]


def _notes(results: dict[str, Any]) -> list[str]:
    return [f"Split: {results['split']}; data: {results['data'] or 'from the run config'}; backend: {results['backend']}.",
            f"Latency: {results['latency_method']}.",
            f"Peak memory: {results['memory_method']}.",
            ("Pareto front: settings not beaten by another that is both smaller and at least as accurate "
             "(mean Dice). HD95 is the mean over finite values; '(k inf)' counts cases where exactly one of "
             "prediction and reference was empty.")]


def _example_lines(results: dict[str, Any]) -> list[str]:
    example = results.get("example")
    if not example:
        return []
    if example.get("error"):
        return ["", f"Example slice not drawn: {example['error']}"]
    return ["", (f"Example ({example['setting']}, case {example['case']}): the runtime's mask and its voxel-wise "
                 f"entropy over {example['samples']} flip-TTA / MC-dropout samples."), "",
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
    lines += [f"![{key}]({name})" for key, name in PLOTS.items()]
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
    images = {"size": plot_dice_vs_size(results), "latency": plot_dice_vs_latency(results),
              "classes": plot_per_class_dice(results)}
    if example is not None:
        record, png = example(results)
        results["example"] = record
        if png is not None:
            write_bytes(out / record["png"], png)
            images["example"] = png
    write_json(out / RESULTS, results)
    for key, name in PLOTS.items():
        write_bytes(out / name, images[key])
    write_text(out / REPORT_MD, render_markdown(results))
    write_text(out / REPORT_HTML, render_html(results, images))
    return results
