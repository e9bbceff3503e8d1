"""Build a TensorRT engine from a bundle, on the device that will run it (`edgeseg build-engine`).

Engines are specific to the GPU, the TensorRT version and the input shapes ("Serialized engines
are not portable across platforms or TensorRT versions"; deployment-facts.md section 3.4), so a
bundle ships ONNX and each device builds (and caches) its own engine. Importable without
TensorRT: `tensorrt` is imported inside the functions that need it, and a missing TensorRT or
GPU is one UserError line naming what to install and where engines are built.

Written strictly against the documented TensorRT Python API, which works unchanged on 10.x
(JetPack 6: 10.3) and 11.x:

- Builder, create_network, NetworkDefinitionCreationFlag.STRONGLY_TYPED:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Builder.html
  (TensorRT 10: "to enable strongly typed mode, pass 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
  to create_network()"; TensorRT 11.0 Builder page: STRONGLY_TYPED "[DEPRECATED] ... Strongly typed mode
  is always enabled. This flag is retained for API compatibility but is ignored").
  Strong typing + explicit Q/DQ is the quantization path both versions document; no INT8/FP16
  builder flags are used (TensorRT 11 removed them; a strongly typed 10.x build refuses them).
- OnnxParser(network, logger).parse(model) -> bool, num_errors, get_error(i).desc():
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/parsers/Onnx/pyOnnx.html
  (the model bytes are self-contained, so no `path` for external weights is needed).
- IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes), add_optimization_profile:
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/BuilderConfig.html
- Builder.create_optimization_profile(), IOptimizationProfile.set_shape(input, min, opt, max):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/OptimizationProfile.html
- Builder.build_serialized_network(network, config) -> IHostMemory (None on failure):
  Builder.html above.
- Runtime(logger).deserialize_cuda_engine(buffer) -> ICudaEngine (None on failure):
  https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Runtime.html

Type-checked with mypy against the tensorrt-stubs .pyi files (see docs/bundle.md). Nothing in
this module has run against a real TensorRT: the unit tests drive its control flow with a fake
`tensorrt` module, and the real-TensorRT test is skipped wherever TensorRT or a GPU is absent.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgeseg import __version__
from edgeseg.atomic import write_bytes, write_json
from edgeseg.errors import UserError
from edgeseg.runtime.bundle import Manifest, is_archive, load_bundle, sha256_hex

INSTALL_HINT = ("TensorRT engines are built on the target device: on a Jetson install JetPack 6 (TensorRT 10.3), "
                "on a desktop NVIDIA GPU run pip install 'edgeseg[trt]'; then run `edgeseg build-engine BUNDLE` there")
DEFAULT_WORKSPACE_MIB = 1024
ENGINE_SUFFIX = ".engine"

Shape = tuple[int, ...]


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"

    @property
    def slug(self) -> str:
        name = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "gpu"
        return f"{name}-sm{self.compute_capability.replace('.', '')}"


@dataclass(frozen=True)
class BuiltEngine:
    path: Path
    cached: bool  # True when an up-to-date engine was already there
    form: str
    trt_version: str
    gpu: GpuInfo


def require_tensorrt() -> Any:
    """The `tensorrt` module, or one UserError line saying what to install and where engines are built."""
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:  # OSError: wheel present but libnvinfer missing
        raise UserError(f"TensorRT is not available ({type(exc).__name__}: {exc}). {INSTALL_HINT}") from None
    if not hasattr(trt, "Builder"):  # e.g. a stub-only `tensorrt` namespace package
        raise UserError(f"the installed 'tensorrt' package is not the TensorRT runtime. {INSTALL_HINT}")
    return trt


def detect_gpu() -> GpuInfo:
    """Name and compute capability of GPU 0 (cuda-python, else nvidia-smi, else the Jetson device tree)."""
    for probe in (_gpu_from_cuda_python, _gpu_from_nvidia_smi, _gpu_from_jetson):
        info = probe()
        if info is not None:
            return info
    raise UserError(f"no NVIDIA GPU found. {INSTALL_HINT}")


def _gpu_from_cuda_python() -> GpuInfo | None:
    for module in ("cuda.bindings.runtime", "cuda.cudart"):  # cuda-python >= 12.6, older layout
        try:
            cudart: Any = importlib.import_module(module)
        except ImportError:
            continue
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            return None
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) != 0:
            return None
        name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
        return GpuInfo(name=name, compute_capability=f"{props.major}.{props.minor}")
    return None


def _gpu_from_nvidia_smi() -> GpuInfo | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    if "," not in first:
        return None
    name, cc = (part.strip() for part in first.split(",", 1))
    return GpuInfo(name=name, compute_capability=cc) if re.fullmatch(r"\d+\.\d+", cc) else None


_JETSON_CC = {"orin": "8.7", "xavier": "7.2", "nano": "5.3", "tx2": "6.2"}


def _gpu_from_jetson() -> GpuInfo | None:
    model = Path("/proc/device-tree/model")
    try:
        text = model.read_text(errors="replace").strip("\0 \n")
    except OSError:
        return None
    if "jetson" not in text.lower():
        return None
    cc = next((v for k, v in _JETSON_CC.items() if k in text.lower()), "0.0")
    return GpuInfo(name=text, compute_capability=cc)


# ------------------------------------------------------------------------------------- planning (no TensorRT)


def pick_trt_form(manifest: Manifest, form: str | None = None, mc: bool = False) -> str:
    """The form an engine is built from: `form` if given, else the bundle's TensorRT form (or its float one)."""
    if form is not None:
        manifest.form(form)
        return form
    return manifest.pick_form("tensorrt", mc=mc)


