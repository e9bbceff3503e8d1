"""Tiled 3D inference: MONAI `sliding_window_inference` (PyTorch fp32) vs the edgeseg runtime (ONNX Runtime).

Run on demand, not in CI, on an otherwise idle machine:

    python benchmarks/runtime_vs_monai.py --rows docs/benchmarks/runtime_vs_monai.json   # full, resumable (hours on 2 cores)
    python benchmarks/runtime_vs_monai.py --quick --out /tmp/bench.md   # small sizes, checks the script works

The same 3D U-Net (edgeseg `unet`, depth 3, widths 16-32-64-128, random weights: timing only) runs
on a random volume, Gaussian blending, overlap 0.5, tile batch 4, with and without 8-flip TTA:

- `monai`: MONAI 1.x `sliding_window_inference` over softmax(model) in PyTorch fp32 (TTA: the mean
  over the 8 flipped volumes, as a MONAI user writes it);
- `ort fp32`, `ort 8/8`, `ort 4/6`: the edgeseg runtime's tiler on the bundle's ONNX Runtime form
  (float, and CPU int8 forms of brevitas twins at 8/8 and 4/6 bits), TTA inside the tile pass.

Each configuration runs in a fresh subprocess; wall time covers the inference on an in-memory,
already normalised volume (no file I/O, no imports, no model loading) and the peak RSS is the
whole process's (ru_maxrss: Python + the framework + model + buffers; torch alone is a few hundred MB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNNERS = ("monai", "ort fp32", "ort 8/8", "ort 4/6")
BUNDLES = {"ort fp32": "fp32", "ort 8/8": "8/8", "ort 4/6": "4/6"}
FULL = {"sizes": [(128, 128, 128), (256, 256, 128)], "tiles": [(64, 64, 64), (96, 96, 96)]}
QUICK = {"sizes": [(48, 48, 48), (64, 64, 48)], "tiles": [(32, 32, 32)]}
EXPORT_TILE = [32, 32, 32]  # parity checks at export; ONNX Runtime forms take any tile
CLASSES = ["background", "a", "b"]
BATCH = 4


def model_config():
    from edgeseg.config import ModelConfig

    return ModelConfig(depth=3, base_width=16, norm="batch", dropout=0.0, decoder="upsample")


def float_model():
    import torch

    from edgeseg.nets import build_from_config

    torch.manual_seed(0)
    return build_from_config(model_config(), spatial_dims=3, in_channels=1, out_channels=len(CLASSES)).eval()


def prepare(work: Path) -> None:
    """Torch weights for MONAI and the three bundles (float, and brevitas twins calibrated on random tiles)."""
    import warnings

    import torch

    from edgeseg.config import QuantConfig
    from edgeseg.export.bundle_writer import write_bundle
    from edgeseg.export.run_export import BundleInfo, export_model
    from edgeseg.quantize.calibrate import calibrate
    from edgeseg.quantize.twin import build_twin, twin_spec

    work.mkdir(parents=True, exist_ok=True)
    model = float_model()
    torch.save(model.state_dict(), work / "model.pt")
    preprocess = {"reorient": False, "target_spacing": None, "normalization": "none",
                  "clip_percentiles": [0.5, 99.5], "label_map": {}}
    for bits in BUNDLES.values():
        out = work / f"bundle_{bits.replace('/', '')}"
        if out.exists():
            continue
        if bits == "fp32":
            exported = model
        else:
            torch.manual_seed(0)
            cfg = model_config()
            exported, _ = build_twin(cfg, twin_spec(cfg, QuantConfig(bits=bits)), spatial_dims=3, in_channels=1,
                                     out_channels=len(CLASSES))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                calibrate(exported, [torch.randn(2, 1, *EXPORT_TILE) for _ in range(2)])
            exported = exported.eval()
        info = BundleInfo(spatial_dims=3, in_channels=1, class_names=CLASSES, tile_size=EXPORT_TILE,
                          preprocess=preprocess, bits=bits)
        result = export_model(exported, info)
        write_bundle(out, result.files, result.manifest)
        print(f"  exported {out.name}: forms {', '.join(result.manifest.forms)}", flush=True)


def volume(size: tuple[int, ...]):
    import numpy as np

    return np.random.default_rng(0).standard_normal((1, *size)).astype(np.float32)


def child(runner: str, size: tuple[int, ...], tile: tuple[int, ...], tta: bool, work: Path, threads: int) -> dict:
    """One configuration; returns wall seconds of the inference and the process's peak RSS."""
    import numpy as np

    image = volume(size)
    if runner == "monai":
        import torch
        from monai.inferers import sliding_window_inference

        torch.set_num_threads(threads)
        model = float_model()
        model.load_state_dict(torch.load(work / "model.pt"))
        x = torch.from_numpy(image)[None]

        def predict(t):
            return torch.softmax(model(t), dim=1)

        flips = [()] + ([(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)] if tta else [])

        def window(t):
            return sliding_window_inference(t, tile, BATCH, predict, overlap=0.5, mode="gaussian")

        with torch.no_grad():
            predict(torch.zeros(BATCH, 1, *tile))  # warm-up, untimed (both runners get one)
        started = time.perf_counter()
        with torch.no_grad():
            probs = sum(torch.flip(window(torch.flip(x, f)), f) if f else window(x) for f in flips) / len(flips)
            labels = probs.argmax(1)
        seconds = time.perf_counter() - started
        checksum = int(labels.sum())
    else:
        from edgeseg.runtime.backends import open_backend
        from edgeseg.runtime.bundle import load_bundle
        from edgeseg.runtime.pipeline import make_sampling, model_predictor, predict_on_grid

        bundle = load_bundle(work / f"bundle_{BUNDLES[runner].replace('/', '')}")
        backend = open_backend(bundle, "onnxruntime", threads=threads)
        sampling = make_sampling(bundle.manifest, tta_axes=[0, 1, 2] if tta else None, mc_passes=0,
                                 rng=np.random.default_rng(0))
        predict = model_predictor(backend, bundle.manifest, sampling, keep_samples=False)
        backend.run(np.zeros((BATCH, 1, *tile), np.float32))  # warm-up, untimed
        started = time.perf_counter()
        grid = predict_on_grid(image, predict, num_classes=len(CLASSES), num_samples=1, model_dims=3, tile=tile,
                               overlap=0.5, batch_size=BATCH, blend="gaussian")
        seconds = time.perf_counter() - started
        checksum = int(grid.labels.sum())
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "checksum": checksum}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM (Linux) rather than ru_maxrss, which survives exec and so
    would report the parent's peak for a freshly started child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux, bytes on macOS


