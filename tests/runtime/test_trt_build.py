"""Engine building: planning and cache naming, and the builder's control flow driven by a FAKE `tensorrt`.

Only `test_real_tensorrt_builds_and_loads_an_engine` touches TensorRT, and it is skipped wherever
TensorRT or a GPU is missing (every build machine here). The fake-module tests check edgeseg's
calls and error handling; they say nothing about whether TensorRT accepts the model.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from edgeseg.errors import UserError
from edgeseg.runtime import trt_build
from edgeseg.runtime.bundle import load_bundle
from edgeseg.runtime.trt_build import GpuInfo, build_engine, engine_file_name, plan_profile, require_tensorrt

ORIN = GpuInfo(name="Orin (nvgpu)", compute_capability="8.7")


@pytest.fixture
def bundle_path(tmp_path) -> Path:
    """A float 2D bundle (conv 4 -> 3 channels) made with `edgeseg bundle`'s code path; tile 8x8, multiple 4."""
    from edgeseg.export.third_party import make_bundle

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 4, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["logits"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("image", T.FLOAT, ["N", 4, "H", "W"])],
                              [helper.make_tensor_value_info("logits", T.FLOAT, ["N", 3, "H", "W"])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    make_bundle(tmp_path / "m.onnx", tmp_path / "bundle", class_names=["a", "b", "c"], tile=[8, 8],
                min_input_multiple=4)
    return tmp_path / "bundle"


def _fake_tensorrt(version: str = "10.3.0.30", strongly_typed: bool = True, parse_ok: bool = True,
                   build_ok: bool = True) -> types.ModuleType:
    """A stand-in exposing the documented API surface build_engine uses; records every call."""
    calls: dict = {"set_shape": [], "parsed": None, "flags": None, "pool": None}

    class Logger:
        WARNING = "warning"

        def __init__(self, severity):
            calls["logger"] = severity

    class Error:
        def desc(self):
            return "Unsupported ONNX data type: UINT8 (2)"

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 2

        def parse(self, model):
            calls["parsed"] = bytes(model)
            return parse_ok

        def get_error(self, i):
            return Error()

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls["set_shape"].append((name, lo.shape, opt.shape, hi.shape))

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["pool"] = (pool, size)

        def add_optimization_profile(self, profile):
            calls["profiles"] = calls.get("profiles", 0) + 1

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls["flags"] = flags
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"ENGINE" if build_ok else None

    class Dims:
        def __init__(self, shape):
            self.shape = tuple(shape)

    flags = types.SimpleNamespace(STRONGLY_TYPED=1) if strongly_typed else types.SimpleNamespace()
    module = types.ModuleType("tensorrt")
    module.__dict__.update(__version__=version, Logger=Logger, Builder=Builder, OnnxParser=Parser, Dims=Dims,
                           NetworkDefinitionCreationFlag=flags,
                           MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"), calls=calls)
    return module


@pytest.fixture
def fake_trt(monkeypatch):
    def install(**kwargs):
        module = _fake_tensorrt(**kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        monkeypatch.setattr(trt_build, "detect_gpu", lambda: ORIN)
        return module

    return install


def test_missing_tensorrt_is_one_line_naming_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(UserError) as info:
        require_tensorrt()
    message = str(info.value)
    assert "\n" not in message and "pip install 'edgeseg[trt]'" in message and "JetPack" in message
    assert "built on the target device" in message


def test_a_stub_only_tensorrt_package_counts_as_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # e.g. tensorrt-stubs' .pyi folder
    with pytest.raises(UserError, match="not the TensorRT runtime"):
        require_tensorrt()


def test_no_gpu_is_a_clear_error(monkeypatch):
    for probe in ("_gpu_from_cuda_python", "_gpu_from_nvidia_smi", "_gpu_from_jetson"):
        monkeypatch.setattr(trt_build, probe, lambda: None)
    with pytest.raises(UserError, match="no NVIDIA GPU found.*pip install"):
        trt_build.detect_gpu()


def test_profile_is_the_fixed_tile_and_batch(bundle_path):
    m = load_bundle(bundle_path).manifest
    assert plan_profile(m, "float", 4, [8, 12]) == {"image": ((4, 4, 8, 12),) * 3}
    with pytest.raises(UserError, match="multiples of 4"):
        plan_profile(m, "float", 1, [8, 10])
    with pytest.raises(UserError, match="needs 2 values"):
        plan_profile(m, "float", 1, [8, 8, 8])


def test_engine_name_carries_what_it_was_built_for():
    name = engine_file_name("trt", "ab" * 32, 2, [48, 64, 48], "10.3.0.30", ORIN)
    assert name == "trt-abababababab-b2-48x64x48-trt10.3.0.30-orin-nvgpu-sm87.engine"


def test_build_engine_control_flow_with_a_fake_tensorrt(fake_trt, bundle_path):
    trt = fake_trt()
    built = build_engine(bundle_path, batch=2, workspace_mib=256)
    calls = trt.calls
    assert calls["flags"] == 1 << 1  # 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert calls["parsed"] == load_bundle(bundle_path).model_bytes("float")  # self-contained, INT8-expanded ONNX
    assert calls["pool"] == ("workspace", 256 * 2**20) and calls["profiles"] == 1
    assert calls["set_shape"] == [("image", (2, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8))]
    assert built.path.parent == bundle_path / "engines" and built.path.read_bytes() == b"ENGINE"
    assert "trt10.3.0.30" in built.path.name and "sm87" in built.path.name and not built.cached
    record = json.loads(built.path.with_name(built.path.name + ".json").read_text())
    assert record["tensorrt"] == "10.3.0.30" and record["batch"] == 2 and record["form"] == "float"
    assert build_engine(bundle_path, batch=2).cached  # same ONNX, shapes, TensorRT and GPU: reused
    assert load_bundle(bundle_path)  # engines/ does not disturb the hash check


def test_tensorrt_11_style_api_without_the_strongly_typed_flag(fake_trt, bundle_path):
    trt = fake_trt(version="11.4.0.106", strongly_typed=False)
    built = build_engine(bundle_path)
    assert trt.calls["flags"] == 0 and "trt11.4.0.106" in built.path.name


def test_parser_and_builder_failures_are_user_errors(fake_trt, bundle_path):
    fake_trt(parse_ok=False)
    with pytest.raises(UserError, match=r"parser rejected the model: Unsupported ONNX data type: UINT8 \(2\) \(\+1 more\)"):
        build_engine(bundle_path)
    fake_trt(build_ok=False)
    with pytest.raises(UserError, match="could not build an engine"):
        build_engine(bundle_path)


def _real_tensorrt_and_gpu() -> str | None:
    try:
        trt = require_tensorrt()
        trt_build.detect_gpu()
    except UserError as exc:
        return str(exc)
    return None if hasattr(trt, "Runtime") else "incomplete tensorrt module"


@pytest.mark.gpu
def test_real_tensorrt_builds_and_loads_an_engine(bundle_path):
    reason = _real_tensorrt_and_gpu()
    if reason is not None:
        pytest.skip(f"needs TensorRT and an NVIDIA GPU: {reason}")
    built = build_engine(bundle_path)
    engine = trt_build.load_engine(built.path)
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    assert names == ["image", "logits"]


@pytest.mark.parametrize("record, message", [("{not json", "unreadable engine record"),
                                             ("[1, 2]", "must be a JSON object")])
def test_a_damaged_engine_record_is_one_clear_error(fake_trt, bundle_path, record, message):
    # control flow only (fake tensorrt module): the record beside the engine is checked before TensorRT is used
    fake_trt()
    built = build_engine(bundle_path, batch=1)
    built.path.with_name(built.path.name + ".json").write_text(record)
    with pytest.raises(UserError, match=message):
        trt_build.load_engine(built.path)
