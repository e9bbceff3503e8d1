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

Evaluate = Callable[[Path, "Path | None", str], dict[str, Any]]
MeasureMemory = Callable[[Path, "Path | None", str], int]
REPORT_CLASS_METRICS = ("dice", "hd95", "abs_volume_error_mm3")
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
        "manifest_sha256": digest,
    }


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
        "dice_mean": result["summary"].get("mean", {}).get("dice", {}).get("mean"),
        "per_class": per_class(result["summary"]),
        "summary": result["summary"],
    }
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
    """A finished row from an earlier run, if it was ok and is for the same bundle (path and manifest digest)."""
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if row.get("status") != "ok" or row.get("bundle") != str(bundle):
        return None
    try:
        if bundle_facts(bundle)["manifest_sha256"] != row.get("manifest_sha256"):
            return None
    except UserError:
        return None
    return row


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
