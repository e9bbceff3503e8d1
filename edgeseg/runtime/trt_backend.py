"""Native TensorRT backend: a cached engine, device buffers through cuda-python, no torch.

The engine comes from the bundle's engine cache (`edgeseg build-engine`) or is built on first
use by `trt_build.build_engine` for this batch size and tile (engines have one fixed input shape,
`trt_build.plan_profile`). A batch smaller than the engine's is padded with zeros (MC masks
with ones) and cropped; a larger one runs in engine-sized chunks.

Written strictly against the documented APIs (TensorRT 10.x and 11.x; type-checked against the
tensorrt-stubs .pyi files by tests/runtime/test_trt_typecheck.py):

- ICudaEngine.num_io_tensors, get_tensor_name(index), get_tensor_mode(name) -> TensorIOMode,
  get_tensor_dtype(name), create_execution_context():
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Engine.html
- IExecutionContext.set_input_shape(name, shape) -> bool, get_tensor_shape(name),
  set_tensor_address(name, memory: int) -> bool, execute_async_v3(stream_handle: int) -> bool
  ("Using default stream may lead to performance issues ... Please use non-default stream"):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/ExecutionContext.html
- cuda-python runtime bindings (`cuda.bindings.runtime`, formerly `cuda.cudart`): cudaMalloc,
  cudaFree, cudaMemcpy (synchronous, so pageable numpy memory is fine), cudaStreamCreate,
  cudaStreamSynchronize, cudaStreamDestroy; every call returns (cudaError_t, *results):
  https://nvidia.github.io/cuda-python/cuda-bindings/latest/module/runtime.html
  The calling pattern is the one of TensorRT's samples/python/common_runtime.py.

Nothing here has run against a real TensorRT (no GPU on the build machines): the unit tests
drive it with fake `tensorrt` and `cuda` modules, which check edgeseg's calls, not TensorRT.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Mapping, Sequence
from math import prod
from typing import Any

import numpy as np

from edgeseg.errors import UserError
from edgeseg.runtime.bundle import Bundle
from edgeseg.runtime.trt_build import (
    INSTALL_HINT,
    build_engine,
    load_engine,
    pick_trt_form,
    plan_profile,
    require_tensorrt,
)

FLOAT32_BYTES = 4


def require_cudart() -> Any:
    """cuda-python's runtime module, or one UserError line saying what to install."""
    for module in ("cuda.bindings.runtime", "cuda.cudart"):  # cuda-python >= 12.6, older layout
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise UserError(f"the TensorRT backend needs cuda-python for GPU buffers (pip install cuda-python). {INSTALL_HINT}")


