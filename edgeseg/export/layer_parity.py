"""Per-layer integer parity: every quantized activation of a QCDQ graph against brevitas, from the same inputs.

Why: comparing only the logits of a deep quantized net cannot tell a wrong graph from float
rounding. brevitas and ONNX Runtime both simulate the integer model in float32, so a
pre-activation within a few ulps of a rounding boundary may land on either neighbouring level,
and that one-LSB flip then moves everything downstream (hundreds of output steps on the trained
hippocampus U-Net). Fed the same integer inputs, though, a correct layer can differ by at most
that one flip.

How (one brevitas forward and one ONNX Runtime run per input tile, no sub-models to rebuild):

1. brevitas: forward hooks on the activation quantizer proxies (`act_quant` of QuantReLU /
   QuantIdentity, ...) record, in execution order, the integer codes (what `QuantTensor.int()` returns) and
   the float value that was rounded (the proxy's input after its fused activation, e.g. ReLU).
2. ONNX: `cut_graph` copies the QCDQ graph and cuts it at every activation quantization point
   (QuantizeLinear -> Clip -> DequantizeLinear): the integer codes (the Clip output, or the
   QuantizeLinear output without a Clip) and the QuantizeLinear's float input become graph
   outputs, and the nodes that read the codes (the DequantizeLinear) read a new graph input
   `<codes>::fed` instead. Fed brevitas' codes at every cut, each layer of the cut graph - the
   DequantizeLinear of its inputs (ONNX scales), conv with int weights and int32 bias, ReLU,
   pooling, resize, concat, float islands, up to its QuantizeLinear and Clip - computes from
   exactly brevitas' input codes.
3. The i-th activation QuantizeLinear in graph order is paired with the i-th quantizer call (the
   TorchScript exporter traces the forward in execution order); the count and every tensor
   shape must agree (RuntimeError otherwise).

Per layer we measure the codes (fraction identical, max |diff| in LSB) and the float values
before rounding, on brevitas' integer grid (v / scale + zero point, clamped half an LSB outside the
code range where every value clips to the same code). Criterion, both must hold for every layer:

- codes within LSB_TOLERANCE = 1: float summation order may flip a near-tie to the neighbouring
  level, never further;
- before rounding within PRE_ROUND_TOLERANCE = 0.05 LSB. Summation-order noise is ~eps * sum |terms|
  / scale: at most 3e-4 LSB measured (trained hippocampus U-Nets at 4/6, 8/8 and 2/4 bits; the
  Count-ception twin, 22,400 terms per output). Without this a wrong graph behind a float island can hide below one
  LSB: an int32 bias that wrapped around at export (-2^31 instead of brevitas' saturated
  +2^31-1, in an attention gate's sigmoid branch) moved the next activation by 0.7 LSB and only
  2% of its codes by one (now repaired by `torch_export.repair_wrapped_biases`).

Every node belongs to exactly one layer or to the output segment (after the last cut; compared in
output quantization steps, the head's int32 accumulator step, see `parity.output_step`), so a wrong
weight, bias, scale, zero point or operator shows up in the layer that holds it. Q/DQ are evaluated
as written (ONNX Runtime optimisations off).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
from torch import nn

from edgeseg.export import graph as g
from edgeseg.export.parity import output_step

LSB_TOLERANCE = 1  # integer codes of each quantized activation, ONNX vs brevitas from the same inputs
PRE_ROUND_TOLERANCE = 0.05  # the value each side rounded, in LSB (float summation noise measured <= 3e-4)
OUTPUT_STEP_TOLERANCE = 1.0  # the head (after the last activation quantizer), in int32 accumulator steps
FLOAT_OUTPUT_TOLERANCE = 1e-4  # ... or in logits when the head is float (no int32 bias)
FED_SUFFIX = "::fed"
OUTPUT_LAYER = "output"


@dataclass(frozen=True)
class QuantPoint:
    """One activation quantization point of the ONNX graph."""

    node: str  # name of the QuantizeLinear node
    pre: str  # its float input
    codes: str  # tensor holding its integer codes: the Clip output, or the QuantizeLinear output
    elem_type: int  # onnx.TensorProto type of the codes (UINT8 / INT8 / ...)


@dataclass(frozen=True)
class LayerParity:
    """How one layer compares: integer codes (unit "LSB") or the graph output ("output steps" / "logits")."""

    layer: str  # brevitas module of the quantizer (e.g. "encoders.0.act1"), or OUTPUT_LAYER
    onnx_node: str  # its QuantizeLinear node (or the graph output's name)
    unit: str
    elements: int
    exact_fraction: float  # fraction of elements that are identical
    max_diff: float  # max |onnx - brevitas| in `unit`
    tolerance: float
    max_pre_round_diff: float | None = None  # max |onnx - brevitas| of the rounded values, in LSB (None: output)
    differing: int = 0  # elements that are not identical

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance and (self.max_pre_round_diff is None
                                                    or self.max_pre_round_diff <= PRE_ROUND_TOLERANCE)

    def problem(self) -> str:
        pre = "" if self.max_pre_round_diff is None else f", before rounding {self.max_pre_round_diff:.3g} LSB " \
                                                          f"(tolerance {PRE_ROUND_TOLERANCE:g})"
        return (f"max |diff| {self.max_diff:.3g} {self.unit} (tolerance {self.tolerance:g}){pre}, "
                f"{100 * self.exact_fraction:.2f}% exact")


@dataclass(frozen=True)
class LayerParityReport:
    """Per-layer parity of a QCDQ graph against its brevitas model; `layers` in graph order."""

    layers: list[LayerParity]  # one per activation quantizer
    output: LayerParity  # the segment after the last quantizer (head)
    inputs: int  # how many input tiles were compared
    saturated_biases: list[str] = field(default_factory=list)  # convs whose int32 bias hits the int32 limit

    @property
    def failing(self) -> list[LayerParity]:
        return [p for p in [*self.layers, self.output] if not p.ok]

    @property
    def ok(self) -> bool:
        return not self.failing

    @property
    def worst(self) -> LayerParity | None:
        """The integer layer with the largest code difference (ties: the most differing codes, relatively)."""
        return max(self.layers, key=lambda p: (p.max_diff, 1.0 - p.exact_fraction, p.max_pre_round_diff or 0.0),
                   default=None)

    def exact_fraction(self) -> float:
        """Fraction of all integer codes (every layer, every input) that are identical."""
        total = sum(p.elements for p in self.layers)
        return sum(p.exact_fraction * p.elements for p in self.layers) / total if total else 1.0

    def max_pre_round_diff(self) -> float:
        return max((p.max_pre_round_diff or 0.0 for p in self.layers), default=0.0)

    def to_dict(self) -> dict:
        worst = self.worst
        return {
            "passed": self.ok,
            "criterion": f"fed the same quantized inputs, every activation's integer codes within {LSB_TOLERANCE} "
                         f"LSB of brevitas and its values before rounding within {PRE_ROUND_TOLERANCE:g} LSB; the "
                         f"head within {self.output.tolerance:g} {self.output.unit}",
            "inputs": self.inputs,
            "layers_checked": len(self.layers),
            "exact_fraction": self.exact_fraction(),
            "max_lsb": worst.max_diff if worst else 0.0,
            "max_pre_round_lsb": self.max_pre_round_diff(),
            "worst_layer": worst.layer if worst else None,
            # compact rows (the manifest travels with every bundle): unit LSB, tolerances as in "criterion"
            "layers": [{"layer": p.layer, "elements": p.elements, "differing": p.differing, "max_lsb": p.max_diff,
                        "max_pre_round_lsb": _short(p.max_pre_round_diff or 0.0)}
                       for p in self.layers],
            "output": asdict(self.output),
            "saturated_int32_biases": list(self.saturated_biases),
        }

    def summary(self) -> str:
        worst = self.worst
        head = f"head {self.output.max_diff:.3g} {self.output.unit}"
        verdict = "passed" if self.ok else "FAILED"
        if worst is None:
            return f"per-layer parity: no quantized activations; {head} -> {verdict}"
        where = f"worst {worst.layer}" if worst.max_diff > 0 else "all exact"
        return (f"per-layer parity (QCDQ vs brevitas, same inputs per layer): {len(self.layers)} layers, "
                f"{100 * self.exact_fraction():.4f}% of integer codes exact, max {worst.max_diff:.0f} LSB ({where}), "
                f"max {self.max_pre_round_diff():.2g} LSB before rounding, {head} -> {verdict}")

    def failure(self) -> str | None:
        """One line naming the first failing layer (graph order: the likely root cause), or None."""
        failing = self.failing
        if not failing:
            return None
        first = failing[0]
        names = ", ".join(p.layer for p in failing[:5]) + (", ..." if len(failing) > 5 else "")
        hint = ""
        if self.saturated_biases:
            hint = (f"; int32 biases saturate in {', '.join(self.saturated_biases[:3])} (a tiny input activation "
                    f"scale, e.g. a dead ReLU; brevitas' exporter wraps positive ones to -2^31)")
        return (f"per-layer parity failed at layer '{first.layer}' (ONNX node {first.onnx_node}): {first.problem()}; "
                f"{len(failing)} of {len(self.layers) + 1} layers fail ({names}){hint}")


def _short(value: float) -> float:
    """`value` to 6 significant digits (manifest rows)."""
    return float(f"{value:.6g}")


def saturated_int32_biases(model: onnx.ModelProto) -> list[str]:
    """Conv nodes whose int32 bias (DequantizeLinear of an int32 constant) holds +-(2^31 - 1) or -2^31.

    brevitas saturates a bias whose bias / (input scale x weight scale) exceeds int32 and, computing
    in float32, exports +2^31 - 1 as float 2^31, cast to int32 as -2^31: the sign flips.
    """
    producers = g.producers(model)
    limit = np.iinfo(np.int32)
    found = []
    for node in model.graph.node:
        tensor = g.int32_bias(model, node, producers) if node.op_type in ("Conv", "ConvTranspose") else None
        if tensor is None:
            continue
        values = onnx.numpy_helper.to_array(tensor)
        if np.any((values <= limit.min + 1) | (values >= limit.max)):
            found.append(node.name or node.output[0])
    return found


def quant_points(model: onnx.ModelProto) -> list[QuantPoint]:
    """The activation QuantizeLinear nodes of `model` in graph order (quantizers of constants skipped)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    inits = g.initializers(model)
    producers = g.producers(model)
    readers = g.consumers(model)
    points = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        source = producers.get(node.input[0])
        if node.input[0] in inits or (source is not None and source.op_type == "Constant"):
            continue  # a quantized constant (weights), not an activation
        codes = node.output[0]
        after = readers.get(codes, [])
        if len(after) == 1 and after[0].op_type == "Clip":
            codes = after[0].output[0]  # sub-8-bit: the clipped codes are the quantized activation
        elem_type = types.get(codes) or types.get(node.output[0])
        if not elem_type:
            zero = inits.get(node.input[2]) if len(node.input) > 2 else None
            elem_type = zero.data_type if zero is not None else onnx.TensorProto.UINT8
        points.append(QuantPoint(node=node.name or codes, pre=node.input[0], codes=codes, elem_type=elem_type))
    return points