def run_config(runner: str, size, tile, tta: bool, work: Path, threads: int) -> dict:
    args = [sys.executable, __file__, "--child", runner, "--size", ",".join(map(str, size)),
            "--tile", ",".join(map(str, tile)), "--work", str(work), "--threads", str(threads)] + (["--tta"] if tta else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(args, check=False, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{runner} {size} {tile} tta={tta} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], quick: bool, threads: int) -> str:
    import monai
    import onnxruntime
    import torch

    lines = [
        "# Tiled inference: MONAI (PyTorch fp32) vs the edgeseg runtime (ONNX Runtime)",
        "",
        (f"Generated by `python benchmarks/runtime_vs_monai.py{' --quick' if quick else ''}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {threads} thread(s); "
        f"Python {platform.python_version()}, torch {torch.__version__}, MONAI {monai.__version__}, "
        f"onnxruntime {onnxruntime.__version__}. One run per configuration, each in a fresh process (noisy on a "
        "shared machine)."),
        "",
        ("Model: edgeseg `unet` depth 3, widths 16-32-64-128, random weights (8/8 and 4/6: brevitas twins, "
        "CPU int8 form). Gaussian blending, overlap 0.5, batch 4 tiles. TTA: 8 flips (MONAI: 8 flipped volumes; "
        "edgeseg: inside the tile pass). Wall time: inference on an in-memory volume after one warm-up batch; peak RSS (VmHWM): the whole process."),
        "",
        "| volume | tile | TTA | runner | wall (s) | speed vs MONAI | peak RSS (MB) | RSS / MONAI's | commit |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    order = {name: i for i, name in enumerate(RUNNERS)}
    for r in sorted(rows, key=lambda r: (r["size"][::-1], r["tile"], r["tta"], order[r["runner"]])):
        base = next((x for x in rows if x["size"] == r["size"] and x["tile"] == r["tile"] and x["tta"] == r["tta"]
                     and x["runner"] == "monai"), None)
        speed = "-" if base is None else f"{base['seconds'] / r['seconds']:.2f}x"
        memory = "-" if base is None else f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}"
        lines.append(f"| {'x'.join(map(str, r['size']))} | {'x'.join(map(str, r['tile']))} | "
                     f"{'8 flips' if r['tta'] else 'no'} | {r['runner']} | {r['seconds']:.2f} | "
                     f"{speed} | {r['peak_rss_mb']:.0f} | {memory} | {r.get('commit', '-')} |")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    """The checkout's commit (rows measured on different days say which code they measured)."""
    if os.environ.get("EDGESEG_BENCH_COMMIT"):  # a frozen copy of the tree (git archive) has no .git
        return os.environ["EDGESEG_BENCH_COMMIT"]
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def _key(row: dict) -> tuple:
    return (tuple(row["size"]), tuple(row["tile"]), bool(row["tta"]), row["runner"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volumes and tiles (checks the script works)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "runtime_vs_monai.md",
                        help="Markdown table to write")
    parser.add_argument("--rows", type=Path, default=None,
                        help="JSON file of measured rows: configurations already in it are not measured again, new "
                             "ones are appended as they finish (the full matrix takes hours on 2 cores: resumable)")
    parser.add_argument("--only-size", default=None, help="measure only this volume size, e.g. 128,128,128")
    parser.add_argument("--only-tile", default=None, help="measure only this tile, e.g. 96,96,96")
    parser.add_argument("--tta-modes", choices=("both", "off", "on"), default="both",
                        help="measure without TTA, with 8-flip TTA, or both")
    parser.add_argument("--redo", action="store_true",
                        help="re-measure the selected configurations (all four runners) even if --rows has them")
    parser.add_argument("--work", type=Path, default=None, help="folder for the model and bundles (default: temp)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--tile", help=argparse.SUPPRESS)
    parser.add_argument("--tta", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size = tuple(int(v) for v in args.size.split(","))
        tile = tuple(int(v) for v in args.tile.split(","))
        print(json.dumps(child(args.child, size, tile, args.tta, args.work, args.threads)))
        return
    from edgeseg.atomic import write_json, write_text

    grid = QUICK if args.quick else FULL
    sizes = grid["sizes"] if args.only_size is None else [tuple(int(v) for v in args.only_size.split(","))]
    tiles = grid["tiles"] if args.only_tile is None else [tuple(int(v) for v in args.only_tile.split(","))]
    modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.tta_modes]
    selected = {(tuple(size), tuple(tile), tta, runner)
                for size in sizes for tile in tiles for tta in modes for runner in RUNNERS}
    rows = json.loads(args.rows.read_text()) if args.rows is not None and args.rows.is_file() else []
    if args.redo:  # the runners of one configuration are always measured together, side by side
        rows = [r for r in rows if _key(r) not in selected]
    done = {_key(r) for r in rows}
    commit = _commit()
    with tempfile.TemporaryDirectory(prefix="edgeseg-bench-") as tmp:
        work = args.work or Path(tmp)
        print(f"preparing model and bundles in {work}", flush=True)
        prepare(work)
        for size in sizes:
            for tile in tiles:
                for tta in modes:
                    for runner in RUNNERS:
                        if (tuple(size), tuple(tile), tta, runner) in done:
                            continue
                        result = run_config(runner, size, tile, tta, work, args.threads)
                        rows.append({"size": list(size), "tile": list(tile), "tta": tta, "runner": runner, **result,
                                     "commit": commit})
                        if args.rows is not None:
                            write_json(args.rows, rows)
                        print(f"  {'x'.join(map(str, size))} tile {'x'.join(map(str, tile))} tta={tta} {runner}: "
                              f"{result['seconds']:.2f} s, {result['peak_rss_mb']:.0f} MB", flush=True)
    write_text(args.out, table(rows, args.quick, args.threads))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
