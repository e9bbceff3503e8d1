"""`edgeseg demo`: the pipeline end to end on a built-in default, ending with the paths it wrote."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console

from edgeseg.config import ExperimentConfig, load_experiment
from edgeseg.errors import UserError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# The demo experiment: small 3D phantoms and a small U-Net, sized to finish in minutes on
# 2 CPU cores. configs/demo.yaml holds the same settings (a test checks they agree).
DEMO_SETTINGS = [
    "data.root=synthetic",
    "data.spatial_dims=3",
    "data.class_names=[background, sphere, blob]",
    "data.synthetic_cases=20",
    "data.synthetic_shape=[40, 40, 40]",
    "data.patch_size=[32, 32, 32]",
    "model.depth=2",
    "model.base_width=8",
    "model.dropout=0.1",
    "train.epochs=8",
    "train.steps_per_epoch=20",
    "train.batch_size=2",
    "train.lr=0.003",
    "train.val_every=2",
    "train.num_threads=2",
]


DEMO_QAT_EPOCHS = 3


def demo_config(data: Path | None = None) -> ExperimentConfig:
    settings = list(DEMO_SETTINGS)
    if data is not None:
        settings = [f"data.root={data}", "data.spatial_dims=3", "data.patch_size=[32, 32, 32]", "model.depth=2",
                    "model.base_width=8", "train.epochs=8", "train.steps_per_epoch=20", "train.batch_size=2"]
    return load_experiment(None, settings)


def shipped_configs() -> list[Path]:
    return sorted(REPO_CONFIGS.glob("*.yaml")) if REPO_CONFIGS.is_dir() else []


def config_summary(path: Path) -> str:
    """A shipped config's description: its header comment up to the first line that ends a sentence, at most
    two lines ("" when it has none)."""
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines()[:2]:
        text = line.lstrip("#").strip()
        if not line.startswith("#") or not text:
            break
        lines.append(text)
        if text.endswith("."):
            break
    return " ".join(lines)


def run_demo(out: Path, *, data: Path | None, overwrite: bool, console: Console) -> None:
    from edgeseg.atomic import write_json
    from edgeseg.cli.tables import metrics_table
    from edgeseg.export.run_export import export_run
    from edgeseg.quantize.qat import quantize_run
    from edgeseg.report.collect import default_evaluate, run_evaluation, subprocess_peak_rss
    from edgeseg.report.sweep import run_existing
    from edgeseg.runtime.pipeline import segment_files
    from edgeseg.train.rundir import RunDir
    from edgeseg.train.setup import load_data_splits
    from edgeseg.train.experiment import evaluate_run, train_experiment

    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty; pass --overwrite to replace the earlier demo or choose --out")
        shutil.rmtree(out)
    if data is not None and not data.is_dir():
        raise UserError(f"data folder not found: {data}")
    started = time.monotonic()
    cfg = demo_config(data)
    run_dir, qrun_dir = out / "float_run", out / "quant_4w6a_run"
    float_bundle, quant_bundle = out / "bundle_fp32", out / "bundle_4w6a"
    console.rule("1/6 train a float 3D U-Net")
    train_experiment(cfg, run_dir, console=console)
    console.rule("2/6 evaluate on the test split")
    result = evaluate_run(run_dir, data=None, split="test", console=console)
    metrics_path = out / "float_test_metrics.json"
    write_json(metrics_path, result)
    console.print(metrics_table(result["summary"], title="float model, test split"))
    console.rule("3/6 quantization-aware training to 4-bit weights / 6-bit activations")
    quantize_run(run_dir, "4/6", qrun_dir, epochs=DEMO_QAT_EPOCHS, console=console)
    console.rule("4/6 export both models to bundles")
    for run, bundle in ((run_dir, float_bundle), (qrun_dir, quant_bundle)):
        exported = export_run(run, bundle)
        for line in exported.summary:
            console.print(f"  {line}")
    console.rule("5/6 segment the test volumes with the 4/6 bundle (torch-free runtime, flip TTA + MC dropout)")
    info = RunDir(run_dir).read_info()
    splits = load_data_splits(Path(info.data_root or ""), cfg.data.layout, cfg.data.splits, cfg.train.seed,
                              label_suffixes=cfg.data.label_suffixes)
    test_images = [str(path) for ref in splits.get("test") for path in ref.images[:1]]
    segmented = out / "segmentations"
    results = segment_files(quant_bundle, test_images, segmented, tta=True, mc_passes=2, uncertainty=True)
    console.print(f"  {len(results)} volume(s) segmented with uncertainty maps and JSON summaries")
    console.rule("6/6 trade-off report: accuracy, size, latency and memory of both bundles through the runtime")
    report_dir = out / "report"
    data_root, evaluate = run_evaluation(run_dir, None, default_evaluate)
    report = run_existing(report_dir, [("fp32", float_bundle), ("4/6", quant_bundle)], data=data_root,
                          evaluate=evaluate, measure_memory=subprocess_peak_rss)
    for row in report["settings"]:
        if row["status"] == "ok":
            console.print(f"  {row['name']}: mean Dice {row['dice_mean']:.3f}, {row['bundle_bytes'] / 1e3:.0f} kB, "
                          f"{row['latency_s_median']:.2f} s/volume, peak {row['peak_rss_bytes'] / 2**20:.0f} MiB")
        else:
            console.print(f"  [red]{row['name']} failed[/red]: {row['error']}")
    console.rule("demo finished")
    console.print(f"in {(time.monotonic() - started) / 60:.1f} min; wrote:")
    for path in (run_dir, metrics_path, qrun_dir, qrun_dir / "metrics.json", float_bundle, quant_bundle, segmented,
                 report_dir / "report.md", report_dir / "report.html"):
        console.print(f"  {path}")