def cut_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[QuantPoint]]:
    """A copy of `model` cut at every activation quantization point.

    Each point's integer codes and float input become graph outputs (after the original outputs;
    graph inputs are not repeated), and every node that read the codes reads the graph input
    `<codes>::fed` instead, so each layer can be fed codes computed elsewhere. Returns the cut
    model and the points (graph order).
    """
    cut = g.copy(model)
    points = quant_points(cut)
    taken = {o.name for o in cut.graph.output} | {i.name for i in cut.graph.input}
    for point in points:
        for node in cut.graph.node:
            for i, name in enumerate(node.input):
                if name == point.codes:
                    node.input[i] = point.codes + FED_SUFFIX
        cut.graph.input.append(onnx.helper.make_tensor_value_info(point.codes + FED_SUFFIX, point.elem_type, None))
        for name, elem_type in ((point.codes, point.elem_type), (point.pre, onnx.TensorProto.FLOAT)):
            if name not in taken:
                cut.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
                taken.add(name)
    return cut, points


@dataclass
class Captured:
    """One activation quantizer call in brevitas: its integer codes and what it rounded.

    `grid(v)` maps a float tensor onto this quantizer's integer grid (v / scale + zero point),
    clamped to half an LSB outside the code range: values beyond it clip to the same code, so
    their differences do not matter.
    """

    layer: str  # the module owning the quantizer proxy ("encoders.0.act1" for "encoders.0.act1.act_quant")
    codes: np.ndarray  # int32, zero point included (as ONNX's codes)
    pre: np.ndarray  # the float value that was rounded (after the fused activation, e.g. ReLU)
    scale: np.ndarray
    zero_point: np.ndarray
    low: float  # lowest / highest code of the bit width
    high: float

    def grid(self, v: np.ndarray) -> np.ndarray:
        # float32 suffices: below 2^16 its ulp is <= 2^-8 LSB (3e-5 LSB for 8-bit codes), far below the tolerance
        return np.clip(v / self.scale + self.zero_point, self.low - 0.5, self.high + 0.5)


