"""Shared test fixtures: the real datasets beside the repo, skipped cleanly when absent."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (the CLI does the same): on a loaded 2-core
# machine spinning made the torch tests 3-6x slower. Set before any test imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("EDGESEG_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared dataset {name} not found at {path} (set EDGESEG_SHARED_DATA)")
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def intensity_detector_bundle(tmp_path_factory) -> Path:
    """A third-party bundle of a one-conv 3D model: class 1 (named "anterior") for bright voxels, class 2 for dark.

    The centre-tap kernel makes it flip-equivariant (TTA leaves its labels unchanged) and its Dice on
    real images neither 0 nor 1: a cheap, predictable model for runtime and report tests.
    """
    import numpy as np

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from edgeseg.export.third_party import make_bundle

    root = tmp_path_factory.mktemp("detector")
    weight = np.zeros((3, 1, 3, 3, 3), np.float32)
    weight[1, 0, 1, 1, 1], weight[2, 0, 1, 1, 1] = 2.0, -2.0
    bias = numpy_helper.from_array(np.array([2.0, 0.0, 0.0], np.float32), "b")
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w", "b"], ["logits"], pads=[1] * 6)], "g",
                              [helper.make_tensor_value_info("image", T.FLOAT, ["N", 1, "D", "H", "W"])],
                              [helper.make_tensor_value_info("logits", T.FLOAT, ["N", 3, "D", "H", "W"])],
                              [numpy_helper.from_array(weight, "w"), bias])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(root / "m.onnx"))
    make_bundle(root / "m.onnx", root / "bundle", class_names=["background", "anterior", "posterior"], tile=[16, 16, 16])
    return root / "bundle"


class ScriptedBackend:
    """A runtime backend returning fixed model outputs (C, *T), one pattern per call, cycling; it ignores
    its input (use flip-invariant patterns under TTA)."""

    name = "scripted"
    form = "float"
    description = "scripted"

    def __init__(self, patterns):
        self.patterns = patterns
        self.calls = 0

    def run(self, image, masks=None):
        import numpy as np

        out = self.patterns[self.calls % len(self.patterns)]
        self.calls += 1
        return np.repeat(out[None], len(image), axis=0)

    def close(self):
        pass


@pytest.fixture
def scripted_backend():
    """The ScriptedBackend class (test modules cannot import conftest under --import-mode=importlib)."""
    return ScriptedBackend
