"""mypy checks our TensorRT code against the `tensorrt-stubs` package (TensorRT cannot be installed here).

The newest stubs release ships no .pyi files, so this uses 10.8.0.43.1 and patches its two
syntax errors (docs/bundle.md). Skips with the reason when the stubs cannot be downloaded.
"""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STUBS = "tensorrt-stubs==10.8.0.43.1"
TRT_MODULES = ["edgeseg/runtime/trt_build.py"] + (
    ["edgeseg/runtime/trt_backend.py"] if (REPO / "edgeseg/runtime/trt_backend.py").exists() else [])


@pytest.fixture(scope="module")
def stub_config(tmp_path_factory):
    pytest.importorskip("mypy")
    root = tmp_path_factory.mktemp("trtstubs")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", STUBS, "-d", str(root)],
                         capture_output=True, text=True, timeout=180)
    wheels = list(root.glob("tensorrt_stubs-*.whl"))
    if got.returncode != 0 or not wheels:
        pytest.skip(f"could not download {STUBS}: {got.stderr.strip().splitlines()[-1:] }")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extractall(root / "stubs")
    pyi = root / "stubs" / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"([(,] *)in: ", r"\1in_: ", pyi.read_text())
    text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = 0)")
    pyi.write_text(text)
    config = root / "mypy.ini"
    config.write_text(f"[mypy]\nmypy_path = {root / 'stubs'}\nignore_missing_imports = True\n"
                      "[mypy-tensorrt_bindings.*,tensorrt.*]\nignore_errors = True\n")
    return config


def _mypy(config, *paths):
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), "--no-incremental",
                           *map(str, paths)], capture_output=True, text=True, cwd=REPO, timeout=600)


def test_tensorrt_code_type_checks_against_the_stubs(stub_config):
    result = _mypy(stub_config, *TRT_MODULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_stubs_catch_api_mistakes(stub_config, tmp_path):
    """The check can fail: a misspelt TensorRT call is reported."""
    bad = tmp_path / "bad_trt.py"
    bad.write_text("import tensorrt as trt\n\n\ndef f(logger: trt.Logger) -> None:\n"
                   "    builder = trt.Builder(logger)\n    builder.create_netwrk(0)\n")
    result = _mypy(stub_config, bad)
    assert result.returncode != 0 and "create_netwrk" in result.stdout, result.stdout