def brevitas_codes(model: nn.Module, x: torch.Tensor) -> tuple[list[Captured], np.ndarray]:
    """Every activation quantizer call of `model` on `x`, in execution order, and the model's float output."""
    from brevitas.proxy.runtime_quant import ActQuantProxyFromInjectorBase
    from brevitas.quant_tensor import QuantTensor

    records: list[Captured] = []
    hooks = []

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(module, args, out):  # type: ignore[no-untyped-def]
            # quantizer disabled (pass-through) or a metadata call on the scalar sentinel: no activation
            if not (module.is_quant_enabled and isinstance(out, QuantTensor) and out.value.dim() >= 2):
                return
            x = args[0].value if isinstance(args[0], QuantTensor) else args[0]
            pre = module.fused_activation_quant_proxy.activation_impl(x)
            bits, signed = int(out.bit_width.item()), bool(out.signed)
            low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
            # QuantTensor.int() without its validity re-check (which costs as much as the quantizer itself)
            codes = torch.round(out.value / out.scale + out.zero_point).to(torch.int32)
            records.append(Captured(layer=name, codes=codes.numpy(), pre=pre.numpy(), scale=out.scale.numpy(),
                                    zero_point=out.zero_point.numpy(), low=float(low), high=float(high)))
        return hook

    for name, module in model.named_modules():
        if isinstance(module, ActQuantProxyFromInjectorBase):
            hooks.append(module.register_forward_hook(record(name.rpartition(".")[0] or name)))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    out = out.value if isinstance(out, QuantTensor) else out
    return records, out.numpy()