def _ok(result: Any, call: str) -> Any:
    """Unpack a cuda-python (err, *values) tuple; a non-zero error is a RuntimeError naming the call."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"{call} failed: CUDA error {err}")
    return values[0] if len(values) == 1 else tuple(values)


class TensorRTBackend:
    """One TensorRT engine with fixed input shapes, its execution context, buffers and stream."""

    name = "tensorrt"

    def __init__(self, engine: Any, *, form: str, input_name: str, output_name: str,
                 shapes: Mapping[str, tuple[int, ...]], description: str, trt: Any, cudart: Any):
        self.form = form
        self.description = description
        self.input_name = input_name
        self.output_name = output_name
        self._cudart = cudart
        self._device: dict[str, int] = {}
        self._stream: Any = None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if sorted(inputs) != sorted(shapes) or output_name not in names:
            raise UserError(f"the TensorRT engine's tensors {names} do not match the bundle's inputs "
                            f"{sorted(shapes)} and output '{output_name}'; rebuild it with `edgeseg build-engine --force`")
        for n in names:
            if engine.get_tensor_dtype(n) != trt.DataType.FLOAT:
                raise UserError(f"TensorRT engine tensor '{n}' is {engine.get_tensor_dtype(n)}, expected float32")
        self.batch = int(shapes[input_name][0])
        self.shapes = {n: tuple(int(v) for v in s) for n, s in shapes.items()}
        self._context = engine.create_execution_context()
        for n, shape in self.shapes.items():
            if not self._context.set_input_shape(n, shape):
                raise UserError(f"TensorRT refused input shape {list(shape)} for '{n}'; rebuild the engine")
        self.output_shape = tuple(int(v) for v in self._context.get_tensor_shape(output_name))
        try:
            for n, shape in [*self.shapes.items(), (output_name, self.output_shape)]:
                self._device[n] = int(_ok(cudart.cudaMalloc(prod(shape) * FLOAT32_BYTES), "cudaMalloc"))
                if not self._context.set_tensor_address(n, self._device[n]):
                    raise RuntimeError(f"set_tensor_address failed for '{n}'")
            self._stream = _ok(cudart.cudaStreamCreate(), "cudaStreamCreate")
        except BaseException:
            self.close()
            raise

    def run(self, image: np.ndarray, masks: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Shape: image (B, C, *T) -> (B, K, *T); masks (B, C_site, 1, ...) per MC input."""
        if self._stream is None:
            raise RuntimeError("the TensorRT backend was closed")
        outputs = []
        for start in range(0, image.shape[0], self.batch):
            chunk = {self.input_name: image[start:start + self.batch]}
            chunk.update({k: v[start:start + self.batch] for k, v in (masks or {}).items()})
            count = len(chunk[self.input_name])
            outputs.append(self._run_full(chunk)[:count])
        return np.concatenate(outputs, axis=0)

    def _run_full(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        cudart = self._cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if set(feeds) != set(self.shapes):
            raise ValueError(f"feeds {sorted(feeds)} do not match the engine inputs {sorted(self.shapes)}")
        for n, array in feeds.items():
            shape = self.shapes[n]
            if array.shape[1:] != shape[1:]:
                raise UserError(f"input '{n}' of shape {list(array.shape)} does not fit the TensorRT engine built for "
                                f"{list(shape)}; use the engine's tile and batch size or rebuild it")
            if len(array) == shape[0]:
                full = np.ascontiguousarray(array, dtype=np.float32)
            else:  # pad a short last batch: zero images, all-ones (no-dropout) masks
                full = np.ones(shape, np.float32) if n != self.input_name else np.zeros(shape, np.float32)
                full[:len(array)] = array
            _ok(cudart.cudaMemcpy(self._device[n], full.ctypes.data, full.nbytes, h2d), "cudaMemcpy")
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        _ok(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        out = np.empty(self.output_shape, np.float32)
        _ok(cudart.cudaMemcpy(out.ctypes.data, self._device[self.output_name], out.nbytes, d2h), "cudaMemcpy")
        return out

    def close(self) -> None:
        """Free the device buffers and the stream (idempotent)."""
        for ptr in self._device.values():
            self._cudart.cudaFree(ptr)
        self._device = {}
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown cuda-python may already be gone
            self.close()


def open_tensorrt(bundle: Bundle, *, mc: bool = False, batch_size: int = 1,
                  tile: Sequence[int] | None = None) -> TensorRTBackend:
    """TensorRT on the bundle's TensorRT form; builds (and caches) the engine on first use."""
    trt = require_tensorrt()
    cudart = require_cudart()
    manifest = bundle.manifest
    tile = list(manifest.tile_size if tile is None else tile)
    form = pick_trt_form(manifest, None, mc)
    profile = plan_profile(manifest, form, batch_size, tile)
    built = build_engine(bundle.path, form=form, mc=mc, batch=batch_size, tile=tile)
    try:
        engine = load_engine(built.path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # the engine's .json build record is damaged
        record = built.path.with_name(built.path.name + ".json")
        raise UserError(f"{record}: unreadable engine record ({type(exc).__name__}: {exc}); rebuild with "
                        "`edgeseg build-engine --force`") from None
    state = "cached engine" if built.cached else "engine built now"
    description = (f"tensorrt {built.trt_version}: form '{form}' ({manifest.form(form).precision}) on {built.gpu.name}, "
                   f"{state} {built.path.name}")
    return TensorRTBackend(engine, form=form, input_name=manifest.input_name, output_name=manifest.output_name,
                           shapes={n: s[0] for n, s in profile.items()}, description=description, trt=trt,
                           cudart=cudart)
