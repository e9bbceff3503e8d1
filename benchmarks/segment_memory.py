"""Peak memory of `edgeseg segment` on a large CT-sized volume (run on demand, not in CI).

    python benchmarks/segment_memory.py                       # 512x512x300 int16 CT, float bundle, tile 96^3
    python benchmarks/segment_memory.py --shape 256,256,150 --tta --uncertainty

Writes a synthetic CT (int16 NIfTI, LPS axes with 0.7 x 0.7 x 1.5 mm voxels, so reorientation runs)
and a small float U-Net bundle into a temporary folder, then segments it with the runtime in a
fresh process and reports that process's peak resident memory (VmHWM), next to a baseline process
that only imports the runtime and opens the same ONNX Runtime session. The runtime is designed to
need about: the input as float32 while it is preprocessed, the preprocessed copy, one tile-deep slab
of per-class accumulators, and the uint8 label maps (plus probabilities / per-sample labels when
asked for).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """VmHWM of this process (Linux): unlike ru_maxrss it does not carry the parent's peak across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("needs Linux /proc/self/status")


def write_ct(path: Path, shape: tuple[int, int, int]) -> None:
    """A body-like ellipse (~40 HU) with bright blobs in air (-1000 HU), int16, LPS affine."""
    import nibabel as nib
    import numpy as np

    x, y = np.ogrid[: shape[0], : shape[1]]
    body = ((x - shape[0] / 2) / (0.42 * shape[0])) ** 2 + ((y - shape[1] / 2) / (0.32 * shape[1])) ** 2 < 1
    data = np.full(shape, -1000, np.int16)
    data[body] = 40
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = [int(rng.integers(s // 4, 3 * s // 4)) for s in shape]
        r = int(rng.integers(4, 12))
        data[c[0] - r:c[0] + r, c[1] - r:c[1] + r, c[2] - r:c[2] + r] = 300
    data += rng.integers(-20, 20, size=shape, dtype=np.int16)
    affine = np.diag([-0.7, -0.7, 1.5, 1.0])  # LPS voxel axes, as DICOM-derived CTs often are
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    nib.save(image, str(path))


def make_bundle(out: Path, tile: list[int], normalization: str) -> None:
    import torch

    from edgeseg.config import ModelConfig
    from edgeseg.export.bundle_writer import write_bundle
    from edgeseg.export.run_export import BundleInfo, export_model
    from edgeseg.nets import build_from_config

    torch.manual_seed(0)
    model = build_from_config(ModelConfig(depth=3, base_width=8, dropout=0.1), spatial_dims=3, in_channels=1,
                              out_channels=3).eval()
    info = BundleInfo(spatial_dims=3, in_channels=1, class_names=["background", "a", "b"], tile_size=tile,
                      preprocess={"reorient": True, "target_spacing": None, "normalization": normalization,
                                  "clip_percentiles": [0.5, 99.5], "label_map": {}})
    result = export_model(model, info)
    write_bundle(out, result.files, result.manifest)


def child(args: argparse.Namespace) -> dict:
    from edgeseg.runtime.pipeline import segment_files

    if args.baseline:
        from edgeseg.runtime.backends import open_backend
        from edgeseg.runtime.bundle import load_bundle

        open_backend(load_bundle(args.bundle), "onnxruntime", threads=args.threads, mc=args.mc > 0).close()
        return {"peak_rss_mb": peak_rss_mb()}
    started = time.perf_counter()
    segment_files(args.bundle, [args.input], args.out, tta=args.tta, mc_passes=args.mc, uncertainty=args.uncertainty,
                  probabilities=args.probabilities, backend="onnxruntime", threads=args.threads, overwrite=True)
    return {"peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512,512,300")
    parser.add_argument("--tile", default="96,96,96")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--mc", type=int, default=0)
    parser.add_argument("--uncertainty", action="store_true")
    parser.add_argument("--probabilities", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--normalization", default="percentile", help="the bundle's: percentile, zscore or none")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory(prefix="edgeseg-mem-") as tmp:
        root = Path(tmp)
        write_ct(root / "ct.nii.gz", shape)  # type: ignore[arg-type]
        make_bundle(root / "bundle", [int(v) for v in args.tile.split(",")], args.normalization)
        flags = [f for f, on in (("--tta", args.tta), ("--uncertainty", args.uncertainty),
                                 ("--probabilities", args.probabilities)) if on]
        flags += ["--mc", str(args.mc)] + (["--threads", str(args.threads)] if args.threads else [])
        base = [sys.executable, __file__, "--child", "--bundle", str(root / "bundle"), "--input",
                str(root / "ct.nii.gz"), "--out", str(root / "out"), *flags]
        results = {}
        for name, extra in (("baseline", ["--baseline"]), ("segment", [])):
            done = subprocess.run(base + extra, check=False, capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                raise SystemExit(f"{name} run failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    voxels = shape[0] * shape[1] * shape[2]
    seg, baseline = results["segment"], results["baseline"]["peak_rss_mb"]
    print(f"volume {'x'.join(map(str, shape))} ({voxels / 1e6:.1f} M voxels; float32 {4 * voxels / 2**20:.0f} MB), "
          f"tile {args.tile}, normalization {args.normalization}, flags {' '.join(flags) or 'none'}")
    print(f"segment: {seg['seconds']:.1f} s, peak RSS {seg['peak_rss_mb']:.0f} MB "
          f"(runtime + session baseline {baseline:.0f} MB; above it {seg['peak_rss_mb'] - baseline:.0f} MB "
          f"= {(seg['peak_rss_mb'] - baseline) / (4 * voxels / 2**20):.1f}x the float32 volume)")


if __name__ == "__main__":
    main()