def plan_profile(manifest: Manifest, form: str, batch: int, tile: list[int]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """min/opt/max shapes per input: one fixed tile and batch (simplest and usually fastest for tiling)."""
    if batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    if len(tile) != manifest.spatial_dims:
        raise UserError(f"tile {tile} needs {manifest.spatial_dims} values")
    bad = [t for t in tile if t < 1 or t % manifest.min_input_multiple]
    if bad:
        raise UserError(f"tile {tile} must be positive multiples of {manifest.min_input_multiple} (the model's "
                        f"min_input_multiple)")
    image: Shape = (batch, manifest.in_channels, *tile)
    shapes = {manifest.input_name: image, **manifest.extra_input_shapes(batch)}
    if manifest.form(form).mc:
        shapes.update(manifest.mc_mask_shapes(batch))
    return {name: (shape, shape, shape) for name, shape in shapes.items()}


def engine_dir(bundle_path: Path) -> Path:
    """Default engine cache: BUNDLE/engines for a directory bundle, BUNDLE.engines/ beside an archive."""
    bundle_path = Path(bundle_path)
    if is_archive(bundle_path):
        return bundle_path.with_name(bundle_path.stem + ".engines")
    return bundle_path / "engines"


def engine_file_name(form: str, onnx_sha256: str, batch: int, tile: list[int], trt_version: str, gpu: GpuInfo) -> str:
    """Cache key as a file name: what the engine was built from, for which shapes, TensorRT and GPU."""
    tile_text = "x".join(str(t) for t in tile)
    return f"{form}-{onnx_sha256[:12]}-b{batch}-{tile_text}-trt{trt_version}-{gpu.slug}{ENGINE_SUFFIX}"


# ------------------------------------------------------------------------------------- building


def _serialize_network(onnx_bytes: bytes, profile: dict[str, tuple[Shape, Shape, Shape]], workspace_bytes: int) -> bytes:
    """ONNX bytes -> serialized engine (TensorRT Python API only; see the module docstring for the doc pages)."""
    import tensorrt as trt  # type: ignore[import-not-found, unused-ignore]

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT 10.x; accepted and ignored by 11.x (always strongly typed)
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        raise UserError(f"TensorRT's ONNX parser rejected the model: {errors[0] if errors else 'no detail'}"
                        + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    shapes = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        shapes.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError("TensorRT could not build an engine for this model (see the TensorRT log above)")
    return bytes(memoryview(serialized))


def build_engine(bundle_path: Path, *, form: str | None = None, mc: bool = False, batch: int | None = None,
                 tile: list[int] | None = None, out_dir: Path | None = None,
                 workspace_mib: int = DEFAULT_WORKSPACE_MIB, force: bool = False) -> BuiltEngine:
    """Build (or reuse from the cache) the engine for one bundle form on this machine's GPU."""
    trt = require_tensorrt()
    gpu = detect_gpu()
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    form_name = pick_trt_form(manifest, form, mc)
    batch = manifest.batch if batch is None else batch
    tile = list(manifest.tile_size if tile is None else tile)
    profile = plan_profile(manifest, form_name, batch, tile)
    onnx_bytes = bundle.model_bytes(form_name)
    digest = sha256_hex(onnx_bytes)
    version = str(trt.__version__)
    directory = Path(out_dir) if out_dir is not None else engine_dir(Path(bundle_path))
    path = directory / engine_file_name(form_name, digest, batch, tile, version, gpu)
    if path.is_file() and not force:
        return BuiltEngine(path=path, cached=True, form=form_name, trt_version=version, gpu=gpu)
    started = time.time()
    engine = _serialize_network(onnx_bytes, profile, workspace_mib * 2**20)
    write_bytes(path, engine)
    write_json(path.with_name(path.name + ".json"), {
        "form": form_name, "onnx_sha256": digest, "bundle": str(bundle_path), "batch": batch, "tile": tile,
        "profile": {k: [list(s) for s in v] for k, v in profile.items()}, "tensorrt": version,
        "gpu": asdict(gpu), "strongly_typed": True, "build_seconds": round(time.time() - started, 1),
        "edgeseg_version": __version__,
    })
    return BuiltEngine(path=path, cached=False, form=form_name, trt_version=version, gpu=gpu)


def load_engine(path: Path) -> Any:
    """Deserialize an engine built by `build_engine`, refusing one built for another TensorRT or GPU."""
    trt = require_tensorrt()
    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    if not path.is_file() or not sidecar.is_file():
        raise UserError(f"engine not found (or its .json record missing): {path}")
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{sidecar}: unreadable engine record ({exc}); rebuild with `edgeseg build-engine`") from None
    if not isinstance(record, dict):
        raise UserError(f"{sidecar}: the engine record must be a JSON object; rebuild with `edgeseg build-engine`")
    gpu = detect_gpu()
    if record.get("tensorrt") != str(trt.__version__) or record.get("gpu") != asdict(gpu):
        raise UserError(f"{path} was built for TensorRT {record.get('tensorrt')} on {record.get('gpu', {}).get('name')}; "
                        f"this is TensorRT {trt.__version__} on {gpu.name}: run `edgeseg build-engine` again")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise UserError(f"TensorRT could not deserialize {path}; rebuild it with `edgeseg build-engine`")
    return engine

