"""The device runtime: torch-free (numpy, scipy, nibabel, onnxruntime; TensorRT where present).

Public names are imported lazily on first access, so `import edgeseg.runtime` loads nothing heavy
(not even onnxruntime):

- `segment_files(bundle, inputs, out_dir, ...)`, `segment_volume(volume, manifest, backend, ...)`
  (`edgeseg.runtime.pipeline`);
- `open_backend(bundle, "auto" | "onnxruntime" | "tensorrt", ...)` (`edgeseg.runtime.backends`);
- `load_bundle(path)`, `read_manifest(path)` (`edgeseg.runtime.bundle`);
- `evaluate_bundle(bundle, data, split, ...)` (`edgeseg.runtime.evaluate_bundle`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "segment_files": "edgeseg.runtime.pipeline",
    "segment_volume": "edgeseg.runtime.pipeline",
    "Segmentation": "edgeseg.runtime.pipeline",
    "open_backend": "edgeseg.runtime.backends",
    "load_bundle": "edgeseg.runtime.bundle",
    "read_manifest": "edgeseg.runtime.bundle",
    "evaluate_bundle": "edgeseg.runtime.evaluate_bundle",
}

__all__ = ["Segmentation", "evaluate_bundle", "load_bundle", "open_backend", "read_manifest", "segment_files",
           "segment_volume"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgeseg.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
