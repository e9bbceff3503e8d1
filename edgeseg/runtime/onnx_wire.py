"""Just enough of the protobuf wire format to load a bundle's ONNX models without the `onnx` package.

Why hand-written: the device install is numpy + onnxruntime (no `onnx`, no `protobuf`), yet a
bundle stores its models compactly (see docs/bundle.md):

- initializers live once in a shared `weights.bin` (ONNX external data), so the forms of one
  model (CPU int8, TensorRT, MC dropout) do not each carry a copy of the weights;
- weights of 4 bits or fewer are ONNX INT4 tensors (two values per byte), which needs opset 21
  and IR version 10 at rest.

`inline_model` turns such a file into one self-contained ModelProto byte string: external data
read in, INT4 tensors expanded to INT8 (the kernels that exist run int8: onnxruntime's
QLinearConv, TensorRT's int8 convolution), and the opset/IR version restored to what the graph
was exported and checked at. Every other byte is copied through unchanged.

Only the fields involved are decoded (field numbers from onnx/onnx.proto):
ModelProto: ir_version = 1, graph = 7, opset_import = 8;
GraphProto: initializer = 5; OperatorSetIdProto: domain = 1, version = 2;
TensorProto: dims = 1, data_type = 2, name = 8, raw_data = 9, external_data = 13,
data_location = 14; StringStringEntryProto: key = 1, value = 2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from math import prod

import numpy as np

# TensorProto.DataType values (onnx.proto)
INT8 = 3
INT4 = 22
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a ModelProto this reader understands."""


def _read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative int32/int64 values use their 64-bit two's complement."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return encode_varint((field << 3) | wire_type)


def encode_len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + encode_varint(len(payload)) + payload


def encode_varint_field(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + encode_varint(value)


def iter_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview, memoryview]]:
    """Yield (field number, wire type, value, raw bytes of the whole field) for each top-level field.

    value is an int for varint/fixed fields and a memoryview of the payload for length-delimited ones.
    """
    view = memoryview(buf)
    pos = 0
    end = len(view)
    while pos < end:
        start = pos
        key, pos = _read_varint(view, pos)
        field, wire_type = key >> 3, key & 7
        value: int | memoryview
        if wire_type == _VARINT:
            value, pos = _read_varint(view, pos)
        elif wire_type == _I64:
            value = int.from_bytes(view[pos:pos + 8], "little")
            pos += 8
        elif wire_type == _I32:
            value = int.from_bytes(view[pos:pos + 4], "little")
            pos += 4
        elif wire_type == _LEN:
            length, pos = _read_varint(view, pos)
            value = view[pos:pos + length]
            pos += length
        else:
            raise WireError(f"unsupported wire type {wire_type} (field {field})")
        if pos > end:
            raise WireError("truncated field")
        yield field, wire_type, value, view[start:pos]


def _packed_varints(payload: memoryview) -> list[int]:
    values = []
    pos = 0
    while pos < len(payload):
        v, pos = _read_varint(payload, pos)
        values.append(v - (1 << 64) if v >= 1 << 63 else v)
    return values


