"""Batch segmentation throughput: `edgeseg segment --workers N` for several N (run on demand, not in CI).

    python benchmarks/segment_scaling.py                          # 16 hippocampus volumes, 1 vs 2 workers, 3 repeats
    python benchmarks/segment_scaling.py --cases 8 --workers 1,2,4 --tta

Exports a float bundle from a U-Net with the hippocampus config's architecture (depth 3, width 16,
batch norm, dropout 0.1) and RANDOM weights (timing only: the masks mean nothing; inference cost
does not depend on the weights), takes the first --cases images of ../shared/data/msd_hippocampus
(synthetic 48x64x48 volumes when that folder is absent), and times the whole `edgeseg segment`
command in a fresh process for each worker count, repeats interleaved. One worker runs in-process
with ONNX Runtime's default threads (all cores); N workers get cores / N threads each.
Writes docs/benchmarks/segment_scaling[_tta].{json,png} and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGESEG_SHARED_DATA", REPO.parent / "shared" / "data")) / "msd_hippocampus" / "images"
TILE = [48, 64, 48]  # configs/hippocampus_3d.yaml inference_tile: every case is one padded tile


def make_bundle(out: Path) -> None:
    import torch

    from edgeseg.config import ModelConfig
    from edgeseg.export.bundle_writer import write_bundle
    from edgeseg.export.run_export import BundleInfo, export_model
    from edgeseg.nets import build_from_config

    torch.manual_seed(0)
    model = build_from_config(ModelConfig(depth=3, base_width=16, norm="batch", dropout=0.1), spatial_dims=3,
                              in_channels=1, out_channels=3).eval()
    info = BundleInfo(spatial_dims=3, in_channels=1, class_names=["background", "anterior", "posterior"],
                      tile_size=TILE, preprocess={"reorient": True, "target_spacing": None, "normalization": "zscore",
                                                  "clip_percentiles": [0.5, 99.5], "label_map": {}})
    result = export_model(model, info)
    write_bundle(out, result.files, result.manifest)


def input_files(count: int, folder: Path) -> tuple[list[Path], str]:
    """The first `count` hippocampus images, or synthetic volumes of the same kind when the data is absent."""
    if SHARED.is_dir():
        files = sorted(SHARED.glob("*.nii.gz"))[:count]
        if len(files) == count:
            return files, f"{SHARED} (first {count}, sorted)"
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        path = folder / f"synthetic_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(size=(36, 50, 35)).astype(np.float32), np.eye(4)), str(path))
        files.append(path)
    return files, f"synthetic 36x50x35 volumes ({SHARED} not found)"


def time_segment(bundle: Path, files: list[Path], out: Path, workers: int, tta: bool) -> dict:
    command = [sys.executable, "-m", "edgeseg", "segment", str(bundle), *map(str, files), "-o", str(out),
               "--backend", "onnxruntime", "--workers", str(workers)] + (["--tta"] if tta else [])
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"segment failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    summary = json.loads((out / "segment_summary.json").read_text())
    assert summary["counts"]["done"] == len(files), summary["counts"]
    return {"wall_s": wall, "batch_s": summary["seconds"], "threads_per_worker": summary["threads_per_worker"]}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    workers = [r["workers"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    ax.plot(workers, [r["volumes_per_min"] for r in rows], "o-", label="median; bars: min to max of the repeats")
    for r in rows:
        ax.vlines(r["workers"], r["volumes_per_min_min"], r["volumes_per_min_max"], color="C0", alpha=0.5)
    ax.set_xlabel("worker processes (--workers)")
    ax.set_ylabel("volumes per minute")
    ax.set_xticks(workers)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tta", action="store_true", help="flip TTA (8 samples per volume)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks", help="where the JSON and PNG go")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    runs: dict[int, list[dict]] = {w: [] for w in counts}
    with tempfile.TemporaryDirectory(prefix="edgeseg-scaling-") as tmp:
        root = Path(tmp)
        make_bundle(root / "bundle")
        files, source = input_files(args.cases, root / "inputs")
        for repeat in range(args.repeats):
            for w in counts:  # interleaved, so a change in machine load hits every worker count alike
                runs[w].append(time_segment(root / "bundle", files, root / f"out_w{w}_r{repeat}", w, args.tta))
                print(f"repeat {repeat + 1}, {w} worker(s): {runs[w][-1]['wall_s']:.1f} s", flush=True)
    rows = []
    for w in counts:
        walls = [r["wall_s"] for r in runs[w]]
        rate = [60 * args.cases / s for s in walls]
        rows.append({"workers": w, "threads_per_worker": runs[w][0]["threads_per_worker"],
                     "wall_s_median": statistics.median(walls), "wall_s_all": [round(s, 2) for s in walls],
                     "batch_s_median": statistics.median(r["batch_s"] for r in runs[w]),
                     "volumes_per_min": statistics.median(rate), "volumes_per_min_min": min(rate),
                     "volumes_per_min_max": max(rate)})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = {"cases": args.cases, "inputs": source, "tta": args.tta, "repeats": args.repeats, "cores": cores,
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "command": "python benchmarks/segment_scaling.py " + " ".join(sys.argv[1:]),
            "bundle": "float U-Net depth 3, width 16, batch norm, dropout 0.1, RANDOM weights; tile 48x64x48"}
    stem = "segment_scaling_tta" if args.tta else "segment_scaling"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    plot(rows, args.out / f"{stem}.png",
         f"edgeseg segment, {args.cases} hippocampus volumes{' + TTA' if args.tta else ''}, {cores} CPU cores")
    base = rows[0]["volumes_per_min"]
    print("\n| workers | threads / worker | wall time, median (all runs) | volumes / min (median) | speed-up |")
    print("| ---: | ---: | --- | ---: | ---: |")
    for r in rows:
        threads = r["threads_per_worker"] or f"default ({cores})"
        print(f"| {r['workers']} | {threads} | {r['wall_s_median']:.1f} s ({', '.join(f'{s:.1f}' for s in r['wall_s_all'])}) "
              f"| {r['volumes_per_min']:.1f} | {r['volumes_per_min'] / base:.2f}x |")


if __name__ == "__main__":
    main()
