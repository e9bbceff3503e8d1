"""Is the QCDQ-vs-brevitas gap a graph error or float summation order? (run on demand, not in CI)

    python benchmarks/qcdq_rounding.py QRUN_DIR [--inputs 3] [--out docs/benchmarks/qcdq_rounding.json]

brevitas simulates quantization in floating point: every layer's integer activation is
round(conv(...) / scale), where conv(...) is a float32 sum whose rounding depends on the summation
order of the kernel (oneDNN in PyTorch, MLAS in ONNX Runtime). When a value lands within a few
float32 ulps of a rounding boundary, two correct implementations can pick neighbouring integers,
and the one-LSB difference then propagates through the later layers.

Oracle for "a correct implementation with another summation order": the same brevitas model run
in float64 (the exact sums, up to 1e-16). If ONNX Runtime's QCDQ graph differs from brevitas-fp32
by about as much as brevitas-fp64 does, the graph is right and the gap is float rounding; if ONNX
Runtime is much further from both, the graph computes something else.

Prints, for each input, the max |difference| in output (int32 accumulator) steps and in logits, the
fraction of logits that differ and the label agreement of: ORT vs fp32, fp64 vs fp32, ORT vs fp64.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import numpy as np
    import torch

    from edgeseg.atomic import write_json
    from edgeseg.export.parity import difference, ort_run, output_step
    from edgeseg.export.torch_export import INPUT_NAME, export_qcdq
    from edgeseg.quantize.qat import load_quant_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("qrun", type=Path)
    parser.add_argument("--inputs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    model, _, info = load_quant_model(args.qrun)
    tile = tuple(info.tile_size)
    torch.manual_seed(0)
    inputs = [torch.randn(1, info.in_channels, *tile) for _ in range(args.inputs)]
    qcdq = export_qcdq(model, (inputs[0],), info.spatial_dims)
    step = output_step(qcdq)
    rows = []
    with torch.inference_mode():
        for i, x in enumerate(inputs):
            fp32 = model(x).numpy()
            fp64 = model.double()(x.double()).float().numpy()
            model.float()
            ort = ort_run(qcdq, {INPUT_NAME: x.numpy()}, optimize=False)
            pairs = {"ort_vs_fp32": (ort, fp32), "fp64_vs_fp32": (fp64, fp32), "ort_vs_fp64": (ort, fp64)}
            row = {"input": i}
            for name, (a, b) in pairs.items():
                d = difference(a, b, step)
                row[name] = {"max_steps": d.max_steps, "max_abs": d.max_abs, "differing": d.differing_fraction,
                             "labels": d.label_agreement}
                print(f"input {i} {name:13s} max {d.max_steps if d.max_steps is not None else float('nan'):9.1f} steps"
                      f" {d.max_abs:.3g} logits, {100 * d.differing_fraction:5.1f}% differ, labels "
                      f"{100 * d.label_agreement:.3f}%", flush=True)
            rows.append(row)
    summary = {"qrun": str(args.qrun), "bits": info.bits, "tile": list(tile), "inputs": rows,
               "float64_supported": bool(np.isfinite([r["fp64_vs_fp32"]["max_abs"] for r in rows]).all())}
    if args.out is not None:
        write_json(args.out, summary)


if __name__ == "__main__":
    main()