def unpack_int4(data: bytes, count: int) -> np.ndarray:
    """ONNX INT4 storage -> int8 values. Shape: (count,).

    Two values per byte, the first in the low nibble (ONNX IR spec, "4 bit integer types");
    a nibble n >= 8 stands for n - 16.
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != (count + 1) // 2:
        raise WireError(f"INT4 tensor of {count} values needs {(count + 1) // 2} bytes, has {raw.size}")
    nibbles = np.empty(raw.size * 2, dtype=np.int16)
    nibbles[0::2] = raw & 0x0F
    nibbles[1::2] = raw >> 4
    nibbles = nibbles[:count]
    return np.where(nibbles >= 8, nibbles - 16, nibbles).astype(np.int8)


def pack_int4(values: np.ndarray) -> bytes:
    """int values in [-8, 7] -> ONNX INT4 storage (inverse of `unpack_int4`). Shape: any; flattened in C order."""
    flat = np.asarray(values).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("INT4 values must lie in [-8, 7]")
    nibbles = (flat & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


ExternalReader = Callable[[str, int, int | None], bytes]


def _rewrite_tensor(payload: memoryview, read_external: ExternalReader, expand_int4: bool) -> bytes:
    """One TensorProto with its data inline (and INT4 expanded to INT8 when asked)."""
    dims: list[int] = []
    data_type = 0
    raw: bytes | None = None
    external: dict[str, str] = {}
    location = 0
    others: list[bytes] = []
    for field, wire_type, value, whole in iter_fields(payload):
        if field == 1:
            if wire_type == _LEN:
                assert isinstance(value, memoryview)
                dims.extend(_packed_varints(value))
            else:
                assert isinstance(value, int)
                dims.append(value - (1 << 64) if value >= 1 << 63 else value)
        elif field == 2 and wire_type == _VARINT:
            assert isinstance(value, int)
            data_type = value
        elif field == 9 and wire_type == _LEN:
            raw = bytes(value)
        elif field == 13 and wire_type == _LEN:
            entry = {f: bytes(v).decode("utf-8") for f, _, v, _ in iter_fields(value)}  # type: ignore[arg-type]
            external[entry.get(1, "")] = entry.get(2, "")
        elif field == 14 and wire_type == _VARINT:
            assert isinstance(value, int)
            location = value
        else:
            others.append(bytes(whole))
    if location == EXTERNAL:
        try:
            offset = int(external.get("offset", "0"))
            length = int(external["length"]) if "length" in external else None
            raw = read_external(external["location"], offset, length)
        except (KeyError, ValueError) as exc:
            raise WireError(f"bad external data reference {external}: {exc}") from None
    if expand_int4 and data_type == INT4:
        if raw is None:
            raise WireError("INT4 tensor without raw_data")
        raw = unpack_int4(raw, prod(dims)).tobytes()
        data_type = INT8
    out = bytearray()
    if dims:
        out += encode_len_field(1, b"".join(encode_varint(d) for d in dims))
    out += encode_varint_field(2, data_type)
    out += b"".join(others)
    if raw is not None:
        out += encode_len_field(9, raw)
    return bytes(out)


def _rewrite_graph(payload: memoryview, read_external: ExternalReader, expand_int4: bool) -> bytes:
    out = bytearray()
    for field, wire_type, value, whole in iter_fields(payload):
        if field == 5 and wire_type == _LEN:
            assert isinstance(value, memoryview)
            out += encode_len_field(5, _rewrite_tensor(value, read_external, expand_int4))
        else:
            out += whole
    return bytes(out)


def _rewrite_opset(payload: memoryview, opset: int) -> bytes:
    fields = list(iter_fields(payload))
    domain = next((bytes(v).decode() for f, _, v, _ in fields if f == 1), "")
    if domain not in ("", "ai.onnx"):
        return bytes(payload)
    kept = b"".join(bytes(whole) for f, _, _, whole in fields if f != 2)
    return kept + encode_varint_field(2, opset)


def inline_model(model: bytes, read_external: ExternalReader, *, expand_int4: bool = True,
                 opset: int | None = None, ir_version: int | None = None) -> bytes:
    """A self-contained copy of serialized ModelProto `model`.

    read_external(location, offset, length) returns the bytes an external-data reference points
    at (length None = to the end of the file). With `expand_int4`, INT4 initializers become INT8;
    `opset` replaces the default-domain opset version and `ir_version` the IR version (both
    restore what a packed model was checked at; see module docstring).
    """
    out = bytearray()
    for field, wire_type, value, whole in iter_fields(model):
        if field == 1 and wire_type == _VARINT and ir_version is not None:
            out += encode_varint_field(1, ir_version)
        elif field == 7 and wire_type == _LEN:
            assert isinstance(value, memoryview)
            out += encode_len_field(7, _rewrite_graph(value, read_external, expand_int4))
        elif field == 8 and wire_type == _LEN and opset is not None:
            assert isinstance(value, memoryview)
            out += encode_len_field(8, _rewrite_opset(value, opset))
        else:
            out += whole
    return bytes(out)


def external_locations(model: bytes) -> set[str]:
    """The external-data file names a serialized ModelProto's initializers refer to."""
    found: set[str] = set()
    for field, _, graph, _ in iter_fields(model):
        if field != 7:
            continue
        for gfield, _, tensor, _ in iter_fields(graph):  # type: ignore[arg-type]
            if gfield != 5:
                continue
            for tfield, _, entry, _ in iter_fields(tensor):  # type: ignore[arg-type]
                if tfield == 13:
                    kv = {f: bytes(v).decode("utf-8") for f, _, v, _ in iter_fields(entry)}  # type: ignore[arg-type]
                    if kv.get(1) == "location":
                        found.add(kv.get(2, ""))
    return found