def _to_onnx_dtype(codes: np.ndarray, elem_type: int) -> np.ndarray:
    return codes.astype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


class _Tally:
    """Accumulates one layer's comparison over several inputs."""

    def __init__(self) -> None:
        self.elements = 0
        self.exact = 0
        self.max_diff = 0.0
        self.max_pre: float | None = None

    def add(self, diff: np.ndarray, pre: np.ndarray | None = None) -> None:
        self.elements += int(diff.size)
        self.exact += int(np.count_nonzero(diff == 0))
        self.max_diff = max(self.max_diff, float(diff.max()) if diff.size else 0.0)
        if pre is not None:
            self.max_pre = max(self.max_pre or 0.0, float(pre.max()) if pre.size else 0.0)

    def result(self, layer: str, node: str, unit: str, tolerance: float) -> LayerParity:
        exact = self.exact / self.elements if self.elements else 1.0
        return LayerParity(layer=layer, onnx_node=node, unit=unit, elements=self.elements, exact_fraction=exact,
                           max_diff=self.max_diff, tolerance=tolerance, max_pre_round_diff=self.max_pre,
                           differing=self.elements - self.exact)


def code_difference(onnx_codes: np.ndarray, brevitas: np.ndarray) -> np.ndarray:
    """|onnx - brevitas| of two integer code tensors, in LSB (int64, no wrap-around)."""
    if onnx_codes.shape != brevitas.shape:
        raise ValueError(f"shape mismatch: {onnx_codes.shape} vs {brevitas.shape}")
    return np.abs(onnx_codes.astype(np.int64) - brevitas.astype(np.int64))


