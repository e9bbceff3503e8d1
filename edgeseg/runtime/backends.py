"""Inference backends behind one small interface: ONNX Runtime and native TensorRT.

A backend runs one model form of a bundle on a batch of tiles and returns the raw model output
(logits or probabilities, as the manifest says); tiling, softmax, TTA and MC sampling live in
`pipeline`. `open_backend(bundle, "auto" | "onnxruntime" | "tensorrt")` picks the form and the
engine and says in one line what it picked (`Backend.description`).

- ONNX Runtime: the form for "onnxruntime" (the CPU int8 form of a quantized bundle, else the
  float form); execution providers TensorRT -> CUDA -> CPU, each only where this onnxruntime
  build has it (ONNX Runtime itself falls back to the next provider when one cannot start).
- TensorRT: `edgeseg.runtime.trt_backend` (imported only when asked for or when "auto" finds
  TensorRT and a GPU); the engine comes from the bundle's engine cache or is built on first use.

"auto" picks TensorRT when the `tensorrt` and `cuda` (cuda-python) packages import and a GPU is
found, else ONNX Runtime. Nothing here imports torch; onnxruntime is imported on first use.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgeseg.errors import UserError, unknown_name
from edgeseg.runtime.bundle import Bundle

BACKEND_CHOICES = ("auto", "onnxruntime", "tensorrt")
ORT_PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class Backend(Protocol):
    """Runs one bundle form. Shape: image (B, C_in, *T) float32 -> output (B, K, *T) float32."""

    name: str  # "onnxruntime" or "tensorrt"
    form: str  # the bundle form it runs
    description: str  # one line for the user: backend, form, precision, device

    def run(self, image: np.ndarray, masks: Mapping[str, np.ndarray] | None = None) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass
class OrtBackend:
    """A bundle form in an onnxruntime InferenceSession (any batch size)."""

    session: Any
    form: str
    input_name: str
    output_name: str
    description: str
    name: str = "onnxruntime"

    def run(self, image: np.ndarray, masks: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        feeds = {self.input_name: np.ascontiguousarray(image, dtype=np.float32)}
        for key, value in (masks or {}).items():
            feeds[key] = np.ascontiguousarray(value, dtype=np.float32)
        return np.asarray(self.session.run([self.output_name], feeds)[0], dtype=np.float32)

    def close(self) -> None:
        self.session = None


def ort_providers(available: Sequence[str] | None = None) -> list[str]:
    """The execution providers to ask for, best first, among those this onnxruntime build has."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    chosen = [p for p in ORT_PROVIDER_PREFERENCE if p in available]
    return chosen or ["CPUExecutionProvider"]


def open_ort(bundle: Bundle, *, mc: bool = False, threads: int | None = None,
             providers: Sequence[str] | None = None) -> OrtBackend:
    """ONNX Runtime on the bundle's form for "onnxruntime" (with MC mask inputs when `mc`)."""
    import onnxruntime as ort

    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    manifest = bundle.manifest
    form = manifest.pick_form("onnxruntime", mc=mc)
    session = bundle.ort_session(form, threads=threads, providers=list(providers or ort_providers()))
    used = ", ".join(session.get_providers())
    precision = manifest.form(form).precision
    thread_text = f", {threads} thread(s)" if threads else ""
    description = f"onnxruntime {ort.__version__}: form '{form}' ({precision}) on {used}{thread_text}"
    return OrtBackend(session=session, form=form, input_name=manifest.input_name, output_name=manifest.output_name,
                      description=description)


def tensorrt_available() -> str | None:
    """None when TensorRT can run here (tensorrt + cuda-python import, a GPU is found), else the reason."""
    for module, what in (("tensorrt", "the tensorrt package"), ("cuda", "cuda-python")):
        if importlib.util.find_spec(module) is None:
            return f"{what} is not installed"
    from edgeseg.runtime.trt_build import detect_gpu, require_tensorrt

    try:
        require_tensorrt()
        detect_gpu()
    except UserError as exc:
        return str(exc)
    return None


def open_backend(bundle: Bundle, name: str = "auto", *, mc: bool = False, threads: int | None = None,
                 batch_size: int = 1, tile: Sequence[int] | None = None) -> Backend:
    """The backend `name` ("auto", "onnxruntime", "tensorrt") on the right form of `bundle`.

    `batch_size` and `tile` fix the TensorRT engine's input shape (ONNX Runtime takes any);
    `threads` sets ONNX Runtime's intra-op threads. A missing TensorRT is one UserError line
    naming what to install when "tensorrt" is asked for; "auto" then uses ONNX Runtime.
    """
    if name not in BACKEND_CHOICES:
        raise unknown_name("backend", name, BACKEND_CHOICES)
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    tile = list(bundle.manifest.tile_size if tile is None else tile)
    if name == "onnxruntime":
        return open_ort(bundle, mc=mc, threads=threads)
    if name == "tensorrt":
        from edgeseg.runtime.trt_backend import open_tensorrt

        return open_tensorrt(bundle, mc=mc, batch_size=batch_size, tile=tile)
    reason = tensorrt_available()
    if reason is None and not _has_form(bundle, "tensorrt", mc):
        reason = "the bundle has no TensorRT form"
    if reason is None:
        from edgeseg.runtime.trt_backend import open_tensorrt

        return open_tensorrt(bundle, mc=mc, batch_size=batch_size, tile=tile)
    backend = open_ort(bundle, mc=mc, threads=threads)
    backend.description += f" (auto: TensorRT not used: {reason.split('. ')[0]})"
    return backend


def _has_form(bundle: Bundle, backend: str, mc: bool) -> bool:
    try:
        bundle.manifest.pick_form(backend, mc=mc)
    except UserError:
        return False
    return True
