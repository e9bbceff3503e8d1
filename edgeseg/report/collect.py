"""One report row per bundle: runtime accuracy on a split, latency, peak memory, size and bits.

Torch-free (the runtime side of the toolchain). The evaluation itself is injectable:
`evaluate(bundle, data, split) -> {"summary": edgeseg.metrics.aggregate output, "cases": [...],
"seconds_per_case": [float, ...]}`; the default is `edgeseg.runtime.evaluate_bundle.evaluate_bundle`.

Latency is the median over test cases of the in-process wall time of the runtime predictor per volume
(the evaluator's `seconds_per_case`). Peak memory is the peak resident set size of a *fresh* Python
process that loads the bundle and evaluates the split (`edgeseg.report.memprobe`), which reports its
own VmHWM from /proc/self/status (Linux; ru_maxrss of RUSAGE_SELF elsewhere). Not the parent's
rusage of the child (os.wait4 / RUSAGE_CHILDREN): on Linux a child's ru_maxrss starts from the RSS of
the forked copy of its parent, so under a torch-loaded parent every setting read ~the parent's size
(measured: 365 MB for both a 0 MB and a 200 MB child). The number includes the interpreter and
imports (numpy, onnxruntime), i.e. what a deployment process needs.

Accuracy follows the bundle's kind (manifest `output_kind`): segmentation bundles are scored by mean Dice,
keypoint bundles (output_kind "heatmap", e.g. Count-ception) by mean keypoint F1, the "mean" entry of the
evaluator's summary in both cases. Each row records which (`accuracy_metric`, `accuracy_mean`); one report
ranks one metric, so bundles of both kinds in one report are a UserError (`report_metric`).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeseg.atomic import json_safe, write_json
from edgeseg.errors import UserError
from edgeseg.metrics.keypoints import KEYPOINT_METRICS

Evaluate = Callable[[Path, "Path | None", str], dict[str, Any]]
MeasureMemory = Callable[[Path, "Path | None", str], int]
DICE, F1 = "dice", "f1"  # the report's accuracy metrics: segmentation and keypoint bundles
REPORT_CLASS_METRICS = ("dice", "hd95", "abs_volume_error_mm3")
CLASS_METRICS = {DICE: REPORT_CLASS_METRICS, F1: KEYPOINT_METRICS}  # per-class table cells kept in a row
KEYPOINT_OUTPUT_KIND = "heatmap"
DEFAULT_EVALUATOR = "edgeseg.runtime.evaluate_bundle:evaluate_bundle"
MEMORY_METHOD = "peak RSS (VmHWM) of a fresh Python subprocess evaluating the split"
BACKEND = "onnxruntime (CPU)"


def load_evaluator(spec: str = DEFAULT_EVALUATOR) -> Evaluate:
    """Import "module:function"; a missing runtime evaluator is one clear UserError."""
    import importlib

    module_name, _, func = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, func)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"bundle evaluator {spec} is not available ({exc})") from None


def default_evaluate(bundle: Path, data: Path | None, split: str, **options: Any) -> dict[str, Any]:
    """The runtime evaluator on the CPU ONNX Runtime backend; `data` is required (see `run_evaluation`).

    options: evaluate_bundle's keyword options (include_background, layout, splits_file, seed, label_suffixes).
    """
    if data is None:
        raise UserError("no dataset folder to evaluate on: pass --data")
    return load_evaluator()(bundle, data, split, **options)


def run_evaluation(run: Path, data: Path | None, evaluate: Evaluate) -> tuple[Path | None, Evaluate]:
    """The dataset folder (default: the run's) and evaluator scoring the classes the run's training scored.

    A report must score what `edgeseg evaluate RUN` scores: the run's data folder and, for runs
    that score class 0 (e.g. EM membranes), the background class too.
    """
    import functools

    from edgeseg.train.rundir import RunDir

    rundir = RunDir(Path(run))
    info, cfg = rundir.read_info(), rundir.read_config()
    if data is None and info.data_root:
        data = Path(info.data_root)
    if evaluate is default_evaluate:
        evaluate = functools.partial(default_evaluate, include_background=info.evaluate_background,
                                     layout=cfg.data.layout, splits_file=cfg.data.splits, seed=cfg.train.seed,
                                     label_suffixes=cfg.data.label_suffixes)
    return data, evaluate


def bundle_facts(bundle: Path) -> dict[str, Any]:
    """Size at rest and bit widths from the bundle's manifest (no model is loaded)."""
    from edgeseg.runtime.bundle import read_manifest

    manifest = read_manifest(Path(bundle))
    # The manifest lists every file's SHA-256, so its digest identifies the exported model (used for reuse).
    digest = hashlib.sha256(json.dumps(json_safe(manifest.to_dict()), sort_keys=True).encode()).hexdigest()
    if "bundle_bytes" not in manifest.sizes:
        raise UserError(f"{bundle}: manifest sizes has no bundle_bytes (re-export the bundle)")
    return {
        "bundle_bytes": int(manifest.sizes["bundle_bytes"]),
        "bits_nominal": manifest.bits.get("nominal"),
        "weights_at_rest": manifest.bits.get("weights_at_rest"),
        "bits_deployed": manifest.bits.get("deployed"),
        "class_names": list(manifest.class_names),
        "output_kind": manifest.output_kind,
        "manifest_sha256": digest,
    }


def accuracy_metric(output_kind: str | None) -> str:
    """The report's accuracy metric for a bundle's output kind: F1 for keypoint bundles, Dice otherwise."""
    return F1 if output_kind == KEYPOINT_OUTPUT_KIND else DICE


def with_accuracy(row: dict[str, Any]) -> dict[str, Any]:
    """An ok row with its accuracy fields (re)derived from its summary and output kind.

    Sets `accuracy_metric`, `accuracy_mean` (the summary's "mean" entry of that metric), `per_class` and
    `dice_mean` (None for keypoint rows; kept for readers of older reports). Rows cached before these
    fields existed (no `output_kind`) are segmentation rows.
    """
    metric = accuracy_metric(row.get("output_kind"))
    summary = row["summary"]
    mean = (summary.get("mean", {}).get(metric) or {}).get("mean")
    rest = {k: v for k, v in row.items() if k != "summary"}  # the long summary stays last (results.json reads)
    return {**rest, "accuracy_metric": metric, "accuracy_mean": mean, "dice_mean": mean if metric == DICE else None,
            "per_class": per_class(summary, CLASS_METRICS[metric]), "summary": summary}


def as_accuracy_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the renderer reads it: an ok row made without the accuracy fields (by a caller from before
    they existed, when Dice was the only metric) is a Dice row with `accuracy_mean` = its `dice_mean`."""
    if row.get("status") != "ok" or "accuracy_metric" in row:
        return row
    return {**row, "accuracy_metric": DICE, "accuracy_mean": row.get("dice_mean")}


def report_metric(rows: Sequence[dict[str, Any]]) -> str:
    """The one accuracy metric of a report's ok rows (Dice when there is none); mixed kinds are a UserError."""
    by_metric: dict[str, list[str]] = {}
    for r in rows:
        if r.get("status") == "ok":
            by_metric.setdefault(r.get("accuracy_metric", DICE), []).append(str(r["name"]))
    return _one_metric(by_metric)


def _one_metric(by_metric: dict[str, list[str]]) -> str:
    if len(by_metric) > 1:
        listed = "; ".join(f"{m}: {', '.join(names)}" for m, names in sorted(by_metric.items()))
        raise UserError(f"one report ranks one accuracy metric, but these bundles mix segmentation (dice) and "
                        f"keypoint (f1) models ({listed}); report each kind separately")
    return next(iter(by_metric), DICE)


def check_one_kind(settings: Sequence[tuple[str, Path]]) -> None:
    """Fail before any evaluation when the readable bundles mix segmentation and keypoint models.

    Unreadable manifests are skipped: that setting becomes a failed row later.
    """
    from edgeseg.runtime.bundle import read_manifest

    by_metric: dict[str, list[str]] = {}
    for name, bundle in settings:
        try:
            kind = read_manifest(Path(bundle)).output_kind
        except (UserError, OSError, ValueError):
            continue
        by_metric.setdefault(accuracy_metric(kind), []).append(name)
    _one_metric(by_metric)


def per_class(summary: dict[str, Any], metrics: Sequence[str] = REPORT_CLASS_METRICS) -> dict[str, dict[str, Any]]:
    """{class: {metric: mean, metric_n_inf: count}} from an `aggregate` summary (the report's table cells)."""
    out: dict[str, dict[str, Any]] = {}
    for cls, by_metric in summary.items():
        row: dict[str, Any] = {}
        for m in metrics:
            if m in by_metric:
                row[m] = by_metric[m]["mean"]
                row[f"{m}_n_inf"] = by_metric[m]["n_inf"]
        out[cls] = row
    return out


def subprocess_peak_rss(bundle: Path, data: Path | None, split: str, *, evaluator: str = DEFAULT_EVALUATOR,
                        env: dict[str, str] | None = None) -> int:
    """Peak RSS in bytes of `python -m edgeseg.report.memprobe` evaluating `bundle` (see module docstring)."""
    from edgeseg.report.memprobe import MARKER

    cmd = [sys.executable, "-m", "edgeseg.report.memprobe", str(bundle), "--split", split, "--evaluator", evaluator]
    if data is not None:
        cmd += ["--data", str(data)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise RuntimeError(f"memory probe exited with {proc.returncode}: {tail[0]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if not lines:
        raise RuntimeError("memory probe printed no peak memory")
    return int(lines[-1][len(MARKER):])


def collect_setting(name: str, bundle: Path, *, data: Path | None, split: str = "test",
                    evaluate: Evaluate = default_evaluate, measure_memory: MeasureMemory | None = subprocess_peak_rss,
                    ) -> dict[str, Any]:
    """Evaluate one bundle and return its report row (status "ok"); raises on failure (see `collect`)."""
    bundle = Path(bundle)
    facts = bundle_facts(bundle)
    result = evaluate(bundle, data, split)
    seconds = [float(s) for s in result["seconds_per_case"]]
    if not seconds:
        raise UserError(f"split '{split}' has no cases to evaluate {bundle} on")
    row: dict[str, Any] = {
        "name": name, "status": "ok", "error": None, "bundle": str(bundle), "split": split, **facts,
        "n_cases": len(seconds),
        "latency_s_median": statistics.median(seconds),
        "latency_s_per_case": seconds,
        "peak_rss_bytes": None, "memory_method": None,
        "summary": result["summary"],
    }
    row = with_accuracy(row)
    if measure_memory is not None:
        row["peak_rss_bytes"] = int(measure_memory(bundle, data, split))
        row["memory_method"] = MEMORY_METHOD
    return row


def failed_row(name: str, bundle: Path | None, error: BaseException, stage: str) -> dict[str, Any]:
    """The report row of a setting that raised: reported, not fatal."""
    message = str(error) if isinstance(error, UserError) else "".join(
        traceback.format_exception_only(type(error), error)).strip()
    return {"name": name, "status": "failed", "stage": stage, "error": message,
            "bundle": None if bundle is None else str(bundle)}


def _cache_path(cache_dir: Path, name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return cache_dir / f"{safe}.json"


def _reusable(path: Path, bundle: Path) -> dict[str, Any] | None:
    """A finished row from an earlier run, if it was ok and is for the same bundle (path and manifest digest).

    Rows written before the accuracy fields existed get them here (from their summary and the manifest).
    """
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if row.get("status") != "ok" or row.get("bundle") != str(bundle) or "summary" not in row:
        return None
    try:
        facts = bundle_facts(bundle)
    except UserError:
        return None
    if facts["manifest_sha256"] != row.get("manifest_sha256"):
        return None
    return with_accuracy({**row, **facts})


def collect(settings: Sequence[tuple[str, Path]], *, data: Path | None, split: str = "test",
            cache_dir: Path | None = None, evaluate: Evaluate = default_evaluate,
            measure_memory: MeasureMemory | None = subprocess_peak_rss,
            progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Report rows for (name, bundle) settings, in order; a failing setting gives a "failed" row.

    With `cache_dir`, each finished row is written to cache_dir/NAME.json and reused on the next call
    when it is for the same bundle (same path and manifest digest), so a re-run report only does the rest.
    """
    names = [n for n, _ in settings]
    if len(set(names)) != len(names):
        raise UserError(f"setting names must be unique, got {names}")
    check_one_kind(settings)
    rows = []
    for name, bundle in settings:
        bundle = Path(bundle)
        cached = _cache_path(cache_dir, name) if cache_dir is not None else None
        row = _reusable(cached, bundle) if cached is not None else None
        if row is not None:
            row["reused"] = True
        else:
            if progress is not None:
                progress(name)
            try:
                row = collect_setting(name, bundle, data=data, split=split, evaluate=evaluate,
                                      measure_memory=measure_memory)
            except Exception as exc:  # noqa: BLE001 - any failure of one setting is reported, not fatal (the report covers the rest)
                row = failed_row(name, bundle, exc, stage="evaluate")
            if cached is not None:
                write_json(cached, row)
            row["reused"] = False
        rows.append(row)
    return rows
