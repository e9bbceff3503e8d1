"""The device runtime runs without torch: in a subprocess of this environment (torch must stay
unloaded) and in a fresh virtual environment holding only the base install (torch absent).

Both segment a real hippocampus volume with an exported U-Net bundle (MC dropout form included),
made beforehand here in the development environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "brevitas", "monai", "onnx", "onnxscript", "onnxoptimizer")
CASE = "hippocampus_001.nii.gz"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    from edgeseg.config import ModelConfig
    from edgeseg.export.bundle_writer import write_bundle
    from edgeseg.export.run_export import BundleInfo, export_model
    from edgeseg.nets import build_from_config

    torch.manual_seed(0)
    model = build_from_config(ModelConfig(depth=2, base_width=4, dropout=0.2), spatial_dims=3, in_channels=1,
                              out_channels=3).eval()
    with torch.no_grad():
        model.head.weight.mul_(40.0)  # well-separated classes, so labels are stable across onnxruntime versions
    info = BundleInfo(spatial_dims=3, in_channels=1, class_names=["background", "anterior", "posterior"],
                      tile_size=[16, 16, 16], preprocess={"reorient": True, "target_spacing": None,
                                                          "normalization": "zscore", "clip_percentiles": [0.5, 99.5],
                                                          "label_map": {}})
    result = export_model(model, info)
    out = tmp_path_factory.mktemp("torchfree") / "bundle.zip"
    write_bundle(out, result.files, result.manifest)
    return out


@pytest.fixture
def volume(shared_data) -> Path:
    path = shared_data / "msd_hippocampus" / "images" / CASE
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def _segment_code(bundle: Path, volume: Path, out: Path) -> str:
    return (
        "import sys\n"
        "import edgeseg.runtime\n"
        "assert 'onnxruntime' not in sys.modules, 'import edgeseg.runtime must stay lazy'\n"
        "import edgeseg.runtime.bundle, edgeseg.runtime.onnx_wire, edgeseg.runtime.tiling, edgeseg.runtime.tta\n"
        "import edgeseg.runtime.uncertainty, edgeseg.runtime.backends, edgeseg.runtime.trt_backend\n"
        "import edgeseg.runtime.trt_build, edgeseg.runtime.evaluate_bundle, edgeseg.cli.segment_cmd\n"
        "from edgeseg.runtime import segment_files\n"
        f"segment_files({str(bundle)!r}, [{str(volume)!r}], {str(out)!r}, tta=True, mc_passes=2, uncertainty=True,\n"
        "              probabilities=True, backend='onnxruntime')\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print('LOADED:' + ','.join(loaded))\n"
    )


def test_runtime_segments_without_loading_torch(bundle, volume, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", _segment_code(bundle, volume, out)], check=False, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED:\n" in result.stdout, f"heavy modules loaded: {result.stdout.strip()[-300:]}"
    assert (out / CASE).is_file() and (out / "hippocampus_001_uncertainty.json").is_file()


def test_base_install_in_a_fresh_venv_segments_with_the_bundle(bundle, volume, tmp_path):
    """pip installs the project (base dependencies only, from this machine's configured index) into a new venv."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(REPO / "edgeseg", src / "edgeseg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    started = time.perf_counter()
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(src.resolve())], check=False,
                             capture_output=True,
                             text=True, timeout=900, env=env)
    seconds = time.perf_counter() - started
    if install.returncode != 0:
        text = install.stdout + install.stderr
        unreachable = ("No matching distribution", "Could not find a version", "Failed to establish",
                       "Temporary failure in name resolution", "Network is unreachable")
        if any(u in text for u in unreachable):
            pytest.skip(f"the base dependencies cannot be installed here (no index reachable): {text.strip()[-300:]}")
        pytest.fail(f"pip install of the project failed:\n{text[-3000:]}")
    print(f"base install took {seconds:.0f} s")
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert probe.stdout.strip() == "None", "torch is installed in the base environment"
    out = tmp_path / "venv_out"
    run = subprocess.run([str(python), "-c", _segment_code(bundle, volume, out)], check=False, capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "LOADED:\n" in run.stdout
    # the same result as in this environment (onnxruntime versions may differ: float tolerance)
    from edgeseg.runtime.pipeline import segment_files

    here = tmp_path / "here"
    segment_files(bundle, [volume], here, tta=True, mc_passes=2, uncertainty=True, probabilities=True,
                  backend="onnxruntime")
    name = "hippocampus_001_probabilities.nii.gz"
    np.testing.assert_allclose(np.asarray(nib.load(str(out / name)).dataobj),
                               np.asarray(nib.load(str(here / name)).dataobj), atol=1e-4)
    labels_venv = np.asarray(nib.load(str(out / CASE)).dataobj)
    labels_here = np.asarray(nib.load(str(here / CASE)).dataobj)
    assert (labels_venv == labels_here).mean() > 0.999
