"""Backends: ONNX Runtime vs scipy, form and provider choice, "auto", and the TensorRT backend's
control flow driven by FAKE `tensorrt`/cuda-python stand-ins (no TensorRT or GPU here; those tests
check edgeseg's calls and buffer handling, not TensorRT itself)."""

from __future__ import annotations

import ctypes
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from edgeseg.errors import UserError
from edgeseg.runtime import backends, trt_backend
from edgeseg.runtime.backends import open_backend, ort_providers
from edgeseg.runtime.bundle import load_bundle
from edgeseg.runtime.trt_backend import TensorRTBackend

WEIGHT = np.random.default_rng(0).normal(size=(3, 2, 3, 3)).astype(np.float32)


def conv_bundle(tmp_path: Path, forms: dict[str, tuple[str, str]] | None = None) -> Path:
    """A 2D conv (2 -> 3 channels, zero padding) bundle; `forms` re-lists its model under other names/backends."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from edgeseg.export.bundle_writer import write_bundle
    from edgeseg.export.third_party import make_bundle

    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["logits"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("image", T.FLOAT, ["N", 2, "H", "W"])],
                              [helper.make_tensor_value_info("logits", T.FLOAT, ["N", 3, "H", "W"])],
                              [numpy_helper.from_array(WEIGHT, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    manifest = make_bundle(tmp_path / "m.onnx", tmp_path / "plain", class_names=["a", "b", "c"], tile=[8, 8])
    if forms is None:
        return tmp_path / "plain"
    base = manifest.forms["float"]
    files = {name: (tmp_path / "plain" / name).read_bytes() for name in manifest.files}
    new_forms = {name: replace(base, backend=backend, precision=precision) for name, (backend, precision) in forms.items()}
    write_bundle(tmp_path / "multi", files, replace(manifest, forms=new_forms))
    return tmp_path / "multi"


def test_onnxruntime_backend_matches_scipy(tmp_path):
    bundle = load_bundle(conv_bundle(tmp_path))
    backend = open_backend(bundle, "onnxruntime", threads=1)
    x = np.random.default_rng(1).normal(size=(3, 2, 8, 8)).astype(np.float32)
    out = backend.run(x)
    expected = np.stack([[sum(ndimage.correlate(b[i], WEIGHT[c, i], mode="constant") for i in range(2))
                          for c in range(3)] for b in x])
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert backend.name == "onnxruntime" and backend.form == "float"
    assert "CPUExecutionProvider" in backend.description and "1 thread(s)" in backend.description


def test_onnxruntime_picks_the_cpu_form_and_tensorrt_the_trt_form(tmp_path, monkeypatch):
    bundle = load_bundle(conv_bundle(tmp_path, {"trt": ("tensorrt", "int8"), "cpu_int8": ("onnxruntime", "int8")}))
    backend = open_backend(bundle, "onnxruntime")
    assert backend.form == "cpu_int8" and "'cpu_int8' (int8)" in backend.description
    chosen = {}

    def fake_open(bundle, *, mc, batch_size, tile):
        chosen.update(form=bundle.manifest.pick_form("tensorrt", mc), batch=batch_size, tile=tile)
        return "trt-backend"

    monkeypatch.setattr(backends, "tensorrt_available", lambda: None)
    monkeypatch.setattr(trt_backend, "open_tensorrt", fake_open)
    assert open_backend(bundle, "auto", batch_size=4) == "trt-backend"
    assert chosen == {"form": "trt", "batch": 4, "tile": [8, 8]}


def test_auto_without_tensorrt_runs_onnxruntime_and_says_why(tmp_path, monkeypatch):
    bundle = load_bundle(conv_bundle(tmp_path))
    monkeypatch.setattr(backends, "tensorrt_available", lambda: "the tensorrt package is not installed")
    backend = open_backend(bundle, "auto")
    assert backend.name == "onnxruntime"
    assert "auto: TensorRT not used: the tensorrt package is not installed" in backend.description


def test_tensorrt_missing_is_one_line_naming_what_to_install(tmp_path, monkeypatch):
    bundle = load_bundle(conv_bundle(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(UserError, match="TensorRT is not available.*pip install") as info:
        open_backend(bundle, "tensorrt")
    assert "\n" not in str(info.value)
    assert backends.tensorrt_available() is not None


def test_bad_backend_name_and_batch(tmp_path):
    bundle = load_bundle(conv_bundle(tmp_path))
    with pytest.raises(UserError, match="did you mean 'onnxruntime'"):
        open_backend(bundle, "onnxrutime")
    with pytest.raises(UserError, match="--batch-size"):
        open_backend(bundle, "onnxruntime", batch_size=0)


def test_provider_preference():
    assert ort_providers(["CPUExecutionProvider", "CUDAExecutionProvider"]) == ["CUDAExecutionProvider",
                                                                               "CPUExecutionProvider"]
    assert ort_providers(["CPUExecutionProvider", "TensorrtExecutionProvider", "CUDAExecutionProvider"])[0] == \
        "TensorrtExecutionProvider"
    assert ort_providers(["AzureExecutionProvider"]) == ["CPUExecutionProvider"]


# ------------------------------------------------------------------------------------- TensorRT, faked


def fake_cuda():
    """cuda-python runtime stand-in: device memory is a dict of bytearrays keyed by fake pointers."""
    memory: dict[int, bytearray] = {}
    calls: dict = {"freed": [], "streams_destroyed": 0}
    kinds = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def cudaMalloc(size):
        ptr = 0x1000 * (len(memory) + 1)
        memory[ptr] = bytearray(size)
        return 0, ptr

    def cudaMemcpy(dst, src, count, kind):
        if kind == kinds.cudaMemcpyHostToDevice:
            memory[dst][:count] = ctypes.string_at(src, count)
        else:
            ctypes.memmove(dst, bytes(memory[src][:count]), count)
        return (0,)

    module = types.SimpleNamespace(
        memory=memory, calls=calls, cudaMemcpyKind=kinds, cudaMalloc=cudaMalloc, cudaMemcpy=cudaMemcpy,
        cudaStreamCreate=lambda: (0, 77), cudaStreamSynchronize=lambda s: (0,),
        cudaFree=lambda p: calls["freed"].append(p) or (0,),
        cudaStreamDestroy=lambda s: calls.__setitem__("streams_destroyed", calls["streams_destroyed"] + 1) or (0,))
    return module


def fake_trt_engine(cuda, shapes, out_channels=3, dtype="float"):
    """An engine whose 'kernel' computes out[:, k] = (k + 1) * image[:, 0] + mask[:, 0] from device memory."""
    trt = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
                                DataType=types.SimpleNamespace(FLOAT="float", HALF="half"))
    names = [*shapes, "logits"]
    log: dict = {"shapes": {}, "addresses": {}, "executions": []}

    class Context:
        def set_input_shape(self, name, shape):
            log["shapes"][name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            image = log["shapes"]["image"]
            return (image[0], out_channels, *image[2:])

        def set_tensor_address(self, name, ptr):
            log["addresses"][name] = ptr
            return True

        def execute_async_v3(self, stream_handle):
            log["executions"].append(stream_handle)
            read = {n: np.frombuffer(bytes(cuda.memory[log["addresses"][n]]), np.float32).reshape(s)
                    for n, s in log["shapes"].items()}
            out = np.concatenate([(k + 1) * read["image"][:, :1] for k in range(out_channels)], axis=1)
            if "mc_mask_0" in read:
                out = out + read["mc_mask_0"][:, :1]
            cuda.memory[log["addresses"]["logits"]][:] = out.astype(np.float32).tobytes()
            return True

    engine = types.SimpleNamespace(
        num_io_tensors=len(names), get_tensor_name=lambda i: names[i],
        get_tensor_mode=lambda n: trt.TensorIOMode.OUTPUT if n == "logits" else trt.TensorIOMode.INPUT,
        get_tensor_dtype=lambda n: trt.DataType.FLOAT if dtype == "float" else trt.DataType.HALF,
        create_execution_context=Context)
    return trt, engine, log


def make_trt(cuda, shapes, **kwargs):
    trt, engine, log = fake_trt_engine(cuda, shapes, **kwargs)
    backend = TensorRTBackend(engine, form="trt", input_name="image", output_name="logits", shapes=shapes,
                              description="fake", trt=trt, cudart=cuda)
    return backend, log


def test_tensorrt_backend_chunks_pads_and_crops_batches():
    cuda = fake_cuda()
    shapes = {"image": (2, 1, 4, 4), "mc_mask_0": (2, 5, 1, 1)}
    backend, log = make_trt(cuda, shapes)
    assert log["shapes"] == shapes and set(log["addresses"]) == {"image", "mc_mask_0", "logits"}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 1, 4, 4)).astype(np.float32)
    mask = rng.integers(0, 2, size=(5, 5, 1, 1)).astype(np.float32)
    out = backend.run(x, {"mc_mask_0": mask})
    expected = np.concatenate([(k + 1) * x for k in range(3)], axis=1) + mask[:, :1]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert log["executions"] == [77, 77, 77]  # 2 + 2 + 1 (padded) tiles, on the created (non-default) stream
    backend.close()
    assert sorted(cuda.calls["freed"]) == sorted(log["addresses"].values()) and cuda.calls["streams_destroyed"] == 1
    with pytest.raises(RuntimeError, match="closed"):
        backend.run(x)


def test_tensorrt_backend_refuses_wrong_tiles_and_dtypes():
    cuda = fake_cuda()
    backend, _ = make_trt(cuda, {"image": (1, 1, 4, 4)})
    with pytest.raises(UserError, match="does not fit the TensorRT engine"):
        backend.run(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(UserError, match="expected float32"):
        make_trt(fake_cuda(), {"image": (1, 1, 4, 4)}, dtype="half")


def test_open_tensorrt_builds_or_reuses_the_engine_for_batch_and_tile(tmp_path, monkeypatch):
    from edgeseg.runtime.trt_build import BuiltEngine, GpuInfo

    bundle = load_bundle(conv_bundle(tmp_path, {"trt": ("tensorrt", "int8"), "cpu_int8": ("onnxruntime", "int8")}))
    cuda = fake_cuda()
    trt, engine, log = fake_trt_engine(cuda, {"image": (4, 2, 16, 8)})
    built = {}

    def fake_build(path, *, form, mc, batch, tile):
        built.update(path=Path(path), form=form, mc=mc, batch=batch, tile=tile)
        return BuiltEngine(path=tmp_path / "x.engine", cached=False, form=form, trt_version="10.3.0",
                           gpu=GpuInfo("Orin", "8.7"))

    monkeypatch.setattr(trt_backend, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(trt_backend, "require_cudart", lambda: cuda)
    monkeypatch.setattr(trt_backend, "build_engine", fake_build)
    monkeypatch.setattr(trt_backend, "load_engine", lambda path: engine)
    backend = trt_backend.open_tensorrt(bundle, batch_size=4, tile=[16, 8])
    assert built == {"path": bundle.path, "form": "trt", "mc": False, "batch": 4, "tile": [16, 8]}
    assert log["shapes"] == {"image": (4, 2, 16, 8)}
    assert "tensorrt 10.3.0: form 'trt' (int8) on Orin, engine built now" in backend.description
    backend.close()
