"""Markdown tables for docs/results.md from a finished `edgeseg report` directory (run on demand).

    python benchmarks/report_tables.py runs/report_hippo

Two tables, both read from files the report wrote, so docs/results.md quotes exactly what the
report measured: (1) QAT in PyTorch/brevitas, float vs quantized on the test split, from each
setting's `runs/<tag>/metrics.json` (the same cases, the same evaluation code), with the QAT wall
time from its log; (2) the deployed bundles through the torch-free runtime, from `results.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _qat_rows(report: Path) -> list[str]:
    rows = []
    for run in sorted((report / "runs").iterdir()):
        metrics_path = run / "metrics.json"
        if not metrics_path.is_file():
            continue
        metrics = json.loads(metrics_path.read_text())
        test = metrics.get("splits", {}).get("test")
        if test is None:
            continue
        per_class = test["per_class_dice"]
        classes = " | ".join(f"{v['quant']:.3f}" for v in per_class.values())
        seconds = metrics.get("qat", {}).get("seconds")
        rows.append(f"| {metrics['bits']} | {classes} | {test['dice_quant']:.4f} | {test['dice_float']:.4f} | "
                    f"**{100 * test['dice_delta']:+.2f}** | {'' if seconds is None else f'{seconds / 60:.1f} min'} |")
    return rows


def _runtime_rows(report: Path) -> tuple[list[str], list[str]]:
    results = json.loads((report / "results.json").read_text())
    classes: list[str] = []
    lines = []
    for s in results["settings"]:
        if s["status"] != "ok":
            lines.append(f"| {s['name']} | failed: {s.get('error', '')[:80]} |")
            continue
        classes = classes or [c for c in s["per_class"] if c != "mean"]
        dice = " | ".join(f"{s['per_class'][c]['dice']:.3f}" for c in classes)
        rss = s.get("peak_rss_bytes")
        lines.append(f"| {s['name']}{' (Pareto)' if s.get('pareto') else ''} | {dice} | {s['dice_mean']:.4f} | "
                     f"{s['bundle_bytes'] / 1e3:.1f} | {s.get('weights_at_rest') or ''} | "
                     f"{s['latency_s_median']:.3f} | {'' if rss is None else f'{rss / 2**20:.0f}'} |")
    return classes, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    args = parser.parse_args()
    classes, runtime = _runtime_rows(args.report)
    names = " | ".join(classes)
    print(f"| QAT setting | {names} | mean (quantized) | mean (float, same cases) | Δ (points) | QAT wall time |")
    print("|---" * (len(classes) + 5) + "|")
    print("\n".join(_qat_rows(args.report)))
    print()
    print(f"| bundle (runtime, ONNX Runtime CPU) | {names} | mean Dice | bundle kB | weights at rest | "
          f"latency s/volume | peak RSS MiB |")
    print("|---" * (len(classes) + 6) + "|")
    print("\n".join(runtime))


if __name__ == "__main__":
    main()
