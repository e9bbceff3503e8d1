"""Compact storage of the exported weights: INT4 packing and one shared external-data file.

- `pack_int4_weights`: every int8 weight that feeds a DequantizeLinear and whose values fit in
  [-8, 7] (4-bit and narrower weights: brevitas stores 4-bit narrow weights as int8 in [-7, 7])
  becomes an ONNX INT4 initializer, two values per byte. Lossless. INT4 needs opset 21 / IR 10,
  so the model is bumped to those at rest; `edgeseg.runtime.onnx_wire` restores the exported
  opset/IR and INT8 weights at load (no int4 convolution kernel exists in onnxruntime or TensorRT).
- `externalize`: the initializers of all forms go into one `weights.bin` (ONNX external data),
  deduplicated by content, so the CPU, TensorRT and MC-dropout forms share one copy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from edgeseg.export import graph as g
from edgeseg.runtime.onnx_wire import pack_int4

INT4_OPSET = 21
INT4_IR_VERSION = 10
WEIGHTS_FILE = "weights.bin"
EXTERNAL_THRESHOLD = 64  # bytes: smaller tensors (scalars, zero points) stay inline
ALIGNMENT = 16


@dataclass(frozen=True)
class PackResult:
    packed: int  # how many weight tensors became INT4
    opset: int  # the opset/IR the graph had before packing (restored at load)
    ir_version: int


def _int4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = onnx.TensorProto.INT4
    tensor.dims.extend(values.shape)
    tensor.raw_data = pack_int4(values)
    return tensor


def pack_int4_weights(model: onnx.ModelProto) -> PackResult:
    """Turn fitting int8 DequantizeLinear weights (and their zero points) into INT4, in place."""
    before = PackResult(packed=0, opset=g.opset(model), ir_version=model.ir_version)
    inits = g.initializers(model)
    packed: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        tensor = inits[node.input[0]]
        if tensor.data_type != onnx.TensorProto.INT8 or len(tensor.dims) < 2:
            continue  # weights only (conv kernels have >= 3 dims; scalars/biases are not packed)
        values = numpy_helper.to_array(tensor)
        if values.size == 0 or values.min() < -8 or values.max() > 7:
            continue
        packed[node.input[0]] = values
        if len(node.input) > 2 and node.input[2]:
            zero = g.array(model, node.input[2])
            if zero is None or np.any(zero != 0):
                raise ValueError(f"weight zero point of {node.name or node.input[0]} is not a zero initializer")
            # A dedicated INT4 zero point: DequantizeLinear needs x and x_zero_point of one type,
            # and brevitas shares zero-point tensors between layers that may stay int8.
            zp_name = f"{node.input[0]}::zero_point_int4"
            if zp_name not in packed:
                packed[zp_name] = zero.astype(np.int8)
            node.input[2] = zp_name
    if not packed:
        return before
    g.remove_initializers(model, [n for n in packed if n in inits])
    model.graph.initializer.extend(_int4_tensor(name, values) for name, values in packed.items())
    g.prune_unused_initializers(model)
    g.set_opset(model, max(INT4_OPSET, before.opset))
    model.ir_version = max(INT4_IR_VERSION, model.ir_version)
    return PackResult(packed=sum(not n.endswith("::zero_point_int4") for n in packed), opset=before.opset,
                      ir_version=before.ir_version)


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's data as raw little-endian bytes (normalising typed fields like float_data)."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        raise ValueError(f"INT4 tensor {tensor.name} without raw_data")
    normalised = numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name)
    return normalised.raw_data


def externalize(models: dict[str, onnx.ModelProto], location: str = WEIGHTS_FILE,
                threshold: int = EXTERNAL_THRESHOLD) -> bytes:
    """Move every initializer of >= `threshold` bytes of every model into one shared blob, in place.

    Identical tensors (same type, shape and bytes) are stored once. Returns the blob to be
    written as `location` next to the model files.
    """
    blob = bytearray()
    offsets: dict[str, tuple[int, int]] = {}
    for model in models.values():
        for tensor in model.graph.initializer:
            data = _raw_bytes(tensor)
            if len(data) < threshold:
                continue
            key = hashlib.sha256(f"{tensor.data_type}:{list(tensor.dims)}:".encode() + data).hexdigest()
            if key not in offsets:
                blob += b"\0" * (-len(blob) % ALIGNMENT)
                offsets[key] = (len(blob), len(data))
                blob += data
            offset, length = offsets[key]
            for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(name)
            tensor.raw_data = data  # set_external_data insists on raw_data being present
            external_data_helper.set_external_data(tensor, location, offset=offset, length=length)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
    return bytes(blob)


def weight_bit_widths(qcdq: onnx.ModelProto) -> dict[str, int]:
    """Nominal bit width of each quantized weight tensor of a brevitas QCDQ graph.

    brevitas emits weights as int const -> Clip(lo, hi) -> DequantizeLinear (the Clip only below
    8 bits): the width is ceil(log2(hi - lo + 1)) (4-bit narrow: [-7, 7] -> 4); without a Clip
    the container width (8).
    """
    inits = g.initializers(qcdq)
    producers = g.producers(qcdq)
    widths: dict[str, int] = {}
    for node in qcdq.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = node.input[0]
        clip = producers.get(source)
        if clip is not None and clip.op_type == "Clip" and clip.input[0] in inits:
            lo, hi = (g.array(qcdq, clip.input[i]) for i in (1, 2))
            if lo is not None and hi is not None:
                widths[clip.input[0]] = int(np.ceil(np.log2(float(hi) - float(lo) + 1)))
        elif source in inits and inits[source].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) \
                and len(inits[source].dims) >= 2:
            widths[source] = 8
    return widths
