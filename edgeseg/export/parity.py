"""Parity measurements: ONNX Runtime outputs against PyTorch/brevitas and between graph forms.

Differences are reported in logits and, for quantized graphs, in output quantization steps:
the head convolution accumulates in int32 with step s_in * s_w[c] per output channel (the
scale of its int32 bias DequantizeLinear), so "within one step" means within one unit of the
integer accumulator. With brevitas `Int32Bias` the ONNX Runtime reference semantics
(ORT_DISABLE_ALL: Q/DQ evaluated in float) match brevitas up to float summation order;
ONNX Runtime's int8 kernels may requantize an intermediate activation 1 LSB differently
(deployment-facts.md section 2.3), which is what `differing_fraction` measures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from edgeseg.export import graph as g


def ort_run(model: bytes | onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, optimize: bool = True,
            session_config: Mapping[str, str] | None = None) -> np.ndarray:
    """First output of `model` on `feeds` in ONNX Runtime (CPU). optimize=False evaluates the graph as written."""
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, dict(feeds))[0])


@dataclass(frozen=True)
class Difference:
    """How far `actual` is from `reference`."""

    max_abs: float  # max |actual - reference| in logits
    differing_fraction: float  # fraction of elements that are not bit-identical
    max_steps: float | None = None  # max |difference| in output quantization steps (quantized heads)
    label_agreement: float = 1.0  # fraction of voxels whose argmax class is the same
    logit_range: float = 0.0  # max - min of the reference logits
    reference_max_abs: float = 0.0  # max |reference|: float32 rounding grows with the magnitude of the outputs

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def difference(actual: np.ndarray, reference: np.ndarray, step: np.ndarray | None = None) -> Difference:
    """Compare two outputs of shape (N, C, *S); `step` (C,) is the per-channel output quantization step."""
    if actual.shape != reference.shape:
        raise ValueError(f"shape mismatch: {actual.shape} vs {reference.shape}")
    diff = np.abs(actual.astype(np.float64) - reference.astype(np.float64))
    steps = None
    if step is not None:
        view = step.reshape((1, -1) + (1,) * (diff.ndim - 2)).astype(np.float64)
        steps = float((diff / view).max()) if diff.size else 0.0
    agreement = float(np.mean(actual.argmax(1) == reference.argmax(1))) if diff.size else 1.0
    return Difference(max_abs=float(diff.max()) if diff.size else 0.0,
                      differing_fraction=float(np.mean(actual != reference)) if diff.size else 0.0,
                      max_steps=steps, label_agreement=agreement,
                      logit_range=float(reference.max() - reference.min()) if diff.size else 0.0,
                      reference_max_abs=float(np.abs(reference).max()) if diff.size else 0.0)


def output_step(model: onnx.ModelProto) -> np.ndarray | None:
    """Per-channel quantization step of the graph output: the scale of the head's int32 bias DQ.

    None when the output is not produced by a convolution with an int32-quantized bias (float head).
    Shape: (C,).
    """
    producers = g.producers(model)
    out = model.graph.output[0].name
    conv = producers.get(out)
    if conv is None or conv.op_type != "Conv" or len(conv.input) < 3:
        return None
    bias_dq = producers.get(conv.input[2])
    if bias_dq is None or bias_dq.op_type != "DequantizeLinear":
        return None
    bias = g.initializers(model).get(bias_dq.input[0])
    if bias is None or bias.data_type != onnx.TensorProto.INT32:
        return None
    scale = g.array(model, bias_dq.input[1])
    return None if scale is None else scale.reshape(-1).astype(np.float32)