def layer_parity(qcdq: onnx.ModelProto, model: nn.Module, inputs: Sequence[torch.Tensor]) -> LayerParityReport:
    """Compare every quantized activation of `qcdq` with brevitas `model` (eval mode), layer by layer.

    `inputs`: image tiles (B, C, *S) for the graph's single input. Raises RuntimeError when the
    graph's activation quantizers cannot be paired with brevitas' (different count or shapes).
    """
    import onnxruntime as ort

    cut, points = cut_graph(qcdq)
    image = g.input_names(qcdq)
    if len(image) != 1:
        raise RuntimeError(f"per-layer parity needs a graph with one input, got {image}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(cut.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out_name = qcdq.graph.output[0].name
    fetch = list(dict.fromkeys([out_name, *(t for p in points for t in (p.codes, p.pre) if t != image[0])]))
    step = output_step(qcdq)
    tallies = [_Tally() for _ in points]
    head = _Tally()
    names: list[str] = []
    for x in inputs:
        records, reference = brevitas_codes(model, x)
        if len(records) != len(points):
            raise RuntimeError(f"cannot pair quantizers: the QCDQ graph has {len(points)} activation QuantizeLinear "
                               f"nodes, brevitas ran {len(records)} activation quantizers")
        names = [r.layer for r in records]
        feeds = {image[0]: x.numpy()}
        feeds.update({p.codes + FED_SUFFIX: _to_onnx_dtype(r.codes, p.elem_type) for p, r in zip(points, records)})
        try:
            got = dict(zip(fetch, session.run(fetch, feeds)))
        except Exception as exc:  # onnxruntime raises its own exception types (e.g. on a shape mismatch)
            raise RuntimeError(f"cannot pair quantizers: the cut QCDQ graph refused brevitas' codes ({exc})") from exc
        got[image[0]] = feeds[image[0]]
        for tally, point, rec in zip(tallies, points, records):
            codes, pre = got[point.codes], got[point.pre]
            if codes.shape != rec.codes.shape or pre.shape != rec.pre.shape:
                raise RuntimeError(f"cannot pair quantizers: {point.node} gives {codes.shape}, brevitas {rec.layer} "
                                   f"{rec.codes.shape}")
            tally.add(code_difference(codes, rec.codes), np.abs(rec.grid(pre) - rec.grid(rec.pre)))
        diff = np.abs(got[out_name].astype(np.float64) - reference.astype(np.float64))
        if step is not None:
            diff = diff / step.reshape((1, -1) + (1,) * (diff.ndim - 2)).astype(np.float64)
        head.add(diff)
    layers = [t.result(name, p.node, "LSB", LSB_TOLERANCE) for t, p, name in zip(tallies, points, names)]
    output = (head.result(OUTPUT_LAYER, out_name, "output steps", OUTPUT_STEP_TOLERANCE) if step is not None
              else head.result(OUTPUT_LAYER, out_name, "logits", FLOAT_OUTPUT_TOLERANCE))
    return LayerParityReport(layers=layers, output=output, inputs=len(inputs),
                             saturated_biases=saturated_int32_biases(qcdq))
